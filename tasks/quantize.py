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

import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from tasks.common import (
    ModelRef,
    Progress,
    StageContext,
    StageResult,
    fingerprint_folder,
    folder_bytes,
    set_offline_env,
)
from tasks.model_store import FINGERPRINT_FILE, model_ref
from tasks.quant_layout import (
    MARLIN_K_MULTIPLE,
    MARLIN_N_MULTIPLE,
    group_size_hint,
    marlin_k_note,
)
from tasks.recipe import QuantizeConfig
from tasks.textdata import load_train_texts, token_blocks

STAGE = "quantize"
PACK_BITS = 32  # GPTQ packs codes into int32 words
SAVE_DTYPE = torch.float16  # unquantized tensors on disk; GPTQ scales are fp16 too
CPU_CALIBRATION_DTYPE = torch.float32  # GPTQModel's CPU default would be bf16
VERIFY_TOKENS = 256  # one short training-text block for the post-save sanity forward
GGUF_FILE = "model.gguf"  # with `gguf:` set, written beside the stage's model folder
_LAYER_INDEX = re.compile(r"\.\d+\.")


class QuantizeError(RuntimeError):
    """Quantization could not run or its output failed verification; one line says why."""


# --------------------------------------------------------------------------------------------
# Group-size check
# --------------------------------------------------------------------------------------------


def _load_config(model_path_or_config: Any):
    """A transformers config from a folder, a config object, or a plain dict."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model_path_or_config, PretrainedConfig):
        return model_path_or_config
    if isinstance(model_path_or_config, dict):
        data = dict(model_path_or_config)
        return AutoConfig.for_model(data.pop("model_type"), **data)
    set_offline_env()
    return AutoConfig.from_pretrained(str(model_path_or_config))


def _safetensors_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Shapes from safetensors headers: a (pruned) checkpoint's true sizes, no weights read."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def quantizable_linears(model_path_or_config: Any) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} of the linears GPTQ quantizes.

    Those are the nn.Linear modules inside the repeated decoder blocks (names with a `.N.` index);
    lm_head and embeddings stay in floating point, as GPTQModel does with `lm_head=False`. The
    module list comes from a meta-device build of the config (no memory, any architecture);
    sizes come from the checkpoint's safetensors headers when a folder is given, so a pruned
    model whose weights disagree with a uniform config is still checked on its real shapes.
    """
    from transformers import AutoModelForCausalLM

    config = _load_config(model_path_or_config)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    linears = {
        name: (module.in_features, module.out_features)
        for name, module in skeleton.named_modules()
        if isinstance(module, torch.nn.Linear) and _LAYER_INDEX.search(f".{name}.")
    }
    if isinstance(model_path_or_config, (str, Path)) and Path(model_path_or_config).is_dir():
        shapes = _safetensors_shapes(Path(model_path_or_config))
        for name in linears:
            shape = shapes.get(f"{name}.weight")
            if shape is not None and len(shape) == 2:
                linears[name] = (shape[1], shape[0])
    return linears


def _index_ranges(indices: list[int]) -> str:
    """[0, 1, 2, 3, 7] -> "0-3,7": every index stays named, runs of 3+ shortened."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs)


def _compact_names(sizes: dict[str, int]) -> dict[str, int]:
    """Fold `model.layers.N.x` names sharing a size into `model.layers.[0-29].x`.

    A 30-layer model would otherwise give a 9 kB error line; this one still names every layer.
    """
    groups: dict[tuple[str, int], list[int]] = {}
    singles: dict[str, int] = {}
    for name, size in sizes.items():
        match = re.search(r"\.(\d+)\.", name)
        if not match:
            singles[name] = size
            continue
        template = name[: match.start()] + ".{}." + name[match.end():]
        groups.setdefault((template, size), []).append(int(match.group(1)))
    out = dict(singles)
    for (template, size), indices in groups.items():
        label = str(indices[0]) if len(indices) == 1 else f"[{_index_ranges(indices)}]"
        out[template.format(label)] = size
    return out


def check_group_size(model_path_or_config: Any, group_size: int) -> None:
    """Refuse a group size that does not divide every quantized layer's in_features.

    GPTQ scales are per (group of input columns); a partial trailing group is not representable
    in the checkpoint format that kernels expect, and pruned models may have odd widths. The
    error names every offending layer so the user can pick a group size or a prune `round_to`.
    """
    linears = quantizable_linears(model_path_or_config)
    if not linears:
        raise ValueError("no quantizable linear layers found (expected decoder-block nn.Linear)")
    bad = {name: dims[0] for name, dims in linears.items() if dims[0] % group_size}
    if not bad:
        return
    listed = ", ".join(f"{name} (in_features {n})" for name, n in _compact_names(bad).items())
    hint = group_size_hint(dims[0] for dims in linears.values())
    raise ValueError(f"group_size {group_size} does not divide in_features of {len(bad)} "
                     f"layer(s): {listed}; {hint}")


AWQ_OUT_MULTIPLE = 64  # GPTQModel's AWQ clip search walks output rows in batches of 64 (or 256)


def check_awq_shapes(model_path_or_config: Any) -> None:
    """Refuse AWQ on layers whose out_features GPTQModel's AWQ cannot process (it asserts)."""
    bad = {name: dims[1] for name, dims in quantizable_linears(model_path_or_config).items()
           if dims[1] % AWQ_OUT_MULTIPLE}
    if bad:
        listed = ", ".join(f"{n} (out_features {v})" for n, v in _compact_names(bad).items())
        raise ValueError(f"awq needs out_features divisible by {AWQ_OUT_MULTIPLE} (GPTQModel 7.6 "
                         f"clip search); offending: {listed}; use gptq or rtn")


