"""Kill a run anywhere, resume it, get the same result; and a full run never leaves the machine.

One uninterrupted `pkdq run` of the tiny Llama (prune -> KD -> quantize, `tiny_resume_recipe`)
runs once per module under a Python audit hook (`reference`), and serves both tests:

- `test_full_run_makes_no_network_connection` (issue 15, part 7): every socket connect, name
  lookup and datagram send of every Python process of that run (pkdq, the ephemeral Prefect
  server, any helper process) is recorded with its address; anything but loopback (127.0.0.0/8,
  ::1) or a Unix socket fails the test, so a dependency that starts phoning home fails CI.
- `test_kill_anywhere_resumes_to_the_same_result` (issue 15, part 5) -- LONG, about 3-4 minutes
  on 2 CPU cores: the same recipe in a fresh folder, SIGKILLed (the whole process group, as a
  crash or an OOM kill would) at a dozen moments spread over every stage (mid-KD after a
  checkpoint too), every evaluation and the report, and restarted each time with the same
  command. The final model's fingerprint and every figure of report.json must equal the
  uninterrupted run's. Kill moments are chosen by watching the run folder and the run's log for
  markers, plus two time offsets; the moments actually hit, with what the folder showed at each,
  are printed and written to `kill_points.json` beside the run.

The restarts talk to one Prefect server started by the test (its startup is paid once, not per
restart); the audited reference run uses pkdq's default ephemeral server, as a user's run does.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tiny_recipes import tiny_resume_recipe

from tasks.core.common import REPO_ROOT, read_json

RUN_NAME = "tiny-resume"
UNITS = ["00-baseline", "01-prune", "02-distill", "03-quantize"]
KD_STEPS = 16  # tiny_resume_recipe: 1024 tokens / (2 x 32)
RUN_TIMEOUT_S = 600

# --------------------------------------------------------------------------- network audit

# Installed as `sitecustomize` for the audited run's processes only (a folder put first on their
# PYTHONPATH), so it runs before pkdq, Prefect or any dependency is imported, in every Python
# child process too (they inherit the environment). An audit hook must never raise: a failure to
# record is itself recorded as a line that the test cannot parse.
AUDIT_HOOK = r'''
import json as _json
import os as _os
import sys as _sys

_LOG = _os.environ.get("PKDQ_NET_AUDIT_LOG")
_ADDRESS_EVENTS = ("socket.connect", "socket.sendto", "socket.sendmsg")
_NAME_EVENTS = ("socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr")


def _pkdq_net_audit(event, args):
    if not event.startswith("socket."):
        return
    try:
        if event in _ADDRESS_EVENTS:
            if args[1] is None:
                return
            row = {"family": int(args[0].family), "address": args[1]}
        elif event == "socket.getaddrinfo":
            row = {"family": int(args[2] or 0), "address": [args[0], args[1]]}
        elif event in _NAME_EVENTS:
            row = {"family": None, "address": args[0]}
        else:
            return
        row.update(event=event, pid=_os.getpid(), argv0=(_sys.argv or [""])[0])
        line = _json.dumps(row, default=repr)
    except Exception as exc:  # never break the program under audit
        line = "unrecorded %s: %r" % (event, exc)
    with open(_LOG, "a") as out:
        out.write(line + "\n")


if _LOG:
    _sys.addaudithook(_pkdq_net_audit)
'''


def _host_is_loopback(host: Any) -> bool:
    if host in (None, "", "localhost", "localhost.localdomain", "0.0.0.0", "::"):
        return True  # None/"": a passive (bind) lookup; 0.0.0.0 and :: reach this host only
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    try:
        ip = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return False  # a host name other than localhost: a lookup that may leave the machine
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def is_local(row: dict[str, Any]) -> bool:
    """True for a Unix socket, or an attempt whose address is loopback."""
    if row["family"] == int(socket.AF_UNIX):
        return True
    address = row["address"]
    host = address[0] if isinstance(address, list) else address
    return _host_is_loopback(host)


def audit_summary(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Attempt counts by event, address family and host (the line the lead reports)."""
    names = {int(socket.AF_UNIX): "AF_UNIX", int(socket.AF_INET): "AF_INET",
             int(socket.AF_INET6): "AF_INET6", 0: "AF_UNSPEC", None: "-"}
    counts: Counter[str] = Counter()
    for row in rows:
        address = row["address"]
        host = "unix socket" if row["family"] == int(socket.AF_UNIX) else (
            address[0] if isinstance(address, list) else address)
        counts[f"{row['event']} {names.get(row['family'], row['family'])} {host}"] += 1
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------- running pkdq


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the test process dies (Linux PR_SET_PDEATHSIG), so a
    test run that is itself killed leaves no server or pkdq run behind in its own session."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)


