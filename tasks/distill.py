"""Distill stage: recover a pruned student by matching the unpruned teacher's logits.

The teacher is the model before pruning (`ctx.teacher`), frozen. The student trains on packed
training text (never evaluation data) with `kd_losses.kd_loss`: alpha * T^2 * KL + (1-alpha) * CE,
AdamW, linear warmup then cosine decay, gradient clipping and accumulation, for a token budget.
Held-out KL(teacher || student) and student perplexity on the held-out Wikipedia slice are
measured before and after (and every `eval_every` steps), so the report can show what KD bought
on text it never saw. Outputs: `model/`, `loss_curve.json`, `loss_curve.png` in `ctx.out_dir`.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tasks.common import (
    ModelRef,
    Progress,
    StageContext,
    StageResult,
    set_offline_env,
    write_json_atomic,
)
from tasks.distributed import Runtime
from tasks.kd_losses import forward_kl, get_divergence, kd_loss, next_token_ce
from tasks.model_store import is_quantized, load_model, model_ref, read_config, save_model
from tasks.recipe import DistillConfig
from tasks.textdata import load_train_texts, token_blocks


class VocabMismatchError(ValueError):
    """Teacher and student do not share a vocabulary, so their logits cannot be compared."""


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


# --------------------------------------------------------------------------- checks and setup


def vocab_size(model) -> int:
    """Rows of the output projection: the logit dimension KD compares position by position."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def check_vocab(teacher, teacher_tok, student, student_tok) -> None:
    """Refuse KD between models whose logits index different tokens (one-line error)."""
    t_size, s_size = vocab_size(teacher), vocab_size(student)
    if t_size != s_size:
        raise VocabMismatchError(
            f"distill: teacher has {t_size} output tokens, student {s_size}; KD compares logits "
            "token by token, so both models need the same vocabulary"
        )
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise VocabMismatchError(
            f"distill: teacher and student tokenizers differ ({len(teacher_tok)} vs "
            f"{len(student_tok)} tokens, or the same size with different ids); KD needs one "
            "shared tokenizer"
        )


def freeze(model) -> None:
    """Teacher: eval mode (no dropout) and no gradients, so it costs no optimizer memory."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)


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


def compute_context(precision: str, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """bf16 autocast on the inputs' device type (weights stay fp32) or nothing."""
    if precision == "bf16-autocast":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_blocks(tokenizer, cfg: DistillConfig, ctx: StageContext, n_blocks: int):
    """Packed training blocks from `<data>/train` (never evaluation files), seeded by the run."""
    texts = load_train_texts(ctx.data, cfg.source)
    try:
        return token_blocks(tokenizer, texts, cfg.seq_len, n_blocks, seed=ctx.seed)
    except ValueError as exc:
        raise ValueError(
            f"distill: tokens={cfg.tokens} needs {n_blocks} blocks of {cfg.seq_len}; the "
            f"'{cfg.source}' training text is too small ({exc}); lower tokens or use source: mixed"
        ) from None


def heldout_blocks(tokenizer, cfg: DistillConfig, ctx: StageContext) -> torch.Tensor:
    """The KD validation slice (held-out Wikipedia files), same block length as training."""
    texts = load_train_texts(ctx.data, heldout=True)
    return token_blocks(tokenizer, texts, cfg.seq_len, cfg.eval_blocks, seed=ctx.seed)


# --------------------------------------------------------------------------- held-out metrics


@torch.no_grad()  # not inference_mode: FSDP2 reuses the unsharded buffers in training later
def heldout_metrics(
    student, teacher, blocks: torch.Tensor, batch_size: int, precision: str = "fp32"
) -> dict[str, float]:
    """Token-mean KL(teacher || student) at T=1 and perplexities on held-out blocks.

    T=1 (not the training temperature) and fp32 by default (whatever the training precision) so
    the number means the same across recipes.
    """
    was_training = student.training
    student.eval()
    kl_sum = ce_sum = t_ce_sum = 0.0
    kl_n = ce_n = 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size]
        with compute_context(precision, ids.device.type):
            s_logits = student(input_ids=ids, use_cache=False).logits
            t_logits = teacher(input_ids=ids, use_cache=False).logits
        kl_sum += float(forward_kl(s_logits, t_logits, 1.0).sum())
        kl_n += ids.numel()
        n_targets = ids[:, 1:].numel()
        ce_sum += float(next_token_ce(s_logits, ids)) * n_targets
        t_ce_sum += float(next_token_ce(t_logits, ids)) * n_targets
        ce_n += n_targets
    student.train(was_training)
    return {
        "kl": kl_sum / kl_n,
        "ppl": math.exp(ce_sum / ce_n),
        "teacher_ppl": math.exp(t_ce_sum / ce_n),
        "tokens": kl_n,
    }


