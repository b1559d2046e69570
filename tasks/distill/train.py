"""The KD training loop: budget to steps, AdamW with warmup + cosine, accumulation, clipping.

Kept small enough to read on one screen (nanoGPT's loop is the model): what a step computes is
`KDEngine.micro_step`; checkpoints, distributed ranks and held-out evals plug in from outside.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tasks.core.common import Progress
from tasks.core.recipe import DistillConfig
from tasks.distill.checkpoint import Checkpointer
from tasks.distill.distributed import Runtime
from tasks.distill.engine import KDEngine


@dataclass(frozen=True)
class TrainPlan:
    """How many optimizer steps and blocks a token budget buys (the budget is rounded up)."""

    steps: int
    micro_batches: int
    blocks: int
    tokens: int

    @classmethod
    def from_config(cls, cfg: DistillConfig) -> TrainPlan:
        per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
        steps = math.ceil(cfg.tokens / per_step)
        return cls(steps, steps * cfg.grad_accum, steps * cfg.grad_accum * cfg.batch_size,
                   steps * per_step)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at the last step (0-based step)."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup - 1, 1)
    progress = min((step - warmup) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(student, cfg: DistillConfig, steps: int, extra=()):
    """AdamW over trainable params (+ `extra`, e.g. KD projections), warmup+cosine LambdaLR."""
    params = [p for p in student.parameters() if p.requires_grad] + list(extra)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            **({"fused": True} if cfg.fused_adamw and fused_ok(params) else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, steps, cfg.min_lr_ratio)
    )
    return opt, sched


def fused_ok(params) -> bool:
    """Whether AdamW's fused kernel takes these tensors: plain (not sharded DTensor) floating
    parameters, all on one device type that has the kernel (CPU or CUDA)."""
    from torch.distributed.tensor import DTensor

    kinds = {p.device.type for p in params}
    return (len(kinds) == 1 and kinds <= {"cpu", "cuda"}
            and all(p.is_floating_point() and not isinstance(p, DTensor) for p in params))


def train_loop(
    student,
    teacher,
    blocks: torch.Tensor,
    cfg: DistillConfig,
    steps: int,
    on_eval=None,
    stage: str = "distill",
    runtime: Runtime | None = None,
    engine: KDEngine | None = None,
    checkpoints: Checkpointer | None = None,
    masks: torch.Tensor | None = None,
) -> list[dict[str, float]]:
    """Run `steps` optimizer steps over `blocks` in order (wrapping if short); return the curve.

    `engine` (`tasks.distill.engine`) computes each micro-batch's loss (default: the plain KD step);
    `checkpoints` saves every `cfg.checkpoint_every` steps and resumes from a matching save.
    A truthy return from `on_eval` stops training early (held-out plateau). `masks` (chat data,
    same shape as `blocks`) marks the tokens the loss trains on; None trains on every position.

    `on_eval(step, tokens)` is called every `cfg.eval_every` steps (not after the last one: the
    caller measures that). Each curve row averages its micro-batches. Under torchrun each rank
    trains on its rows of every global batch and logs the loss averaged over ranks (`runtime`).
    """
    with training_context(student, cfg):
        return _train_steps(student, teacher, blocks, cfg, steps, on_eval, stage,
                            runtime or Runtime(), engine or KDEngine(cfg, steps), checkpoints,
                            masks)


@contextlib.contextmanager
def training_context(student, cfg: DistillConfig) -> Iterator[None]:
    """What the student's training forward runs under: activation checkpointing and the lean
    RMSNorm (`tasks.distill.lean_norm`), each as the config asks. Held-out evals inside it are
    unchanged
    (no-grad forwards save nothing either way)."""
    from tasks.distill.lean_norm import lean_norm

    with activation_checkpointing(student, cfg.activation_checkpointing), \
            lean_norm(student, cfg.lean_norm):
        yield


@contextlib.contextmanager
def activation_checkpointing(model, enabled: bool = True) -> Iterator[None]:
    """Recompute the student's decoder layers in backward (non-reentrant checkpoints) while on.

    Only a training-mode forward checkpoints, so held-out evals inside the loop run as usual.
    Trades the layers' saved activations for one extra forward of the layers per step
    (`bench/kd_throughput.py`, variant pkdq-ckpt, measures both).
    """
    base = getattr(model, "module", model)
    if not enabled:
        yield
        return
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"distill: activation_checkpointing: {type(base).__name__} does not "
                         "support it; set activation_checkpointing: false")
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        disable = base.activation_checkpointing_disable
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        disable = base.gradient_checkpointing_disable
    try:
        yield
    finally:
        disable()


def _train_steps(student, teacher, blocks: torch.Tensor, cfg: DistillConfig, steps: int,
                 on_eval, stage: str, rt: Runtime, engine: KDEngine,
                 checkpoints: Checkpointer | None,
                 masks: torch.Tensor | None = None) -> list[dict[str, float]]:
    opt, sched = make_optimizer(student, cfg, steps, engine.parameters())
    student.train()
    progress = Progress(stage, steps)
    curve: list[dict[str, float]] = []
    cursor, tokens, start, first = 0, 0, time.perf_counter(), 1
    resumed = checkpoints.load(student, engine, opt, sched) if checkpoints else None
    if resumed is not None:
        first, cursor, tokens = resumed["step"] + 1, resumed["cursor"], resumed["tokens"]
        curve = resumed["curve"]
        if rt.is_main:
            print(f"[{stage}] resumed from the checkpoint at step {resumed['step']} of {steps}",
                  file=sys.stderr, flush=True)
    for step in range(first, steps + 1):
        engine.set_step(step)
        parts = {"loss": 0.0, "kl": 0.0, "ce": 0.0}
        step_tokens = 0
        for micro in range(cfg.grad_accum):
            rows = torch.arange(cursor, cursor + cfg.batch_size) % len(blocks)
            batch = blocks[rows]
            cursor += cfg.batch_size
            ids = rt.local_rows(batch)
            with rt.accumulating(student, sync=micro == cfg.grad_accum - 1):
                mask = None if masks is None else rt.local_rows(masks[rows]).to(ids.device)
                out = engine.micro_step(student, teacher, ids, rt.local_rows(rows), mask=mask)
                (out.loss / cfg.grad_accum).backward()
            parts["loss"] += float(out.loss.detach()) / cfg.grad_accum
            parts["kl"] += out.kd / cfg.grad_accum
            parts["ce"] += out.ce / cfg.grad_accum
            step_tokens += batch.numel()
        parts = rt.mean(parts)
        grad_norm = rt.clip_grad_norm(student, cfg.max_grad_norm)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += step_tokens
        row = {"step": step, "tokens": tokens, **parts, "lr": lr,
               "grad_norm": float(grad_norm), "time_s": time.perf_counter() - start}
        curve.append(row)
        if rt.is_main:
            progress.update(step, tokens=step_tokens, force=step == steps, **parts)
        if on_eval is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < steps:
            if on_eval(step, tokens):
                break
        if checkpoints is not None and checkpoints.due(step, steps) and rt.is_main:
            checkpoints.save(step, {"cursor": cursor, "tokens": tokens, "curve": curve},
                             student, engine, opt, sched)
    return curve
