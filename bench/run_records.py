"""Reading a finished run folder's own records, for the bench scripts that table past runs."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any


def read_record(path: Path) -> dict[str, Any]:
    """A run folder's JSON record, or {} where that unit never ran (an optional section)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def created_s(run: dict[str, Any]) -> float:
    """run.json's `created` as a POSIX timestamp."""
    return datetime.fromisoformat(run["created"]).timestamp()


def sealed_s(run_dir: Path, run: dict[str, Any]) -> float | None:
    """From run.json's `created` to the last unit's seal (`*.done`): a later `pkdq run` that
    reuses every unit rewrites the report but no seal, so this stays the first run's time."""
    seals = [p.stat().st_mtime for p in run_dir.glob("*/*.done")]
    return max(seals) - created_s(run) if seals and run.get("created") else None
