"""pkdq's work: one module per stage plus the model store. Callable without Prefect."""
