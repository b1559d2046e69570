"""THE quantized checkpoint format: GPTQ v1 folders (and AWQ GEMM folders for loading).

One home for everything that knows how a quantized folder is laid out, so the quantize stage,
quantization-aware KD, pruning after quantization, GGUF export and speed measurement all read
and write it the same way:

- layout: per quantized linear `qweight` (int32, 32/bits codes per word along inputs, lowest
  bits first), `qzeros` (int32, `zero - 1` packed along outputs: the AutoGPTQ v1 convention
  GPTQModel keeps), `scales` (fp16 [groups, out]) and `g_idx` (int32 [in]); every other tensor
  in SAVE_DTYPE; `quantization_config` in config.json;
- pack / unpack of the int32 words, read of the parts, dequantization to float weights;
- loading: through GPTQModel's portable TORCH kernel (`load_quantized`, the grid computed in
  fp32 on CPU) or as a plain float model holding exactly the grid values (`load_dequantized`);
- writing a checkpoint whose grid (scales, zeros, g_idx) is reused and only the codes change.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.core.common import ModelRef, one_line, set_offline_env
from tasks.core.model_folder import copy_side_files, seal_folder

PACK_BITS = 32  # GPTQ packs codes into int32 words
SAVE_DTYPE = torch.float16  # unquantized tensors on disk; GPTQ scales are fp16 too
QUANT_PARTS = ("qweight", "qzeros", "scales", "g_idx")


class QuantizeError(RuntimeError):
    """Quantization could not run, or a quantized folder could not be read; one line says why."""


@dataclass
class GridParams:
    """One quantized module's frozen grid, as stored in the checkpoint (GPTQ v1 tensors)."""

    qzeros: torch.Tensor  # int32 [groups, out * bits / 32], stores zero - 1
    scales: torch.Tensor  # fp16 [groups, out]
    g_idx: torch.Tensor  # int32 [in]


def quantization_config(path: Path) -> dict[str, Any]:
    """The folder's `quantization_config` ({} for a float model)."""
    return json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}


def gptq_config(path: Path, purpose: str) -> dict[str, Any]:
    """The quantization_config of a GPTQ-format folder (methods gptq and rtn), else one error."""
    quant = quantization_config(path)
    if quant.get("quant_method") != "gptq":
        raise QuantizeError(f"{purpose} needs a GPTQ-format checkpoint (gptq or rtn); "
                            f"{path} has quant_method {quant.get('quant_method')!r}")
    if quant.get("desc_act"):
        raise QuantizeError(f"{purpose} does not support desc_act checkpoints")
    return quant


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
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


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of `unpack_int32`: pack 32/bits codes per int32, lowest bits first."""
    per_word = PACK_BITS // bits
    codes = codes.to(torch.int64).movedim(dim, 0)
    shape = codes.shape
    codes = codes.reshape(shape[0] // per_word, per_word, *shape[1:])
    shifts = (torch.arange(per_word, dtype=torch.int64) * bits).view(-1, *[1] * (len(shape) - 1))
    words = (codes << shifts).sum(1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(0, dim).contiguous()


# --------------------------------------------------------------------------------------------
# Reading and dequantizing
# --------------------------------------------------------------------------------------------


def read_parts(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(float tensors, {module: {qweight, qzeros, scales, g_idx}}) of a quantized folder."""
    from safetensors import safe_open

    plain: dict[str, torch.Tensor] = {}
    quant: dict[str, dict[str, torch.Tensor]] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                name, _, part = key.rpartition(".")
                if part in QUANT_PARTS:
                    quant.setdefault(name, {})[part] = handle.get_tensor(key)
                else:
                    plain[key] = handle.get_tensor(key)
    return plain, quant


def quantized_module_names(path: Path) -> list[str]:
    """Names of the quantized modules, read from safetensors headers (no tensor loaded)."""
    from safetensors import safe_open

    names: list[str] = []
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            names += [k[: -len(".qweight")] for k in handle.keys() if k.endswith(".qweight")]
    return sorted(names)


