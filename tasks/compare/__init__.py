"""Orderings compared side by side under equal budgets (`pkdq compare`; see README.md)."""

from tasks.core.lazy import lazy_exports

_EXPORTS = {
    "plan_ordering": "orderings",
    "parse_orders": "orderings",
    "shared_prefixes": "orderings",
    "KIND_LETTER": "orderings",
    "LETTERS": "orderings",
    "Ordering": "orderings",
    "COMPARE_FILE": "folder",
    "baseline_folder": "folder",
    "evaluate_folder": "folder",
    "init_compare": "folder",
    "mark_compare": "folder",
    "run_ordering_step": "folder",
    "unit_folder": "folder",
    "summary_rows": "report",
    "write_compare_report": "report",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
