"""Prefect artifacts of a report: the retention table and the quality plots, in the Prefect UI.

Kept apart from the flows so the compress and compare flows publish the same artifacts from the
same collected report data (report.json) and figures (`tasks.report.page.quality_figures`).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any
from uuid import UUID

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.report import FIGURE_TITLES, retention_columns, retention_rows, table_records


def figures_markdown(pngs: Mapping[str, bytes]) -> str:
    """Markdown with each PNG inline as a data: URI (the UI cannot read the run folder)."""
    blocks = []
    for key, png in pngs.items():
        title = FIGURE_TITLES.get(key, key)
        data = base64.b64encode(png).decode("ascii")
        blocks.append(f"### {title}\n\n![{title}](data:image/png;base64,{data})\n")
    return "\n".join(blocks)


def publish_report_artifacts(data: dict[str, Any], pngs: Mapping[str, bytes],
                             key: str = "pkdq", name: str = "",
                             table: list[dict[str, str]] | None = None) -> dict[str, UUID]:
    """A table artifact with the retention table and a markdown artifact with the plots.

    `data` is one run's collected report data (report.json); `pngs` maps a figure key ("ppl",
    "accuracy", "size", or any title) to PNG bytes. `table` replaces the run's retention table
    (a comparison passes the rows of all its orderings, via `table_records`). Artifact keys are
    `<key>-retention-table` and `<key>-quality-plots` (lowercase, digits, dashes: Prefect's rule).
    """
    label = name or data["run"]["run_id"]
    if table is None:
        table = table_records(retention_columns(), retention_rows(data))
    return {
        "table": create_table_artifact(
            key=f"{key}-retention-table", table=table,
            description=f"pkdq retention per benchmark and stage (± standard error), {label}"),
        "plots": create_markdown_artifact(
            key=f"{key}-quality-plots", markdown=figures_markdown(pngs),
            description=f"pkdq quality per stage, {label}"),
    }
