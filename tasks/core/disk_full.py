"""A full disk is the user's to fix, not a bug: one line naming the file, never a traceback.

Saves go through several libraries (Python's io, safetensors' Rust writer, tokenizers) and each
reports a full disk its own way: OSError with errno ENOSPC (no space), EFBIG (a file-size limit,
RLIMIT_FSIZE, with SIGXFSZ ignored) or EDQUOT (quota), or an error whose text carries the OS
message. `disk_full_guard` turns any of them into `DiskFullError`, naming the file written last
when the library did not say which.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
_DISK_FULL_TEXT = re.compile(
    r"No space left on device|File too large|Disk quota exceeded|StorageFull|FileTooLarge|"
    r"QuotaExceeded|os error (?:28|27|122)\b")


class DiskFullError(RuntimeError):
    """Raised with one line: which file could not be written, and what to do."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        super().__init__(f"disk full while writing {shown_path(self.path)}: free space and rerun")


def shown_path(path: Path) -> str:
    """`path` relative to the working directory when it lies below it, else absolute."""
    try:
        return os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd()) else \
            str(path)
    except (OSError, ValueError):
        return str(path)


def is_disk_full(exc: BaseException, folder: Path | None = None) -> bool:
    """True when `exc` or anything in its cause/context chain is a full disk or file-size limit.

    Some writers lose the errno: torch.save's C++ stream says only "basic_ios::clear: iostream
    error". Such a bare write failure counts when `folder` is given and its file system has no
    room left, or this process runs under a file-size limit (RLIMIT_FSIZE).
    """
    chain = _chain(exc)
    for current in chain:
        if isinstance(current, DiskFullError):
            return True
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        if _DISK_FULL_TEXT.search(str(current)):
            return True
    if folder is not None and any(_WRITE_FAILED_TEXT.search(str(c)) for c in chain):
        return no_room(folder)
    return False


_WRITE_FAILED_TEXT = re.compile(r"iostream error|file write failed|PytorchStreamWriter failed")
NO_ROOM_BYTES = 64 << 20


def no_room(folder: Path) -> bool:
    """True when the file system holding `folder` has under 64 MiB free (a failed write leaves
    its partial file behind, so little is left), or a file-size limit is set for this process."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        return True
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stat = os.statvfs(path)
    except OSError:
        return False
    free = (stat.f_bfree if os.geteuid() == 0 else stat.f_bavail) * stat.f_frsize
    return free < NO_ROOM_BYTES


def _named_file(exc: BaseException) -> Path | None:
    current: BaseException | None = exc
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DiskFullError):
            return current.path
        if isinstance(current, OSError) and current.filename:
            return Path(current.filename)
        current = current.__cause__ or current.__context__
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not e for e in out):
        out.append(current)
        current = current.__cause__ or current.__context__
    return out


def file_in_traceback(exc: BaseException, folder: Path) -> Path | None:
    """The path below `folder` that the innermost frame of the failed write held in a local
    variable: libraries that drop the file name from their error (safetensors' Rust writer says
    only "File too large (os error 27)", and removes the half-written file) still had it in
    hand (`save_file(tensors, filename)`)."""
    root = Path(folder).resolve()
    for link in reversed(_chain(exc)):  # the original error first
        frames = []
        tb = link.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        for frame in reversed(frames):  # innermost first
            for value in list(frame.f_locals.values()):
                if not isinstance(value, str | os.PathLike) or not str(value):
                    continue
                try:
                    path = Path(value).resolve()
                except (OSError, TypeError, ValueError):
                    continue
                if path != root and path.is_relative_to(root) and not path.is_dir():
                    return path
    return None


def newest_file(folder: Path) -> Path | None:
    """The most recently modified file under `folder` (the larger one on a tie: the kernel's
    timestamps are coarse), most likely the one a failed save was writing."""
    best: tuple[int, int, Path] | None = None
    for file in Path(folder).rglob("*"):
        try:
            if file.is_file():
                stat = file.stat()
                if best is None or (stat.st_mtime_ns, stat.st_size) > best[:2]:
                    best = (stat.st_mtime_ns, stat.st_size, file)
        except OSError:
            continue
    return best[2] if best else None


def disk_full_error(exc: BaseException, folder: Path) -> DiskFullError:
    """The DiskFullError for `exc`, naming the file its error or its traceback names, else the
    newest file under `folder`, else `folder` itself."""
    if isinstance(exc, DiskFullError):
        return exc
    return DiskFullError(_named_file(exc) or file_in_traceback(exc, folder)
                         or newest_file(folder) or folder)


@contextmanager
def disk_full_guard(folder: Path) -> Iterator[None]:
    """Re-raise a full disk met while writing under `folder` as a one-line DiskFullError."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if not is_disk_full(exc, folder):
            raise
        raise disk_full_error(exc, folder) from exc
