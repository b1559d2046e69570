"""A model folder's speed where CPU users deploy it: exported to GGUF by pkdq's own exporter
(`export_gguf`) and timed in llama.cpp (`tasks.core.llama_cpp.llama_cpp_speed`).

One function for a run's llama.cpp speed unit (`tasks.pipeline.llama_cpp_unit`) and the
llama.cpp bench table (`bench/llama_cpp_table.py`), so both time the same way. Each row says how
the weights got onto the GGUF type: a GPTQ grid the type holds (bits 4 / 8, sym, group 32, no
act-order) is written code for code ("exact"); any other GPTQ grid is re-quantized onto
llama.cpp's blocks ("re-gridded"); a float model is quantized from its float weights.
An architecture (or tokenizer) the exporter cannot write is one line (`refusal`), not a failure.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from tasks.core.common import GGUF_FILE, one_line
from tasks.core.llama_cpp import LlamaCppError, llama_cpp_speed
from tasks.core.model_store import is_quantized
from tasks.quantize.gguf_export import GgufExportError, export_gguf, preflight


def grid_label(written: dict[str, Any], quantized: bool, qtype: str) -> str:
    """One word on how the weights reached `qtype`: exact / re-gridded / grid-f16 / from-float."""
    if written.get("exact_grid"):
        return "exact"
    if quantized:
        return "grid-f16" if qtype == "f16" else "re-gridded"
    return "from-float"


def gguf_speed_row(model_path: Path, qtype: str, gguf_file: Path, prompt_tokens: int,
                   decode_tokens: int, threads: int, repeats: int,
                   keep: bool = False, embedding: str | None = None) -> dict[str, Any]:
    """Export `model_path` to `gguf_file` as `qtype`, time it in llama.cpp, and delete the file
    unless `keep` (a 135M model's f16 GGUF is 270 MB; a run measures several per stage).
    `embedding` is the embedding/output type (`export_gguf`'s default when None).

    Raises GgufExportError when the exporter refuses, LlamaCppError when llama.cpp fails.
    """
    gguf_file = Path(gguf_file)
    try:
        exported = export_for_timing(model_path, qtype, gguf_file, embedding)
        start = time.perf_counter()
        speed = llama_cpp_speed(gguf_file, prompt_tokens, decode_tokens, threads=threads,
                                repeats=repeats)
    finally:
        if not keep:
            gguf_file.unlink(missing_ok=True)
    return {**exported, **speed, "measure_s": time.perf_counter() - start}


def export_for_timing(model_path: Path, qtype: str, gguf_file: Path,
                      embedding: str | None = None) -> dict[str, Any]:
    """`model_path` exported to `gguf_file` as `qtype` (not verified: timing needs no
    perplexity), and what a speed row says of it: type, bytes, how the weights got there.

    Raises GgufExportError when the exporter refuses.
    """
    start = time.perf_counter()
    written = export_gguf(Path(model_path), Path(gguf_file), qtype, verify=False,
                          embedding=embedding)
    return {"type": qtype, "file_bytes": written["bytes"],
            "grid": grid_label(written, is_quantized(Path(model_path)), qtype),
            "grid_note": written.get("exact_grid_note"),
            "tensor_types": written.get("tensor_types"),
            "embedding_type": written.get("embedding_type"),
            "export_s": time.perf_counter() - start}


def shipped_file_about(gguf_file: Path) -> dict[str, Any]:
    """What a speed row says of a stage's own model.gguf, timed as it is (no export): the file
    a user ships, whose embedding type (say Q4_0) the re-exported rows do not have. Its `type`
    names the file; `base_type` is the baseline row it is judged against (its main type)."""
    from tasks.core.llama_cpp import gguf_type_label

    types, main, embedding, label = gguf_type_label(gguf_file)
    return {"type": f"{label} ({GGUF_FILE})", "base_type": main,
            "file_bytes": Path(gguf_file).stat().st_size, "grid": "shipped", "grid_note": None,
            "tensor_types": types, "embedding_type": embedding, "export_s": 0.0}


def shipped_speed_row(gguf_file: Path, prompt_tokens: int, decode_tokens: int, threads: int,
                      repeats: int) -> dict[str, Any]:
    """The stage's own model.gguf timed as it is (`shipped_file_about`)."""
    start = time.perf_counter()
    speed = llama_cpp_speed(gguf_file, prompt_tokens, decode_tokens, threads=threads,
                            repeats=repeats)
    return {**shipped_file_about(gguf_file), **speed,
            "measure_s": time.perf_counter() - start}


def timing_failure(exc: Exception) -> str:
    """One line for llama.cpp failing to time a file (the runtime, not the model: worth
    another try later) or a machine too busy to finish in time."""
    if isinstance(exc, subprocess.TimeoutExpired):
        return f"llama.cpp timing ran past {exc.timeout:.0f} s"
    return one_line(exc, limit=1000, with_type=False)


def gguf_speed_rows(model_path: Path, qtypes: list[str], work: Path, prompt_tokens: int,
                    decode_tokens: int, threads: int, repeats: int,
                    shipped: Path | None = None) -> dict[str, Any]:
    """`gguf_speed_row` for each of `qtypes`, one GGUF on disk at a time, in `work`.

    {"rows": [...], "refused": None}; or, when the exporter cannot write this model at all (an
    architecture without a GGUF mapping, a tokenizer it cannot carry), no rows and the reason in
    one line, found before any weight is read. A type refused on its own gets a row with its
    reason; one llama.cpp failed to load or run gets a row with the error (`error`).
    `shipped`, the stage's own GGUF, gets a row of its own (`shipped_speed_row`).
    """
    try:
        preflight(Path(model_path), qtypes[0])
    except GgufExportError as exc:
        return {"rows": [], "refused": one_line(exc, limit=1000, with_type=False)}
    rows = []
    for qtype in qtypes:
        try:
            rows.append(gguf_speed_row(model_path, qtype, Path(work) / f"model-{qtype}.gguf",
                                       prompt_tokens, decode_tokens, threads, repeats))
        except GgufExportError as exc:
            rows.append({"type": qtype, "refused": one_line(exc, limit=1000, with_type=False)})
        except (LlamaCppError, subprocess.TimeoutExpired) as exc:
            rows.append({"type": qtype, "error": timing_failure(exc)})
    if shipped is not None:
        try:
            rows.append(shipped_speed_row(shipped, prompt_tokens, decode_tokens, threads,
                                          repeats))
        except (LlamaCppError, subprocess.TimeoutExpired) as exc:
            rows.append({"type": GGUF_FILE, "error": timing_failure(exc)})
    return {"rows": rows, "refused": None}
