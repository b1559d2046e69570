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

import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tasks.core.common import ModelRef
from tasks.core.gptq_checkpoint import (
    GridParams,
    QuantizeError,
    gptq_config,
    load_dequantized,
    read_parts,
    scale_zero,
    write_gptq,
)

_HANDLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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


def prepare_qat(student_model: nn.Module, quant_checkpoint_path: Path) -> QatHandle:
    """Swap each quantized linear of `student_model` for a FakeQuantLinear on the stored grid.

    `student_model` is a float model of the checkpoint's architecture (see `load_qat_student`);
    its linear weights are the starting shadow weights (normally the dequantized checkpoint).
    """
    path = Path(quant_checkpoint_path)
    bits = int(gptq_config(path, "quantization-aware KD")["bits"])
    _, quant = read_parts(path)
    handle = QatHandle(model=student_model, checkpoint=path, bits=bits)
    for name, parts in quant.items():
        linear = student_model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise QuantizeError(f"{name} is quantized in {path} but not a linear in the student")
        scale, zero = scale_zero(parts, bits)
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


def load_qat_student(path: Path):
    """(float student ready for QAT, tokenizer) from a GPTQ folder: dequantized weights + STE."""
    model, tokenizer = load_dequantized(path)
    prepare_qat(model, Path(path))
    return model.eval(), tokenizer


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
    codes = {name: handle.model.get_submodule(name).codes() for name in handle.grids}
    ref = write_gptq(handle.model, codes, handle.grids, handle.bits, handle.checkpoint, out_dir)
    metrics = {"quantization_aware": True, "qat_bits": handle.bits,
               "qat_modules": len(handle.grids), "qat_codes_changed": changed,
               "qat_codes_changed_fraction": changed / total if total else 0.0,
               "qat_grid": f"frozen scales/zeros from {handle.checkpoint}"}
    return ref, metrics
