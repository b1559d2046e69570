"""Prefect flows: thin wiring of `tasks` into runs, caches and artifacts."""
