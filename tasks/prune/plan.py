"""Kept sizes of a prune config on a given model, checked before any weight is touched.

Sizes are uniform across layers (an HF config holds one intermediate_size, one head count), FFN and
hidden widths are rounded to `round_to` (quantization kernels need whole groups), and head counts
must be whole KV groups: HF maps query head h to KV head h // (heads / kv_heads), so every group
keeps the same number of query heads. A target that cannot be met says so in one line, naming the
valid sizes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from tasks.core.dims import Dims
from tasks.core.recipe import DepthTarget, FfnTarget, HeadsTarget, PruneConfig

WHOLE_TOLERANCE = 0.05  # a ratio may miss a whole head/group count by this much (e.g. 0.33 of 3)


@dataclass(frozen=True)
class PrunePlan:
    """What the stage will keep. `None` means the axis is not pruned."""

    before: Dims
    after: Dims
    layers_removed: int = 0
    heads_mode: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"before": self.before.to_json(), "after": self.after.to_json(),
                "layers_removed": self.layers_removed, "heads_mode": self.heads_mode}


def kept_width(total: int, target: FfnTarget, round_to: int, key: str = "prune.ffn") -> int:
    """Channels kept: the target rounded to the nearest multiple of `round_to`, at least one
    multiple and at most the largest multiple that fits."""
    wanted = target.size if target.size is not None else total * (1.0 - target.ratio)
    if wanted > total:
        raise ValueError(f"{key}.size {target.size} exceeds the model's size {total}")
    kept = int(round(wanted / round_to)) * round_to
    return max(round_to, min(kept, total - total % round_to if total >= round_to else total))


def _whole(count: float, what: str, key: str, valid: list[int], total: int) -> int:
    if abs(count - round(count)) > WHOLE_TOLERANCE or round(count) not in valid:
        options = ", ".join(f"{v} (ratio {1 - v / total:.3g})" for v in valid)
        raise ValueError(f"{key} leaves {count:.3g} {what}; valid sizes: {options or 'none'}")
    return int(round(count))


def kept_heads(dims: Dims, target: HeadsTarget, key: str = "prune.heads") -> tuple[int, int]:
    """(query heads, KV heads) kept. kv_groups: size = groups kept; query: size = query heads
    kept per group (the same in every group)."""
    g, q = dims.kv_heads, dims.q_per_group
    if target.mode == "kv_groups":
        if g == 1:
            raise ValueError(f"{key}.mode kv_groups: the model has a single KV group (MQA, "
                             f"{dims.heads} query heads share it); use mode: query")
        valid = list(range(1, g))
        if target.size is not None:
            kept = _whole(target.size, f"of {g} KV groups", f"{key}.size {target.size}", valid, g)
        else:
            kept = _whole(g * (1 - target.ratio), f"of {g} KV groups",
                          f"{key}.ratio {target.ratio}", valid, g)
        return kept * q, kept
    if q == 1:
        raise ValueError(f"{key}.mode query: every KV group has one query head ({dims.heads} "
                         "heads, no GQA sharing); use mode: kv_groups")
    valid = list(range(1, q))
    what = f"query heads per KV group (of {q}; {g} groups)"
    if target.size is not None:
        kept = _whole(target.size, what, f"{key}.size {target.size}", valid, q)
    else:
        kept = _whole(q * (1 - target.ratio), what, f"{key}.ratio {target.ratio}", valid, q)
    return kept * g, g


def layers_removed(dims: Dims, target: DepthTarget, key: str = "prune.depth") -> int:
    removed = target.remove if target.remove is not None else round(dims.layers * target.ratio)
    if not 1 <= removed < dims.layers:
        raise ValueError(f"{key} removes {removed} of {dims.layers} layers; valid: remove 1.."
                         f"{dims.layers - 1}")
    return removed


def plan_prune(dims: Dims, cfg: PruneConfig) -> PrunePlan:
    """Every kept size, or a one-line ValueError naming the recipe key and the valid sizes."""
    after = dict(asdict(dims))
    removed = layers_removed(dims, cfg.depth) if cfg.depth else 0
    after["layers"] = dims.layers - removed
    if cfg.heads:
        after["heads"], after["kv_heads"] = kept_heads(dims, cfg.heads)
    if cfg.ffn:
        after["ffn"] = kept_width(dims.ffn, cfg.ffn, cfg.round_to, "prune.ffn")
    if cfg.hidden:
        after["hidden"] = kept_width(dims.hidden, cfg.hidden, cfg.round_to, "prune.hidden")
    if after["hidden"] % after["heads"]:
        raise ValueError(f"prune.hidden keeps {after['hidden']} channels, not a multiple of the "
                         f"{after['heads']} attention heads kept (transformers refuses such a "
                         "config); keep a hidden size that both round_to and the head count "
                         "divide")
    return PrunePlan(before=dims, after=Dims(**after), layers_removed=removed,
                     heads_mode=cfg.heads.mode if cfg.heads else None)
