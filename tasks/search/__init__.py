"""Budget in, best pruned shape out: candidates under a target, ranked by a one-shot proxy,
finalists by a short KD (`pkdq search`; see README.md)."""

from tasks.core.lazy import lazy_exports

_EXPORTS = {
    "SearchPlan": "plan",
    "search_plan": "plan",
    "prune_target_index": "plan",
    "with_prune": "plan",
    "write_search_report": "report",
    "search_rows": "report",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
