"""The `resources:` section of a recipe, and whether this machine has what it asks for.

Resources say *where and on how many processes* a stage runs, never *what* it computes, so they
are not part of a stage's resume key: a run started on a laptop can resume on a GPU box and reuse
every finished stage. What changes results (e.g. `distill.precision: bf16-autocast`) belongs to
the stage's own config. Only distill runs on several processes today; prune and quantize are
single-process stages.

    resources:
      distill: {nproc_per_node: 2, nnodes: 1, device: cpu, strategy: ddp}
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StageResources(BaseModel):
    """Processes, device and parallel strategy for one stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    nproc_per_node: int = Field(1, ge=1, le=1024, description="processes on each machine")
    nnodes: int = Field(1, ge=1, le=4096, description="machines")
    device: Literal["cpu", "cuda"] = "cpu"
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: full copies, averaged gradients; fsdp: shard student and teacher")
    rdzv_endpoint: str | None = Field(
        None, description="host:port every machine can reach (needed when nnodes > 1)")

    @model_validator(mode="after")
    def _endpoint_for_many_nodes(self) -> StageResources:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint (host:port that every node reaches)")
        return self

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def launched(self) -> bool:
        """Run through torchrun: several processes, or a GPU (device placement lives there)."""
        return self.world_size > 1 or self.device == "cuda"


class Resources(BaseModel):
    """Per-stage resources; a stage not named runs as one CPU process."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    distill: StageResources = StageResources()


class ResourceError(RuntimeError):
    """One line: which stage asks for what this machine lacks."""


def usable_cpus() -> int:
    """CPU cores this process may run on (affinity-aware, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cuda_devices() -> tuple[int, str]:
    """(visible CUDA devices, a note on why there are none)."""
    import torch

    if not torch.cuda.is_available():
        build = torch.__version__
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no driver/device"
        return 0, f"{why}, torch {build}"
    return torch.cuda.device_count(), ""


def missing(stage: str, res: StageResources) -> str | None:
    """What this machine lacks for `res` (one line), or None when it can run it.

    Only this node's share is checked: with nnodes > 1 the other machines check their own.
    """
    need = res.nproc_per_node
    if res.device == "cuda":
        have, why = cuda_devices()
        if have < need:
            note = f" ({why})" if why else ""
            return (f"resources.{stage}: {need} process(es) on cuda need {need} CUDA device(s); "
                    f"this machine has {have}{note}")
    elif need > usable_cpus():
        return (f"resources.{stage}: {need} CPU processes need {need} CPU cores; this machine "
                f"has {usable_cpus()}")
    return None


def check_machine(resources: Resources) -> None:
    """Refuse, before anything runs, a recipe whose stages need more than this machine has."""
    for stage in type(resources).model_fields:
        problem = missing(stage, getattr(resources, stage))
        if problem:
            raise ResourceError(problem)


def threads_per_process(total: int, res: StageResources) -> int:
    """Split the recipe's CPU thread budget over this node's processes (at least one each)."""
    return max(1, total // res.nproc_per_node)


@cache
def native_bf16(device: str) -> bool:
    """Whether bf16 matmuls run natively on `device`: CUDA, or a CPU with AVX512-BF16 / AMX-BF16.

    On a CPU without them (AVX2-only, e.g. many AMD EPYC) bf16 is emulated: measured 1.2 GFLOPS
    against 33 GFLOPS for fp32 at 512x512 on one such core, which turned the default recipe's
    32-step KD from 3 minutes into about two hours. Read from /proc/cpuinfo, so the answer is
    deterministic for a machine (a timing probe would not be).
    """
    if device == "cuda":
        return True
    try:
        with open("/proc/cpuinfo") as handle:
            flags = {flag for line in handle if line.startswith("flags")
                     for flag in line.split(":", 1)[1].split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def concrete_precision(precision: str, device: str) -> str:
    """`auto` made concrete for this machine: bf16 autocast where bf16 is native, else fp32."""
    if precision != "auto":
        return precision
    return "bf16-autocast" if native_bf16(device) else "fp32"


def settle_for_machine(kind: str, config: Any, resources: Resources | None) -> Any:
    """A stage config with machine-dependent choices (`precision: auto`) made concrete.

    Called before a unit's key is computed, so the key, the stage and its records all carry
    what was actually computed: a KD unit finished in bf16 on one machine is never reused as
    the fp32 result on another.
    """
    if kind != "distill" or getattr(config, "precision", None) != "auto":
        return config
    device = resources.distill.device if resources else "cpu"
    return config.model_copy(update={"precision": concrete_precision("auto", device)})
