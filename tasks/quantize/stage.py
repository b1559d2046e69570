"""Quantize stage: GPTQ, AWQ or round-to-nearest (RTN) weight-only quantization.

GPTQ and RTN write one GPTQ v1 checkpoint; AWQ writes the AWQ GEMM checkpoint (quant_method awq,
zero-point, int32 qweight packed along outputs) that vLLM's `awq`/`awq_marlin` loaders read.
All methods go through GPTQModel 7.6 (AutoGPTQ is archived and fails to import with transformers
5; llm-compressor pins transformers<=5.17), so GPTQ and its RTN baseline land in the same on-disk
format (`quant_method: gptq`, v1 packing, int32 qweight/qzeros, fp16 scales, fp16 embeddings and
norms) and load the same way. Quantization runs on CPU by default and on CUDA when present.
Calibration reads training text only (C4 by default), never evaluation data.

Loaders (transformers 5.23 + gptqmodel 7.6, CPU):
- `GPTQModel.load(path, backend=TORCH)`: works with the pinned deps; its `.model` is a stock HF
  `LlamaForCausalLM` whose linears are `TorchLinear`. `load_quantized` returns that module,
  recast so it computes with exactly the stored grid in fp32 on CPU (see its docstring).
- `AutoModelForCausalLM.from_pretrained(path)`: transformers' own GPTQ integration also needs
  `optimum` (not a pkdq dependency); with optimum 2.3 it loads on CPU via `TorchAtenLinear`.
  The stage verifies it only when optimum is importable and says so in its metrics.
"""

from __future__ import annotations

import math
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from tasks.core.common import GGUF_FILE, ModelRef, StageContext, StageResult, set_offline_env
from tasks.core.conventions import prefix_ids
from tasks.core.data_blocks import Blocks, training_blocks
from tasks.core.gptq_checkpoint import (
    SAVE_DTYPE,
    QuantizeError,
    import_gptqmodel,
    quantized_module_names,
)
from tasks.core.model_folder import model_bytes, seal_folder
from tasks.core.recipe import QuantizeConfig
from tasks.quantize.driver import STAGE, compute_device, configure_threads, quantize_into
from tasks.quantize.linears import check_awq_shapes, check_group_size, load_config, serving_notes
from tasks.quantize.verify import reference_logits, verify_loaders

VERIFY_TOKENS = 256  # one short training-text block for the post-save sanity forward
EQUALIZED = "equalized"  # the scaled float model, inside the stage folder until the stage ends


# GPTQModel's per-module log, which it saves into the model folder. It holds each module's wall
# time, so inside the folder it would give identical weights a new fingerprint every run (and a
# resumed run a final model that differs from an uninterrupted one's): it goes beside the folder.
QUANT_LOG = "quant_log.csv"


def _calibration_data(tokenizer, cfg: QuantizeConfig, ctx: StageContext,
                      config=None) -> Blocks:
    """GPTQ/AWQ calibration blocks, opened by the family's prefix (BOS for Gemma) as in use."""
    cal = cfg.calibration
    return training_blocks(tokenizer, cal.spec(), ctx.data, cal.seq_len, cal.samples, ctx.seed,
                           prefix=prefix_ids(tokenizer, config))


def _verify_block(tokenizer, cfg: QuantizeConfig, ctx: StageContext,
                  config=None) -> torch.Tensor:
    """One short training-text block (not evaluation data) for the post-save sanity forward."""
    spec = cfg.calibration.spec()
    if spec.kind != "builtin":
        spec = spec.model_copy(update={"repeat": True})  # one block; short data may repeat
    return training_blocks(tokenizer, spec, ctx.data, VERIFY_TOKENS, 1, ctx.seed + 1,
                           prefix=prefix_ids(tokenizer, config)).ids


def _skipped_layers(src: Path, quantized: list[str], tied: bool) -> list[dict[str, str]]:
    """Linear layers left in floating point, with why."""
    from transformers import AutoModelForCausalLM

    config = load_config(src)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    done = set(quantized)
    skipped = []
    for name, module in skeleton.named_modules():
        if not isinstance(module, torch.nn.Linear) or name in done:
            continue
        if name.endswith("lm_head"):
            why = ("output head kept in float (GPTQ lm_head=False)"
                   + ("; tied to the input embedding" if tied else ""))
        else:
            why = "outside the decoder blocks GPTQModel quantizes"
        skipped.append({"name": name, "why": why})
    return skipped


