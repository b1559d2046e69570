"""Running GPTQModel: a float view of the input, the method's config, progress, the save.

All three methods (GPTQ, AWQ, RTN) go through GPTQModel 7.6 (AutoGPTQ is archived and fails to
import with transformers 5; llm-compressor pins transformers<=5.17). Calibration runs on CPU by
default and on CUDA when present; the checkpoint format itself is `tasks.core.gptq_checkpoint`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from tasks.core.common import Progress, one_line
from tasks.core.gptq_checkpoint import (
    SAVE_DTYPE,
    QuantizeError,
    cast_unquantized,
    import_gptqmodel,
    quantized_module_names,
)
from tasks.core.recipe import QuantizeConfig
from tasks.quantize.q4_0_grid import gptqmodel_q4_0_grid

STAGE = "quantize"
CPU_CALIBRATION_DTYPE = torch.float32  # GPTQModel's CPU default would be bf16


def float_source(src: Path, scratch: Path) -> Path:
    """A folder GPTQModel will treat as a full-precision model to quantize.

    Folders converted from GGUF keep a stale `quantization_config` (quant_method gguf) although
    their safetensors hold dense float weights; GPTQModel then takes them for a pre-quantized
    checkpoint and fails. For those, build a view (symlinks + cleaned config.json) under
    `scratch`. A folder that is really quantized is refused: quantizing twice is never intended.
    """
    config = json.loads((src / "config.json").read_text())
    quant = config.get("quantization_config")
    if not quant:
        return src
    method = quant.get("quant_method", "?")
    if method != "gguf" or quantized_module_names(src):
        raise QuantizeError(f"input {src} is already quantized (quant_method {method}); "
                            "quantize needs a full-precision model")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for file in src.iterdir():
        if file.name != "config.json" and file.is_file():
            (scratch / file.name).symlink_to(file.resolve())
    del config["quantization_config"]
    (scratch / "config.json").write_text(json.dumps(config, indent=2))
    return scratch


def compute_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def configure_threads(threads: int) -> None:
    """Match torch threads and GPTQModel's CPU worker pool to ctx.threads.

    GPTQModel's pool always has a 2-worker `model_loader:cpu` sub-pool, so fewer than 2 CPU
    workers fails at the first quantize call; the env var is read when the pool is first built.
    """
    torch.set_num_threads(max(1, threads))
    os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(2, threads))


def _gptqmodel_config(cfg: QuantizeConfig):
    """GPTQModel config for the recipe; kept in memory (no disk offload: faster, deterministic).

    GPTQ's low-sample RTN fallback is off, so a GPTQ run is GPTQ on every module or fails.
    With desc_act=False GPTQModel's default group-aware reordering (act_group_aware) applies;
    it changes only the processing order, the checkpoint keeps the standard g_idx layout.
    """
    _, _, _, GPTQConfig, RTNConfig, AWQConfig = import_gptqmodel()
    common = dict(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, offload_to_disk=False)
    if cfg.method == "rtn":
        return RTNConfig(desc_act=False, **common)
    if cfg.method == "awq":
        # AWQ checkpoints carry zero points (asymmetric) in every runtime that reads them
        return AWQConfig(**(common | {"sym": False}), fallback=None)
    return GPTQConfig(desc_act=cfg.desc_act, damp_percent=cfg.damp_percent, fallback=None,
                      mse=getattr(cfg, "mse", 0.0), **common)


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The repeated decoder blocks: the longest ModuleList in the model."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise QuantizeError("model has no ModuleList of decoder layers")
    return max(lists, key=len)


def _attach_layer_progress(model: torch.nn.Module, start: float) -> list[Any]:
    """Print `layer i/N` to stderr when GPTQ first runs each decoder layer."""
    layers = _decoder_layers(model)
    progress = Progress(STAGE, total=len(layers), unit="layer", every_s=0.0)
    progress.start = start
    seen: set[int] = set()

    def hook(index: int):
        def _on_forward(_module, _args):
            if index not in seen:
                seen.add(index)
                progress.update(index + 1, force=True)
        return _on_forward

    return [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]


@contextmanager
def _gptqmodel_log_dir(folder: Path) -> Iterator[None]:
    """Send GPTQModel's per-processor log files into the stage folder, not `./logs` of the CWD.

    GPTQModel 7.6 writes them under a module-level relative path; without this every run
    litters whatever directory pkdq was started from.
    """
    try:
        from gptqmodel.looper import loop_processor
    except ImportError:
        yield
        return
    previous = getattr(loop_processor, "_PROJECT_LOG_DIR", None)
    loop_processor._PROJECT_LOG_DIR = folder
    try:
        yield
    finally:
        if previous is not None:
            loop_processor._PROJECT_LOG_DIR = previous


def _run_gptqmodel(src: Path, tmp: Path, cfg: QuantizeConfig, calib: torch.Tensor | None,
                   device: str) -> list[dict[str, Any]]:
    """Quantize `src` with GPTQModel and save the packed checkpoint into `tmp`.

    CPU calibration runs in fp32 (GPTQModel would pick bf16, coarsening the layer inputs the
    Hessians are built from); the unquantized rest is then stored in SAVE_DTYPE.
    """
    _, GPTQModel, BACKEND, *_ = import_gptqmodel()
    qcfg = _gptqmodel_config(cfg)
    dtype = CPU_CALIBRATION_DTYPE if device == "cpu" else torch.float16
    backend = BACKEND.TORCH
    if cfg.method == "awq":
        # GPTQModel's AWQ packer only builds fp16/bf16 modules; on CPU fp16 matmuls are ~100x
        # slower than bf16 (measured: 6.3 s vs 0.06 s for 2048x576x1536), so CPU uses bf16
        dtype, backend = (torch.bfloat16 if device == "cpu" else torch.float16), BACKEND.AWQ_TORCH
    start = time.perf_counter()
    wrapper = GPTQModel.load(str(src), qcfg, device=device, dtype=dtype)
    hooks = _attach_layer_progress(wrapper.model, start) if calib is not None else []
    data = None if calib is None else [
        {"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calib
    ]
    grid = gptqmodel_q4_0_grid() if getattr(cfg, "grid", "min-max") == "q4_0" else nullcontext()
    try:
        with _gptqmodel_log_dir(tmp.parent / "gptqmodel-logs"), grid:
            log = wrapper.quantize(data, batch_size=1, backend=backend)
    finally:
        for handle in hooks:
            handle.remove()
    # AWQ runtimes (vLLM's included) expect fp16 scales; bf16 -> fp16 keeps every scale bit
    cast_unquantized(wrapper.model, SAVE_DTYPE,
                      scales_dtype=SAVE_DTYPE if cfg.method == "awq" else None)
    wrapper.save(str(tmp))
    # keyed by process: "gptq" or "weight_only_rtn"
    entries = [e for rows in log.values() for e in rows] if isinstance(log, dict) else []
    return [e for e in entries if isinstance(e, dict)]


def quantize_into(src: Path, tmp: Path, cfg: QuantizeConfig, calib: torch.Tensor | None,
                   device: str) -> tuple[list[dict[str, Any]], float]:
    """Run the method on a float view of `src`, writing `tmp`; (quantizer log, wall seconds)."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    work = float_source(src, tmp.with_name("source-view.partial"))
    print(f"[{STAGE}] {cfg.method} W{cfg.bits} g{cfg.group_size} on {device}: {src}",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        entries = _run_gptqmodel(work, tmp, cfg, calib, device)
    except QuantizeError:
        raise
    except Exception as exc:  # noqa: BLE001 - never skip silently: one clear error instead
        raise QuantizeError(f"{cfg.method} quantization of {src} failed: {one_line(exc)}") from exc
    finally:
        if work != src:
            shutil.rmtree(work, ignore_errors=True)
    return entries, time.perf_counter() - start
