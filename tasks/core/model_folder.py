"""A model folder's identity: the content fingerprint sealed inside it, and a manifest to check it.

Stages exchange folders, and every cache key follows a folder's content, not its path. A folder
becomes a model only when it is sealed: written in full under a temporary name, fingerprinted,
then renamed in one step, so a crash never leaves a folder that looks finished.

Sealing also writes a manifest (`.pkdq-manifest.json`: the fingerprint and every file's size and
sha256) so that a finished folder can be checked before it is reused: a weight file overwritten
or truncated after sealing must not pass as the model its fingerprint names. The check re-hashes
every file (`check_folder`); SmolLM2's 540 MB folder takes well under a second with hashlib's
sha256, small next to any stage it saves, and it catches every content change, including ones
that keep the size and the modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from tasks.core.common import ModelRef

FINGERPRINT_FILE = ".pkdq-fingerprint"
# The model card pkdq writes into a sealed folder after sealing, and rewrites once the folder's
# evaluation exists: documentation about the weights, not part of them, so a sealed folder's
# checks skip it (its fingerprint was taken before the card was there).
CARD_FILE = "README.md"
MANIFEST_FILE = ".pkdq-manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 1 << 22


def _content_files(path: Path, skip_card: bool = False) -> list[tuple[str, Path]]:
    """The files that make a model folder's content, in fingerprint order.

    Dot files (the seal's own files) and `*.lock` files (HF download locks) are not content;
    with `skip_card` (checks of a sealed folder), neither is the model card `CARD_FILE`.
    """
    out = []
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if skip_card and rel == CARD_FILE:
            continue
        if not (rel.startswith(".") or rel.endswith(".lock")):
            out.append((rel, file))
    return out


def model_bytes(path: Path) -> int:
    """Bytes of a model folder's content: what a user ships, without the seal's own files or the
    model card, whose text changes when an evaluation is added (sizes must not move with it)."""
    return sum(file.stat().st_size for _, file in _content_files(Path(path), skip_card=True))


def copy_side_files(src: Path, dest: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy a model folder's files other than its weights (tokenizer, configs) into `dest`, for
    a new model written from it: never the weights, the seal's own files, the weight index or
    the model card (they describe the old model), nor any name in `skip`."""
    for file in Path(src).iterdir():
        if file.is_file() and not file.name.endswith(".safetensors") and \
                not file.name.startswith(".") and \
                file.name not in ("model.safetensors.index.json", CARD_FILE, *skip):
            shutil.copy2(file, Path(dest) / file.name)


def file_digest(file: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of one file, read in 4 MiB chunks."""
    digest, size = hashlib.sha256(), 0
    with open(file, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def fingerprint_folder(path: Path, skip_card: bool = False) -> str:
    """Content hash of a model folder (every file's name and bytes), so cache keys follow content.

    Paths alone are not enough: a folder rewritten in place must not hit a stale cache entry.
    This function is frozen: run keys written by earlier versions embed its values. `skip_card`:
    leave out the model card (a sealed folder's card came after its fingerprint).
    """
    digest = hashlib.sha256()
    for rel, file in _content_files(path, skip_card):
        digest.update(rel.encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda h=handle: h.read(_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _fingerprint_and_manifest(path: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """The fingerprint and each file's size and sha256, in one read of the folder."""
    digest = hashlib.sha256()
    files: dict[str, dict[str, Any]] = {}
    for rel, file in _content_files(path):
        digest.update(rel.encode())
        one, size = hashlib.sha256(), 0
        with open(file, "rb") as handle:
            for chunk in iter(lambda h=handle: h.read(_CHUNK), b""):
                digest.update(chunk)
                one.update(chunk)
                size += len(chunk)
        files[rel] = {"size": size, "sha256": one.hexdigest()}
    return digest.hexdigest()[:16], files


def model_ref(path: Path) -> ModelRef:
    """Fingerprint a model folder, reusing the stored fingerprint written when it was sealed."""
    path = Path(path).resolve()
    stored = path / FINGERPRINT_FILE
    fp = stored.read_text().strip() if stored.is_file() else fingerprint_folder(path)
    return ModelRef(path, fp)


def checked_model_ref(path: Path) -> ModelRef:
    """`model_ref` for a folder given to pkdq as input: a sealed folder whose content changed
    since it was sealed gets its real fingerprint (with one line saying why), not the stored one.
    """
    path = Path(path).resolve()
    if not is_sealed(path):
        return model_ref(path)
    problem = check_folder(path, label=str(path))
    if problem is None:
        return model_ref(path)
    print(f"[model-store] {problem}: fingerprinting its content instead of the sealed value",
          flush=True)
    return ModelRef(path, fingerprint_folder(path, skip_card=True))


def is_sealed(path: Path) -> bool:
    """True when the folder was finished by `seal_folder` (its fingerprint file is inside)."""
    return (Path(path) / FINGERPRINT_FILE).is_file()


def seal_folder(tmp: Path, final: Path) -> ModelRef:
    """Fingerprint the finished `tmp` folder and write its manifest, then move it to `final` in
    one rename."""
    tmp, final = Path(tmp), Path(final)
    fingerprint, files = _fingerprint_and_manifest(tmp)
    manifest = {"version": MANIFEST_VERSION, "fingerprint": fingerprint, "files": files}
    _write_synced(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1))
    _write_synced(tmp / FINGERPRINT_FILE, fingerprint)  # last: its presence means "sealed"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return ModelRef(final.resolve(), fingerprint)


def _write_synced(path: Path, text: str) -> None:
    """Write and fsync, so a full disk shows up here as an error rather than a short file."""
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def check_folder(path: Path, fingerprint: str | None = None, label: str | None = None
                 ) -> str | None:
    """Why a sealed folder must not be reused (one phrase naming the file), or None when every
    file still has the size and sha256 recorded when it was sealed.

    `fingerprint` is the value the caller recorded (a stage record's ModelRef): a folder swapped
    for another sealed model fails too. Folders sealed before manifests existed are checked by
    recomputing their fingerprint. `label` names the folder in the phrase (default: its name).
    """
    path = Path(path)
    label = label if label is not None else path.name
    if not path.is_dir():
        return f"{label}/ is missing"
    if not is_sealed(path):
        return f"{label}/ is not sealed (no {FINGERPRINT_FILE})"
    stored = (path / FINGERPRINT_FILE).read_text().strip()
    if fingerprint is not None and stored != fingerprint:
        return f"{label}/{FINGERPRINT_FILE} changed ({stored} != {fingerprint} recorded)"
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():  # sealed by an earlier pkdq: the fingerprint is the record
        actual = fingerprint_folder(path, skip_card=True)
        return None if actual == stored else (
            f"{label}/ changed (fingerprint {actual} != {stored} recorded)")
    try:
        manifest = json.loads(manifest_path.read_text())
        recorded: dict[str, dict[str, Any]] = manifest["files"]
        sealed_fp = manifest["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{label}/{MANIFEST_FILE} is unreadable"
    if sealed_fp != stored:
        return f"{label}/{FINGERPRINT_FILE} changed ({stored} != {sealed_fp} recorded)"
    present = dict(_content_files(path, skip_card=True))
    recorded = {rel: want for rel, want in recorded.items() if rel != CARD_FILE}
    return files_problem(path, recorded, label, present)


def files_problem(root: Path, recorded: dict[str, dict[str, Any]], label: str | None,
                  present: dict[str, Path] | None = None) -> str | None:
    """First recorded file under `root` that is missing or differs in size or sha256, as one
    phrase; with `present` (every content file now there), an added file counts too."""
    prefix = f"{label}/" if label else ""
    for rel, want in recorded.items():
        file = Path(root) / rel
        if not file.is_file():
            return f"{prefix}{rel} is missing"
        size = file.stat().st_size
        if size != want["size"]:
            return f"{prefix}{rel} changed (size {size} != {want['size']} recorded)"
    added = sorted(set(present or ()) - set(recorded))
    if added:
        return f"{prefix}{added[0]} was added"
    for rel, want in recorded.items():  # listing and sizes first: they need no reading
        size, sha = file_digest(Path(root) / rel)
        if size != want["size"] or sha != want["sha256"]:
            return (f"{prefix}{rel} changed (sha256 {sha[:12]} != {want['sha256'][:12]} "
                    "recorded)")
    return None


def record_files(root: Path, rels: list[str]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each of `rels` under `root`, for `files_problem` to check later."""
    out = {}
    for rel in rels:
        size, sha = file_digest(Path(root) / rel)
        out[rel] = {"size": size, "sha256": sha}
    return out
