"""Candidate shapes under a budget: every combination of depth, FFN, heads and hidden cuts that
meets the target within its tolerance, sizes counted from config.json alone (no weights).

A candidate is a concrete prune config (the same one a user would write by hand), so the
search's winner is an ordinary prune stage, and its size is what the recipe's quantize stage
will leave: quantized linears at `bits` plus one fp16 scale and a packed zero per group and an
int32 group index per input column (the GPTQ layout), embeddings and norms at 16 bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from tasks.core.dims import Dims, approx_params
from tasks.core.recipe import (
    BudgetTarget,
    DepthTarget,
    FfnTarget,
    HeadsTarget,
    HiddenTarget,
    PruneConfig,
    QuantizeConfig,
)

DENSE_BYTES = 4  # a dense stage folder stores fp32
EMBED_BYTES = 2  # 16-bit embeddings, norms and unquantized heads next to quantized linears


class SearchSpaceError(ValueError):
    """One line: which bound or target makes the search impossible, and what to change."""


@dataclass(frozen=True)
class Shape:
    dims: Dims
    vocab: int
    tied: bool

    def params(self) -> int:
        return approx_params(self.dims, self.vocab, self.tied)

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in_features, out_features) of every decoder linear (what GPTQ quantizes)."""
        d = self.dims
        q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
        per_layer = [(d.hidden, q), (d.hidden, kv), (d.hidden, kv), (q, d.hidden),
                     (d.hidden, d.ffn), (d.hidden, d.ffn), (d.ffn, d.hidden)]
        return per_layer * d.layers

    def bytes_after(self, quant: QuantizeConfig | None) -> int:
        """Bytes on disk after the recipe's last stage: quantized, or the dense fp32 folder."""
        if quant is None:
            return self.params() * DENSE_BYTES
        linear = 0
        linear_params = 0
        for n_in, n_out in self.linear_shapes():
            groups = math.ceil(n_in / quant.group_size)
            linear += n_in * n_out * quant.bits // 8  # packed weights
            linear += groups * n_out * (2 + quant.bits / 8)  # fp16 scales, packed zeros
            linear += n_in * 4  # g_idx
            linear_params += n_in * n_out
        return int(linear + (self.params() - linear_params) * EMBED_BYTES)


@dataclass(frozen=True)
class Candidate:
    prune: PruneConfig  # concrete axes, ready for the prune stage
    shape: Shape
    params: int
    bytes: int
    cuts: dict[str, Any]  # what is cut, in words for the table: layers, ffn, heads, hidden

    @property
    def label(self) -> str:
        parts = [f"{k} {v}" for k, v in self.cuts.items() if v]
        return ", ".join(parts) or "uncut"


def base_shape(config: dict[str, Any]) -> Shape:
    dims = Dims.from_config(config)
    return Shape(dims, int(config.get("vocab_size") or 0),
                 bool(config.get("tie_word_embeddings", False)))


def _widths(total: int, round_to: int, max_cut: float) -> list[int]:
    """Kept widths, multiples of `round_to`, from the deepest allowed cut up to uncut."""
    lowest = math.ceil(total * (1 - max_cut) / round_to) * round_to
    kept = list(range(max(round_to, lowest), total, round_to))
    return kept + [total]


def _head_options(dims: Dims, max_cut: float) -> list[tuple[str | None, int]]:
    """(mode, kept) pairs: whole KV groups when there are several, else query heads per group."""
    options: list[tuple[str | None, int]] = [(None, 0)]
    if dims.kv_heads > 1:
        low = max(1, math.ceil(dims.kv_heads * (1 - max_cut)))
        options += [("kv_groups", g) for g in range(low, dims.kv_heads)]
    if dims.q_per_group > 1:
        low = max(1, math.ceil(dims.q_per_group * (1 - max_cut)))
        options += [("query", q) for q in range(low, dims.q_per_group)]
    return options


def target_value(target: BudgetTarget, base: Shape, quant: QuantizeConfig | None
                 ) -> tuple[str, float]:
    """("params" | "bytes", the absolute target)."""
    if target.params is not None:
        value = target.params * base.params() if target.params <= 1 else target.params
        return "params", value
    return "bytes", float(target.bytes)  # type: ignore[arg-type]


