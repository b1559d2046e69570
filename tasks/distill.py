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
import gc
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
from tasks.kd_checkpoint import Checkpointer, ListState, PlateauMonitor, run_fingerprint
from tasks.kd_engine import KDEngine
from tasks.kd_losses import forward_kl, get_divergence, kd_loss, next_token_ce
from tasks.logit_cache import LogitCache
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
    student, teacher, blocks: torch.Tensor, batch_size: int, precision: str = "fp32",
    chunk: int = 0,
) -> dict[str, float]:
    """Token-mean KL(teacher || student) at T=1 and perplexities on held-out blocks.

    T=1 (not the training temperature) and fp32 by default (whatever the training precision) so
    the number means the same across recipes. `chunk` > 0 runs both LM heads and the scores on
    that many positions at a time from the final hidden states, so the [batch, seq, vocab]
    logits of the two models (and their log-softmaxes) never exist at once: the same numbers up
    to summation order, without the eval's full-vocabulary transients raising the stage's peak.
    """
    was_training = student.training
    student.eval()
    kl_sum = ce_sum = t_ce_sum = 0.0
    kl_n = ce_n = 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size]
        with compute_context(precision, ids.device.type):
            if chunk:
                kl, ce, t_ce = _chunked_scores(student, teacher, ids, chunk)
            else:
                s_logits = student(input_ids=ids, use_cache=False).logits
                t_logits = teacher(input_ids=ids, use_cache=False).logits
                n_targets = ids[:, 1:].numel()
                kl = float(forward_kl(s_logits, t_logits, 1.0).sum())
                ce = float(next_token_ce(s_logits, ids)) * n_targets
                t_ce = float(next_token_ce(t_logits, ids)) * n_targets
                del s_logits, t_logits
        kl_sum, ce_sum, t_ce_sum = kl_sum + kl, ce_sum + ce, t_ce_sum + t_ce
        kl_n += ids.numel()
        ce_n += ids[:, 1:].numel()
    student.train(was_training)
    return {
        "kl": kl_sum / kl_n,
        "ppl": math.exp(ce_sum / ce_n),
        "teacher_ppl": math.exp(t_ce_sum / ce_n),
        "tokens": kl_n,
    }


def _chunked_scores(student, teacher, ids: torch.Tensor, chunk: int) -> tuple[float, ...]:
    """(KL sum, student CE sum, teacher CE sum) of one batch, LM heads run `chunk` rows at once."""
    import torch.nn.functional as F

    from tasks.kd_sparse import next_token_targets

    def final_hidden(model):
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        return out.hidden_states[-1].reshape(-1, out.hidden_states[-1].shape[-1])

    s_h, t_h = final_hidden(student), final_hidden(teacher)
    s_head = getattr(student, "module", student).get_output_embeddings()
    t_head = getattr(teacher, "module", teacher).get_output_embeddings()
    targets = next_token_targets(ids).reshape(-1)
    kl = ce = t_ce = 0.0
    for lo in range(0, s_h.shape[0], chunk):
        sl = slice(lo, lo + chunk)
        s_logits, t_logits = s_head(s_h[sl]).float(), t_head(t_h[sl]).float()
        kl += float(forward_kl(s_logits, t_logits, 1.0).sum())
        ce += float(F.cross_entropy(s_logits, targets[sl], ignore_index=-100, reduction="sum"))
        t_ce += float(F.cross_entropy(t_logits, targets[sl], ignore_index=-100, reduction="sum"))
    return kl, ce, t_ce


# --------------------------------------------------------------------------- training loop


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


def micro_step(student, teacher, ids: torch.Tensor, cfg: DistillConfig,
               alpha: float | None = None, **params: float):
    """Forward both models on one micro-batch and return the loss parts (graph on the student).

    `alpha` (scheduled) and `params` (jsd beta, skew, taid_lambda) come from `KDEngine`.
    """
    with compute_context(cfg.precision, ids.device.type):
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, use_cache=False).logits
        s_logits = student(input_ids=ids, use_cache=False).logits
    return kd_loss(s_logits, t_logits, ids, name=cfg.loss, temperature=cfg.temperature,
                   alpha=cfg.alpha if alpha is None else alpha, **params)


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
) -> list[dict[str, float]]:
    """Run `steps` optimizer steps over `blocks` in order (wrapping if short); return the curve.

    `engine` (`tasks.kd_engine`) computes each micro-batch's loss (default: the plain KD step);
    `checkpoints` saves every `cfg.checkpoint_every` steps and resumes from a matching save.
    A truthy return from `on_eval` stops training early (held-out plateau).

    `on_eval(step, tokens)` is called every `cfg.eval_every` steps (not after the last one: the
    caller measures that). Each curve row averages its micro-batches. Under torchrun each rank
    trains on its rows of every global batch and logs the loss averaged over ranks (`runtime`).
    """
    with training_context(student, cfg):
        return _train_steps(student, teacher, blocks, cfg, steps, on_eval, stage,
                            runtime or Runtime(), engine or KDEngine(cfg, steps), checkpoints)


