"""Types and helpers every stage shares: model references, stage context, atomic writes, paths.

Stages exchange folders on disk (never live model objects) so that Prefect tasks, resumed runs and
other machines all see the same thing; these types are that contract.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_UPDATE_DOWNLOAD_COUNTS": "0",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def set_offline_env() -> None:
    """Force every HF library offline: pkdq must never reach a hub at run time."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def pkdq_version() -> str:
    """The installed pkdq's version (pyproject.toml is its one home); part of every unit key."""
    return metadata.version("pkdq")


def cache_dir() -> Path:
    """Where converted models, logit caches and Prefect state live (override: PKDQ_CACHE_DIR)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pkdq"
    path = Path(os.environ.get("PKDQ_CACHE_DIR", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    """Offline benchmark + training data: PKDQ_DATA_DIR, else ../shared/data beside the repo."""
    env = os.environ.get("PKDQ_DATA_DIR")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "data")


@dataclass(frozen=True)
class ModelRef:
    """A model folder in HF layout plus the fingerprint of its content."""

    path: Path
    fingerprint: str

    def to_json(self) -> dict[str, str]:
        return {"path": str(self.path), "fingerprint": self.fingerprint}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> ModelRef:
        return cls(Path(data["path"]), data["fingerprint"])


# Inside a stage's folder: its mid-stage resume state (KD's `tasks.distill.checkpoint`). The one
# thing a restarted stage keeps of an interrupted attempt (`tasks.run_folder.begin_stage`): it
# carries a fingerprint of the run it belongs to and is used only when that matches.
CHECKPOINT_DIR = "checkpoint"
# Beside a stage's stage.json: its speed in llama.cpp, written by `tasks.pipeline.llama_cpp_unit`
# and read by the report (which sits below the pipeline, hence the name lives here).
LLAMA_CPP_FILE = "llama_cpp.json"
# Beside the final stage's stage.json: the baseline's and the final model's GGUFs timed side by
# side in interleaved rounds (`tasks.pipeline.llama_cpp_rounds_unit`), whose ratios the report's
# speed goal is judged on.
LLAMA_CPP_ROUNDS_FILE = "llama_cpp_rounds.json"
# A quantize stage's GGUF, beside its model folder (and in `pkdq export --format gguf-*`'s
# folder): the quantize stage writes it, the evaluation scores it, the report reads its scores.
GGUF_FILE = "model.gguf"
# An evaluation's metrics: in its output folder and, as the unit's record, beside stage.json.
EVAL_JSON = "eval.json"
# Per-doc scores in a stage's eval/ folder: written by the evaluation, read by the report and
# the comparison (which sit beside or below it, hence the names live here).
SAMPLES_JSON = "eval_samples.json"  # the stage's model, fp32 activations
SERVED_SAMPLES_JSON = "served_samples.json"  # a quantized model as served (bf16)
GGUF_SAMPLES_JSON = "gguf_samples.json"  # the stage's GGUF, its own weights


@dataclass
class StageContext:
    """What a stage needs besides its input model and config."""

    out_dir: Path
    seed: int = 0
    threads: int = 1
    data: Path = field(default_factory=data_dir)
    teacher: ModelRef | None = None
    stage_name: str = ""


@dataclass
class StageResult:
    model: ModelRef
    metrics: dict[str, Any]


def unique_tmp(path: Path) -> Path:
    """A temporary name beside `path`, unique to this process and thread.

    Why not `path.tmp`: two writers of one shared cache entry (two runs on a machine, two test
    workers) would write into, or rename away, each other's half-written file.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def write_text_atomic(path: Path, text: str) -> None:
    """Write then rename, so a crash (or a concurrent reader) never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_tmp(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write then rename, so a crash never leaves a half-written JSON that looks finished."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


class Progress:
    """Terminal progress for long loops: stage, step, tokens/s, ETA, on one line per update."""

    def __init__(self, stage: str, total: int, unit: str = "step", every_s: float = 5.0) -> None:
        self.stage, self.total, self.unit, self.every_s = stage, total, unit, every_s
        self.start = time.perf_counter()
        self.last_print = 0.0
        self.tokens = 0

    def update(self, done: int, tokens: int = 0, force: bool = False, **extra: float) -> None:
        self.tokens += tokens
        now = time.perf_counter()
        if not force and now - self.last_print < self.every_s and done < self.total:
            return
        self.last_print = now
        elapsed = now - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        eta = elapsed / done * (self.total - done) if done else float("nan")
        parts = [f"[{self.stage}] {self.unit} {done}/{self.total}"]
        if self.tokens:
            parts.append(f"{rate:,.0f} tok/s")
        parts += [f"{k} {v:.4g}" for k, v in extra.items()]
        parts.append(f"elapsed {elapsed:,.0f}s ETA {eta:,.0f}s")
        print(" | ".join(parts), file=sys.stderr, flush=True)


def read_utf8(path: Path, error: type[Exception], label: str, fix: str) -> str:
    """A user's file as UTF-8 text, or `error` in one line: unreadable, or the first bad byte
    and its offset, then `fix` (what to do). Recipes and data files alike."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise error(f"{label}: cannot read ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{label}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                    f"{exc.start}); {fix}") from None


def one_line(exc: BaseException, limit: int = 300, with_type: bool = True) -> str:
    """One-line, bounded rendering of an exception (some libraries list hundreds of tensors);
    `with_type=False` for pkdq's own errors, whose message already says what went wrong."""
    text = " ".join((f"{type(exc).__name__}: {exc}" if with_type else str(exc)).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
