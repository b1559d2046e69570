"""Importance of prunable units, measured on the unpruned model (one-shot, as Minitron does).

Criteria (higher score = more important = kept):
- activation (Minitron): |activation| per unit, mean over the sequence, L2 over calibration
  sequences. FFN neuron: the down_proj input; query head: the L2 norm of its attention output
  (o_proj input); hidden channel: the outputs of every hidden-size norm, summed.
- magnitude / magnitude_l2: L1 / L2 norm of all the weights a unit owns (`tasks.prune.units`).
- taylor (LLM-Pruner, element-wise first order): sum over a unit's weights of |w * dL/dw|, with
  dL/dw accumulated over calibration blocks of the language-modelling loss.
- random: the control.
Layers: block influence (ShortGPT: mean over tokens of 1 - cos(layer input, layer output)), the
perplexity rise when the layer is skipped, or random.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from tasks.core.common import Progress
from tasks.prune.units import Anatomy, Coupling


class _SeqMeanBatchL2:
    """Minitron's aggregation: mean |x| over the sequence, then L2 norm over sequences."""

    def __init__(self, size: int) -> None:
        self.sum_sq = torch.zeros(size, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:  # x: (batch, seq, units), already non-negative
        per_seq = x.detach().to(torch.float64).mean(dim=1)
        self.sum_sq += per_seq.pow(2).sum(dim=0)

    def result(self) -> torch.Tensor:
        return self.sum_sq.sqrt()


@dataclass
class ActivationScores:
    """Per-layer unit scores from one calibration pass (lists are indexed by layer)."""

    ffn: list[torch.Tensor] = field(default_factory=list)
    query_heads: list[torch.Tensor] = field(default_factory=list)
    hidden: torch.Tensor | None = None
    block_influence: torch.Tensor | None = None

    def kv_groups(self, q_per_group: int) -> list[torch.Tensor]:
        """A KV group's score: the sum of its query heads' scores."""
        return [s.view(-1, q_per_group).sum(dim=1) for s in self.query_heads]


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _output_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def activation_scores(anatomy: Anatomy, blocks: torch.Tensor, batch_size: int = 4,
                      stage: str = "prune") -> ActivationScores:
    """One forward pass over `blocks` with hooks collecting every activation statistic at once."""
    n, hd = len(anatomy.layers), anatomy.head_dim
    ffn = [_SeqMeanBatchL2(anatomy.ffn) for _ in range(n)]
    heads = [_SeqMeanBatchL2(anatomy.n_heads) for _ in range(n)]
    hidden = _SeqMeanBatchL2(anatomy.hidden)
    influence = torch.zeros(n, dtype=torch.float64)
    tokens = [0]
    handles = []

    def on_down(i: int):
        return lambda _m, args: ffn[i].add(args[0].abs())

    def on_o(i: int):
        def hook(_m, args):
            x = args[0]
            heads[i].add(x.view(*x.shape[:-1], -1, hd).norm(dim=-1))
        return hook

    def on_norm(_m, _args, output):
        hidden.add(_output_tensor(output).abs())

    def on_layer(i: int):
        def hook(_m, args, kwargs, output):
            x, y = _hidden_states(args, kwargs), _output_tensor(output)
            cos = nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
            influence[i] += (1 - cos).sum()
        return hook

    for i, layer in enumerate(anatomy.layers):
        handles.append(anatomy.mlp(i).down_proj.register_forward_pre_hook(on_down(i)))
        handles.append(anatomy.attn(i).o_proj.register_forward_pre_hook(on_o(i)))
        handles.append(layer.register_forward_hook(on_layer(i), with_kwargs=True))
        handles += [norm.register_forward_hook(on_norm) for norm in anatomy.layer_norms(layer)]
    handles.append(anatomy.final_norm.register_forward_hook(on_norm))
    progress = Progress(stage, total=len(blocks), unit="calibration block")
    try:
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start:start + batch_size]
            anatomy.model(input_ids=batch, use_cache=False)
            tokens[0] += batch.numel()
            progress.update(start + len(batch), tokens=batch.numel())
    finally:
        for handle in handles:
            handle.remove()
    return ActivationScores(
        ffn=[a.result() for a in ffn], query_heads=[a.result() for a in heads],
        hidden=hidden.result(), block_influence=influence / max(tokens[0], 1))


