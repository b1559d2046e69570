"""What each stage trained or calibrated on, and how much of it overlaps the evaluation sets.

Built from the stage metrics alone: `data` (kind, documents, tokens available and used, epochs;
chat: rows and loss tokens) and `contamination` (per evaluation set, the documents sharing a
13-gram with the training text; `tasks.core.contamination`). A score on an evaluation set that
the training text overlaps is a score on training text, so the report says it next to the scores.
"""

from __future__ import annotations

from typing import Any

DATA_COLUMNS = ["stage", "data", "documents", "tokens available", "tokens used", "epochs",
                "overlapping evaluation documents"]
DATA_NOTE = ("Overlap: evaluation documents that share a word 13-gram with the stage's training "
             "or calibration text, per evaluation set (GPT-3 appendix C); examples in "
             "metrics.json → contamination.")


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "–"


def _overlap(report: dict[str, Any] | None) -> str:
    if not report:
        return "–"
    if "unchecked" in report:
        return f"not measured ({report['unchecked'][:80]})"
    parts = [f"{name} {row['overlapping_documents']}/{row['documents']}"
             for name, row in (report.get("sets") or {}).items()]
    allowed = " (allowed)" if report.get("allow_overlap") and any(
        row["fraction"] > report.get("threshold", 1) for row in report["sets"].values()) else ""
    return ", ".join(parts) + allowed


def data_rows(data: dict[str, Any]) -> list[list[str]]:
    """One row per stage that read training text (from its metrics)."""
    rows = []
    for entry in data["stages"]:
        metrics = entry.get("metrics") or {}
        used = metrics.get("data")
        if not used and not metrics.get("contamination"):
            continue
        used = used or {}
        kind = used.get("kind", "?")
        label = f"{kind} {used['source']}" if kind == "builtin" else kind
        if "fingerprint" in used:
            label += f" ({used['fingerprint'][:8]})"
        if kind == "chat":
            label += f", loss on {used.get('loss_on', '?')} ({_count(used.get('loss_tokens'))} " \
                     "loss tokens)"
        rows.append([entry["stage"], label,
                     _count(used.get("documents", used.get("conversations"))),
                     _count(used.get("tokens_available")), _count(used.get("tokens_used")),
                     str(used.get("epochs", "–")), _overlap(metrics.get("contamination"))])
    return rows


def data_markdown(data: dict[str, Any]) -> list[str]:
    """The Markdown section (empty when no stage recorded its data)."""
    rows = data_rows(data)
    if not rows:
        return []
    return ["## Training data and contamination", "", DATA_NOTE, "",
            "| " + " | ".join(DATA_COLUMNS) + " |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- |",
            *("| " + " | ".join(row) + " |" for row in rows), ""]
