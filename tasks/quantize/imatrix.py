"""llama.cpp's importance matrix for `gguf-q4_k_m` exports, computed on calibration text.

Q4_K_M rounds each block of weights onto a 4-bit grid; with an importance matrix (the mean
squared activation of every input column, measured by `llama-imatrix` on real text) the rounding
weighs columns by how much they matter, instead of treating all alike. The text is training-side
only, never an evaluation split (`tasks.core.data`, `tasks.core.text_sources`):

- a pkdq run folder (or a stage model inside one) brings its recipe's quantize calibration (the
  text GPTQ would calibrate on; the quantize section's default when the recipe has none), with
  its token budget (samples x seq_len) and seed;
- `--calibration` names a built-in training source (wikipedia, c4, mixed) or a text file;
- a quantize stage with `gguf: q4_k_m` uses its own `calibration` (`sample_calibration`).

This module chooses and writes the text; `tasks.core.llama_cpp` runs the executables.
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tasks.core.data import SOURCES, training_text_problem
from tasks.quantize.errors import ExportError

BYTES_PER_TOKEN = 8  # text gathered per token asked: prose averages ~4.5 bytes/token, so enough
MAX_TEXT_FILE_BYTES = 64_000_000  # a --calibration text file larger than this is refused


@dataclass(frozen=True)
class Calibration:
    """Which text the importance matrix is computed on, and how much of it."""

    source: str  # what it is, in words: "recipe X quantize.calibration: builtin c4"
    spec: dict[str, Any]  # DataSpec fields, or {"kind": "file", "path": ...}
    tokens: int  # the budget: at most this many tokens are run through the model
    chunk_tokens: int  # llama-imatrix's window (the recipe's seq_len)
    seed: int  # documents are taken in this seed's shuffled order
    data: str | None = None  # the data dir built-in sources are read from (None: data_dir())


def run_folder_of(path: Path) -> Path | None:
    """The pkdq run folder `path` is, or holds as one of its stage models (run/NN-x/model)."""
    path = Path(path)
    if (path / "run.json").is_file():
        return path
    if path.name == "model" and (path.parent.parent / "run.json").is_file():
        return path.parent.parent
    return None


def sample_calibration(sample: Any, seed: int, label: str,
                       data: Path | None = None) -> Calibration:
    """A recipe's `TextSample` (its source, samples x seq_len tokens) as imatrix text."""
    spec = sample.spec()
    what = (spec.source if spec.kind == "builtin"
            else ", ".join(spec.paths) or spec.name or spec.path)
    return Calibration(source=f"{label}: {spec.kind} {what}", spec=spec.model_dump(),
                       tokens=sample.samples * sample.seq_len, chunk_tokens=sample.seq_len,
                       seed=seed, data=str(data) if data is not None else None)


def recipe_calibration(run: Path) -> Calibration:
    """The run's recipe quantize calibration (the QuantizeConfig default if it quantizes not),
    read from the data dir the run recorded."""
    from tasks.core.recipe import QuantizeConfig, Recipe

    try:
        record = json.loads((run / "run.json").read_text())
        recipe = Recipe.model_validate(record["recipe"])
    except Exception as exc:  # noqa: BLE001 - any unreadable record is one line
        raise ExportError(f"{run / 'run.json'}: no readable recipe for the importance matrix's "
                          f"calibration text ({type(exc).__name__}); pass --calibration") from exc
    configs = [cfg for kind, cfg in recipe.stage_list() if kind == "quantize"]
    cal = (configs[-1] if configs else QuantizeConfig()).calibration
    where = "quantize.calibration" if configs else "default quantize.calibration (no quantize)"
    data = (record.get("data") or {}).get("path")  # the data dir the run read, if recorded
    return sample_calibration(cal, recipe.seed, f"recipe {recipe.name} {where}",
                              Path(data) if data else None)


