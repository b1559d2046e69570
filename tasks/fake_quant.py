"""Quantization-aware KD: train a GPTQ-quantized student without leaving its quantization grid.

Orderings where Q precedes KD (P-Q-KD, Q-KD-P) are only comparable with P-KD-Q if the final model
is still quantized with the same bits, groups, scales and zeros. So KD trains a float *shadow*
weight for every quantized linear, and each forward projects it onto the frozen grid:

    w_q = scale * (clamp(round(w / scale + zero), 0, 2^bits - 1) - zero)

with a straight-through estimator (the rounding's gradient is taken as identity), the standard
QAT recipe. Scales, zeros and g_idx come from the quantized checkpoint and never change, so
`finalize_qat` only re-computes the integer codes and writes them with the checkpoint's own
qzeros/scales/g_idx: the result is a GPTQ v1 checkpoint that every GPTQ loader reads, and
re-quantizing it with the same scales changes no weight.

Only GPTQ-format checkpoints (methods gptq and rtn) are supported; AWQ's GEMM packing would need
its own packer (refused with a clear error).
"""

from __future__ import annotations

import json
import shutil
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tasks.common import fingerprint_folder, set_offline_env
from tasks.model_store import FINGERPRINT_FILE, ModelRef, model_ref
from tasks.quantize import PACK_BITS, SAVE_DTYPE, QuantizeError, _unpack_int32

_HANDLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class GridParams:
    """One quantized module's frozen grid, as stored in the checkpoint (GPTQ v1 tensors)."""

    qzeros: torch.Tensor  # int32 [groups, out * bits / 32], stores zero - 1
    scales: torch.Tensor  # fp16 [groups, out]
    g_idx: torch.Tensor  # int32 [in]


@dataclass
class QatHandle:
    """What `finalize_qat` needs: the model, its grid, and the checkpoint it came from."""

    model: nn.Module
    checkpoint: Path
    bits: int
    grids: dict[str, GridParams] = field(default_factory=dict)
    initial_codes: dict[str, torch.Tensor] = field(default_factory=dict)


class FakeQuantLinear(nn.Linear):
    """nn.Linear whose forward uses its weight projected onto a frozen GPTQ grid (STE).

    Keeps the parameter name `weight`, so optimizers, DDP and state dicts see a plain linear;
    scale/zero buffers are non-persistent (they live in the checkpoint, not the state dict).
    """

    def __init__(self, linear: nn.Linear, scale: torch.Tensor, zero: torch.Tensor,
                 g_idx: torch.Tensor, bits: int) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(linear.weight)
            if linear.bias is not None:
                self.bias.copy_(linear.bias)
        self.bits = bits
        self.register_buffer("scale", scale.float(), persistent=False)  # [groups, out]
        self.register_buffer("zero", zero.float(), persistent=False)  # [groups, out]
        self.register_buffer("g_idx", g_idx.long(), persistent=False)  # [in]

    def codes(self) -> torch.Tensor:
        """Integer grid positions [out, in] of the current shadow weight."""
        scale, zero = self._expanded()
        return torch.clamp(torch.round(self.weight.detach().float() / scale + zero),
                           0, 2**self.bits - 1)

    def _expanded(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale[self.g_idx].t(), self.zero[self.g_idx].t()  # [out, in] each

    def quantized_weight(self) -> torch.Tensor:
        """scale * (code - zero), with a straight-through gradient to the shadow weight."""
        scale, zero = self._expanded()
        w = self.weight.float()
        q = torch.clamp(torch.round(w / scale + zero), 0, 2**self.bits - 1)
        wq = scale * (q - zero)
        return (w + (wq - w).detach()).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight().to(x.dtype), self.bias)


def _checkpoint_quant(path: Path) -> dict[str, Any]:
    quant = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    if quant.get("quant_method") != "gptq":
        raise QuantizeError(f"quantization-aware KD needs a GPTQ-format checkpoint (gptq or rtn); "
                            f"{path} has quant_method {quant.get('quant_method')!r}")
    if quant.get("desc_act"):
        raise QuantizeError("quantization-aware KD does not support desc_act checkpoints")
    return quant


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """(float tensors, {module: {qweight, qzeros, scales, g_idx}}) of a GPTQ folder."""
    from safetensors import safe_open

    plain: dict[str, torch.Tensor] = {}
    quant: dict[str, dict[str, Any]] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                name, _, part = key.rpartition(".")
                if part in ("qweight", "qzeros", "scales", "g_idx"):
                    quant.setdefault(name, {})[part] = handle.get_tensor(key)
                else:
                    plain[key] = handle.get_tensor(key)
    return plain, quant


