"""Size and CPU speed of a model folder, measured honestly: disk bytes, resident memory, latency.

Why a separate process per model: resident memory (RSS) of a Python process never shrinks back
cleanly after a model is freed, and allocator caches of one model inflate the next; so
`profile_in_subprocess` loads each model in a fresh interpreter and reports the RSS growth caused
by loading it. Latency is the median of a few repeats after a warm-up (first calls compile or
pack kernels). Quantized weight-only checkpoints are smaller on disk but their CPU kernels
dequantize on the fly, so they are often *not* faster than fp32/bf16; `speed_notes` says so
whenever the numbers show it rather than letting "smaller" imply "faster".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tasks.core.common import REPO_ROOT, set_offline_env
from tasks.core.gptq_checkpoint import compile_requested
from tasks.core.model_folder import model_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WARMUP_DECODE_STEPS = 4


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (Linux); 0 where unavailable."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def weights_bytes(path: Path) -> int:
    """Bytes of the weight files (safetensors) alone: tokenizer files are the same for all."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def _load(path: Path, dtype: str) -> torch.nn.Module:
    """Float folders load in `dtype`; quantized ones via tasks.core.gptq_checkpoint (fp32 or bf16
    compute)."""
    from tasks.core.model_store import is_quantized, load_model

    if is_quantized(path):
        from tasks.core.gptq_checkpoint import load_quantized

        return load_quantized(path, dtype=DTYPES[dtype])
    return load_model(path, dtype=DTYPES[dtype])[0]


@torch.inference_mode()
def measure_latency(model: torch.nn.Module, prefill_tokens: int = 512, decode_tokens: int = 32,
                    repeats: int = 3, seed: int = 0,
                    budget_s: float | None = None) -> dict[str, float]:
    """Median prefill seconds for `prefill_tokens`, and greedy decode tokens/s with a KV cache.

    Token ids are random (speed does not depend on content). A warm-up runs first: the full
    prefill (kernel selection, packing, allocator growth for the longest activations) and a few
    decode steps (their kernels); more decode steps would only repeat what the timed runs
    measure, at 18 s a pass for a GPTQ model on the CPU kernel. With `budget_s`, no further
    repeat starts once the timed passes took that long (at least one runs; `repeats` says how
    many did): a run's transformers row is a reference beside llama.cpp, and three passes of a
    GPTQ folder on that kernel cost a minute of every default run.
    """
    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, prefill_tokens), generator=generator)
    device = next(model.parameters()).device
    ids = ids.to(device)

    def one_run(steps: int) -> tuple[float, float]:
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill = time.perf_counter() - start
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return prefill, time.perf_counter() - start

    one_run(min(decode_tokens, WARMUP_DECODE_STEPS))
    runs: list[tuple[float, float]] = []
    while len(runs) < repeats and (budget_s is None or sum(map(sum, runs)) < budget_s):
        runs.append(one_run(decode_tokens))
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    return {
        "prefill_tokens": prefill_tokens,
        "prefill_s": prefill,
        "prefill_tokens_per_s": prefill_tokens / prefill,
        "decode_tokens": decode_tokens,
        "decode_tokens_per_s": decode_tokens / decode,
        "repeats": len(runs),
        "repeats_asked": repeats,
        "budget_s": budget_s,
    }


def profile_model(path: Path, dtype: str = "fp32", prefill_tokens: int = 512,
                  decode_tokens: int = 32, repeats: int = 3, threads: int = 1) -> dict[str, Any]:
    """Load `path` in this process and measure it (use the subprocess form for honest RSS)."""
    set_offline_env()
    torch.set_num_threads(threads)
    compiled = compile_requested()  # see tasks.core.gptq_checkpoint.COMPILE_ENV
    if not compiled:
        from torch import _dynamo

        _dynamo.config.disable = True
    import transformers  # noqa: F401 - library imports must not count as the model's memory

    from tasks.core.model_store import is_quantized
    if is_quantized(Path(path)):
        from tasks.core.gptq_checkpoint import import_gptqmodel
        import_gptqmodel()
    before = rss_bytes()
    model = _load(Path(path), dtype)
    loaded = rss_bytes()
    speed = measure_latency(model, prefill_tokens, decode_tokens, repeats)
    return {
        "path": str(path),
        "compute_dtype": dtype,
        "threads": threads,
        "torch_compile": compiled,
        "weights_bytes": weights_bytes(Path(path)),
        "folder_bytes": model_bytes(Path(path)),
        "rss_load_bytes": loaded - before,
        "rss_peak_after_run_bytes": rss_bytes() - before,
        **speed,
    }


def profile_in_subprocess(path: Path, dtype: str = "fp32", prefill_tokens: int = 512,
                          decode_tokens: int = 32, repeats: int = 3, threads: int = 1,
                          timeout_s: float = 900) -> dict[str, Any]:
    """`profile_model` in a fresh interpreter, so RSS counts this model alone."""
    cmd = [sys.executable, "-m", "tasks.evaluate.speed", str(path), "--dtype", dtype,
           "--prefill", str(prefill_tokens), "--decode", str(decode_tokens),
           "--repeats", str(repeats), "--threads", str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env,
                          cwd=str(REPO_ROOT), check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"speed profile of {path} ({dtype}) failed: {' | '.join(tail)}")
    return json.loads(lines[-1])


def speed_notes(rows: dict[str, dict[str, Any]], reference: str = "fp32") -> list[str]:
    """One line per model smaller on disk than `reference` but not faster at prefill or decode."""
    ref = rows.get(reference)
    if not ref:
        return []
    notes = []
    for name, row in rows.items():
        if name == reference or row["weights_bytes"] >= ref["weights_bytes"]:
            continue
        ratio = ref["weights_bytes"] / row["weights_bytes"]
        if row.get("prefill_s") is None:  # the latency run timed out: slower by definition
            slower = ["prefill", "decode"]
        else:
            slower = [what for what, key, better in (
                ("prefill", "prefill_s", row["prefill_s"] < ref["prefill_s"]),
                ("decode", "decode_tokens_per_s",
                 row["decode_tokens_per_s"] > ref["decode_tokens_per_s"]),
            ) if not better]
        if slower:
            notes.append(f"{name}: {ratio:.1f}x smaller on disk than {reference} but not faster "
                         f"at {' or '.join(slower)} on this CPU (weight-only quantized kernels "
                         "dequantize on the fly; the win is memory, not speed)")
    return notes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="size + CPU latency of one model folder (JSON)")
    parser.add_argument("path", type=Path)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    result = profile_model(args.path, args.dtype, args.prefill, args.decode, args.repeats,
                           args.threads)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
