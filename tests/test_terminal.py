"""The terminal shows pkdq's own lines; run.log gets everything (pkdq.terminal).

The real run's terminal and run.log are checked in tests/test_flow.py (it already runs the CLI
twice on the tiny Llama); here: which lines count as pkdq's, and the capture itself on a small
process that writes through every channel a run does, in a subprocess (it rewires fds 1 and 2).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pkdq.terminal import LOG_NAME, pkdq_line
from tasks.core.common import REPO_ROOT

# Lines seen on the terminal of a tiny run before pkdq.terminal existed.
PKDQ_LINES = [
    "pkdq: running tiny-run in /tmp/x/tiny-run",
    "[01-prune] calibration block 4/4 | 2,133 tok/s | elapsed 0s ETA 0s",
    "[02-distill] step 4/4 | 357 tok/s | loss 5.406 | kl 0.001033 | elapsed 1s ETA 0s",
    "[01-prune] finished earlier (key 3fa9): reused",
    "[evaluate] piqa: acc_norm 0.5000 (n=4, 1.1s) | elapsed 11.3s",
    "[model-store] converting x.gguf to safetensors in /c (once)",
    "[P-KD-Q KD (self)] starting",
    "[3fa9c1d2-kd] evaluating model",
    "info [marlin-128]: vLLM Marlin kernels need in_features divisible by 128",
    "P-KD-Q,KD-P-Q: warning [prune-oneshot]: one-shot pruning over 50%",
    "  P-KD-Q 1. P: prune FFN 50%",
    "error: RuntimeError: boom (traceback in /tmp/x/run.log)",
]
THIRD_PARTY = [
    "W1130 15:43:16.575000 24150 .venv/lib/python3.11/site-packages/torch/utils/_pytree.py:630]"
    " <enum 'KernelPreference'> is an Enum subclass and is now natively supported",
    "15:43:16.024 | WARNING | torchao - Failed to load /x/torchao/_C_mxfp8.so: Could not load",
    "15:43:05.314 | INFO    | Task run 'resolve-model-bad' - Finished in state Completed()",
    "15:42:55.630 | INFO    | prefect - Starting temporary server on http://127.0.0.1:8903",
    "15:44:01.992 | INFO    | Task run '03-quantize-bff' - Files in directory:",
    "[0 of 2] \u2591\u2591\u2591\u2591| 0:00:00 / 0:00:00 [0/2] 0.0%",
    "[W1130 15:43:16.575 socket.cpp:752] [c10d] The client socket has failed to connect",
    "[rank0]: Traceback (most recent call last):",
    "[Gloo] Rank 0 is connected to 1 peer ranks.",
    "INFO  Kernel: selected: `TorchLinear`",
    "\x1b[33mWARN\x1b[0m  Python GIL is enabled",
    "Loading weights:   0%|   | 0/20\rLoading weights: 100%|###| 20/20",
    "torch._dynamo hit config.recompile_limit (8)",
    "Traceback (most recent call last):",
    "RuntimeError: [01-prune] boom",
]


@pytest.mark.parametrize("line", PKDQ_LINES)
def test_pkdq_lines_are_shown(line):
    assert pkdq_line(line) == line


@pytest.mark.parametrize("line", THIRD_PARTY)
def test_library_lines_are_not(line):
    assert pkdq_line(line) is None


def test_prefect_lines_show_their_pkdq_message_only():
    line = ("15:43:31.657 | INFO    | Task run '01-prune-7c5' - [01-prune] calibration block 4/4 "
            "| 2,133 tok/s | elapsed 0s ETA 0s")
    assert pkdq_line(line) == "[01-prune] calibration block 4/4 | 2,133 tok/s | elapsed 0s ETA 0s"
    assert pkdq_line("12:00:00.000 | INFO    | Flow run 'a-b' - [02-distill] done") == \
        "[02-distill] done"
    # a bar redrawn in place ends in a pkdq line: the terminal would show that line
    assert pkdq_line("50%|#####   |\r[distill] step 2/4 | elapsed 1s") == \
        "[distill] step 2/4 | elapsed 1s"


# Writes through every channel a run does: print, raw fd 2 (C code), a child process, Python
# logging under Prefect's console format, warnings, torch-style logging; then crashes like a
# flow would, through the CLI's own handler.
SCRIPT = textwrap.dedent("""
    import logging, os, subprocess, sys, warnings
    from pathlib import Path
    import typer
    from pkdq.cli import _capture, _crash_to_one_line
    log = _capture(Path(sys.argv[1]), verbose=sys.argv[2] == "1")
    print("pkdq: running demo")
    print("[01-prune] calibration block 4/4 | 2,133 tok/s | elapsed 0s ETA 0s", file=sys.stderr)
    os.write(2, b"W1130 12:00:00.000000 1 torch/utils/_pytree.py:630] Enum subclass\\n")
    subprocess.run([sys.executable, "-c", "import sys; print('[02-distill] step 1/4 | child');"
                    "print('INFO  Kernel: selected: TorchLinear', file=sys.stderr)"], check=True)
    logging.basicConfig(format="%(asctime)s.%(msecs)03d | %(levelname)-7s | %(name)s - "
                               "%(message)s", datefmt="%H:%M:%S")
    logging.getLogger("torchao").warning("Failed to load _C_mxfp8.so")
    logging.getLogger("prefect").warning("[03-quantize] done in 1s")
    warnings.warn("deprecated thing")
    print("Loading weights: 50%|##  |", end="\\r", flush=True)
    try:
        with _crash_to_one_line(log):
            raise RuntimeError("boom")
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
""")


@pytest.mark.parametrize("verbose", [False, True])
def test_capture_splits_terminal_and_log(tmp_path, verbose):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(run_dir), "1" if verbose else "0"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    log = (run_dir / LOG_NAME).read_text()
    assert done.returncode == 1, done.stderr + log
    terminal = done.stdout + done.stderr
    error = f"error: RuntimeError: boom (traceback in {run_dir / LOG_NAME})"
    ours = ["pkdq: running demo", "[01-prune] calibration block 4/4", "[02-distill] step 1/4",
            "[03-quantize] done in 1s", error]
    theirs = ["_pytree.py:630] Enum subclass", "INFO  Kernel: selected", "Failed to load",
              "UserWarning: deprecated thing", "Loading weights: 50%", "Traceback (most recent",
              'File "<string>", line']
    for text in ours:
        assert text in terminal and text in log, text
    for text in theirs:
        assert text in log, text
        assert (text in terminal) == verbose, text
    assert error in done.stderr.splitlines()  # the error line on stderr, whole, in both modes
    if not verbose:  # pkdq's lines only, and a Prefect-formatted one without its prefix
        assert "pkdq: running demo" in done.stdout.splitlines()
        assert "[03-quantize] done in 1s" in done.stderr.splitlines()
        assert len(terminal.splitlines()) == len(ours)
    assert log.startswith("==== ") and "pkdq " in log.splitlines()[0]
