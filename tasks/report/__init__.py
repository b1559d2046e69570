"""Reports built from a run folder alone: Markdown, JSON, one self-contained HTML page."""

from tasks.core.lazy import lazy_exports

_EXPORTS = {
    "write_report": "run_report",  # report.md / report.json / report.html of a run folder
    "write_card": "card",  # README.md model card of a stage's model folder
    "SAMPLES_FILE": "run_report",
    "quality_figures": "page",
    "retention_columns": "page",
    "retention_rows": "page",
    "table_records": "page",
    "FIGURE_TITLES": "page",
    "render_html": "html",
    "pm": "format",
    "fmt": "format",
    "stage_retention": "retention",  # stage score / baseline score, with standard errors
    "per_doc": "retention",  # one task's {doc_id: score} from a per-doc samples file
    "paired_text": "retention",  # that difference as '+3.5 ± 2.1' points for a table cell
    "paired_stats": "retention",  # paired difference of two models on the docs both scored
    "loss_curve": "plots",
}
_MODULES = ("plots", "browser", "devtools")  # PNG plots; headless Chromium: files, live apps
__all__ = sorted([*_EXPORTS, *_MODULES])
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _MODULES)
