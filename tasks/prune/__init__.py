"""Structured pruning: cut layers, attention heads, FFN neurons or hidden width (see README.md)."""

from tasks.core.lazy import lazy_exports

_EXPORTS = {
    "prune_stage": "stage",  # the stage: (ModelRef, PruneConfig, StageContext) -> StageResult
    "prune_model": "stage",  # prune a loaded model in memory (benchmarks, search)
    "prune_scan": "scan",  # importance of every unit, to choose targets (`pkdq prune-scan`)
    "plan_prune": "plan",  # kept sizes per axis from a config and the model's dimensions
    "PrunePlan": "plan",
    "UnsupportedModelError": "units",
    "Candidate": "space",  # a concrete shape under a budget target, with its sizes
    "SearchSpaceError": "space",
    "enumerate_candidates": "space",  # every shape meeting prune.target (config.json only)
    "spread": "space",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
