"""Distill stage: recover a pruned student by matching the unpruned teacher's logits.

The teacher is the model before pruning (`ctx.teacher`), frozen. The student trains on packed
training text (never evaluation data) with `tasks.distill.losses.kd_loss`: alpha * T^2 * KL +
(1-alpha) * CE,
AdamW, linear warmup then cosine decay, gradient clipping and accumulation, for a token budget.
Held-out KL(teacher || student) and student perplexity on the held-out Wikipedia slice are
measured before and after (and every `eval_every` steps), so the report can show what KD bought
on text it never saw. Outputs: `model/`, `loss_curve.json`, `loss_curve.png` in `ctx.out_dir`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tasks.core.common import (
    CHECKPOINT_DIR,
    ModelRef,
    StageContext,
    StageResult,
    set_offline_env,
    write_json_atomic,
)
from tasks.core.conventions import prefix_ids
from tasks.core.data_blocks import Blocks
from tasks.core.data_blocks import training_blocks as data_blocks
from tasks.core.model_folder import model_ref
from tasks.core.model_store import load_model, read_config, save_model
from tasks.core.recipe import DistillConfig
from tasks.core.resources import concrete_precision
from tasks.distill.checkpoint import Checkpointer, ListState, PlateauMonitor, run_fingerprint
from tasks.distill.distributed import Runtime
from tasks.distill.engine import KDEngine
from tasks.distill.heldout import heldout_blocks, heldout_metrics
from tasks.distill.logit_cache import LogitCache
from tasks.distill.losses import get_divergence
from tasks.distill.memory import keep_freed_memory
from tasks.distill.teacher import TeacherHolder, load_pair, teacher_idle
from tasks.distill.train import TrainPlan, train_loop


def training_blocks(tokenizer, cfg: DistillConfig, ctx: StageContext, n_blocks: int,
                    config=None) -> Blocks:
    """Training blocks (never evaluation files), seeded by the run: packed bundled text, the
    recipe's own data, or masked chat rows (`Blocks.mask`: the positions the loss covers).

    Packed blocks open with the family's prefix (`tasks.core.conventions`): a student trained
    on blocks without the BOS its family expects learns to do without it, and then scores
    better than a baseline that was also fed none, for no reason to do with compression."""
    spec = cfg.spec()
    try:
        return data_blocks(tokenizer, spec, ctx.data, cfg.seq_len, n_blocks, ctx.seed,
                           masked=cfg.masked(), prefix=prefix_ids(tokenizer, config))
    except ValueError as exc:
        if spec.kind != "builtin":
            raise
        raise ValueError(
            f"distill: tokens={cfg.tokens} needs {n_blocks} blocks of {cfg.seq_len}; the "
            f"'{cfg.source}' training text is too small ({exc}); lower tokens or use source: mixed"
        ) from None


def plot_curve(curve: list[dict[str, float]], heldout: list[dict[str, float]], path: Path) -> None:
    """Training loss parts per step and held-out KL; written via a temp file, then renamed."""
    from tasks.report import loss_curve

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


def distill_stage(student: ModelRef, cfg: DistillConfig, ctx: StageContext,
                  runtime: Runtime | None = None) -> StageResult:
    """Train `student` toward `ctx.teacher` for `cfg.tokens` tokens; save and measure it.

    `runtime` is set by `tasks.distill.worker` under torchrun; every rank calls this, rank 0
    alone writes the outputs.
    """
    set_offline_env()
    torch.set_num_threads(ctx.threads)
    torch.manual_seed(ctx.seed)
    rt = runtime or Runtime()
    device_type = str(rt.device).split(":")[0]
    cfg = cfg.model_copy(update={"precision": concrete_precision(cfg.precision, device_type)})
    get_divergence(cfg.loss)  # fail on an unknown loss before loading anything
    # Chunked loss allocates [chunk, V] temporaries that glibc already reuses from its heap;
    # keeping every freed page would only raise the resident high-water mark.
    with keep_freed_memory() if not cfg.loss_chunk else contextlib.nullcontext():
        return _run_stage(student, cfg, ctx, rt)


def _run_stage(student: ModelRef, cfg: DistillConfig, ctx: StageContext,
               rt: Runtime) -> StageResult:
    wall_start = time.perf_counter()
    model, tokenizer, teacher = load_pair(student, ctx.teacher)
    rt.check_batch(cfg.batch_size)
    plan = TrainPlan.from_config(cfg)
    config = getattr(teacher, "config", None)
    data = training_blocks(tokenizer, cfg, ctx, plan.blocks, config)
    train, masks = data.ids, data.mask
    held_data = heldout_blocks(tokenizer, cfg, ctx, config)
    held = held_data.ids.to(rt.device)
    held_mask = None if held_data.mask is None or not cfg.masked() \
        else held_data.mask.to(rt.device)
    stage = ctx.stage_name or "distill"
    heldout: list[dict[str, float]] = []
    cache, cache_stats = build_logit_cache(teacher, tokenizer, train, cfg, ctx, rt)
    model, teacher = rt.wrap(model, teacher)
    engine = KDEngine.for_models(cfg, plan.steps, model, teacher, cache)
    teachers = TeacherHolder(teacher, ctx.teacher, offload=teacher_idle(cfg, rt))
    del teacher  # the holder owns it: offloaded, nothing else may keep it alive
    ckpt_dir = Path(ctx.out_dir) / CHECKPOINT_DIR
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
                                  chunk=cfg.loss_chunk if rt.world == 1 else 0, mask=held_mask)
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
                       runtime=rt, engine=engine, checkpoints=checkpoints, masks=masks)
    train_s = time.perf_counter() - train_start
    final_step, final_tokens = curve[-1]["step"], curve[-1]["tokens"]
    if heldout[-1]["step"] != final_step:  # an early stop has just measured it
        evaluate(final_step, final_tokens)
    restored = monitor.restore_best(rt.unwrap(model), final_step)

    out_dir = Path(ctx.out_dir)
    model = rt.export(model, lambda: load_model(student)[0])  # None on ranks other than 0
    qat_metrics: dict[str, Any] = {}
    if rt.is_main:
        qat_metrics = _save_outputs(model, tokenizer, student, out_dir, curve, heldout)
        checkpoints.clear()
    rt.barrier()
    metrics = summarize(curve, heldout, plan, cfg, train_s, time.perf_counter() - wall_start)
    metrics.update(recovery_metrics(curve, heldout, monitor, restored, checkpoints, train_s))
    metrics.update(cache_stats)
    metrics.update(qat_metrics)
    metrics["data"] = {**data.stats, "heldout": held_data.stats}
    return StageResult(model_ref(out_dir / "model"), metrics)


def _save_outputs(model, tokenizer, student: ModelRef, out_dir: Path,
                  curve: list[dict[str, float]], heldout: list[dict[str, float]]
                  ) -> dict[str, Any]:
    """Write model/, loss_curve.json and loss_curve.png (rank 0); returns QAT metrics if any.

    A quantization-aware student is packed back onto its frozen grid (GPTQ format); any other
    student is saved in the dtype its input folder had.
    """
    from tasks.distill.qat import finalize_qat, qat_handle

    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    qat_metrics: dict[str, Any] = {}
    if (qat := qat_handle(model)) is not None:
        qat_metrics = finalize_qat(qat, out_dir / "model")[1]
    else:
        model.to(input_dtype(student.path))
        save_model(model, tokenizer, out_dir / "model")
    write_json_atomic(out_dir / "loss_curve.json", {"steps": curve, "heldout": heldout})
    plot_curve(curve, heldout, out_dir / "loss_curve.png")
    return qat_metrics


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