def enumerate_candidates(config: dict[str, Any], prune: PruneConfig,
                         quant: QuantizeConfig | None) -> list[Candidate]:
    """Every shape within the bounds that meets the target within tolerance, closest first.

    Raises SearchSpaceError (one line) for a target above the baseline, or when no shape fits:
    naming the bound that stops it (the deepest cut allowed still too big) or the tolerance
    (shapes exist on both sides but the required multiples skip over the target).
    """
    target = prune.target
    assert target is not None
    base = base_shape(config)
    what, goal = target_value(target, base, quant)
    measure = (lambda s: s.params()) if what == "params" else (lambda s: s.bytes_after(quant))
    full = measure(base)
    if goal >= full:
        raise SearchSpaceError(
            f"prune.target.{what}: {goal:,.0f} is not below the baseline's {full:,.0f}; "
            "nothing to cut (give a smaller target)")
    d, allowed, step = base.dims, set(target.axes), prune.round_to
    depths = range(0, math.floor(d.layers * target.max_depth_cut) + 1) if "depth" in allowed \
        else range(1)
    ffns = _widths(d.ffn, step, target.max_width_cut) if "ffn" in allowed else [d.ffn]
    hiddens = _widths(d.hidden, step, target.max_width_cut) if "hidden" in allowed \
        else [d.hidden]
    heads = _head_options(d, target.max_width_cut) if "heads" in allowed else [(None, 0)]
    found: list[Candidate] = []
    smallest = math.inf
    for removed in depths:
        for mode, kept in heads:
            for ffn in ffns:
                for hidden in hiddens:
                    dims = replace(d, layers=d.layers - removed, ffn=ffn, hidden=hidden)
                    if mode == "kv_groups":
                        dims = replace(dims, kv_heads=kept, heads=kept * d.q_per_group)
                    elif mode == "query":
                        dims = replace(dims, heads=kept * d.kv_heads)
                    if dims.hidden % dims.heads:
                        continue  # transformers refuses a config whose hidden size does not
                        # split into its attention heads, explicit head_dim or not
                    shape = replace(base, dims=dims)
                    size = measure(shape)
                    smallest = min(smallest, size)
                    if (removed, mode, ffn, hidden) != (0, None, d.ffn, d.hidden) and \
                            abs(size / goal - 1) <= target.tolerance:
                        found.append(_candidate(prune, d, shape, removed, mode, kept, quant))
    if not found:
        if smallest > goal * (1 + target.tolerance):
            raise SearchSpaceError(
                f"prune.target.{what}: {goal:,.0f} is out of reach: the deepest cuts allowed "
                f"(max_depth_cut {target.max_depth_cut}, max_width_cut "
                f"{target.max_width_cut}, axes {', '.join(target.axes)}) still leave "
                f"{smallest:,.0f}; raise a bound, allow more axes, or ask for less")
        raise SearchSpaceError(
            f"prune.target.tolerance: {target.tolerance} is too tight: no shape whose sizes "
            f"are multiples of round_to {step} lands within it of {goal:,.0f}; raise tolerance "
            "or lower round_to")
    found.sort(key=lambda c: (abs(measure(c.shape) / goal - 1), c.label))
    return found


def _candidate(prune: PruneConfig, full: Dims, shape: Shape, removed: int, mode: str | None,
               kept: int, quant: QuantizeConfig | None) -> Candidate:
    """The concrete prune config of one shape (sizes, not ratios: exactly these widths)."""
    search, d = prune.search, shape.dims
    axes: dict[str, Any] = {}
    cuts: dict[str, Any] = {"layers": f"-{removed}" if removed else ""}
    if removed:
        axes["depth"] = DepthTarget(remove=removed, criterion=search.depth_criterion)
    if mode is not None:
        axes["heads"] = HeadsTarget(mode=mode, size=kept, criterion=search.criterion)
        cuts["heads"] = f"{'KV groups' if mode == 'kv_groups' else 'q/group'} {kept}"
    if d.ffn != full.ffn:
        axes["ffn"] = FfnTarget(size=d.ffn, criterion=search.criterion)
        cuts["ffn"] = str(d.ffn)
    if d.hidden != full.hidden:
        axes["hidden"] = HiddenTarget(size=d.hidden, criterion=search.criterion)
        cuts["hidden"] = str(d.hidden)
    config = PruneConfig(round_to=prune.round_to, calibration=prune.calibration,
                         taylor_samples=prune.taylor_samples, skip_samples=prune.skip_samples,
                         **axes)
    return Candidate(config, shape, shape.params(), shape.bytes_after(quant), cuts)


def spread(candidates: list[Candidate], limit: int) -> list[Candidate]:
    """At most `limit` candidates, taken round-robin over the combinations of axes they cut, so
    the proxy sees depth-only, width-only and mixed shapes, not twenty near-identical ones."""
    groups: dict[tuple[str, ...], list[Candidate]] = {}
    for cand in candidates:
        groups.setdefault(tuple(k for k, v in cand.cuts.items() if v), []).append(cand)
    picked: list[Candidate] = []
    queues = list(groups.values())
    while len(picked) < limit and any(queues):
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    return picked