# --------------------------------------------------------------------------- training loop


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at the last step (0-based step)."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup - 1, 1)
    progress = min((step - warmup) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(student, cfg: DistillConfig, steps: int):
    """AdamW over trainable params, with the warmup+cosine schedule as a LambdaLR."""
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, steps, cfg.min_lr_ratio)
    )
    return opt, sched


def micro_step(student, teacher, ids: torch.Tensor, cfg: DistillConfig):
    """Forward both models on one micro-batch and return the loss parts (graph on the student)."""
    with compute_context(cfg.precision, ids.device.type):
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, use_cache=False).logits
        s_logits = student(input_ids=ids, use_cache=False).logits
    return kd_loss(s_logits, t_logits, ids, name=cfg.loss, temperature=cfg.temperature,
                   alpha=cfg.alpha)


def train_loop(
    student,
    teacher,
    blocks: torch.Tensor,
    cfg: DistillConfig,
    steps: int,
    on_eval=None,
    stage: str = "distill",
    runtime: Runtime | None = None,
) -> list[dict[str, float]]:
    """Run `steps` optimizer steps over `blocks` in order (wrapping if short); return the curve.

    `on_eval(step, tokens)` is called every `cfg.eval_every` steps (not after the last one: the
    caller measures that). Each curve row averages its micro-batches. Under torchrun each rank
    trains on its rows of every global batch and logs the loss averaged over ranks (`runtime`).
    """
    rt = runtime or Runtime()
    opt, sched = make_optimizer(student, cfg, steps)
    student.train()
    progress = Progress(stage, steps)
    curve: list[dict[str, float]] = []
    cursor, tokens, start = 0, 0, time.perf_counter()
    for step in range(1, steps + 1):
        parts = {"loss": 0.0, "kl": 0.0, "ce": 0.0}
        step_tokens = 0
        for micro in range(cfg.grad_accum):
            batch = blocks[torch.arange(cursor, cursor + cfg.batch_size) % len(blocks)]
            cursor += cfg.batch_size
            ids = rt.local_rows(batch)
            with rt.accumulating(student, sync=micro == cfg.grad_accum - 1):
                out = micro_step(student, teacher, ids, cfg)
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
            on_eval(step, tokens)
    return curve


# --------------------------------------------------------------------------- outputs


def plot_curve(curve: list[dict[str, float]], heldout: list[dict[str, float]], path: Path) -> None:
    """Training loss parts per step and held-out KL; written via a temp file, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_held) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = [row["step"] for row in curve]
    for key, label in (("loss", "loss"), ("kl", "KL at T"), ("ce", "CE")):
        ax_train.plot(steps, [row[key] for row in curve], label=label)
    ax_train.set(xlabel="step", ylabel="training loss", title="KD training (per step)")
    ax_train.legend()
    ax_held.plot([h["step"] for h in heldout], [h["kl"] for h in heldout], "o-", label="KL")
    ax_held.set(xlabel="step", ylabel="KL(teacher || student), T=1", title="held-out")
    ax_held.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def input_dtype(path: Path) -> torch.dtype:
    """The floating dtype the student folder was saved in (fp32 when unstated)."""
    config = read_config(path)
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    dtype = getattr(torch, name.replace("torch.", ""), torch.float32)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def tail_mean(curve: list[dict[str, float]], key: str, n: int = 10) -> float:
    rows = curve[-n:]
    return sum(row[key] for row in rows) / len(rows)


def summarize(
    curve: list[dict[str, float]],
    heldout: list[dict[str, float]],
    plan: TrainPlan,
    cfg: DistillConfig,
    train_s: float,
    wall_s: float,
) -> dict[str, Any]:
    """The stage's metrics: budget, speed, final and tail-mean losses, held-out before/after."""
    before, after = heldout[0], heldout[-1]
    metrics: dict[str, Any] = {
        "steps": plan.steps,
        "tokens": plan.tokens,
        "tokens_budget": cfg.tokens,
        "wall_s": wall_s,
        "train_s": train_s,
        "tokens_per_s": plan.tokens / train_s if train_s > 0 else float("nan"),
    }
    for key in ("loss", "kl", "ce"):
        metrics[f"final_{key}"] = curve[-1][key]
        metrics[f"last10_{key}"] = tail_mean(curve, key)
    metrics.update({
        "heldout_kl_before": before["kl"],
        "heldout_kl_after": after["kl"],
        "heldout_ppl_before": before["ppl"],
        "heldout_ppl_after": after["ppl"],
        "heldout_teacher_ppl": before["teacher_ppl"],
        "heldout_tokens": before["tokens"],
        "config": cfg.model_dump(),
    })
    return metrics


