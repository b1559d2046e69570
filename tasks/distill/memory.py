"""glibc heap tuning for the KD loop: keep freed blocks while training, give them back after.

Large per-step temporaries make glibc mmap and unmap ~1 GB each step; these helpers trade that
kernel time for a stable heap, and return the pages when the teacher must be reloaded.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

_KEEP_DEPTH = 0


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[None]:
    """Make glibc reuse freed big blocks instead of unmapping them, then restore its defaults.

    Every step allocates several [batch*seq, vocab] fp32 tensors (~200 MB at 4x256 tokens). glibc
    serves those with fresh mmaps and unmaps them on free, so each step page-faults ~1 GB of
    zeroed memory again: on SmolLM2 that was ~25% of a step as kernel (sys) time. With mmap off and
    no trimming the heap keeps those pages. Afterwards the defaults come back and the kept memory
    is returned (malloc_trim). A no-op off glibc.
    """
    global _KEEP_DEPTH
    libc = _glibc()
    if libc is None:
        yield
        return
    m_trim_threshold, m_mmap_max = -1, -4
    if _KEEP_DEPTH == 0:
        libc.mallopt(m_mmap_max, 0)
        libc.mallopt(m_trim_threshold, 2**31 - 1)
    _KEEP_DEPTH += 1
    try:
        yield
    finally:
        _KEEP_DEPTH -= 1
        if _KEEP_DEPTH == 0:  # nested uses restore only when the outermost one ends
            libc.mallopt(m_mmap_max, 65536)
            libc.mallopt(m_trim_threshold, 128 * 1024)
            libc.malloc_trim(0)


def release_free_heap() -> None:
    """Hand glibc's free heap pages back to the OS (malloc_trim); a no-op off glibc.

    A training step frees ~1 GB of activations into the heap, which glibc keeps for the next
    step. Before the offloaded teacher is reloaded for a held-out eval, that kept memory would
    stack under the teacher's weights and make the eval the stage's peak (measured on SmolLM2:
    3068 MiB with it kept, vs a 2767 MiB training peak); trimmed, the next step faults it back in
    once. Not used inside `keep_freed_memory`, whose point is to keep those pages.
    """
    libc = _glibc()
    if libc is not None and _KEEP_DEPTH == 0:
        libc.malloc_trim(0)


def _glibc():
    """glibc through ctypes on Linux (for mallopt/malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None