def scale_zero(parts: dict[str, torch.Tensor], bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float scales and zero points [groups, out] of one module (qzeros stores zero - 1)."""
    zeros = (unpack_int32(parts["qzeros"], bits, dim=1) + 1).float()
    return parts["scales"].float(), zeros


def dequantize(parts: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """Float [out, in] weight of one module: scale * (q - zero), per input-column group.

    Independent of any kernel, so tests and audits can check what a checkpoint really holds.
    """
    q = unpack_int32(parts["qweight"], bits, dim=0).t().float()  # [out, in]
    scale, zero = scale_zero(parts, bits)
    groups = parts["g_idx"].long()
    return (scale[groups].t() * (q - zero[groups].t())).contiguous()


def read_quantized_weights(path: Path, bits: int) -> dict[str, torch.Tensor]:
    """{module name: dequantized float weight} for every quantized module of a checkpoint."""
    return {name: dequantize(parts, bits) for name, parts in read_parts(path)[1].items()}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


# GPTQModel's TORCH kernel torch.compiles each quantized module's dequantizer at load. On a CPU
# that buys nothing: the first load imports inductor (~7 s), the first forward compiles every
# module (seconds each; SmolLM2's 210 modules hit dynamo's recompile limit and fall back to
# eager anyway). So CPU loads run the same dequantizer eagerly unless PKDQ_SPEED_COMPILE=1
# (the speed probe reports which it measured as `torch_compile`).
COMPILE_ENV = "PKDQ_SPEED_COMPILE"


def compile_requested() -> bool:
    return os.environ.get(COMPILE_ENV) == "1"


@contextmanager
def eager_dequantize(enabled: bool) -> Iterator[None]:
    """While loading, make GPTQModel's TORCH kernel skip its torch.compile step (it keeps the
    eager dequantizer, the same arithmetic); restored afterwards."""
    if not enabled:
        yield
        return
    from gptqmodel.nn_modules.qlinear import torch as torch_kernel

    original = torch_kernel.torch_compile
    torch_kernel.torch_compile = lambda fn, **_kwargs: fn
    try:
        yield
    finally:
        torch_kernel.torch_compile = original


def import_gptqmodel():
    """Import GPTQModel lazily (it prints a banner and sets env vars at import)."""
    try:
        import gptqmodel
        from gptqmodel import BACKEND, GPTQModel
        from gptqmodel.quantization.config import AWQConfig, GPTQConfig, RTNConfig
    except Exception as exc:  # noqa: BLE001 - any import failure means the method cannot run
        raise QuantizeError("quantization needs gptqmodel==7.6.0, which failed to import: "
                            f"{one_line(exc)}") from exc
    return gptqmodel, GPTQModel, BACKEND, GPTQConfig, RTNConfig, AWQConfig


def cast_unquantized(model: torch.nn.Module, dtype: torch.dtype,
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
    method = quantization_config(path).get("quant_method")
    if method not in ("gptq", "awq"):
        raise QuantizeError(f"{path} is not a GPTQ or AWQ checkpoint (quantization_config."
                            f"quant_method {method!r}); load_quantized reads those only")
    if method == "awq" and backend == "torch":
        backend = "awq_torch"
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, torch.get_num_threads())))
    _, GPTQModel, BACKEND, *_ = import_gptqmodel()
    eager = str(device).startswith("cpu") and not compile_requested()
    try:
        with eager_dequantize(eager):
            wrapper = GPTQModel.load(str(path), backend=BACKEND(backend), device=device,
                                     dtype=torch.float16)
    except Exception as exc:  # noqa: BLE001 - surface any loader failure as one clear error
        raise QuantizeError(f"GPTQModel could not load {path} (backend {backend}, {device}): "
                            f"{one_line(exc)}") from exc
    model = wrapper.model
    if dtype is None and str(device).startswith("cpu"):
        dtype = torch.float32
    if dtype is not None:
        cast_unquantized(model, dtype, scales_dtype=torch.float32)
    return model.eval()


def load_dequantized(path: Path):
    """(float model, tokenizer) holding exactly the checkpoint's grid values, as plain linears.

    Built from the config without its quantization_config (a stock float model), then loaded
    with the checkpoint's float tensors and the dequantized linears. Stages that change shapes
    (pruning after quantization) start here; QAT starts here and adds the fake-quant wrappers.
    """
    set_offline_env()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    gptq_config(path, "loading the dequantized grid")
    config = AutoConfig.from_pretrained(str(path))
    bits = int(config.quantization_config["bits"])
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain, quant = read_parts(path)
    state = {k: v.float() for k, v in plain.items()}
    state |= {f"{name}.weight": dequantize(parts, bits) for name, parts in quant.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise QuantizeError(f"dequantized model from {path}: missing {missing[:4]}, "
                            f"unexpected {unexpected[:4]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval(), AutoTokenizer.from_pretrained(str(path))


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_gptq(model: nn.Module, codes: dict[str, torch.Tensor], grids: dict[str, GridParams],
               bits: int, template: Path, out_dir: Path) -> ModelRef:
    """Write `model` as a GPTQ v1 checkpoint on frozen grids: only the codes are new.

    `codes` holds each quantized module's integer grid positions [out, in]; its qzeros/scales/
    g_idx are reused from `grids`. config.json (with its quantization_config) and tokenizer
    files are copied from `template`, the source checkpoint. Unquantized tensors are stored in
    SAVE_DTYPE, as the quantize stage stores them.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if name in grids:
            grid = grids[name]
            tensors[f"{name}.qweight"] = pack_int32(codes[name].t().to(torch.int64), bits, dim=0)
            tensors[f"{name}.qzeros"] = grid.qzeros.clone()
            tensors[f"{name}.scales"] = grid.scales.clone()
            tensors[f"{name}.g_idx"] = grid.g_idx.clone()
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.detach().to(SAVE_DTYPE).clone()
    tied = getattr(model.config, "tie_word_embeddings", False)
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in grids or (tied and key.endswith("lm_head.weight")):
            continue
        tensors[key] = value.detach().to(SAVE_DTYPE).contiguous().clone()
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    copy_side_files(Path(template), tmp)
    return seal_folder(tmp, out_dir)


def load_served(path: Path, device: str = "cpu") -> torch.nn.Module:
    """The quantized folder as a user's runtime serves it: GPTQModel's own default load (no
    dtype given: bf16 activations and scales), nothing cast afterwards.

    `load_quantized` computes in fp32 for a like-for-like comparison with the fp32 baseline;
    this is the other number a report owes its reader, the scores as served.
    """
    set_offline_env()
    method = quantization_config(path).get("quant_method")
    if method not in ("gptq", "awq"):
        raise QuantizeError(f"{path} is not a GPTQ or AWQ checkpoint (quantization_config."
                            f"quant_method {method!r}); load_served reads those only")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, torch.get_num_threads())))
    _, GPTQModel, BACKEND, *_ = import_gptqmodel()
    backend = "awq_torch" if method == "awq" else "torch"
    try:
        wrapper = GPTQModel.load(str(path), backend=BACKEND(backend), device=device)
    except Exception as exc:  # noqa: BLE001 - surface any loader failure as one clear error
        raise QuantizeError(f"GPTQModel could not load {path} (backend {backend}, {device}): "
                            f"{one_line(exc)}") from exc
    return wrapper.model.eval()
