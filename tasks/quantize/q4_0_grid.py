"""llama.cpp's Q4_0 rounding rule for GPTQ's per-group scales (`quantize.grid: q4_0`).

Why: GPTQModel's symmetric 4-bit grid is `step = 2 max|w| / 15` around zero point 8, so its 16
levels run from -8 to +7 steps: a group whose largest-magnitude weight is positive has it clipped
to 14/15 of its value. Q4_0 instead takes the signed weight of largest magnitude `m` and sets
`d = m / -8`: `m` lands exactly on code 0 and the step is `max|w| / 8`, finer than 2/15; only
weights of the other sign beyond 7.5 steps are clipped (to 7). After equivalent scaling,
plain Q4_0 round-to-nearest beat GPTQ on GPTQModel's grid on SmolLM2 (held-out KL to float
0.130 vs 0.170: README "Quantize options"), so GPTQ was rounding to the worse grid. With this
rule GPTQ chooses its codes on the grid the GGUF file stores, and the export stays exact: the
scale is still one fp16 per 32 weights, zero point 8, codes 0..15, only its sign may be
negative, which `w = d * (q - 8)` (GPTQ, compressed-tensors and GGUF alike) reads as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

ZERO = 8  # Q4_0's zero point: w = d * (q - 8), q in 0..15
TOP = 15


def signed_max_scale(blocks: torch.Tensor) -> torch.Tensor:
    """Per row of `blocks` [rows, size]: Q4_0's `d = m / -8`, m the signed value of largest
    magnitude; an all-zero row gets 1 (any scale codes it as 8, i.e. zero)."""
    pick = blocks.abs().argmax(dim=1, keepdim=True)
    scale = blocks.gather(1, pick) / -ZERO
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def round_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """`blocks` [rows, size] rounded to nearest on Q4_0's grid (row-wise scales)."""
    scale = signed_max_scale(blocks)
    codes = torch.clamp(torch.round(blocks / scale) + ZERO, 0, TOP)
    return (codes - ZERO) * scale


@contextmanager
def gptqmodel_q4_0_grid() -> Iterator[None]:
    """While open, GPTQModel's weight quantizer picks Q4_0's scales for 4-bit symmetric groups.

    GPTQ (and RTN) call `Quantizer.find_params(W[:, group], weight=True)` at each group start and
    then round every column with `clamp(round(w / scale) + zero, 0, maxq)`; replacing the scale
    there is all it takes: the error feedback, the packing (`round(w / scale + zero)`) and every
    loader work unchanged with a negative scale. Other bit widths and asymmetric configs keep
    GPTQModel's own rule.
    """
    from gptqmodel.quantization.quantizer import Quantizer

    original = Quantizer.find_params

    def find_params(self, x, weight=False):
        original(self, x, weight)
        if not (weight and getattr(self, "perchannel", False) and self.qcfg.sym
                and int(self.maxq.item()) == TOP):
            return
        scale = signed_max_scale(x.flatten(1).float()).to(self.scale.dtype)
        self.scale = scale.reshape(self.scale.shape)
        self.zero = torch.full_like(self.scale, ZERO)

    Quantizer.find_params = find_params
    try:
        yield
    finally:
        Quantizer.find_params = original
