"""KD step throughput and peak memory: pkdq's step vs the tutorial loop, side by side.

    flock /tmp/pkdq-heavy.lock python bench/kd_throughput.py --steps 3 --threads 2

Same teacher (SmolLM2-135M), student (50% FFN pruned by `tasks.prune.stage`), training blocks,
seq_len, batch and thread count. Each variant runs in its own child process (RSS high-water marks
never mix) the way the distill stage does: load teacher and student, score held-out KL on
`EVAL_BLOCKS` blocks, train, score held-out KL again with the optimizer state still alive (as an
`eval_every` eval does). The peak column is the whole child's high-water mark, evals included.

- tutorial: teacher forward every step, full fp32 [B, L, V] logits for both models,
  `F.kl_div(log_softmax(s/T), softmax(t/T), "batchmean") * T^2` mixed with CE, default AdamW,
  teacher resident, full-logit held-out eval.
- pkdq-live: `KDEngine` with bf16 autocast, the chunked LM head + loss and a live teacher.
- pkdq-prev: the distill stage's options before the memory changes: top-k logit cache (k=64),
  bf16 autocast, chunked head + loss, but foreach AdamW, the fp32 teacher resident through
  training, the full RMSNorm graph (`lean_norm: false`) and the full-logit held-out eval.
- pkdq: `DistillConfig` defaults on top of cache + bf16 autocast + chunks, i.e. what a recipe
  with `logit_cache: true, loss_chunk: 64, precision: bf16-autocast` runs: fused AdamW, the
  teacher offloaded while training (reloaded for each held-out eval, after the training heap is
  handed back to the OS; its reload is in `eval s`),
  the lean RMSNorm (`tasks.distill.lean_norm`) and the chunked held-out eval.
- pkdq-ckpt: pkdq plus `activation_checkpointing: true` (recompute the decoder layers in
  backward): less memory, a slower step.

Every pkdq variant runs the same code for the head: the student's decoder without its LM head,
then `tasks.distill.sparse`'s fused chunk loop, which for forward KL against the cache writes each
chunk's logit gradient in closed form (no autograd over [64, V] tensors) and takes the head
weight's gradient in 256-position matmuls (not one [V, H] product and fp32 cast per chunk).

Chunks are 64 positions: their [64, V] fp32 temporaries (12.5 MB) stay under glibc's mmap
threshold, so they are reused from the heap without `keep_freed_memory` (which, with chunks,
only inflated the resident high-water mark).

The cache is built first (its own child; the cost is paid once per teacher+data and reused by
every later run, so it is reported separately, not inside the step). Timing skips one warm-up
step. Output: a table on stdout, `bench/results/kd_throughput.json` and `.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kd_common import (  # noqa: E402
    BATCH,
    SEED,
    SEQ_LEN,
    limit_threads,
    peak_rss_mb,
    rss_mb,
    teacher_and_student,
)

EVAL_BLOCKS = 8  # DistillConfig.eval_blocks' default

VARIANTS = ("tutorial", "pkdq-live", "pkdq-prev", "pkdq", "pkdq-ckpt")
TOPK, CHUNK, TEMPERATURE, ALPHA = 64, 64, 2.0, 0.5


def _blocks(tokenizer, n: int, heldout: bool = False):
    from tasks.core.common import data_dir
    from tasks.core.data import load_train_texts, token_blocks

    texts = load_train_texts(data_dir(), heldout=True) if heldout else \
        load_train_texts(data_dir(), "wikipedia")
    return token_blocks(tokenizer, texts, SEQ_LEN, n, SEED)


def _cfg(variant: str):
    """The DistillConfig a recipe would hold for this variant (defaults = the recommended ones)."""
    from tasks.core.recipe import DistillConfig

    prev = variant == "pkdq-prev"
    return DistillConfig(seq_len=SEQ_LEN, batch_size=BATCH, temperature=TEMPERATURE, alpha=ALPHA,
                         lr=1e-4, precision="bf16-autocast", loss_chunk=CHUNK,
                         logit_cache=variant != "pkdq-live", cache_topk=TOPK,
                         fused_adamw=not prev, teacher_offload=not prev, lean_norm=not prev,
                         activation_checkpointing=variant == "pkdq-ckpt")


def _cache(teacher_ref, tokenizer, blocks):
    from tasks.distill.logit_cache import LogitCache

    cfg = _cfg("pkdq")
    return LogitCache.for_blocks(teacher_ref.fingerprint, tokenizer, blocks, cfg.cache_topk,
                                 cfg.temperature, cfg.precision)


def child(variant: str, steps: int, threads: int) -> dict:
    """Run one variant in this process and return its numbers."""
    limit_threads(threads)
    import torch
    import torch.nn.functional as F

    from tasks.core.model_store import load_model
    from tasks.distill.distributed import Runtime
    from tasks.distill.heldout import heldout_metrics
    from tasks.distill.teacher import TeacherHolder, freeze, teacher_idle
    from tasks.distill.train import make_optimizer, training_context

    teacher_ref, student_ref = teacher_and_student(threads)
    teacher, tok = load_model(teacher_ref)  # the stage loads both (check_vocab, cache build)
    freeze(teacher)
    blocks = _blocks(tok, BATCH * (steps + 1))
    if variant == "cache":
        cache = _cache(teacher_ref, tok, blocks)
        start = time.perf_counter()
        stats = cache.build(teacher, blocks, batch_size=BATCH)
        return {"variant": "cache-build", "seconds": time.perf_counter() - start,
                "tokens": blocks.numel(), "bytes": cache.nbytes(), **stats,
                "peak_rss_mb": peak_rss_mb()}
    student, _ = load_model(student_ref)
    held = _blocks(tok, EVAL_BLOCKS, heldout=True)
    cfg = _cfg(variant)
    tutorial = variant == "tutorial"
    holder = TeacherHolder(teacher, teacher_ref, offload=not tutorial and teacher_idle(cfg,
                                                                                     Runtime()))
    teacher = None
    eval_s: list[float] = []

    def evaluate() -> float:
        start = time.perf_counter()
        with holder.loaded() as t:  # tutorial and pkdq-prev: full-logit eval
            kl = heldout_metrics(student, t, held, BATCH,
                                 chunk=0 if variant in ("tutorial", "pkdq-prev") else CHUNK)["kl"]
        eval_s.append(time.perf_counter() - start)
        return kl

    kl_before = evaluate()  # the stage scores held-out KL before training
    teacher = holder.resident()  # None once offloaded: the cached step never calls it
    student.train()
    if tutorial:
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    else:
        opt, _ = make_optimizer(student, cfg, steps + 1)
    loaded_mb = rss_mb()
    times: list[float] = []

    if tutorial:
        def step(ids, rows):
            with torch.no_grad():
                t = teacher(input_ids=ids).logits
            s = student(input_ids=ids).logits
            vocab = s.shape[-1]
            kd = F.kl_div(F.log_softmax(s.view(-1, vocab) / TEMPERATURE, -1),
                          F.softmax(t.view(-1, vocab) / TEMPERATURE, -1),
                          reduction="batchmean") * TEMPERATURE**2
            ce = F.cross_entropy(s[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
            return ALPHA * kd + (1 - ALPHA) * ce
        context = contextlib.nullcontext()
    else:
        from tasks.distill.engine import KDEngine

        cache = _cache(teacher_ref, tok, blocks) if cfg.logit_cache else None
        if cache is not None and not cache.complete:
            raise SystemExit("logit cache missing: run the 'cache' child first")
        engine = KDEngine(cfg, steps + 1, cache=cache)

        def step(ids, rows):
            return engine.micro_step(student, teacher, ids, rows).loss
        # The stage skips keep_freed_memory when loss_chunk > 0 (see tasks.distill.stage).
        context = training_context(student, cfg)

    with context:
        for i in range(steps + 1):
            rows = torch.arange(i * BATCH, (i + 1) * BATCH)
            ids = blocks[rows]
            start = time.perf_counter()
            loss = step(ids, rows)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:  # the first step warms up allocators and kernels
                times.append(time.perf_counter() - start)
            print(f"[{variant}] step {i}: {time.perf_counter() - start:.1f}s loss "
                  f"{float(loss):.3f}", file=sys.stderr, flush=True)
    train_peak = peak_rss_mb()
    teacher = None  # the holder's reference is the one evaluate() uses (and drops when offloaded)
    kl_after = evaluate()  # as with eval_every: optimizer state still alive
    tokens = BATCH * SEQ_LEN * len(times)
    return {"variant": variant, "steps_timed": len(times), "tokens_per_s": tokens / sum(times),
            "step_s": sum(times) / len(times), "peak_rss_mb": peak_rss_mb(),
            "train_peak_rss_mb": train_peak, "rss_after_load_mb": loaded_mb,
            "peak_over_load_mb": peak_rss_mb() - loaded_mb, "eval_s": eval_s,
            "heldout_kl": [kl_before, kl_after], "teacher_reloads": holder.reloads,
            "threads": threads, "config": cfg.model_dump() if not tutorial else None}


def run_child(variant: str, steps: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", variant, "--steps", str(steps),
                          "--threads", str(threads)], check=True, capture_output=True, text=True)
    sys.stderr.write(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=(*VARIANTS, "cache"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.threads)))
        return
    teacher_and_student(args.threads)  # prune once, outside the measured children
    rows = {"cache": run_child("cache", args.steps, args.threads)}
    for variant in VARIANTS:
        rows[variant] = run_child(variant, args.steps, args.threads)
    lines = table(rows, args)
    print("\n" + "\n".join(lines))
    out = Path(__file__).resolve().parent / "results" / "kd_throughput.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def table(rows: dict, args) -> list[str]:
    """The markdown table (also printed): speed and peak memory relative to the tutorial."""
    base = rows["tutorial"]
    lines = [f"KD step, SmolLM2-135M -> 50% FFN student, seq {SEQ_LEN} x batch {BATCH}, "
             f"{args.threads} thread(s), {args.steps} timed steps each; peak = whole child "
             f"(held-out eval of {EVAL_BLOCKS} blocks before and after training included)", "",
             "| variant | tok/s | x | step s | peak MiB | x | train peak MiB | eval s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for variant in VARIANTS:
        r = rows[variant]
        lines.append(
            f"| {variant} | {r['tokens_per_s']:.1f} | "
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f} | {r['step_s']:.2f} | "
            f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base['peak_rss_mb']:.2f} | "
            f"{r['train_peak_rss_mb']:.0f} | "
            f"{' + '.join(f'{t:.1f}' for t in r['eval_s'])} |")
    c = rows["cache"]
    lines += ["", f"logit cache: {c['tokens']} tokens in {c['seconds']:.1f}s "
              f"({c['tokens'] / max(c['seconds'], 1e-9):.0f} tok/s, once per teacher+data), "
              f"{c['bytes'] / 2**20:.1f} MiB on disk, reused={bool(c['reused'])}"]
    return lines


if __name__ == "__main__":
    main()