# ------------------------------------------------------------------------ weight-based criteria


def coupled_scores(couplings: list[Coupling],
                   elementwise: Callable[[Coupling], torch.Tensor]) -> torch.Tensor:
    """Sum `elementwise(coupling)` over every element a unit owns, across all coupled tensors."""
    total: torch.Tensor | None = None
    seen: set[tuple[int, str]] = set()
    for coupling in couplings:
        key = (id(coupling.module), coupling.attr)
        if key in seen:
            continue
        seen.add(key)
        values = elementwise(coupling).detach().to(torch.float64)
        other = [d for d in range(values.ndim) if d != coupling.dim]
        per_channel = values.sum(dim=other) if other else values
        per_unit = per_channel.view(-1, coupling.width).sum(dim=1)
        total = per_unit if total is None else total + per_unit
    if total is None:
        raise ValueError("no weights coupled to these units")
    return total


def _l1(c: Coupling) -> torch.Tensor:
    return c.tensor.abs()


def _sq(c: Coupling) -> torch.Tensor:
    return c.tensor.pow(2)


def _taylor(c: Coupling) -> torch.Tensor:
    grad = c.tensor.grad
    if grad is None:
        raise ValueError(f"{type(c.module).__name__}.{c.attr}: no gradient for the taylor score")
    return (c.tensor * grad).abs()


WEIGHT_CRITERIA: dict[str, tuple[Callable[[Coupling], torch.Tensor], bool]] = {
    # name: (elementwise value, take the square root of the sum)
    "magnitude": (_l1, False),
    "magnitude_l2": (_sq, True),
    "taylor": (_taylor, False),
}


def weight_scores(couplings: list[Coupling], criterion: str) -> torch.Tensor:
    """magnitude (L1), magnitude_l2 or taylor scores of the units these couplings describe."""
    elementwise, root = WEIGHT_CRITERIA[criterion]
    scores = coupled_scores(couplings, elementwise)
    return scores.sqrt() if root else scores


def accumulate_gradients(anatomy: Anatomy, blocks: torch.Tensor, batch_size: int = 1,
                         stage: str = "prune") -> None:
    """Fill `.grad` of every weight with dL/dw of the mean LM loss over `blocks` (for taylor)."""
    model = anatomy.model
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    progress = Progress(stage, total=len(blocks), unit="taylor block")
    steps = math.ceil(len(blocks) / batch_size)
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start:start + batch_size]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        (loss / steps).backward()
        progress.update(start + len(batch), tokens=batch.numel())


def release_gradients(anatomy: Anatomy) -> None:
    for p in anatomy.model.parameters():
        p.grad = None
        p.requires_grad_(False)


def axis_generator(seed: int, axis: str) -> torch.Generator:
    """A random stream per axis, so adding an axis never changes another axis's random picks."""
    return torch.Generator().manual_seed(seed * 1000 + zlib.crc32(axis.encode()) % 1000)


def random_scores(size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(size, generator=generator, dtype=torch.float64)


# ------------------------------------------------------------------------ depth criteria


class _Skip(nn.Module):
    """Stands in for a decoder layer: passes the residual stream through unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@torch.no_grad()
def mean_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token loss over `blocks` (equal-length blocks, so token-weighted)."""
    total = 0.0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start:start + batch_size]
        total += float(model(input_ids=batch, labels=batch, use_cache=False).loss) * len(batch)
    return total / len(blocks)


@torch.no_grad()
def skip_layer_ppl_increase(anatomy: Anatomy, blocks: torch.Tensor, batch_size: int = 4,
                            stage: str = "prune") -> torch.Tensor:
    """Calibration perplexity with each layer skipped, minus the full model's perplexity."""
    base = math.exp(mean_loss(anatomy.model, blocks, batch_size))
    layers = anatomy.layers
    scores = torch.zeros(len(layers), dtype=torch.float64)
    progress = Progress(stage, total=len(layers), unit="layer skipped")
    for i in range(len(layers)):
        original = layers[i]
        layers[i] = _Skip()
        try:
            scores[i] = math.exp(mean_loss(anatomy.model, blocks, batch_size)) - base
        finally:
            layers[i] = original
        progress.update(i + 1, tokens=blocks.numel())
    return scores
