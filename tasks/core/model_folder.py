"""A model folder's identity: the content fingerprint sealed inside it.

Stages exchange folders, and every cache key follows a folder's content, not its path. A folder
becomes a model only when it is sealed: written in full under a temporary name, fingerprinted,
then renamed in one step, so a crash never leaves a folder that looks finished.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from tasks.core.common import ModelRef

FINGERPRINT_FILE = ".pkdq-fingerprint"


def fingerprint_folder(path: Path) -> str:
    """Content hash of a model folder (every file's name and bytes), so cache keys follow content.

    Paths alone are not enough: a folder rewritten in place must not hit a stale cache entry.
    """
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel.startswith(".") or rel.endswith(".lock"):
            continue
        digest.update(rel.encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def model_ref(path: Path) -> ModelRef:
    """Fingerprint a model folder, reusing the stored fingerprint written when it was sealed."""
    path = Path(path).resolve()
    stored = path / FINGERPRINT_FILE
    fp = stored.read_text().strip() if stored.is_file() else fingerprint_folder(path)
    return ModelRef(path, fp)


def is_sealed(path: Path) -> bool:
    """True when the folder was finished by `seal_folder` (its fingerprint file is inside)."""
    return (Path(path) / FINGERPRINT_FILE).is_file()


def seal_folder(tmp: Path, final: Path) -> ModelRef:
    """Fingerprint the finished `tmp` folder, then move it to `final` in one rename."""
    tmp, final = Path(tmp), Path(final)
    fingerprint = fingerprint_folder(tmp)
    (tmp / FINGERPRINT_FILE).write_text(fingerprint)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return ModelRef(final.resolve(), fingerprint)
