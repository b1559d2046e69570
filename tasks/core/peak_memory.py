"""Peak resident memory (RSS high-water mark) of one piece of work in this process.

A flow runs several stages in one process, so the process-lifetime peak (`ru_maxrss`) would
report KD training's peak under evaluation. Linux lets a process reset its own high-water mark
(writing 5 to /proc/self/clear_refs, since 4.0); where that is not possible the process peak is
reported and labelled as such.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak_rss() -> bool:
    """Start a new peak window; False when the platform keeps only the process-lifetime peak."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """RSS high-water mark: VmHWM (since the last reset) where readable, else ru_maxrss."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux
