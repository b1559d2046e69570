"""GGUF files timed in llama.cpp side by side, in interleaved rounds, so that the machine's
drift cancels out of their ratios.

A stage's own speed unit times its files right after its evaluation, minutes away from the
baseline's, and this machine's speed drifts over minutes: two runs of the default recipe on
2026-12-03 timed the same baseline q4_0 file at 137.9 and 143.8 tok/s, and the shipped file at
124.6 and 182.9. A ratio such as "decode vs the baseline" needs its files timed together: every
round times every file once, each in a fresh process (`repeats=1` after the warm-up pass: the
rounds are the repeats), and a file's rate is its median over the rounds. One function for a
run's rounds unit (`tasks.pipeline.llama_cpp_rounds_unit`) and `bench/gguf_speed_rounds.py`.

Why not load every file once in one process and alternate passes there: tried on the default's
five files (3 rounds), it saved 15 s of 62 but timed every file about 15% slower than a process
of its own does (q4_0 decode 125 against 147 tok/s; each llama.cpp context keeps its own worker
threads, and five of them share 2 cores), and a user's runtime serves one model per process.
"""

from __future__ import annotations

import os
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.core.common import one_line
from tasks.core.llama_cpp import LlamaCppError, gguf_type_label, llama_cpp_speed
from tasks.quantize.gguf_export import GgufExportError
from tasks.quantize.gguf_speed import export_for_timing, shipped_file_about, timing_failure


def interleaved_speed(files: dict[str, Path], rounds: int, prompt_tokens: int = 512,
                      decode_tokens: int = 64, threads: int = 2,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Each of `files` (name -> GGUF) timed once per round, the rounds interleaved.

    Returns {"rows": [...] in `files` order, "rounds", "threads", "prompt_tokens",
    "decode_tokens", "load_average_1m": [before, after each round]}. A row holds the median
    prefill and decode rates, the decode range over rounds (`decode_spread`), every round's
    decode rate, and the highest peak RSS. Raises LlamaCppError when llama.cpp fails.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1; got {rounds}")
    loads = [os.getloadavg()[0]]
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in files}
    for round_no in range(1, rounds + 1):
        for name, path in files.items():
            sample = llama_cpp_speed(Path(path), prompt_tokens, decode_tokens, threads=threads,
                                     repeats=1)
            samples[name].append(sample)
            if progress is not None:
                progress(f"round {round_no}/{rounds} {name}: decode "
                         f"{sample['decode_tok_s']:.1f} tok/s")
        loads.append(os.getloadavg()[0])
    return {"rows": [_row(name, Path(files[name]), samples[name]) for name in files],
            "rounds": rounds, "threads": threads, "prompt_tokens": prompt_tokens,
            "decode_tokens": decode_tokens, "load_average_1m": loads}


def _row(name: str, path: Path, samples: list[dict[str, Any]]) -> dict[str, Any]:
    decode = [s["decode_tok_s"] for s in samples]
    return {"name": name, "file": str(path), "file_bytes": path.stat().st_size,
            "types": gguf_type_label(path)[3],
            "prefill_tok_s": statistics.median(s["prefill_tok_s"] for s in samples),
            "decode_tok_s": statistics.median(decode), "decode_rounds": decode,
            "decode_spread": [min(decode), max(decode)],
            "peak_rss_mb": max(s["peak_rss_mb"] for s in samples),
            "runtime": samples[0]["runtime"]}


def time_side_by_side(models: dict[str, Path], types: list[str], work: Path,
                      shipped: Path | None, rounds: int, prompt_tokens: int,
                      decode_tokens: int, threads: int,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Each model (stage folder -> model path) exported at each of `types` into `work`, plus
    the `shipped` GGUF, timed in interleaved rounds (`interleaved_speed`). Rows carry their
    `stage` and what a per-stage speed row says of the file (type, grid, bytes); an export
    refused is a row with its reason. {"rows", "rounds", ...}; with "error" (one line, no
    timed rows) when llama.cpp failed."""
    files: dict[str, Path] = {}
    about: dict[str, dict[str, Any]] = {}
    refused: list[dict[str, Any]] = []
    for stage_folder, model_path in models.items():
        for qtype in types:
            name, file = f"{stage_folder} {qtype}", Path(work) / f"{stage_folder}-{qtype}.gguf"
            try:
                about[name] = {"stage": stage_folder,
                               **export_for_timing(model_path, qtype, file)}
                files[name] = file
            except GgufExportError as exc:
                refused.append({"stage": stage_folder, "type": qtype,
                                "refused": one_line(exc, limit=1000, with_type=False)})
    if shipped is not None:
        name = f"{shipped.parent.name} {shipped.name}"
        about[name], files[name] = {"stage": shipped.parent.name,
                                    **shipped_file_about(shipped)}, shipped
    if not files:
        return {"rows": refused, "rounds": rounds}
    try:
        timed = interleaved_speed(files, rounds, prompt_tokens, decode_tokens, threads,
                                  progress)
    except (LlamaCppError, subprocess.TimeoutExpired) as exc:
        return {"rows": refused, "error": timing_failure(exc)}
    rows = [{**about[row["name"]], **{k: v for k, v in row.items() if k != "file"},
             "file_bytes": about[row["name"]]["file_bytes"]} for row in timed.pop("rows")]
    return {**timed, "rows": rows + refused}
