"""Run the distill stage under torchrun when a recipe's resources ask for several processes.

`distill_runner(resources)` returns a function with the signature of every stage,
`(ModelRef, DistillConfig, StageContext) -> StageResult`: the in-process `distill_stage` by
default, or `launch_distill`, which writes the config as JSON, starts
`torchrun ... -m tasks.distill.worker`, streams its output, and reads back the result rank 0
wrote. The pipeline does not know the difference.

Single node: the rendezvous goes through a FileStore in a temp folder (no TCP server for the
torchrun agent) and the process group's store and gloo sockets are bound to 127.0.0.1, so a
local multi-process run opens nothing beyond loopback. Several nodes: c10d rendezvous over TCP at
`rdzv_endpoint`; pkdq starts this node's share and prints the command every other node runs (on a
filesystem shared at the same path).
"""

from __future__ import annotations

import collections
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from tasks.core.common import (
    REPO_ROOT,
    ModelRef,
    StageContext,
    StageResult,
    read_json,
    write_json_atomic,
)
from tasks.core.recipe import DistillConfig
from tasks.core.resources import ResourceError, StageResources, missing, threads_per_process

LAUNCH_DIR = "launch"


class LaunchError(RuntimeError):
    """torchrun exited non-zero; carries the last lines of its output."""


def torchrun_command(res: StageResources, worker_args: list[str], rdzv_dir: Path,
                     run_id: str = "pkdq") -> list[str]:
    """The torchrun command line (as `python -m torch.distributed.run`, immune to PATH).

    With nnodes > 1 every node runs this same command; the rendezvous assigns ranks.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run",
           "--nnodes", str(res.nnodes), "--nproc-per-node", str(res.nproc_per_node),
           "--max-restarts", "0"]
    if res.nnodes == 1:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", str(rdzv_dir / "rdzv.store"),
                "--rdzv-conf", "store_type=file", "--rdzv-id", run_id,
                "--local-addr", "127.0.0.1"]
    else:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", str(res.rdzv_endpoint),
                "--rdzv-id", run_id]
    return [*cmd, "-m", "tasks.distill.worker", *worker_args]


def worker_args(student: ModelRef, cfg_file: Path, ctx: StageContext, res: StageResources,
                threads: int) -> list[str]:
    """Arguments of `tasks.distill.worker` for this stage."""
    if ctx.teacher is None:
        raise ValueError("distill: no teacher; the flow must pass the model before pruning "
                         "as ctx.teacher")
    return ["--student", str(student.path), "--teacher", str(ctx.teacher.path),
            "--config", str(cfg_file), "--out", str(Path(ctx.out_dir).resolve()),
            "--seed", str(ctx.seed), "--threads", str(threads), "--data", str(ctx.data),
            "--stage-name", ctx.stage_name or "distill",
            "--strategy", res.strategy, "--device", res.device]


def launch_env(res: StageResources, threads: int) -> dict[str, str]:
    """Environment for torchrun: the repo importable, threads split, a single node on loopback."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if res.nnodes == 1:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # no agent TCP store: FileStore only
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    return env


def launch_distill(student: ModelRef, cfg: DistillConfig, ctx: StageContext,
                   res: StageResources) -> StageResult:
    """Run the distill stage as `res.world_size` processes and return rank 0's result."""
    problem = missing("distill", res)
    if problem:
        raise ResourceError(problem)
    out_dir = Path(ctx.out_dir).resolve()
    launch_dir = out_dir / LAUNCH_DIR
    launch_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = launch_dir / "config.json"
    write_json_atomic(cfg_file, cfg.model_dump(mode="json"))
    threads = threads_per_process(ctx.threads, res)
    args = worker_args(student, cfg_file, ctx, res, threads)
    result_file = launch_dir / "result.json"
    result_file.unlink(missing_ok=True)
    run_id = f"pkdq-{out_dir.parent.name}-{out_dir.name}"
    with tempfile.TemporaryDirectory(prefix="pkdq-rdzv-") as rdzv:
        cmd = torchrun_command(res, args, Path(rdzv), run_id)
        shown = shlex.join(["torchrun", *cmd[3:]])
        (launch_dir / "command.txt").write_text(shown + "\n")
        print(f"[{ctx.stage_name or 'distill'}] launching {res.world_size} processes "
              f"({res.strategy}, {res.device}): {shown}", flush=True)
        if res.nnodes > 1:
            print(f"[distill] run the same command on each of the other {res.nnodes - 1} "
                  f"node(s), in {REPO_ROOT}, with this run folder at the same path", flush=True)
        _run_streaming(cmd, launch_env(res, threads))
    if not result_file.is_file():
        raise LaunchError(f"distill: torchrun finished but rank 0 wrote no {result_file}")
    result = read_json(result_file)
    return StageResult(ModelRef.from_json(result["model"]),
                       {**result["metrics"], "world_size": result["world_size"],
                        "strategy": result["strategy"], "device": result["device"]})


def _run_streaming(cmd: list[str], env: dict[str, str]) -> None:
    """Run `cmd`, echoing its output line by line (so Prefect's log capture sees it)."""
    tail: collections.deque[str] = collections.deque(maxlen=40)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            print(line, end="", flush=True)
        code = proc.wait()
    except BaseException:
        proc.terminate()  # our own child: torchrun forwards the signal to its workers
        proc.wait()
        raise
    if code != 0:
        raise LaunchError(f"distill: torchrun exited with code {code}: {_first_error(tail)}")


def _first_error(lines) -> str:
    """The workers' own exception line (e.g. '[rank0]: ValueError: ...'), not torchrun's."""
    errors = [line for line in lines if re.match(r"^\[rank\d+\]: \w+(Error|Exception)\b", line)]
    if errors:
        return errors[0].split(": ", 1)[1]
    return next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")


def distill_runner(res: StageResources | None) -> Callable[..., StageResult]:
    """The distill stage function for these resources: in-process, or through torchrun."""
    if res is None or not res.launched:
        from tasks.distill.stage import distill_stage

        return distill_stage

    def run(student: ModelRef, cfg: DistillConfig, ctx: StageContext) -> StageResult:
        return launch_distill(student, cfg, ctx, res)

    return run