@contextlib.contextmanager
def training_context(student, cfg: DistillConfig) -> Iterator[None]:
    """What the student's training forward runs under: activation checkpointing and the lean
    RMSNorm (`tasks.kd_norm`), each as the config asks. Held-out evals inside it are unchanged
    (no-grad forwards save nothing either way)."""
    from tasks.kd_norm import lean_norm

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
                 checkpoints: Checkpointer | None) -> list[dict[str, float]]:
    opt, sched = make_optimizer(student, cfg, steps, engine.parameters())
    student.train()
    progress = Progress(stage, steps)
    curve: list[dict[str, float]] = []
    cursor, tokens, start, first = 0, 0, time.perf_counter(), 1
    resumed = checkpoints.load(student, engine, opt, sched) if checkpoints else None
    if resumed is not None:
        first, cursor, tokens = resumed["step"] + 1, resumed["cursor"], resumed["tokens"]
        curve = resumed["curve"]
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
                out = engine.micro_step(student, teacher, ids, rt.local_rows(rows))
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


# --------------------------------------------------------------------------- outputs


def plot_curve(curve: list[dict[str, float]], heldout: list[dict[str, float]], path: Path) -> None:
    """Training loss parts per step and held-out KL; written via a temp file, then renamed."""
    from tasks.plots import loss_curve

    tmp = path.with_suffix(".png.tmp")
    tmp.write_bytes(loss_curve({"steps": curve, "heldout": heldout}))
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
    teacher, teacher_tok = load_model(teacher_ref)
    if is_quantized(student_ref.path):  # Q before KD: quantization-aware KD on the frozen grid
        from tasks.fake_quant import load_qat_student

        student, student_tok = load_qat_student(student_ref.path)
    else:
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
    # Chunked loss allocates [chunk, V] temporaries that glibc already reuses from its heap;
    # keeping every freed page would only raise the resident high-water mark.
    with keep_freed_memory() if not cfg.loss_chunk else contextlib.nullcontext():
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
    cache, cache_stats = build_logit_cache(teacher, tokenizer, train, cfg, ctx, rt)
    model, teacher = rt.wrap(model, teacher)
    engine = KDEngine.for_models(cfg, plan.steps, model, teacher, cache)
    teachers = TeacherHolder(teacher, ctx.teacher, offload=teacher_idle(cfg, rt))
    del teacher  # the holder owns it: offloaded, nothing else may keep it alive
    ckpt_dir = Path(ctx.out_dir) / "checkpoint"
    keep_best = cfg.keep_best and cfg.eval_every > 0 and rt.world == 1
    monitor = PlateauMonitor(cfg.early_stop_patience, cfg.early_stop_min_delta,
                             ckpt_dir / "best.pt" if keep_best else None)
    checkpoints = Checkpointer(
        ckpt_dir, cfg.checkpoint_every,
        run_fingerprint(cfg.model_dump(), student.fingerprint, ctx.teacher.fingerprint,
                        str(ctx.seed), str(rt.world)),
        extra={"monitor": monitor, "heldout": ListState(heldout)})

    def evaluate(step: int, tokens: int) -> bool:
        # Every rank scores all held-out blocks (FSDP needs all ranks in each forward anyway).
        with teachers.loaded() as teacher:  # fp32; chunked heads when training chunks them
            row = heldout_metrics(rt.unwrap(model), teacher, held, cfg.batch_size,
                                  chunk=cfg.loss_chunk if rt.world == 1 else 0)
        heldout.append({"step": step, "train_tokens": tokens, **row})
        if rt.is_main:
            print(f"[{stage}] held-out step {step}: KL {row['kl']:.4f} ppl {row['ppl']:.2f} "
                  f"(teacher ppl {row['teacher_ppl']:.2f})", file=sys.stderr, flush=True)
        return monitor.update(step, row["kl"], rt.unwrap(model))

    if not checkpoints.matches():  # a resumed run restores its held-out rows instead
        evaluate(0, 0)
    train_start = time.perf_counter()
    curve = train_loop(model, teachers.resident(), train, cfg, plan.steps, on_eval=evaluate,
                       stage=stage,
                       runtime=rt, engine=engine, checkpoints=checkpoints)
    train_s = time.perf_counter() - train_start
    final_step, final_tokens = curve[-1]["step"], curve[-1]["tokens"]
    if heldout[-1]["step"] != final_step:  # an early stop has just measured it
        evaluate(final_step, final_tokens)
    restored = monitor.restore_best(rt.unwrap(model), final_step)

    out_dir = Path(ctx.out_dir)
    model = rt.export(model, lambda: load_model(student)[0])  # None on ranks other than 0
    qat_metrics: dict[str, Any] = {}
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        model.eval()
        from tasks.fake_quant import finalize_qat, qat_handle

        if (qat := qat_handle(model)) is not None:  # pack onto the same grid, GPTQ format
            qat_metrics = finalize_qat(qat, out_dir / "model")[1]
        else:
            model.to(input_dtype(student.path))
            save_model(model, tokenizer, out_dir / "model")
        write_json_atomic(out_dir / "loss_curve.json", {"steps": curve, "heldout": heldout})
        plot_curve(curve, heldout, out_dir / "loss_curve.png")
        checkpoints.clear()
    rt.barrier()
    metrics = summarize(curve, heldout, plan, cfg, train_s, time.perf_counter() - wall_start)
    metrics.update(recovery_metrics(curve, heldout, monitor, restored, checkpoints, train_s))
    metrics.update(cache_stats)
    metrics.update(qat_metrics)
    return StageResult(model_ref(out_dir / "model"), metrics)


