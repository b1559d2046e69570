"""A local Prefect server plus a process worker polling a work pool: started, recorded, stopped.

`pkdq serve` is the one-machine version of a pkdq cluster: the Prefect server (API + database)
listens on 127.0.0.1 only, and a `process` worker runs each submitted flow run as a subprocess of
itself. On a real cluster the server runs once and `prefect worker start --pool NAME --type
process` runs on every machine that should take runs (with the repo, its venv and the run folder
at the same paths); `pkdq run --pool NAME --api-url ...` submits to it from anywhere.

Both processes start in their own session (process group = pid) and are recorded with their pids
in `<home>/pkdq-serve.json`, so `pkdq stop` ends exactly them (and the flow runs the worker
started) by pid, never by name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.core.common import REPO_ROOT, cache_dir, write_json_atomic

STATE_FILE = "pkdq-serve.json"
DEFAULT_PORT = 4200
DEFAULT_POOL = "pkdq"


class ServeError(RuntimeError):
    """One line: what did not start, and where its log is."""


@dataclass
class Service:
    """What `pkdq serve` started, as recorded for `pkdq stop` and `pkdq run --pool`."""

    api_url: str
    pool: str
    server_pid: int
    worker_pid: int
    home: str
    logs: str
    ui_url: str = ""  # empty when served without --ui

    def stop_hint(self) -> str:
        return f"pkdq stop --home {self.home}   (or: kill {self.worker_pid} {self.server_pid})"


def default_home(port: int) -> Path:
    """Each served server has its own PREFECT_HOME (SQLite database), apart from ephemeral runs."""
    return cache_dir() / "prefect-serve" / str(port)


def api_url(host: str, port: int) -> str:
    return f"http://{host}:{port}/api"


def ui_url(host: str, port: int) -> str:
    return f"http://{host}:{port}"


def prefect_env(home: Path, url: str | None = None, **extra: str) -> dict[str, str]:
    """Environment for the server, worker and flow runs: their own home, quiet, repo importable."""
    env = dict(os.environ)
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p),
        "PYTHONUNBUFFERED": "1",
        **extra,
    })
    if url:
        env["PREFECT_API_URL"] = url
    else:
        env.pop("PREFECT_API_URL", None)
    return env


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start detached in its own session (pgid == pid), output to a log file."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _log_tail(log: Path, lines: int = 5) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    """Poll GET /api/health until the server answers (12-22 s here), or fail with its log tail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServeError(f"prefect server exited with code {proc.returncode}; log {log}: "
                             f"{_log_tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise ServeError(f"prefect server at {url} not healthy after {timeout_s:.0f}s; log {log}")


def ensure_pool(url: str, pool: str) -> bool:
    """Create a `process` work pool unless it exists; True when created."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with SyncPrefectClient(url) as client:
        try:
            client.read_work_pool(pool)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            return True


def wait_worker_online(url: str, pool: str, proc: subprocess.Popen, log: Path,
                       timeout_s: float = 120) -> None:
    """Until the worker has sent its first heartbeat, a submitted run could sit unclaimed."""
    from prefect.client.orchestration import SyncPrefectClient

    deadline = time.monotonic() + timeout_s
    with SyncPrefectClient(url) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServeError(f"prefect worker exited with code {proc.returncode}; log {log}: "
                                 f"{_log_tail(log)}")
            workers = client.read_workers_for_work_pool(pool, offset=0, limit=50)
            if any(str(getattr(w.status, "value", w.status)).upper() == "ONLINE" for w in workers):
                return
            time.sleep(0.5)
    raise ServeError(f"prefect worker for pool '{pool}' not online after {timeout_s:.0f}s; "
                     f"log {log}")


def server_settings(port: int, ui: bool) -> dict[str, str]:
    """The server's own address as settings, not only as `--host/--port` flags.

    `prefect server start --port P` binds P but leaves PREFECT_SERVER_API_PORT at its default
    (4200), and the UI learns where the API is from `GET /ui-settings`, whose `api_url` is
    PREFECT_UI_API_URL, else PREFECT_API_URL, else http://<api host>:<api port>/api from those
    settings. So on any port but 4200 the UI called http://127.0.0.1:4200/api and showed
    "Can't connect to Server API". Setting the address here makes all three agree.
    """
    return {
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": api_url("127.0.0.1", port),
        "PREFECT_UI_URL": ui_url("127.0.0.1", port),
        "PREFECT_UI_ENABLED": str(ui).lower(),
    }


def serve(port: int = DEFAULT_PORT, pool: str = DEFAULT_POOL, home: Path | None = None,
          ui: bool = False, query_seconds: float = 5.0, limit: int = 1) -> Service:
    """Start server (127.0.0.1:port) and worker, create the pool if missing, record the pids."""
    home = Path(home or default_home(port)).resolve()
    existing = read_service(home)
    if existing and alive(existing.server_pid):
        raise ServeError(f"a pkdq server is already running from {home} (pid "
                         f"{existing.server_pid}, {existing.api_url}); stop it: "
                         f"{existing.stop_hint()}")
    url = api_url("127.0.0.1", port)
    logs = home / "logs"
    server_log, worker_log = logs / "server.log", logs / "worker.log"
    server = _spawn([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                     "--port", str(port), "--ui" if ui else "--no-ui", "--analytics-off"],
                    prefect_env(home, **server_settings(port, ui)), server_log)
    worker = None
    try:
        wait_healthy(url, server, server_log)
        ensure_pool(url, pool)
        worker = _spawn([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool,
                         "--type", "process", "--name", f"pkdq-{pool}-{port}",
                         "--limit", str(limit), "--install-policy", "never"],
                        prefect_env(home, url, PREFECT_WORKER_QUERY_SECONDS=str(query_seconds)),
                        worker_log)
        wait_worker_online(url, pool, worker, worker_log)
    except BaseException:
        for proc in (worker, server):
            if proc is not None:
                _stop_group(proc.pid)
        raise
    service = Service(url, pool, server.pid, worker.pid, str(home), str(logs),
                      ui_url("127.0.0.1", port) if ui else "")
    write_json_atomic(home / STATE_FILE, asdict(service))
    return service


def read_service(home: Path) -> Service | None:
    path = Path(home) / STATE_FILE
    try:
        if not path.is_file():
            return None
    except OSError:  # a --home no file system can hold records nothing
        return None
    try:
        return Service(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:  # edited or truncated: say so, kill nothing
        raise ServeError(f"{path} is not a pkdq server record ({exc}); stop the processes "
                         "yourself and delete it") from None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_prefect_group_leader(pid: int) -> bool:
    """Guard against a recycled pid: only a Prefect process leading its own group is ours."""
    try:
        if os.getpgid(pid) != pid:
            return False
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except (ProcessLookupError, PermissionError):
        return False
    except OSError:  # no /proc (not Linux): the pgid check must do
        return True
    return b"prefect" in cmdline


def _stop_group(pid: int, grace_s: float = 15.0) -> bool:
    """SIGTERM the process group that `pid` leads (it and its children), SIGKILL if it lingers."""
    if not _is_prefect_group_leader(pid):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            reaped, _ = os.waitpid(pid, os.WNOHANG)  # our child when serve() started it here
        except ChildProcessError:
            reaped = 0
        if reaped == pid or not alive(pid):
            return True
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def stop(home: Path) -> list[int]:
    """Stop the worker, then the server recorded in `home`; return the pids that were running."""
    service = read_service(home)
    if service is None:
        raise ServeError(f"no pkdq server recorded in {home} ({STATE_FILE} missing)")
    stopped = [pid for pid in (service.worker_pid, service.server_pid) if _stop_group(pid)]
    (Path(home) / STATE_FILE).unlink(missing_ok=True)
    return stopped