def _launch(recipe: Path, runs: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`pkdq run RECIPE --runs-dir RUNS` in its own session (so killpg reaches every child)."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "pkdq", "run", str(recipe),
                                 "--runs-dir", str(runs)], cwd=REPO_ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_die_with_parent)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = RUN_TIMEOUT_S) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"pkdq run did not finish in {timeout:.0f}s: {_tail(log)}")
    assert proc.returncode == 0, _tail(log)


def _tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else "(no log)"


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    return env


def report_figures(run_dir: Path) -> dict[str, Any]:
    """Every figure of report.json by its JSON path: numbers, booleans and fingerprints.

    Left out: what differs between two identical runs by nature (wall and CPU times, speeds,
    peak memory, timestamps, attempt counts, paths) and `resumed_from_step` (where KD resumed:
    the point of a resumed run, None in an uninterrupted one).
    """
    skip_keys = {"attempts", "peak_rss_bytes", "resumed_from_step", "created"}

    def skipped(key: str) -> bool:
        return key in skip_keys or key.endswith("_s") or "_per_s" in key or key == "speed"

    out: dict[str, Any] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if not skipped(str(key)):
                    walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}/{i}")
        elif isinstance(node, (bool, int, float)) or node is None:
            out[path] = node
        elif path.endswith("/fingerprint"):
            out[path] = node

    walk(read_json(run_dir / "report.json"), "")
    return out


def final_fingerprint(run_dir: Path) -> str:
    run = read_json(run_dir / "run.json")
    stage = read_json(run_dir / "03-quantize" / "stage.json")
    assert run["final_model"]["fingerprint"] == stage["model"]["fingerprint"]
    return run["final_model"]["fingerprint"]


class Reference:
    """The uninterrupted, audited run, started in the background: on 2 cores it runs beside the
    kill sequence (both are single-threaded), which waits for it only to compare at the end."""

    def __init__(self, base: Path, model_path: Path) -> None:
        self.env, self.audit_log = audited_env(base)
        self.log = base / "reference.log"
        self.run_dir = base / "runs" / RUN_NAME
        self.started = time.monotonic()
        self.proc = _launch(tiny_resume_recipe(base, model_path), base / "runs", self.env,
                            self.log)
        self.wall_s: float | None = None
        self.audit: list[dict[str, Any]] = []
        self.unparsed: list[str] = []

    def finished(self) -> Reference:
        if self.wall_s is None:
            _finish(self.proc, self.log)
            self.wall_s = time.monotonic() - self.started
            self.audit, self.unparsed = read_audit(self.audit_log)
            print(f"\nreference run: {self.wall_s:.1f}s, {len(self.audit)} socket events audited")
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def reference(tiny_llama_ref, tmp_path_factory):
    """One uninterrupted run of `tiny_resume_recipe` under the network audit hook."""
    ref = Reference(tmp_path_factory.mktemp("reference"), tiny_llama_ref.path)
    yield ref
    ref.stop()


def audited_env(folder: Path) -> tuple[dict[str, str], Path]:
    """Environment whose Python processes (and their children) record socket use to a file."""
    site = folder / "audit-site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(AUDIT_HOOK)
    audit_log = folder / "network-audit.jsonl"
    audit_log.touch()
    pythonpath = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return _env(PYTHONPATH=pythonpath, PKDQ_NET_AUDIT_LOG=str(audit_log)), audit_log


def read_audit(audit_log: Path) -> tuple[list[dict[str, Any]], list[str]]:
    rows, unparsed = [], []
    for line in audit_log.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            unparsed.append(line)
    return rows, unparsed


def test_audit_hook_sees_a_grandchild_phoning_home(tmp_path):
    """The hook catches what the full-run test guards against, in a child of a child: a name
    lookup and a connect to a non-loopback address (a documentation-range IP, never answered:
    the nonblocking connect returns at once). Loopback and Unix sockets pass."""
    env, audit_log = audited_env(tmp_path)
    grandchild = ("import socket\n"
                  "s = socket.socket(); s.setblocking(False); s.connect_ex(('192.0.2.1', 443))\n"
                  "socket.socket().connect_ex(('127.0.0.1', 9))\n"
                  "socket.socket(socket.AF_UNIX).connect_ex('/nonexistent.sock')\n"
                  "try:\n    socket.getaddrinfo('phone-home.invalid', 443)\n"
                  "except OSError:\n    pass\n")
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"
    subprocess.run([sys.executable, "-c", child], env=env, check=True, timeout=60)
    rows, unparsed = read_audit(audit_log)
    assert not unparsed
    remote = sorted(str(r["address"]) for r in rows if not is_local(r))
    assert remote == ["['192.0.2.1', 443]", "['phone-home.invalid', 443]"], rows
    assert sum(is_local(r) for r in rows) == 2, rows


# --------------------------------------------------------------------------- kill anywhere