# --------------------------------------------------------------------------- the stage


def load_pair(student_ref: ModelRef, teacher_ref: ModelRef | None):
    """Load (student, tokenizer, teacher), refusing what KD here cannot handle."""
    if teacher_ref is None:
        raise ValueError("distill: no teacher; the flow must pass the model before pruning "
                         "as ctx.teacher")
    if is_quantized(student_ref.path):
        raise ValueError("distill: the student is quantized; quantization-aware KD is not "
                         "implemented, so run distill before quantize")
    teacher, teacher_tok = load_model(teacher_ref)
    student, student_tok = load_model(student_ref)
    check_vocab(teacher, teacher_tok, student, student_tok)
    freeze(teacher)
    return student, student_tok, teacher


def distill_stage(student: ModelRef, cfg: DistillConfig, ctx: StageContext,
                  runtime: Runtime | None = None) -> StageResult:
    """Train `student` toward `ctx.teacher` for `cfg.tokens` tokens; save and measure it.

    `runtime` is set by `tasks.distill_worker` under torchrun; every rank calls this, rank 0
    alone writes the outputs.
    """
    set_offline_env()
    torch.set_num_threads(ctx.threads)
    torch.manual_seed(ctx.seed)
    get_divergence(cfg.loss)  # fail on an unknown loss before loading anything
    with keep_freed_memory():
        return _run_stage(student, cfg, ctx, runtime or Runtime())


def _run_stage(student: ModelRef, cfg: DistillConfig, ctx: StageContext,
               rt: Runtime) -> StageResult:
    wall_start = time.perf_counter()
    model, tokenizer, teacher = load_pair(student, ctx.teacher)
    rt.check_batch(cfg.batch_size)
    plan = TrainPlan.from_config(cfg)
    train = training_blocks(tokenizer, cfg, ctx, plan.blocks)
    held = heldout_blocks(tokenizer, cfg, ctx).to(rt.device)
    stage = ctx.stage_name or "distill"
    heldout: list[dict[str, float]] = []
    model, teacher = rt.wrap(model, teacher)

    def evaluate(step: int, tokens: int) -> None:
        # Every rank scores all held-out blocks (FSDP needs all ranks in each forward anyway).
        row = heldout_metrics(rt.unwrap(model), teacher, held, cfg.batch_size)  # fp32
        heldout.append({"step": step, "train_tokens": tokens, **row})
        if rt.is_main:
            print(f"[{stage}] held-out step {step}: KL {row['kl']:.4f} ppl {row['ppl']:.2f} "
                  f"(teacher ppl {row['teacher_ppl']:.2f})", file=sys.stderr, flush=True)

    evaluate(0, 0)
    train_start = time.perf_counter()
    curve = train_loop(model, teacher, train, cfg, plan.steps, on_eval=evaluate, stage=stage,
                       runtime=rt)
    train_s = time.perf_counter() - train_start
    evaluate(plan.steps, plan.tokens)

    out_dir = Path(ctx.out_dir)
    model = rt.export(model, lambda: load_model(student)[0])  # None on ranks other than 0
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        model.eval()
        model.to(input_dtype(student.path))
        save_model(model, tokenizer, out_dir / "model")
        write_json_atomic(out_dir / "loss_curve.json", {"steps": curve, "heldout": heldout})
        plot_curve(curve, heldout, out_dir / "loss_curve.png")
    rt.barrier()
    metrics = summarize(curve, heldout, plan, cfg, train_s, time.perf_counter() - wall_start)
    return StageResult(model_ref(out_dir / "model"), metrics)