def _weights_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("gptqmodel", "torch", "transformers", "optimum"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _log_summary(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean/max per-module loss and damping actually used, from GPTQModel's log.

    GPTQ logs its weighted reconstruction error; RTN logs mean |w - w_q| ("rtn: 0.0016").
    """
    def numbers(key: str) -> list[float]:
        vals = []
        for entry in entries:
            try:
                vals.append(float(str(entry.get(key, "")).split()[-1]))
            except (ValueError, IndexError):
                continue
        return [v for v in vals if math.isfinite(v)]

    losses, damps = numbers("loss"), numbers("damp")
    summary: dict[str, Any] = {"modules_logged": len(entries)}
    if losses:
        summary |= {"loss_mean": sum(losses) / len(losses), "loss_max": max(losses)}
    if damps:
        summary["damp_max"] = max(damps)
    return summary


def _finalize(tmp: Path, final: Path, tokenizer) -> ModelRef:
    """Tokenizer in, GPTQModel's log out (`QUANT_LOG`), fingerprint stored, then one rename: a
    crash never leaves a 'done' folder."""
    tokenizer.save_pretrained(str(tmp))
    log = tmp / QUANT_LOG
    if log.is_file():
        log.replace(final.parent / QUANT_LOG)
    return seal_folder(tmp, final)


def _stage_metrics(src: Path, final: Path, cfg: QuantizeConfig, ctx: StageContext,
                   calib: torch.Tensor | None, run: dict[str, Any]) -> dict[str, Any]:
    """The metrics.json body: what was asked, what it cost, what was verified."""
    gptq = cfg.method == "gptq"
    tied = bool(getattr(load_config(src), "tie_word_embeddings", False))
    return {
        "method": cfg.method,
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "desc_act": cfg.desc_act if gptq else False,
        "act_group_aware": gptq and not cfg.desc_act,
        "sym": cfg.sym if cfg.method != "awq" else False,
        "damp_percent": cfg.damp_percent if gptq else None,
        "calibration": None if calib is None else {
            "source": cfg.calibration.source, "samples": cfg.calibration.samples,
            "seq_len": cfg.calibration.seq_len, "tokens": int(calib.numel()), "seed": ctx.seed,
        },
        "device": run["device"],
        "threads": ctx.threads,
        "wall_s": round(run["wall_s"], 2),
        "bytes_on_disk": {
            "input_folder": model_bytes(src), "output_folder": model_bytes(final),
            "input_weights": _weights_bytes(src), "output_weights": _weights_bytes(final),
        },
        "quantized_layers": len(run["quantized"]),
        "skipped_layers": _skipped_layers(src, run["quantized"], tied),
        "quantizer_log": _log_summary(run["entries"]),
        "storage_dtype": str(SAVE_DTYPE).replace("torch.", "") + " (unquantized tensors)",
        "checkpoint_format": ("awq gemm (int32 packing along outputs, fp16 scales, zero points)"
                              if cfg.method == "awq" else "gptq v1 (int32 packing, fp16 scales)"),
        "loaders_verified": run["verified"],
        "serving": serving_notes(src, cfg),
        "verify_block": {"source": cfg.calibration.source, "tokens": VERIFY_TOKENS,
                         "seed": ctx.seed + 1, "note": "training text, not evaluation data"},
        "versions": _versions(),
    }


def _gguf_preflight(src: Path, qtype: str) -> Path | None:
    """Refuse a GGUF request that cannot succeed before quantizing (architecture, tokenizer
    reference); the export itself runs on the finished checkpoint. Returns the reference."""
    if qtype == "none":
        return None
    from tasks.quantize.errors import ExportError
    from tasks.quantize.gguf_export import LLAMA_QUANTIZED, GgufExportError, preflight
    from tasks.quantize.imatrix import check_tools

    try:
        if qtype in LLAMA_QUANTIZED:
            check_tools()  # its importance matrix needs llama-imatrix and llama-quantize
        return preflight(src, qtype)
    except (GgufExportError, ExportError) as exc:
        raise QuantizeError(f"gguf: {qtype}: {exc}") from exc


def _export_gguf(final: Path, out_file: Path, cfg: QuantizeConfig, ctx: StageContext,
                 reference: Path, src: Path) -> dict[str, Any]:
    """GGUF export of the finished checkpoint, its failures as one-line QuantizeErrors.
    llama.cpp's k-quants get an importance matrix on the stage's own calibration text; with
    `gguf_q8_layers`, the layers 4 bits hurt most are written in Q8_0 from `src`."""
    from tasks.quantize.errors import ExportError
    from tasks.quantize.gguf_export import LLAMA_QUANTIZED, GgufExportError, export_gguf
    from tasks.quantize.gguf_verify import GgufVerifyError
    from tasks.quantize.imatrix import sample_calibration
    from tasks.quantize.mixed_export import export_mixed

    calibration = (sample_calibration(cfg.calibration, ctx.seed, "quantize.calibration",
                                      ctx.data) if cfg.gguf in LLAMA_QUANTIZED else None)
    try:
        if getattr(cfg, "gguf_q8_layers", None) is not None:
            return export_mixed(final, src, out_file, cfg, ctx, reference)
        return export_gguf(final, out_file, cfg.gguf, reference, calibration=calibration,
                           threads=ctx.threads, embedding=cfg.gguf_embedding)
    except (GgufExportError, GgufVerifyError, ExportError) as exc:
        raise QuantizeError(f"gguf {cfg.gguf} export of {final} failed: {exc}") from exc


def quantize_stage(model: ModelRef, cfg: QuantizeConfig, ctx: StageContext) -> StageResult:
    """Quantize `model` with GPTQ, AWQ or RTN into `ctx.out_dir/model` plus metrics.

    With `cfg.gguf` set, the finished checkpoint is also exported to `ctx.out_dir/model.gguf`
    (`tasks.quantize.gguf_export`; its metrics under "gguf").
    """
    set_offline_env()
    configure_threads(ctx.threads)
    import_gptqmodel()
    from transformers import AutoTokenizer

    src = Path(model.path)
    check_group_size(src, cfg.group_size)
    if cfg.method == "awq":
        check_awq_shapes(src)
    # getattr: a long-running process may hold a QuantizeConfig from before the field existed
    gguf = getattr(cfg, "gguf", "none")
    gguf_reference = _gguf_preflight(src, gguf)
    device = compute_device()
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    config = load_config(src)
    equalize = getattr(cfg, "equalize", False)
    calibration = (_calibration_data(tokenizer, cfg, ctx, config)
                   if cfg.method != "rtn" or equalize else None)
    calib = calibration.ids if calibration is not None else None
    verify_ids = _verify_block(tokenizer, cfg, ctx, config)
    ref_logits = reference_logits(src, verify_ids)

    final = Path(ctx.out_dir) / "model"
    tmp = final.with_name(final.name + ".partial")
    work, equalized = src, None
    if equalize:
        from tasks.quantize.equalize import EqualizeError, equalized_copy

        try:
            work, equalized = equalized_copy(src, calib, cfg.bits, cfg.group_size, cfg.sym,
                                             Path(ctx.out_dir) / EQUALIZED,
                                             rule=getattr(cfg, "grid", "min-max"))
        except EqualizeError as exc:
            raise QuantizeError(str(exc)) from exc
    try:
        entries, wall_s = quantize_into(work, tmp, cfg, calib if cfg.method != "rtn" else None,
                                        device)
        quantized = quantized_module_names(tmp)
        if not quantized:
            raise QuantizeError(f"{cfg.method} wrote no quantized modules into {tmp}")
        verified = verify_loaders(tmp, verify_ids, ref_logits, device)
        ref = _finalize(tmp, final, tokenizer)
        print(f"[{STAGE}] done in {wall_s:,.0f}s: {len(quantized)} layers -> {final}",
              file=sys.stderr, flush=True)
        run = {"device": device, "wall_s": wall_s, "quantized": quantized, "entries": entries,
               "verified": verified}
        metrics = _stage_metrics(src, final, cfg, ctx, calib, run)
        if calibration is not None:
            metrics["data"] = calibration.stats
        if equalized is not None:
            metrics["equalize"] = equalized
        if gguf != "none":
            # the Q8_0 layers of a mixed file come from the float model GPTQ saw: its norms are
            # the ones the file holds
            metrics["gguf"] = _export_gguf(final, Path(ctx.out_dir) / GGUF_FILE, cfg, ctx,
                                           gguf_reference, work)
    finally:  # the scaled copy never outlives the stage, whether it finished or not
        if work != src:
            shutil.rmtree(work, ignore_errors=True)
    return StageResult(model=ref, metrics=metrics)