@dataclass
class Attempt:
    proc: subprocess.Popen
    log: Path
    started: float
    run_log_offset: int

    def text(self, run_dir: Path) -> str:
        """This attempt's output: its terminal, plus what it added to the run's own log."""
        out = self.log.read_text(errors="replace") if self.log.is_file() else ""
        run_log = run_dir / "run.log"
        if run_log.is_file():
            with open(run_log, "rb") as handle:
                handle.seek(self.run_log_offset)
                out += handle.read().decode(errors="replace")
        return out


@dataclass
class Moment:
    """A kill moment: `reached(run_dir, attempt)` turns true once the run has got that far;
    `gone` once the run is past it without it ever having been seen (then it is skipped)."""

    name: str
    reached: Callable[[Path, Attempt], bool]
    gone: Callable[[Path, Attempt], bool] = lambda _run, _a: False


def _exists(rel: str) -> Callable[[Path, Attempt], bool]:
    return lambda run, _a: (run / rel).exists()


def _logged(marker: str, after: str = "") -> Callable[[Path, Attempt], bool]:
    """The marker appears in this attempt's output (after the line containing `after`)."""

    def reached(run: Path, attempt: Attempt) -> bool:
        text = attempt.text(run)
        start = text.find(after) if after else 0
        return start >= 0 and marker in text[start:]

    return reached


def _after(seconds: float) -> Callable[[Path, Attempt], bool]:
    return lambda _run, attempt: time.monotonic() - attempt.started >= seconds