def serving_notes(model_path_or_config: Any, cfg: QuantizeConfig) -> dict[str, Any]:
    """Which vLLM loader the checkpoint targets and what would stop its fast kernel.

    vLLM needs CUDA and cannot be installed on this CPU machine, so nothing here is verified
    with vLLM; these are the documented layout constraints, checked against the real shapes.
    Marlin (gptq_marlin / awq_marlin) wants in_features % 128 and out_features % 64; SmolLM2's
    hidden size 576 fails the first, so vLLM would fall back to its slower non-Marlin kernel.
    """
    linears = quantizable_linears(model_path_or_config)
    warnings: list[str] = []
    bad_k = {n: d[0] for n, d in linears.items() if d[0] % MARLIN_K_MULTIPLE}
    bad_n = {n: d[1] for n, d in linears.items() if d[1] % MARLIN_N_MULTIPLE}
    if bad_k:
        warnings.append(marlin_k_note(_compact_names(bad_k)))
    if bad_n:
        names = ", ".join(f"{n} ({v})" for n, v in _compact_names(bad_n).items())
        warnings.append(f"vLLM Marlin kernels need out_features divisible by "
                        f"{MARLIN_N_MULTIPLE}; not: {names}")
    if cfg.method == "awq" and cfg.bits != 4:
        warnings.append("vLLM's AWQ kernels are 4-bit only; an 8-bit AWQ checkpoint loads here "
                        "(GPTQModel) but not in vLLM")
    if cfg.method != "awq" and not cfg.sym:
        warnings.append("asymmetric GPTQ: vLLM's gptq_marlin wants sym=True")
    loader = "awq / awq_marlin" if cfg.method == "awq" else "gptq / gptq_marlin"
    return {
        "vllm_quantization": loader,
        "vllm_verified": "no: vLLM needs CUDA and cannot be installed on this CPU-only machine",
        "warnings": warnings,
    }


# --------------------------------------------------------------------------------------------
# GPTQ checkpoint format helpers
# --------------------------------------------------------------------------------------------


def _unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unpack int32 words holding 32/bits codes each (lowest bits first) along `dim`."""
    per_word = PACK_BITS // bits
    shifts = torch.arange(0, PACK_BITS, bits, dtype=torch.int32)
    words = packed.to(torch.int32).unsqueeze(dim + 1)
    view = [1] * words.dim()
    view[dim + 1] = per_word
    codes = torch.bitwise_and(torch.bitwise_right_shift(words, shifts.view(view)), 2**bits - 1)
    shape = list(packed.shape)
    shape[dim] *= per_word
    return codes.reshape(shape)


def dequantize_gptq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """Float [out, in] weight of one GPTQ v1 module: scale * (q - zero), per input-column group.

    Independent of any kernel, so tests and audits can check what a checkpoint really holds.
    v1 checkpoints store `zero - 1` in qzeros (the AutoGPTQ convention GPTQModel keeps).
    """
    q = _unpack_int32(qweight, bits, dim=0)  # [in, out]
    zeros = _unpack_int32(qzeros, bits, dim=1) + 1  # [groups, out]
    groups = g_idx.long()
    weight = scales.float()[groups] * (q.float() - zeros.float()[groups])
    return weight.t().contiguous()


def read_quantized_weights(path: Path, bits: int) -> dict[str, torch.Tensor]:
    """{module name: dequantized float weight} for every quantized module of a checkpoint."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            keys = set(handle.keys())
            for key in sorted(k for k in keys if k.endswith(".qweight")):
                name = key[: -len(".qweight")]
                tensors = [handle.get_tensor(f"{name}.{part}")
                           for part in ("qweight", "qzeros", "scales", "g_idx")]
                out[name] = dequantize_gptq(*tensors, bits=bits)
    return out