def _dequant(parts: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    q = _unpack_int32(parts["qweight"], bits, dim=0).t().float()  # [out, in]
    scale, zero = _scale_zero(parts, bits)
    g = parts["g_idx"].long()
    return scale[g].t() * (q - zero[g].t())


def _scale_zero(parts: dict[str, torch.Tensor], bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    zeros = (_unpack_int32(parts["qzeros"], bits, dim=1) + 1).float()
    return parts["scales"].float(), zeros


def prepare_qat(student_model: nn.Module, quant_checkpoint_path: Path) -> QatHandle:
    """Swap each quantized linear of `student_model` for a FakeQuantLinear on the stored grid.

    `student_model` is a float model of the checkpoint's architecture (see `load_qat_student`);
    its linear weights are the starting shadow weights (normally the dequantized checkpoint).
    """
    path = Path(quant_checkpoint_path)
    bits = int(_checkpoint_quant(path)["bits"])
    _, quant = _read_checkpoint(path)
    handle = QatHandle(model=student_model, checkpoint=path, bits=bits)
    for name, parts in quant.items():
        linear = student_model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise QuantizeError(f"{name} is quantized in {path} but not a linear in the student")
        scale, zero = _scale_zero(parts, bits)
        fake = FakeQuantLinear(linear, scale, zero, parts["g_idx"], bits)
        parent_name, _, child = name.rpartition(".")
        setattr(student_model.get_submodule(parent_name), child, fake)
        handle.grids[name] = GridParams(parts["qzeros"], parts["scales"], parts["g_idx"])
        handle.initial_codes[name] = fake.codes().to(torch.uint8)
    _HANDLES[student_model] = handle
    return handle


def qat_handle(model: nn.Module) -> QatHandle | None:
    """The handle `prepare_qat` registered for this model (None for an ordinary student)."""
    return _HANDLES.get(model)


def load_dequantized(path: Path):
    """(float model, tokenizer) holding exactly the checkpoint's grid values, as plain linears.

    Built from the config without its quantization_config (a stock float model), then loaded
    with the checkpoint's float tensors and the dequantized linears. Stages that change shapes
    (pruning after quantization) start here; QAT starts here and adds the fake-quant wrappers.
    """
    set_offline_env()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    _checkpoint_quant(path)
    config = AutoConfig.from_pretrained(str(path))
    bits = int(config.quantization_config["bits"])
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain, quant = _read_checkpoint(path)
    state = {k: v.float() for k, v in plain.items()}
    state |= {f"{name}.weight": _dequant(parts, bits) for name, parts in quant.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise QuantizeError(f"dequantized model from {path}: missing {missing[:4]}, "
                            f"unexpected {unexpected[:4]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval(), AutoTokenizer.from_pretrained(str(path))


def load_qat_student(path: Path):
    """(float student ready for QAT, tokenizer) from a GPTQ folder: dequantized weights + STE."""
    model, tokenizer = load_dequantized(path)
    prepare_qat(model, Path(path))
    return model.eval(), tokenizer


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of tasks.quantize._unpack_int32: pack 32/bits codes per int32, lowest bits first."""
    per_word = PACK_BITS // bits
    codes = codes.to(torch.int64).movedim(dim, 0)
    shape = codes.shape
    codes = codes.reshape(shape[0] // per_word, per_word, *shape[1:])
    shifts = (torch.arange(per_word, dtype=torch.int64) * bits).view(-1, *[1] * (len(shape) - 1))
    words = (codes << shifts).sum(1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(0, dim).contiguous()


def pack_to_gptq(model: nn.Module, grids: dict[str, GridParams], bits: int,
                 template: Path, out_dir: Path) -> ModelRef:
    """Write `model` as a GPTQ v1 checkpoint using the frozen grids (qzeros/scales/g_idx reused).

    Only the codes (qweight) are recomputed from each FakeQuantLinear; config.json (with its
    quantization_config) and tokenizer files are copied from `template`, the source checkpoint.
    Unquantized tensors are stored in SAVE_DTYPE, as the quantize stage does.
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
            codes = module.codes().t().to(torch.int64)  # [in, out]
            tensors[f"{name}.qweight"] = pack_int32(codes, bits, dim=0)
            tensors[f"{name}.qzeros"] = grid.qzeros.clone()
            tensors[f"{name}.scales"] = grid.scales.clone()
            tensors[f"{name}.g_idx"] = grid.g_idx.clone()
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.detach().to(SAVE_DTYPE).clone()
    state = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False)
    for key, value in state.items():
        owner = key.rpartition(".")[0]
        if owner in grids or (tied and key.endswith("lm_head.weight")):
            continue
        tensors[key] = value.detach().to(SAVE_DTYPE).contiguous().clone()
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for file in Path(template).iterdir():
        if file.is_file() and not file.name.endswith(".safetensors") and \
                not file.name.startswith(".") and file.name != "model.safetensors.index.json":
            shutil.copy2(file, tmp / file.name)
    (tmp / FINGERPRINT_FILE).write_text(fingerprint_folder(tmp))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return model_ref(out_dir)


def finalize_qat(handle: QatHandle, out_dir: Path) -> tuple[ModelRef, dict[str, Any]]:
    """Pack the trained student into `out_dir` (GPTQ v1, same grid); (ref, QAT metrics).

    The metrics say how many integer codes KD moved: with small learning rates STE training
    may move few or none, and the report should show that rather than hide it.
    """
    changed, total = 0, 0
    for name, before in handle.initial_codes.items():
        after = handle.model.get_submodule(name).codes().to(torch.uint8)
        changed += int((after != before).sum())
        total += before.numel()
    ref = pack_to_gptq(handle.model, handle.grids, handle.bits, handle.checkpoint, out_dir)
    metrics = {"quantization_aware": True, "qat_bits": handle.bits,
               "qat_modules": len(handle.grids), "qat_codes_changed": changed,
               "qat_codes_changed_fraction": changed / total if total else 0.0,
               "qat_grid": f"frozen scales/zeros from {handle.checkpoint}"}
    return ref, metrics