def named_calibration(name: str, tokens: int, chunk_tokens: int, seed: int) -> Calibration:
    """`--calibration NAME`: a built-in training source, or a UTF-8 text file."""
    from tasks.core.common import data_dir

    if name in SOURCES:
        problem = training_text_problem(data_dir(), name)
        if problem:
            raise ExportError(f"--calibration {name}: {problem}")
        return Calibration(source=f"builtin {name} (training split)",
                           spec={"kind": "builtin", "source": name}, tokens=tokens,
                           chunk_tokens=chunk_tokens, seed=seed)
    path = Path(name)
    if not path.is_file():
        raise ExportError(f"--calibration {name}: neither a built-in training source "
                          f"({', '.join(SOURCES)}) nor a text file")
    if path.stat().st_size > MAX_TEXT_FILE_BYTES:
        raise ExportError(f"--calibration {name}: larger than {MAX_TEXT_FILE_BYTES // 10**6} MB")
    return Calibration(source=f"text file {path}", spec={"kind": "file", "path": str(path)},
                       tokens=tokens, chunk_tokens=chunk_tokens, seed=seed)


def calibration_text(cal: Calibration) -> str:
    """The documents of `cal`, in its seed's shuffled order (as GPTQ calibration blocks take
    them), joined by blank lines until about `BYTES_PER_TOKEN` bytes per budgeted token."""
    if cal.spec.get("kind") == "file":
        try:
            return Path(cal.spec["path"]).read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ExportError(f"--calibration {cal.spec['path']}: not UTF-8 text") from exc
    from tasks.core.common import data_dir
    from tasks.core.recipe import DataSpec
    from tasks.core.text_sources import DataError, load_corpus

    try:
        docs = load_corpus(DataSpec(**cal.spec), Path(cal.data or data_dir())).texts()
    except DataError as exc:
        raise ExportError(str(exc)) from exc
    order = list(range(len(docs)))
    random.Random(cal.seed).shuffle(order)
    picked, size, need = [], 0, cal.tokens * BYTES_PER_TOKEN
    for index in order:
        picked.append(docs[index])
        size += len(docs[index].encode("utf-8")) + 2
        if size >= need:
            break
    return "\n\n".join(picked)


def check_tools() -> None:
    """Both executables present, or one line naming ./setup.sh (before any weight is read)."""
    from tasks.core.llama_cpp import LlamaCppError, llama_tool

    try:
        llama_tool("llama-imatrix"), llama_tool("llama-quantize")
    except LlamaCppError as exc:
        raise ExportError(str(exc)) from exc


def imatrix_quantize(f16_file: Path, out_file: Path, ftype: str, cal: Calibration,
                     context: int, threads: int = 2) -> dict[str, Any]:
    """Importance matrix of the f16 GGUF on `cal`'s text, then `llama-quantize --imatrix`.

    Returns the record export metadata keeps: used, source, tokens actually run (llama-imatrix
    may find fewer whole windows in the text than the budget asks), windows and timing.
    """
    from tasks.core.llama_cpp import LlamaCppError, compute_imatrix, quantize_with_imatrix

    chunk = max(8, min(cal.chunk_tokens, context))
    chunks = max(1, -(-cal.tokens // chunk))
    text = calibration_text(cal)
    with tempfile.TemporaryDirectory(prefix="pkdq-imatrix-") as tmp:
        text_file, matrix = Path(tmp) / "calibration.txt", Path(tmp) / "imatrix.gguf"
        text_file.write_text(text, encoding="utf-8")
        try:
            stats = compute_imatrix(f16_file, text_file, matrix, chunk, chunks, threads)
            quantize_with_imatrix(f16_file, out_file, matrix, ftype, threads)
        except LlamaCppError as exc:
            raise ExportError(str(exc)) from exc
    return {"used": True, **asdict(cal), "tokens_budget": cal.tokens, **stats,
            "text_bytes": len(text.encode("utf-8"))}
