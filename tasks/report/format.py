"""Number formats and wording shared by the markdown and HTML reports, so both read the same."""

from __future__ import annotations

from typing import Any

Cell = str | dict[str, Any]  # a table cell: text, or {"text", "json", "value"} (html.py)
DASH = "–"


def json_path(prefix: str, *parts: Any) -> str:
    """Dotted report.json path; list indices are plain parts ("stages.2.eval.params")."""
    return ".".join(str(p) for p in (prefix, *parts) if str(p) != "")


def num(path: str, value: Any, text: str) -> Cell:
    """A numeric cell tied to report.json, or a dash when the number is missing."""
    if value is None:
        return DASH
    return {"text": text, "json": path, "value": float(value)}


def cell_text(cell: Cell) -> str:
    """What a cell shows, for Markdown."""
    return str(cell["text"]) if isinstance(cell, dict) else str(cell)


RETENTION_NOTE = (
    "Score ± standard error; retention = stage / baseline; chance-normalised = "
    "(s − chance) / (b − chance); paired Δ = s − b over the same doc ids, its error from "
    "the per-doc differences.")

def scores_note(stages: list[dict[str, Any]]) -> str:
    """Which numbers are which: the activations every score was computed with and, when a
    quantized stage was also scored as served, what those rows are."""
    dtypes = sorted({(e.get("eval") or {}).get("activations_dtype") or "float32"
                     for e in stages if e.get("eval")}) or ["float32"]
    served = [e for e in stages if (e.get("eval") or {}).get("served")]
    note = (f"Scores are computed with {' / '.join(dtypes)} activations"
            f"{' (quantized layers included)' if served else ''}, like-for-like with the "
            "baseline.")
    if served:
        note += (f" Rows marked \"{served_label(served[0])}\" score the same docs with the "
                 "quantized model loaded the way a user's runtime loads it (GPTQModel's "
                 "default), which is what the model delivers when deployed.")
    shipped = [e for e in stages if (e.get("eval") or {}).get("gguf")]
    if shipped:
        note += (f" Rows marked \"{gguf_label(shipped[0])}\" score the stage's GGUF, the file "
                 "a llama.cpp user ships: its own weights (embedding type included) in fp32, "
                 "its bytes, and its WikiText-2 perplexity in llama.cpp in brackets.")
    return note


SIZE_NOTE = (
    "Size ratios: against the fp32 baseline folder pkdq evaluates, and against the baseline "
    "in bf16 (its parameters at 2 bytes each: what a team would otherwise ship).")


def pm(value: float | None, err: float | None, pct: bool = False) -> str:
    """value ± err, as a percentage for scores or to 3 decimals for ratios; – when missing."""
    if value is None:
        return "–"
    scale, suffix = (100.0, "%") if pct else (1.0, "")
    if err is None:
        return f"{value * scale:.1f}{suffix}" if pct else f"{value:.3f}"
    return (f"{value * scale:.1f} ± {err * scale:.1f}{suffix}" if pct
            else f"{value:.3f} ± {err:.3f}")


def fmt(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "–"


def short_stage(folder: str) -> str:
    """"02-distill" -> "distill": stage folders are numbered, plot labels need not be."""
    head, _, rest = folder.partition("-")
    return rest if head.isdigit() and rest else folder


def gguf_label(entry: dict[str, Any]) -> str:
    """"as GGUF (q4_0, embedding q4_0)": the rows of a stage's GGUF in every table."""
    return ((entry.get("eval") or {}).get("gguf") or {}).get("label", "as GGUF")


def extra_retentions(entry: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(key, label, retention) of a stage's other scorings of the same docs: as served, and
    as its GGUF; the renderers list them under the stage's own rows."""
    out = []
    for key, label in (("retention_served", served_label), ("retention_gguf", gguf_label)):
        if entry.get(key):
            out.append((key, label(entry), entry[key]))
    return out


def served_label(entry: dict[str, Any]) -> str:
    """"as served (bfloat16)": how a stage's as-served rows are told apart in every table."""
    dtype = ((entry.get("eval") or {}).get("served") or {}).get("dtype", "runtime default")
    return f"as served ({dtype})"
