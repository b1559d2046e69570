"""A terminal a person can read: pkdq's own lines on the terminal, everything in the run's log.

A run's process (and its children: torchrun workers, Prefect's temporary server, speed probes)
writes through many channels: pkdq's prints, Prefect's console handler (every `print` inside a
flow becomes a Prefect log line), Python `warnings`, torch's own logger, GPTQModel's banners and
tables, C++ code writing straight to file descriptor 2. The only place all of them meet is the
file descriptors 1 and 2, so `capture_terminal` points both at pipes and one reader thread:

- appends every byte to the log file (`runs/<id>/run.log`), unfiltered and as it arrives, so the
  log is the complete record of what the terminal would have shown (a killed run keeps it all);
- passes to the real terminal only pkdq's own lines (`is_pkdq_line`), or everything with
  `verbose` (then byte for byte, so library progress bars stay live).

Lines are recognised by pkdq's vocabulary rather than marked at the source, so the stages keep
printing as they always did and a stage run outside the CLI (tests, notebooks) looks the same.
Prefect's console lines (`12:00:01.234 | INFO    | Task run '01-prune' - [01-prune] starting`)
show their message only, so the terminal reads the same inside and outside a flow.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import re
import select
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

LOG_NAME = "run.log"

# The first word inside a stage line's brackets: a lowercase tag (evaluate, quantize, model-store,
# compare), a numbered folder or unit (01-prune, 3fa9c1-kd), or an ordering (P-KD-Q). Library
# lines that also open with a bracket do not fit: GPTQModel's "[0 of 2] ...", torch's glog
# "[W1130 12:00:00 ...]", torchrun's "[rank0]:", Gloo's "[Gloo] ...".
_STAGE_LINE = re.compile(
    r"\[(?:[a-z][\w.:-]*|[0-9a-f]+-[a-z][\w-]*|[A-Z]{1,2}(?:-[A-Z]{1,2})+)(?: [^\]]*)?\] \S")
_CLI_LINE = re.compile(
    r"(?:pkdq|error|warning): "  # the CLI's own lines and its one-line failures
    r"|(?:[A-Z][A-Z,-]*: )?(?:info|warning) \[[\w.-]+\]: "  # rule findings (tasks.rules)
    r"|  [A-Z]{1,2}(?:-[A-Z]{1,2})+ \d+\. ")  # `pkdq compare`'s plan, one line per step
# Prefect's console format ends in "<who> - <message>" after an "HH:MM:SS" timestamp; the
# message may be a pkdq line (flows run with log_prints=True).
_PREFECT_PREFIX = re.compile(r"\d\d:\d\d:\d\d\S* \|.*? - ")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_MAX_PENDING = 1 << 20  # a "line" longer than this (endless \r updates) is judged as it is


def pkdq_line(line: str) -> str | None:
    """The text to show for `line` if it is one of pkdq's own lines, else None.

    A line is judged by what a terminal would display: ANSI escapes removed, only the part after
    the last carriage return (a progress bar redrawn in place).
    """
    text = _ANSI.sub("", line.rstrip("\r\n")).rsplit("\r", 1)[-1]
    if _STAGE_LINE.match(text) or _CLI_LINE.match(text):
        return text
    for prefix in _PREFECT_PREFIX.finditer(text):  # usually exactly one " - " to try
        message = text[prefix.end():]
        if _STAGE_LINE.match(message) or _CLI_LINE.match(message):
            return message
    return None


def is_pkdq_line(line: str) -> bool:
    return pkdq_line(line) is not None


class TerminalCapture:
    """File descriptors 1 and 2 teed into a log file, filtered on their way to the terminal.

    Start it once per process, as early as the log's path is known; `close` (also run at exit)
    puts the terminal back. Closing at exit rather than when the command returns keeps the last
    words of libraries that speak from atexit hooks (Prefect stopping its temporary server) in the
    log: atexit runs hooks in reverse order, so those registered after `start` run first.
    """

    def __init__(self, log_path: Path, verbose: bool = False) -> None:
        self.log_path = Path(log_path)
        self.verbose = verbose
        self._saved: dict[int, int] = {}  # 1/2 -> a duplicate of the real terminal fd
        self._pipes: dict[int, int] = {}  # pipe read end -> 1 or 2
        self._pending: dict[int, bytes] = {1: b"", 2: b""}
        self._log_fd = -1
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()  # a forked child inherits the atexit hook, not the reader

    # ------------------------------------------------------------------ start / close
    def start(self, header: str = "") -> TerminalCapture:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        stamp = datetime.now().astimezone().isoformat(timespec="seconds")
        os.write(self._log_fd, f"==== {stamp} pid {os.getpid()} {header}\n".encode())
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd in (1, 2):
            read_end, write_end = os.pipe()
            with contextlib.suppress(OSError):  # Linux: fewer stalls while the reader waits
                fcntl.fcntl(write_end, 1031, 1 << 20)  # F_SETPIPE_SZ
            self._saved[fd] = os.dup(fd)
            os.set_inheritable(self._saved[fd], False)
            os.dup2(write_end, fd)
            os.close(write_end)
            os.set_blocking(read_end, False)  # the reader drains, then waits in select
            self._pipes[read_end] = fd
        # A pipe makes Python block-buffer; these keep lines (and children's lines) live.
        os.environ["PYTHONUNBUFFERED"] = "1"
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.reconfigure(line_buffering=True)
        self._thread = threading.Thread(target=self._pump, name="pkdq-terminal", daemon=True)
        self._thread.start()
        atexit.register(self.close)
        return self

    def close(self, timeout_s: float = 2.0) -> None:
        """Put the terminal back and write out what is still in the pipes.

        Children that still hold the pipes (none, normally, by exit) keep the reader waiting up
        to `timeout_s`; what they write after that is lost, and the log says so.
        """
        if self._closed or self._thread is None or os.getpid() != self._pid:
            return
        self._closed = True
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # our process no longer writes into the pipes
        self._thread.join(timeout_s)  # ends at end-of-file: every writer has gone
        with self._lock:
            for read_end in list(self._pipes):
                self._drain(read_end)
            if self._pipes:
                _write_all(self._log_fd, b"==== pkdq: child processes still hold the terminal; "
                                         b"what they write from here on is not logged\n")
            for fd in (1, 2):
                self._flush_pending(fd)
            for read_end in list(self._pipes):
                os.close(read_end)
            self._pipes.clear()
            for saved in self._saved.values():
                os.close(saved)
            self._saved.clear()
            os.close(self._log_fd)
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)

    # ------------------------------------------------------------------ the reader
    def _pump(self) -> None:
        while True:
            with self._lock:
                live = list(self._pipes)
            if not live:
                return
            try:
                ready, _, _ = select.select(live, [], [], 0.5)
            except (OSError, ValueError):  # closed under us by close() after its timeout
                return
            with self._lock:
                for read_end in ready:
                    if read_end in self._pipes and not self._drain(read_end):
                        fd = self._pipes.pop(read_end)
                        self._flush_pending(fd)
                        os.close(read_end)
                if self._closed and not self._pipes:
                    return

    def _drain(self, read_end: int) -> bool:
        """Handle what the pipe holds now; False at end-of-file."""
        fd = self._pipes[read_end]
        while True:
            try:
                data = os.read(read_end, 1 << 16)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            self._handle(fd, data)

    def _handle(self, fd: int, data: bytes) -> None:
        _write_all(self._log_fd, data)
        if self.verbose:
            _write_all(self._saved[fd], data)
            return
        pending = self._pending[fd] + data
        *lines, rest = pending.split(b"\n")
        if len(rest) > _MAX_PENDING:
            lines, rest = [*lines, rest], b""
        self._pending[fd] = rest
        for line in lines:
            self._show(fd, line)

    def _flush_pending(self, fd: int) -> None:
        if self._pending[fd] and not self.verbose:
            self._show(fd, self._pending[fd])
        self._pending[fd] = b""

    def _show(self, fd: int, line: bytes) -> None:
        text = pkdq_line(line.decode("utf-8", errors="replace"))
        if text is not None:
            _write_all(self._saved[fd], text.encode() + b"\n")


def _write_all(fd: int, data: bytes) -> None:
    """os.write until done; a terminal that went away must not stop the run (the log has it)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            time.sleep(0.01)
        except OSError:
            return


_active: TerminalCapture | None = None


def capture_terminal(run_dir: Path, verbose: bool = False, header: str = "") -> TerminalCapture:
    """Tee this process's terminal into `run_dir/run.log` for the rest of its life (see module
    docstring); a second call in the same process returns the first capture."""
    global _active
    if _active is None:
        _active = TerminalCapture(Path(run_dir) / LOG_NAME, verbose).start(header)
    return _active
