"""Exact GPTQ -> GGUF block mapping: keep the quantizer's work when llama.cpp's grid can hold it.

GGUF's Q4_0 block is 32 consecutive weights of one row with one fp16 scale `d` and codes
q in 0..15: w = d * (q - 8). A GPTQ checkpoint with bits 4, sym, group_size 32 and no act-order
stores exactly that: fp16 `scales`, zero point 8 (qzeros holds 7), codes 0..15, groups of 32
consecutive input columns (g_idx = column // 32). Q8_0 likewise: int8 codes c, w = d * c, which
is GPTQ bits 8, sym (zero 128), group 32 with c = q - 128. Such checkpoints are written code for
code and scale for scale, so llama.cpp dequantizes to the very values pkdq's own loader computes;
re-quantizing the dequantized floats instead (what gguf-py's quantizer does) would pick new
scales and codes and lose the GPTQ solution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy only inside functions: `pkdq validate` imports this module's rules
    import numpy as np

BLOCK = 32
# qtype -> (GPTQ bits, the symmetric zero point that maps onto the GGUF grid)
EXACT_GRIDS = {"q4_0": (4, 8), "q8_0": (8, 128)}


@dataclass(frozen=True)
class ExactWeight:
    """One quantized linear as GGUF needs it: integer codes [out, in] and fp16 scales
    [out, in // 32] (one per 32-wide block of a row)."""

    codes: np.ndarray
    scales: np.ndarray


def exact_grid_problem(quant: dict, qtype: str) -> str | None:
    """None when a checkpoint with this quantization_config can be written exactly as `qtype`,
    else why not (one clause). Per-module zero points are checked again on the tensors."""
    if qtype not in EXACT_GRIDS:
        return f"{qtype} has no GPTQ-equivalent grid"
    bits, _ = EXACT_GRIDS[qtype]
    if quant.get("quant_method") != "gptq":
        return "the source is not a GPTQ-format checkpoint"
    wanted = {"bits": bits, "group_size": BLOCK, "sym": True, "desc_act": False}
    wrong = [f"{k} {quant.get(k)!r} (needs {v!r})" for k, v in wanted.items()
             if quant.get(k, False if k == "desc_act" else None) != v]
    return "GPTQ " + ", ".join(wrong) if wrong else None


def exact_weights(path: Path, qtype: str) -> tuple[dict[str, ExactWeight] | None, str | None]:
    """({HF weight key: ExactWeight}, None) for a checkpoint `qtype` holds exactly, else
    (None, why not): wrong settings, a non-monotone g_idx, or a zero point other than the grid's.
    """
    import numpy as np

    from tasks.core.gptq_checkpoint import quantization_config, read_parts, unpack_int32

    quant = quantization_config(path)
    problem = exact_grid_problem(quant, qtype)
    if problem:
        return None, problem
    bits, zero = EXACT_GRIDS[qtype]
    out: dict[str, ExactWeight] = {}
    for name, parts in read_parts(path)[1].items():
        q = unpack_int32(parts["qweight"], bits, dim=0).t().numpy()  # [out, in]
        cols = q.shape[1]
        if cols % BLOCK or not np.array_equal(parts["g_idx"].numpy(), np.arange(cols) // BLOCK):
            return None, f"{name} groups are not consecutive 32-column blocks (g_idx)"
        zeros = unpack_int32(parts["qzeros"], bits, dim=1) + 1
        if not bool((zeros == zero).all()):
            return None, f"{name} has zero points other than {zero} (not symmetric)"
        scales = parts["scales"].numpy()
        if scales.dtype != np.float16:
            return None, f"{name} scales are {scales.dtype}, not fp16"
        out[f"{name}.weight"] = ExactWeight(codes=q.astype(np.int16),
                                            scales=np.ascontiguousarray(scales.T))
    return out, None


def permute_rows(weight: ExactWeight, permute) -> ExactWeight:
    """Apply a row permutation (llama.cpp's q/k rope interleave) to codes and scales alike:
    blocks run along rows, so moving whole rows keeps every block intact."""
    return ExactWeight(codes=permute(weight.codes), scales=permute(weight.scales))


def encode_exact(weight: ExactWeight, qtype: str) -> np.ndarray:
    """Raw GGUF bytes [rows, blocks * block_bytes] for `qtype`, built from the codes and scales
    (no rounding anywhere)."""
    import numpy as np

    rows, cols = weight.codes.shape
    blocks = cols // BLOCK
    d = weight.scales.astype(np.float16).reshape(rows, blocks, 1).view(np.uint8)  # 2 bytes
    codes = weight.codes.reshape(rows, blocks, BLOCK)
    if qtype == "q4_0":
        low, high = codes[..., :BLOCK // 2], codes[..., BLOCK // 2:]
        qs = (low | (high << 4)).astype(np.uint8)
    elif qtype == "q8_0":
        qs = (codes - EXACT_GRIDS["q8_0"][1]).astype(np.int8).view(np.uint8)
    else:
        raise ValueError(f"no exact encoding for {qtype}")
    return np.concatenate([d, qs], axis=-1).reshape(rows, -1)
