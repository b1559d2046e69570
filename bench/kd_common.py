"""Shared setup for the KD benchmarks: the SmolLM2 teacher and its 50%-FFN-pruned student.

The pruned student is built once with `tasks.prune.stage.prune_stage` (activation criterion,
round_to
64) and kept under `<pkdq cache>/bench/`, so re-running a benchmark measures KD, not pruning.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.core.common import ModelRef, StageContext, cache_dir, set_offline_env  # noqa: E402

SEQ_LEN, BATCH, SEED = 256, 4, 1234


def teacher_and_student(threads: int = 1) -> tuple[ModelRef, ModelRef]:
    """(SmolLM2-135M, the same with 50% of FFN neurons removed), both as local folders."""
    set_offline_env()
    from tasks.core.model_folder import model_ref
    from tasks.core.model_store import load_model, resolve_model, save_model
    from tasks.core.recipe import FfnTarget, PruneConfig, TextSample
    from tasks.prune.stage import prune_model

    teacher = resolve_model("smollm2-135m")
    out = cache_dir() / "bench" / f"smollm2-ffn50-{teacher.fingerprint}"
    if (out / "model" / "config.json").is_file():
        return teacher, model_ref(out / "model")
    cfg = PruneConfig(ffn=FfnTarget(ratio=0.5, criterion="activation"), round_to=64,
                      calibration=TextSample(source="wikipedia", samples=16, seq_len=256))
    ctx = StageContext(out_dir=out, seed=SEED, threads=threads)
    # prune_stage's own save trips over the converted model's stale GGUF quantization_config
    # (transformers refuses to save "gguf-quantized" models); prune, drop it, then save.
    import torch

    torch.manual_seed(SEED)
    torch.set_num_threads(threads)
    model, tok = load_model(teacher)
    prune_model(model, tok, cfg, ctx)
    drop_gguf_config(model)
    return teacher, save_model(model, tok, out / "model")


def drop_gguf_config(model) -> None:
    """Forget a GGUF source's quantization_config: the weights in memory are plain floats."""
    quant = getattr(model.config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else \
        getattr(quant, "quant_method", None)
    if quant is not None and str(getattr(method, "value", method)) == "gguf":
        del model.config.quantization_config
        model.hf_quantizer = None


def rss_mb() -> float:
    """Current resident set size (MiB) from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """This process's RSS high-water mark (MiB); children measure themselves so peaks never mix."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def limit_threads(threads: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)