def teacher_idle(cfg: DistillConfig, rt: Runtime) -> bool:
    """Whether the training step never runs the teacher, so it may leave memory while training:
    the logit cache serves its distribution and no hidden/attention state is matched."""
    return (cfg.teacher_offload and cfg.logit_cache and cfg.hidden_loss == "none"
            and not cfg.attention_match and rt.world == 1)


class TeacherHolder:
    """The frozen teacher, kept resident or (offload) dropped after each use and reloaded.

    With the logit cache the teacher only scores held-out KL (before, every `eval_every`, after),
    so keeping its fp32 weights through training costs their whole size in peak memory for
    nothing; a reload from its folder costs a second or two per eval.
    """

    def __init__(self, teacher, ref: ModelRef, offload: bool) -> None:
        self._teacher, self.ref, self.offload = teacher, ref, offload
        self.reloads = 0

    def resident(self):
        """The teacher for the training step (None when offloaded: the step never calls it)."""
        self._drop()
        return self._teacher

    def _drop(self) -> None:
        if self.offload and self._teacher is not None:
            self._teacher = None
            gc.collect()  # a model may sit in reference cycles: free its weights now

    @contextlib.contextmanager
    def loaded(self) -> Iterator[Any]:
        if self._teacher is None:
            release_free_heap()
            self._teacher, _ = load_model(self.ref)
            freeze(self._teacher)
            self.reloads += 1
        try:
            yield self._teacher
        finally:
            self._drop()


def build_logit_cache(teacher, tokenizer, blocks: torch.Tensor, cfg: DistillConfig,
                      ctx: StageContext, rt: Runtime):
    """The top-k teacher cache for these blocks (built once, by rank 0), or (None, {})."""
    if not cfg.logit_cache:
        return None, {}
    cache = LogitCache.for_blocks(ctx.teacher.fingerprint, tokenizer, blocks, cfg.cache_topk,
                                  cfg.temperature, cfg.precision)
    start = time.perf_counter()
    stats = {"built": 0, "reused": 1}
    if rt.is_main:
        stats = cache.build(teacher, blocks, cfg.batch_size)
    rt.barrier()
    return cache, {"logit_cache_reused": bool(stats["reused"]),
                   "logit_cache_build_s": time.perf_counter() - start,
                   "logit_cache_bytes": cache.nbytes(), "logit_cache_dir": str(cache.folder)}


def recovery_metrics(curve, heldout, monitor: PlateauMonitor, restored: bool,
                     checkpoints: Checkpointer, train_s: float) -> dict[str, Any]:
    """Early stop / best-step facts; after-numbers describe the model actually saved."""
    out: dict[str, Any] = {**monitor.summary(), "steps_run": curve[-1]["step"],
                           "tokens_trained": curve[-1]["tokens"],
                           "resumed_from_step": checkpoints.resumed_from}
    if checkpoints.resumed_from is not None and train_s > 0:
        done = next(r["tokens"] for r in curve if r["step"] == checkpoints.resumed_from)
        out["tokens_per_s"] = (curve[-1]["tokens"] - done) / train_s
    elif train_s > 0:
        out["tokens_per_s"] = curve[-1]["tokens"] / train_s
    if restored:
        best = next(h for h in heldout if h["step"] == monitor.best_step)
        out.update({"heldout_kl_after": best["kl"], "heldout_ppl_after": best["ppl"],
                    "heldout_kl_last": heldout[-1]["kl"], "heldout_ppl_last": heldout[-1]["ppl"]})
    return out
