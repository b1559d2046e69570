"""A grid of recipe variants run with shared prefixes and selected on held-out KL (`pkdq sweep`;
see README.md)."""

from tasks.core.lazy import lazy_exports

_EXPORTS = {
    "GridAxis": "grid",
    "Variant": "grid",
    "parse_grid": "grid",
    "expand": "grid",
    "scaled_tokens": "grid",
    "SWEEP_FILE": "units",
    "SweepPlan": "plan",
    "sweep_plan": "plan",
    "init_sweep": "units",
    "mark_sweep": "units",
    "run_variant_step": "units",
    "score_config": "units",
    "score_unit": "units",
    "variant_ordering": "units",
    "rank": "report",
    "winner_reason": "report",
    "write_sweep_report": "report",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
