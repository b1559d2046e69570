"""Knowledge-distillation recovery: the student learns the teacher's logits (see README.md)."""

from tasks.core.lazy import lazy_exports

_EXPORTS = {
    "distill_stage": "stage",  # the stage in this process: (ModelRef, DistillConfig, ctx)
    "distill_runner": "launch",  # the stage as the resources ask: in-process or under torchrun
    "VocabMismatchError": "teacher",
    "heldout_score": "score",  # any finished model vs a teacher on the held-out slice (sweeps)
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