def _quantized_module_names(path: Path) -> list[str]:
    from safetensors import safe_open

    names: list[str] = []
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            names += [k[: -len(".qweight")] for k in handle.keys() if k.endswith(".qweight")]
    return sorted(names)


# --------------------------------------------------------------------------------------------
# Running GPTQModel
# --------------------------------------------------------------------------------------------


def _short(exc: BaseException, limit: int = 300) -> str:
    """One-line, bounded rendering of a library exception (some list hundreds of tensors)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _float_source(src: Path, scratch: Path) -> Path:
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
    if method != "gguf" or _quantized_module_names(src):
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


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _configure_threads(threads: int) -> None:
    """Match torch threads and GPTQModel's CPU worker pool to ctx.threads.

    GPTQModel's pool always has a 2-worker `model_loader:cpu` sub-pool, so fewer than 2 CPU
    workers fails at the first quantize call; the env var is read when the pool is first built.
    """
    torch.set_num_threads(max(1, threads))
    os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(2, threads))


def _import_gptqmodel():
    """Import GPTQModel lazily (it prints a banner and sets env vars at import)."""
    try:
        import gptqmodel
        from gptqmodel import BACKEND, GPTQModel
        from gptqmodel.quantization.config import AWQConfig, GPTQConfig, RTNConfig
    except Exception as exc:  # noqa: BLE001 - any import failure means the method cannot run
        raise QuantizeError("quantization needs gptqmodel==7.6.0, which failed to import: "
                            f"{_short(exc)}") from exc
    return gptqmodel, GPTQModel, BACKEND, GPTQConfig, RTNConfig, AWQConfig


def _gptqmodel_config(cfg: QuantizeConfig):
    """GPTQModel config for the recipe; kept in memory (no disk offload: faster, deterministic).

    GPTQ's low-sample RTN fallback is off, so a GPTQ run is GPTQ on every module or fails.
    With desc_act=False GPTQModel's default group-aware reordering (act_group_aware) applies;
    it changes only the processing order, the checkpoint keeps the standard g_idx layout.
    """
    _, _, _, GPTQConfig, RTNConfig, AWQConfig = _import_gptqmodel()
    common = dict(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, offload_to_disk=False)
    if cfg.method == "rtn":
        return RTNConfig(desc_act=False, **common)
    if cfg.method == "awq":
        # AWQ checkpoints carry zero points (asymmetric) in every runtime that reads them
        return AWQConfig(**(common | {"sym": False}), fallback=None)
    return GPTQConfig(desc_act=cfg.desc_act, damp_percent=cfg.damp_percent, fallback=None,
                      **common)


def _calibration_blocks(tokenizer, cfg: QuantizeConfig, ctx: StageContext) -> torch.Tensor:
    cal = cfg.calibration
    texts = load_train_texts(ctx.data, cal.source)
    return token_blocks(tokenizer, texts, cal.seq_len, cal.samples, seed=ctx.seed)


def _verify_block(tokenizer, cfg: QuantizeConfig, ctx: StageContext) -> torch.Tensor:
    """One short training-text block (not evaluation data) for the post-save sanity forward."""
    texts = load_train_texts(ctx.data, cfg.calibration.source)
    return token_blocks(tokenizer, texts, VERIFY_TOKENS, 1, seed=ctx.seed + 1)


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


def _cast_unquantized(model: torch.nn.Module, dtype: torch.dtype,
                      scales_dtype: torch.dtype | None = None) -> None:
    """Cast embeddings/norms/head to `dtype`, and optionally the quantized modules' scales.

    Parameters are cast in place (`.data`), so tied embedding/head weights stay one tensor;
    packed codes (qweight/qzeros/g_idx) are integers and never touched.
    """
    for module in model.modules():
        if hasattr(module, "qweight"):
            scales = getattr(module, "scales", None)
            if scales_dtype is not None and isinstance(scales, torch.Tensor):
                module.scales = scales.to(scales_dtype)
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
    model.config.dtype = dtype


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
    _, GPTQModel, BACKEND, *_ = _import_gptqmodel()
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
    try:
        with _gptqmodel_log_dir(tmp.parent / "gptqmodel-logs"):
            log = wrapper.quantize(data, batch_size=1, backend=backend)
    finally:
        for handle in hooks:
            handle.remove()
    # AWQ runtimes (vLLM's included) expect fp16 scales; bf16 -> fp16 keeps every scale bit
    _cast_unquantized(wrapper.model, SAVE_DTYPE,
                      scales_dtype=SAVE_DTYPE if cfg.method == "awq" else None)
    wrapper.save(str(tmp))
    # keyed by process: "gptq" or "weight_only_rtn"
    entries = [e for rows in log.values() for e in rows] if isinstance(log, dict) else []
    return [e for e in entries if isinstance(e, dict)]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_quantized(path: Path, device: str = "cpu", dtype: torch.dtype | None = None,
                   backend: str = "torch") -> torch.nn.Module:
    """Eval-mode HF CausalLM (stock transformers class, quantized linears) from a GPTQ folder.

    Loads through GPTQModel with its portable TORCH kernel (CPU and CUDA); the result's `.config`,
    `.device`, `.tie_weights` and `forward(input_ids).logits` are the usual HF ones, so lm-eval's
    HFLM can wrap it. The kernel only loads as fp16/bf16, and loading as bf16 would round the
    fp16 scales; so it loads as fp16 (the storage dtype, exact), then on CPU (or when `dtype` is
    given) casts scales to fp32 (the kernel dequantizes exactly and casts to the input's dtype)
    and the unquantized rest to `dtype` (default fp32 on CPU: fp32 logits give lm-eval untied
    log-likelihoods and a like-for-like comparison with the fp32 baseline; bf16 is faster).
    """
    set_offline_env()
    quant = json.loads((Path(path) / "config.json").read_text()).get("quantization_config", {})
    method = quant.get("quant_method")
    if method not in ("gptq", "awq"):
        raise QuantizeError(f"{path} is not a GPTQ or AWQ checkpoint (quantization_config."
                            f"quant_method {method!r}); load_quantized reads those only")
    if method == "awq" and backend == "torch":
        backend = "awq_torch"
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, torch.get_num_threads())))
    _, GPTQModel, BACKEND, *_ = _import_gptqmodel()
    try:
        wrapper = GPTQModel.load(str(path), backend=BACKEND(backend), device=device,
                                 dtype=torch.float16)
    except Exception as exc:  # noqa: BLE001 - surface any loader failure as one clear error
        raise QuantizeError(f"GPTQModel could not load {path} (backend {backend}, {device}): "
                            f"{_short(exc)}") from exc
    model = wrapper.model
    if dtype is None and str(device).startswith("cpu"):
        dtype = torch.float32
    if dtype is not None:
        _cast_unquantized(model, dtype, scales_dtype=torch.float32)
    return model.eval()


def _load_with_transformers(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu").eval()


# --------------------------------------------------------------------------------------------
# Verification + metrics
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(ids.to(device)).logits.float().cpu()


def _reference_logits(src: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    try:
        return _logits(model, ids)
    finally:
        del model


def _agreement(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and mean KL(ref || got) in nats per token: a cheap sanity signal."""
    if not torch.isfinite(got).all():
        raise QuantizeError("quantized model produced non-finite logits")
    ref_lp = torch.log_softmax(ref, dim=-1)
    got_lp = torch.log_softmax(got, dim=-1)
    kl = (ref_lp.exp() * (ref_lp - got_lp)).sum(-1).mean().item()
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    return {"top1_agreement": round(top1, 4), "kl_nats": round(kl, 5)}


def _verify_loaders(path: Path, ids: torch.Tensor, ref: torch.Tensor,
                    device: str) -> dict[str, Any]:
    """Load the written checkpoint back through each available loader and compare logits."""
    results: dict[str, Any] = {}
    model = load_quantized(path, device=device)
    results["gptqmodel"] = {"dtype": str(model.dtype).replace("torch.", ""),
                            **_agreement(ref, _logits(model, ids))}
    del model
    method = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
    if method.get("quant_method") == "gptq":
        try:
            import optimum  # noqa: F401 - transformers' GPTQ integration imports it
        except ImportError:
            results["transformers"] = "not verified: transformers' GPTQ loader needs optimum"
            return results
    try:
        model = _load_with_transformers(path)
        results["transformers"] = {"dtype": str(model.dtype).replace("torch.", ""),
                                   **_agreement(ref, _logits(model, ids))}
    except Exception as exc:  # noqa: BLE001 - reported, the gptqmodel loader already passed
        results["transformers"] = f"failed: {_short(exc)}"
    return results


def _skipped_layers(src: Path, quantized: list[str], tied: bool) -> list[dict[str, str]]:
    """Linear layers left in floating point, with why."""
    from transformers import AutoModelForCausalLM

    config = _load_config(src)
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


# --------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------


def _finalize(tmp: Path, final: Path, tokenizer) -> None:
    """Tokenizer in, fingerprint stored, then one rename: a crash never leaves a 'done' folder."""
    tokenizer.save_pretrained(str(tmp))
    (tmp / FINGERPRINT_FILE).write_text(fingerprint_folder(tmp))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def _quantize_into(src: Path, tmp: Path, cfg: QuantizeConfig, calib: torch.Tensor | None,
                   device: str) -> tuple[list[dict[str, Any]], float]:
    """Run the method on a float view of `src`, writing `tmp`; (quantizer log, wall seconds)."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    work = _float_source(src, tmp.with_name("source-view.partial"))
    print(f"[{STAGE}] {cfg.method} W{cfg.bits} g{cfg.group_size} on {device}: {src}",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        entries = _run_gptqmodel(work, tmp, cfg, calib, device)
    except QuantizeError:
        raise
    except Exception as exc:  # noqa: BLE001 - never skip silently: one clear error instead
        raise QuantizeError(f"{cfg.method} quantization of {src} failed: {_short(exc)}") from exc
    finally:
        if work != src:
            shutil.rmtree(work, ignore_errors=True)
    return entries, time.perf_counter() - start


def _stage_metrics(src: Path, final: Path, cfg: QuantizeConfig, ctx: StageContext,
                   calib: torch.Tensor | None, run: dict[str, Any]) -> dict[str, Any]:
    """The metrics.json body: what was asked, what it cost, what was verified."""
    gptq = cfg.method == "gptq"
    tied = bool(getattr(_load_config(src), "tie_word_embeddings", False))
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
            "input_folder": folder_bytes(src), "output_folder": folder_bytes(final),
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
    from tasks.gguf_export import GgufExportError, preflight

    try:
        return preflight(src, qtype)
    except GgufExportError as exc:
        raise QuantizeError(f"gguf: {qtype}: {exc}") from exc


def _export_gguf(final: Path, out_file: Path, qtype: str, reference: Path) -> dict[str, Any]:
    """GGUF export of the finished checkpoint, its failures as one-line QuantizeErrors."""
    from tasks.gguf_export import GgufExportError, export_gguf
    from tasks.gguf_verify import GgufVerifyError

    try:
        return export_gguf(final, out_file, qtype, reference)
    except (GgufExportError, GgufVerifyError) as exc:
        raise QuantizeError(f"gguf {qtype} export of {final} failed: {exc}") from exc


def quantize_stage(model: ModelRef, cfg: QuantizeConfig, ctx: StageContext) -> StageResult:
    """Quantize `model` with GPTQ, AWQ or RTN into `ctx.out_dir/model` plus metrics.

    With `cfg.gguf` set, the finished checkpoint is also exported to `ctx.out_dir/model.gguf`
    (`tasks.gguf_export`; its metrics under "gguf").
    """
    set_offline_env()
    _configure_threads(ctx.threads)
    _import_gptqmodel()
    from transformers import AutoTokenizer

    src = Path(model.path)
    check_group_size(src, cfg.group_size)
    if cfg.method == "awq":
        check_awq_shapes(src)
    # getattr: a long-running process may hold a QuantizeConfig from before the field existed
    gguf = getattr(cfg, "gguf", "none")
    gguf_reference = _gguf_preflight(src, gguf)
    device = _device()
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    calib = _calibration_blocks(tokenizer, cfg, ctx) if cfg.method != "rtn" else None
    verify_ids = _verify_block(tokenizer, cfg, ctx)
    ref_logits = _reference_logits(src, verify_ids)

    final = Path(ctx.out_dir) / "model"
    tmp = final.with_name(final.name + ".partial")
    entries, wall_s = _quantize_into(src, tmp, cfg, calib, device)
    quantized = _quantized_module_names(tmp)
    if not quantized:
        raise QuantizeError(f"{cfg.method} wrote no quantized modules into {tmp}")
    verified = _verify_loaders(tmp, verify_ids, ref_logits, device)
    _finalize(tmp, final, tokenizer)
    print(f"[{STAGE}] done in {wall_s:,.0f}s: {len(quantized)} layers -> {final}",
          file=sys.stderr, flush=True)
    run = {"device": device, "wall_s": wall_s, "quantized": quantized, "entries": entries,
           "verified": verified}
    metrics = _stage_metrics(src, final, cfg, ctx, calib, run)
    if gguf != "none":
        metrics["gguf"] = _export_gguf(final, Path(ctx.out_dir) / GGUF_FILE, gguf,
                                       gguf_reference)
    return StageResult(model=model_ref(final), metrics=metrics)