def kd_checkpoint_step(run: Path) -> int:
    """The step of KD's last mid-stage checkpoint (0: none)."""
    try:
        return int(json.loads((run / "02-distill/checkpoint/state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


def _kd_resumed_then_saved(run: Path, attempt: Attempt) -> bool:
    """This attempt resumed KD from a checkpoint and has written a later one since."""
    found = re.search(r"resumed from the checkpoint at step (\d+)", attempt.text(run))
    return found is not None and kd_checkpoint_step(run) > int(found.group(1))


def _run_finished(run: Path, _a: Attempt) -> bool:
    try:
        return read_json(run / "run.json")["status"] == "finished"
    except (OSError, ValueError, KeyError):
        return False


MOMENTS = [
    Moment("startup: 2 s after launch", _after(2.0)),
    Moment("baseline eval mid-way (arc_easy scored)", _logged("[evaluate] arc_easy:")),
    Moment("prune begun (01-prune/)", _exists("01-prune")),
    Moment("prune finished, before its eval (01-prune/stage.json)",
           _exists("01-prune/stage.json")),
    Moment("prune eval begun (01-prune/eval/)", _exists("01-prune/eval")),
    Moment("KD mid-training, after a checkpoint (02-distill/checkpoint/state.json)",
           _exists("02-distill/checkpoint/state.json"), gone=_exists("02-distill/stage.json")),
    Moment("KD mid-training again: resumed from a checkpoint, then saved a later one",
           _kd_resumed_then_saved, gone=_exists("02-distill/stage.json")),
    Moment("while resuming KD: 5 s after launch", _after(5.0)),
    Moment("KD eval mid-way (piqa scored)", _logged("[evaluate] piqa:", after="[02-distill]")),
    Moment("quantize begun (03-quantize/)", _exists("03-quantize")),
    Moment("quantize eval begun (03-quantize/eval/)", _exists("03-quantize/eval")),
    Moment("all units done, report next (run.json status finished)", _run_finished),
    Moment("report mid-way (report.json written)", _exists("report.json")),
]


def where(run_dir: Path) -> str:
    """What the run folder shows: the first unfinished unit and its partial files."""
    if not (run_dir / "run.json").is_file():
        return "no run.json yet (before the flow's first write)"
    for unit in UNITS:
        folder = run_dir / unit
        has_stage = unit == "00-baseline" or (folder / "stage.json").is_file()
        if not has_stage:
            present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
            kd_step = kd_checkpoint_step(run_dir) if unit == "02-distill" else 0
            step = f", KD checkpoint at step {kd_step} of {KD_STEPS}" if kd_step else ""
            return f"in {unit} (stage): {present}{step}"
        if not (folder / "eval.json.done").is_file():
            present = sorted(p.name for p in (folder / "eval").iterdir()) \
                if (folder / "eval").is_dir() else []
            return f"in {unit} eval: eval/ holds {present}" if (folder / "eval").is_dir() \
                else f"{unit}: eval not begun"
    reports = sorted(p.name for p in run_dir.glob("report*"))
    return f"all units finished; report files {reports}"


@dataclass
class KillLog:
    hits: list[dict[str, Any]] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """One local Prefect server for all restarts: each `pkdq run` would otherwise start its own
    ephemeral one (10-20 s here) again."""
    home = tmp_path_factory.mktemp("prefect-server")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}/api"
    env = _env(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false", DO_NOT_TRACK="1")
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host",
                                 "127.0.0.1", "--port", str(port), "--no-ui", "--analytics-off"],
                                cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent)
    try:
        yield proc, log, url, home
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_kill_anywhere_resumes_to_the_same_result(prefect_server, reference, tiny_llama_ref,
                                                 tmp_path):
    """LONG (~3-4 min): a dozen SIGKILLs over every stage, evaluation and the report; each time
    the same command resumes; the final model and every report figure equal an uninterrupted
    run's. See the module docstring."""
    from flows.serve import wait_healthy

    server, server_log, url, home = prefect_server
    wait_healthy(url, server, server_log)
    env = _env(PREFECT_API_URL=url, PREFECT_HOME=str(home))
    recipe = tiny_resume_recipe(tmp_path, tiny_llama_ref.path)
    runs = tmp_path / "runs"
    run_dir = runs / RUN_NAME
    kills = KillLog()
    started = time.monotonic()

    def launch(n: int) -> Attempt:
        run_log = run_dir / "run.log"
        offset = run_log.stat().st_size if run_log.is_file() else 0
        log = tmp_path / f"attempt-{n:02d}.log"
        return Attempt(_launch(recipe, runs, env, log), log, time.monotonic(), offset)

    attempt = launch(1)
    for moment in MOMENTS:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not moment.reached(run_dir, attempt):
            if attempt.proc.poll() is not None or time.monotonic() > deadline \
                    or moment.gone(run_dir, attempt):
                break
            time.sleep(0.05)
        if attempt.proc.poll() is None and moment.gone(run_dir, attempt) \
                and not moment.reached(run_dir, attempt):
            kills.missed.append(moment.name)
            continue
        if attempt.proc.poll() is not None:  # it got past this moment (or failed) in one go
            assert attempt.proc.returncode == 0, _tail(attempt.log)
            kills.missed.append(moment.name)
            break
        assert time.monotonic() <= deadline, f"{moment.name}: not reached; {_tail(attempt.log)}"
        os.killpg(attempt.proc.pid, signal.SIGKILL)
        attempt.proc.wait()
        lines = [x for x in attempt.text(run_dir).splitlines() if x.strip()]
        kills.hits.append({"moment": moment.name,
                           "attempt_s": round(time.monotonic() - attempt.started, 1),
                           "state": where(run_dir),
                           "last_output": lines[-1][-160:] if lines else ""})
        attempt = launch(len(kills.hits) + 1)
    kills.missed += [m.name for m in MOMENTS if m.name not in
                     {h["moment"] for h in kills.hits} | set(kills.missed)]
    _finish(attempt.proc, attempt.log)
    wall = time.monotonic() - started
    reference = reference.finished()

    lines = [f"{i:2d}. {h['moment']} @ {h['attempt_s']}s -> {h['state']}"
             for i, h in enumerate(kills.hits, 1)]
    print(f"\nkill-anywhere: {len(kills.hits)} kills, {len(kills.hits) + 1} attempts, "
          f"{wall:.0f}s (reference run {reference.wall_s:.0f}s)")
    print("\n".join(lines))
    if kills.missed:
        print(f"missed (the run was already past them): {kills.missed}")
    (runs / "kill_points.json").write_text(json.dumps(
        {"hits": kills.hits, "missed": kills.missed, "wall_s": wall}, indent=2))

    run = read_json(run_dir / "run.json")
    # a kill before the flow's first write leaves no attempt behind
    assert run["status"] == "finished" and 2 <= run["attempts"] <= len(kills.hits) + 1
    assert len(kills.hits) >= 10, lines
    kd = read_json(run_dir / "02-distill" / "metrics.json")
    assert kd["steps"] == KD_STEPS
    assert kd["resumed_from_step"] is not None, "KD never resumed from its mid-stage checkpoint"
    assert final_fingerprint(run_dir) == final_fingerprint(reference.run_dir)
    ours, theirs = report_figures(run_dir), report_figures(reference.run_dir)
    assert ours.keys() == theirs.keys()
    differ = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    assert not differ, differ


# After the kill test: the reference run overlaps it (see `Reference`).
def test_full_run_makes_no_network_connection(reference):
    reference = reference.finished()
    summary = audit_summary(reference.audit)
    print("\nnetwork audit of a full run (event family host: count):")
    for key, count in summary.items():
        print(f"  {key}: {count}")
    assert not reference.unparsed, reference.unparsed[:5]
    # The hook is live in the run's processes: the ephemeral Prefect API is reached on loopback.
    assert any(r["event"] == "socket.connect" for r in reference.audit), summary
    remote = [r for r in reference.audit if not is_local(r)]
    assert not remote, f"non-loopback connection attempts: {remote[:10]}"
    assert read_json(reference.run_dir / "run.json")["status"] == "finished"
