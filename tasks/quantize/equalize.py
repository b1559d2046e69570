"""Equivalent scaling before quantization: AWQ's scale search, folded into the float model.

Why: 4-bit rounding loses most on the input channels that carry the largest activations, and a
per-input-channel scale `s` moves magnitude between an activation and the weights that read it
without changing what the model computes: `x W^T = (x / s)(W diag(s))^T`. The `1 / s` folds into
what produced `x` (the RMSNorm before q/k/v and before gate/up; up_proj's rows before down_proj,
since down_proj reads `act(gate) * up`), so the result is a plain float model: GPTQ, RTN, the
GGUF export (Q4_0 code for code), the Q8_0 layer choice and every loader see ordinary weights
and need nothing new. Only what the quantizer rounds changes.

`s = mean|x| ** alpha` per group of linears that read the same input, alpha searched on a grid
(as AWQ, Lin et al. 2024) to minimise the output error of the recipe's own rounding grid on the
calibration blocks: `sum_k tr(dW_k H dW_k^T)` with `H = X^T X`, so the search costs
out x in^2 per alpha whatever the number of tokens. alpha = 0 (no scaling) is on the grid, so a
group is never made worse on the calibration text than it was.

Measured on SmolLM2-135M before it became a recipe option (held-out KL to the float model,
training-side Wikipedia): Q4_0 round-to-nearest 0.286 -> 0.130; GPTQ W4 g32 on C4 calibration
0.215 -> 0.169 (README "Quantize options" has the table; in the default run the shipped file's
held-out KL to its float input fell 0.182 -> 0.134).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tasks.core.conventions import SUPPORTED_FAMILIES, model_type
from tasks.quantize.q4_0_grid import round_q4_0

ALPHAS = 11  # 0, 0.1, ..., 1: half of AWQ's 20 points, for half the search time (~50 s on SmolLM2)
# The norm before the MLP: Gemma 3 normalises the attention output after o_proj as well, so its
# `post_attention_layernorm` is not what gate/up read.
MLP_NORM = {"gemma3_text": "pre_feedforward_layernorm"}
# Gemma's RMSNorm multiplies by (1 + weight), the others by weight.
NORM_OFFSET = {"gemma3_text": 1.0}


class EqualizeError(ValueError):
    """A model equivalent scaling cannot be folded into (one line)."""


@dataclass
class ScaleGroup:
    """Linears reading one input, and what produced that input (a norm, or up_proj's rows)."""

    name: str
    linears: list[torch.nn.Linear]
    norm: torch.nn.Module | None = None
    producer: torch.nn.Linear | None = None
    norm_offset: float = 0.0

    def fold(self, scale: torch.Tensor) -> None:
        """Divide the producer by `scale`, multiply the readers' input columns by it."""
        with torch.no_grad():
            if self.norm is not None:
                weight = self.norm.weight
                weight.copy_(((weight.float() + self.norm_offset) / scale
                              - self.norm_offset).to(weight.dtype))
            else:
                assert self.producer is not None
                self.producer.weight.div_(scale[:, None].to(self.producer.weight.dtype))
                if self.producer.bias is not None:
                    self.producer.bias.div_(scale.to(self.producer.bias.dtype))
            for linear in self.linears:
                linear.weight.mul_(scale.to(linear.weight.dtype))


def scale_groups(model: Any) -> list[list[ScaleGroup]]:
    """Per decoder layer: q/k/v after the input norm, gate/up after the MLP norm, down after up."""
    kind = model_type(model.config)
    if kind not in SUPPORTED_FAMILIES:
        raise EqualizeError(f"quantize.equalize: {kind or 'this architecture'} is not supported "
                            f"(supported: {', '.join(SUPPORTED_FAMILIES.values())})")
    offset = NORM_OFFSET.get(kind, 0.0)
    out = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        out.append([
            ScaleGroup("qkv", [attn.q_proj, attn.k_proj, attn.v_proj],
                       norm=layer.input_layernorm, norm_offset=offset),
            ScaleGroup("gate_up", [mlp.gate_proj, mlp.up_proj],
                       norm=getattr(layer, MLP_NORM.get(kind, "post_attention_layernorm")),
                       norm_offset=offset),
            ScaleGroup("down", [mlp.down_proj], producer=mlp.up_proj),
        ])
    return out


def round_to_grid(weight: torch.Tensor, bits: int, group_size: int, sym: bool,
                  rule: str = "min-max") -> torch.Tensor:
    """`weight` rounded per group of input columns to the recipe's own grid (GPTQ's min-max
    grid of `bits`, or Q4_0's signed-max rule), so the search optimises what the quantizer
    will round to."""
    rows, cols = weight.shape
    size = group_size if 0 < group_size <= cols and cols % group_size == 0 else cols
    blocks = weight.float().reshape(-1, size)
    if rule == "q4_0":
        return round_q4_0(blocks).reshape(rows, cols)
    top = 2 ** bits - 1
    if sym:
        peak = blocks.abs().amax(-1, keepdim=True).clamp(min=1e-12)
        step, zero = 2 * peak / top, torch.full_like(peak, (top + 1) / 2)
    else:
        low = blocks.amin(-1, keepdim=True).clamp(max=0)
        high = blocks.amax(-1, keepdim=True).clamp(min=0)
        step = ((high - low) / top).clamp(min=1e-12)
        zero = torch.round(-low / step)
    codes = torch.clamp(torch.round(blocks / step) + zero, 0, top)
    return ((codes - zero) * step).reshape(rows, cols)


@dataclass
class InputStats:
    """What one group's input looked like on the calibration blocks."""

    gram: torch.Tensor  # X^T X, float64
    abs_sum: torch.Tensor  # sum over tokens of |x|
    tokens: int = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        self.gram += flat.T @ flat
        self.abs_sum += flat.abs().sum(0)
        self.tokens += flat.shape[0]


def _collect(model: Any, groups: list[list[ScaleGroup]], blocks: torch.Tensor,
             batch: int) -> list[list[InputStats]]:
    stats = [[InputStats(torch.zeros(g.linears[0].in_features, g.linears[0].in_features,
                                     dtype=torch.float64),
                         torch.zeros(g.linears[0].in_features, dtype=torch.float64))
              for g in layer] for layer in groups]
    hooks = []
    for layer_groups, layer_stats in zip(groups, stats, strict=True):
        for group, stat in zip(layer_groups, layer_stats, strict=True):
            hooks.append(group.linears[0].register_forward_pre_hook(
                lambda _m, args, stat=stat: stat.add(args[0])))
    try:
        with torch.no_grad():
            for start in range(0, len(blocks), batch):
                model(input_ids=blocks[start:start + batch], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def _output_error(weights: list[torch.Tensor], scale: torch.Tensor, gram: torch.Tensor,
                  grid: dict[str, Any]) -> float:
    total = 0.0
    for weight in weights:
        delta = weight - round_to_grid(weight * scale, **grid) / scale
        total += float(((delta @ gram) * delta).sum())
    return total


def search_scale(group: ScaleGroup, stat: InputStats, grid: dict[str, Any]
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """The best `mean|x| ** alpha` scale for one group, and what it bought."""
    gram = (stat.gram / max(stat.tokens, 1)).float()
    mean_abs = (stat.abs_sum / max(stat.tokens, 1)).float().clamp(min=1e-6)
    weights = [linear.weight.detach().float() for linear in group.linears]
    best: tuple[float, float, torch.Tensor] | None = None
    base = 0.0
    for step in range(ALPHAS):
        alpha = step / (ALPHAS - 1)
        scale = mean_abs.pow(alpha)
        scale = scale / (scale.max() * scale.min()).sqrt()
        error = _output_error(weights, scale, gram, grid)
        if step == 0:
            base = error
        if best is None or error < best[1]:
            best = (alpha, error, scale)
    assert best is not None
    return best[2], {"alpha": round(best[0], 2),
                     "error_ratio": round(best[1] / base, 4) if base > 0 else 1.0}


def equalize(model: Any, blocks: torch.Tensor, bits: int, group_size: int, sym: bool,
             batch: int = 2, rule: str = "min-max") -> dict[str, Any]:
    """Fold searched scales into `model` in place; returns the stage's record of them.

    Statistics come from one forward of the float model: the scales are exact, so every later
    layer's input is what it was, and layer-by-layer recomputation would change nothing.
    """
    started = time.perf_counter()
    groups = scale_groups(model)
    stats = _collect(model, groups, blocks, batch)
    grid = {"bits": bits, "group_size": group_size, "sym": sym, "rule": rule}
    per_layer = []
    for index, (layer_groups, layer_stats) in enumerate(zip(groups, stats, strict=True)):
        row: dict[str, Any] = {"layer": index}
        for group, stat in zip(layer_groups, layer_stats, strict=True):
            scale, found = search_scale(group, stat, grid)
            group.fold(scale)
            row[group.name] = found
        per_layer.append(row)
        print(f"[quantize] equalize: layer {index + 1}/{len(groups)} "
              f"({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
    ratios = [row[name]["error_ratio"] for row in per_layer for name in ("qkv", "gate_up", "down")]
    return {"method": "AWQ-style scale search folded into the float model",
            "grid": grid, "alphas": ALPHAS, "tokens": int(blocks.numel()),
            "mean_error_ratio": round(sum(ratios) / len(ratios), 4),
            "layers": per_layer, "wall_s": round(time.perf_counter() - started, 2)}


def equalized_copy(src: Any, blocks: torch.Tensor, bits: int, group_size: int, sym: bool,
                   out_dir: Any, rule: str = "min-max") -> tuple[Any, dict[str, Any]]:
    """`src` with the scales folded in, saved as a float folder at `out_dir` for the method to
    quantize (and the GGUF export to take its Q8_0 layers from); (folder, record)."""
    from tasks.core.model_store import load_model, save_model

    model, tokenizer = load_model(Path(src))
    record = equalize(model, blocks, bits, group_size, sym, rule=rule)
    ref = save_model(model, tokenizer, Path(out_dir))
    return Path(ref.path), record
