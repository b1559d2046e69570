"""KD step throughput and peak memory: pkdq's step vs the tutorial loop, side by side.

    flock /tmp/pkdq-heavy.lock python bench/kd_throughput.py --steps 3

Same teacher (SmolLM2-135M), student (50% FFN pruned by `tasks.prune`), training blocks,
seq_len, batch and thread count. Variants, each in its own child process so RSS high-water
marks never mix:

- tutorial: teacher forward every step, full fp32 [B, L, V] logits for both models,
  `F.kl_div(log_softmax(s/T), softmax(t/T), "batchmean") * T^2` mixed with CE, AdamW.
- pkdq-live: `KDEngine` with bf16 autocast and the chunked LM head + loss, teacher live.
- pkdq: the same plus the top-k teacher-logit cache (k=64): the teacher does not run.
- pkdq-lean: pkdq without the teacher in memory (the cached step never calls it).

Chunks are 64 positions: their [64, V] fp32 temporaries (12.5 MB) stay under glibc's mmap
threshold, so they are reused from the heap without `keep_freed_memory` (which, with chunks,
only inflated the resident high-water mark).

The cache is built first (its own child; the cost is paid once per teacher+data and reused by
every later run, so it is reported separately, not inside the step). Both pkdq variants keep the
teacher loaded, as the distill stage does (it scores held-out KL), so peak memory is not flattered
by leaving it out. Timing skips one warm-up step. Output: a table on stdout and
`bench/results/kd_throughput.json`.
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

VARIANTS = ("tutorial", "pkdq-live", "pkdq", "pkdq-lean")
TOPK, CHUNK, TEMPERATURE, ALPHA = 64, 64, 2.0, 0.5


def _blocks(tokenizer, n: int):
    from tasks.common import data_dir
    from tasks.textdata import load_train_texts, token_blocks

    return token_blocks(tokenizer, load_train_texts(data_dir(), "wikipedia"), SEQ_LEN, n, SEED)


def _cfg(variant: str):
    from tasks.recipe import DistillConfig

    return DistillConfig(seq_len=SEQ_LEN, batch_size=BATCH, temperature=TEMPERATURE, alpha=ALPHA,
                         lr=1e-4, precision="bf16-autocast", loss_chunk=CHUNK,
                         logit_cache=variant != "pkdq-live", cache_topk=TOPK)


def _cache(teacher_ref, tokenizer, blocks):
    from tasks.logit_cache import LogitCache

    cfg = _cfg("pkdq")
    return LogitCache.for_blocks(teacher_ref.fingerprint, tokenizer, blocks, cfg.cache_topk,
                                 cfg.temperature, cfg.precision)


def child(variant: str, steps: int, threads: int) -> dict:
    """Run one variant in this process and return its numbers."""
    limit_threads(threads)
    import torch
    import torch.nn.functional as F

    from tasks.distill import freeze
    from tasks.model_store import load_model

    teacher_ref, student_ref = teacher_and_student(threads)
    if variant == "pkdq-lean":
        student, tok = load_model(student_ref)
        teacher = None
    else:
        teacher, tok = load_model(teacher_ref)
        freeze(teacher)
    blocks = _blocks(tok, BATCH * (steps + 1))
    if variant == "cache":
        cache = _cache(teacher_ref, tok, blocks)
        start = time.perf_counter()
        stats = cache.build(teacher, blocks, batch_size=BATCH)
        return {"variant": "cache-build", "seconds": time.perf_counter() - start,
                "tokens": blocks.numel(), "bytes": cache.nbytes(), **stats,
                "peak_rss_mb": peak_rss_mb()}
    if teacher is not None:
        student, _ = load_model(student_ref)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    loaded_mb = rss_mb()
    times: list[float] = []

    if variant == "tutorial":
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
        context = torch.enable_grad()
    else:
        from tasks.kd_engine import KDEngine

        cfg = _cfg(variant)
        cache = _cache(teacher_ref, tok, blocks) if variant != "pkdq-live" else None
        if cache is not None and not cache.complete:
            raise SystemExit("logit cache missing: run the 'cache' child first")
        engine = KDEngine(cfg, steps + 1, cache=cache)

        def step(ids, rows):
            return engine.micro_step(student, teacher, ids, rows).loss
        # The stage skips keep_freed_memory when loss_chunk > 0 (see tasks.distill).
        context = contextlib.nullcontext()

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
    tokens = BATCH * SEQ_LEN * len(times)
    return {"variant": variant, "steps_timed": len(times), "tokens_per_s": tokens / sum(times),
            "step_s": sum(times) / len(times), "peak_rss_mb": peak_rss_mb(),
            "rss_after_load_mb": loaded_mb, "peak_over_load_mb": peak_rss_mb() - loaded_mb,
            "threads": threads}


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
    base = rows["tutorial"]
    print(f"\nKD step, SmolLM2-135M -> 50% FFN student, seq {SEQ_LEN} x batch {BATCH}, "
          f"{args.threads} thread(s), {args.steps} timed steps each")
    print(f"{'variant':<10} {'tok/s':>8} {'x':>6} {'step s':>8} {'peak MiB':>9} {'x':>6} "
          f"{'peak-load MiB':>14}")
    for variant in VARIANTS:
        r = rows[variant]
        print(f"{variant:<10} {r['tokens_per_s']:>8.1f} "
              f"{r['tokens_per_s'] / base['tokens_per_s']:>6.2f} {r['step_s']:>8.2f} "
              f"{r['peak_rss_mb']:>9.0f} {r['peak_rss_mb'] / base['peak_rss_mb']:>6.2f} "
              f"{r['peak_over_load_mb']:>14.0f}")
    c = rows["cache"]
    print(f"logit cache: {c['tokens']} tokens in {c['seconds']:.1f}s "
          f"({c['tokens'] / max(c['seconds'], 1e-9):.0f} tok/s, once per teacher+data), "
          f"{c['bytes'] / 2**20:.1f} MiB on disk, reused={bool(c['reused'])}")
    out = Path(__file__).resolve().parent / "results" / "kd_throughput.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
