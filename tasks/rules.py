"""Rule check before a run: warnings that cite the published result or constraint behind them.

The recipe loader refuses what cannot run at all. These rules flag what will run but is known to
go badly (cutting more than half in one shot, quantizing before KD), or what will fail late: a
quantization group size that does not divide the *pruned* widths is refused only when the quantize
stage starts, after prune and KD have spent their time. Nothing here loads weights: shapes come
from config.json and the prune plan (`tasks.prune.plan`, the sizes the prune stage will keep), so
`pkdq validate` stays instant and `pkdq compare` can check every ordering it builds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tasks.core.dims import Dims
from tasks.core.model_store import cached_config
from tasks.core.recipe import PruneConfig, QuantizeConfig, Recipe
from tasks.prune import PrunePlan, plan_prune
from tasks.quantize import (
    MARLIN_K_MULTIPLE,
    MARLIN_SOURCE,
    group_size_hint,
    marlin_k_note,
)

MINITRON = ('Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge '
            'Distillation" (Minitron), arXiv:2407.14679')
ORDERING_STUDY = ('"A Systematic Study of Compression Ordering for Large Language Models" '
                  '(2025), arXiv:2511.19495')
GPTQ_GROUPS = ("GPTQ/AWQ keep one scale per group of input columns, so a partial group is not "
               "representable; tasks/quantize.check_group_size refuses it at stage start")
PRUNE_PLAN = "tasks/prune/plan.py: the prune stage checks targets against the model's sizes"

ONE_SHOT_LIMIT = 0.5  # fraction of an axis, or of all parameters, cut in one prune step
# Dims field each prune axis shrinks, and what its units are called in a message.
AXIS_FIELD = {"depth": "layers", "heads": "heads", "ffn": "ffn", "hidden": "hidden"}
AXIS_UNITS = {"depth": "layers", "heads": "query heads", "ffn": "FFN neurons",
              "hidden": "hidden channels"}

Level = Literal["warning", "info"]


@dataclass(frozen=True)
class RuleWarning:
    """One finding: `message` is one line, `source` says where the rule comes from.

    `info` findings are worth knowing but no reason to change the recipe (`--strict` ignores
    them); SmolLM2's hidden size 576, for instance, always misses vLLM's Marlin tiling.
    """

    code: str
    message: str
    source: str
    level: Level = "warning"

    def line(self) -> str:
        return f"{self.level} [{self.code}]: {self.message} ({self.source})"


def rule_warnings(recipe: Recipe, order: Sequence[str] | None = None,
                  model_config: dict[str, Any] | None = None) -> list[RuleWarning]:
    """Every rule's findings for `recipe` run in `order` (stage kinds; default: recipe order).

    `order` is separate from the recipe because production recipes must be P-KD-Q while `pkdq
    compare` runs their stages in other orders. `model_config` is the model's config.json; when
    None it is read from disk if the model is already there (`cached_config`), else the rules that
    need shapes are skipped. Raises ValueError only for an `order` that is not a permutation of
    the recipe's stages.
    """
    configs: dict[str, Any] = dict(recipe.stage_list())
    kinds = _checked_order(configs, order)
    config = model_config if model_config is not None else cached_config(recipe.model)
    dims = _dims(config)
    prune: PruneConfig | None = configs.get("prune")
    quant: QuantizeConfig | None = configs.get("quantize")
    found: list[RuleWarning] = []
    plan = None
    if prune is not None and dims is not None:
        try:
            plan = plan_prune(dims, prune)
        except ValueError as exc:
            found.append(RuleWarning("prune-target-invalid",
                                     f"{exc}; the prune stage will refuse it", PRUNE_PLAN))
    if prune is not None:
        found.extend(_prune_over_half(prune, plan, config or {}))
    found.extend(_order_rules(kinds))
    if quant is not None and dims is not None:
        found.extend(_quantize_shape_rules(quant, _quantized_shapes(kinds, dims, plan)))
    return found


def _checked_order(configs: dict[str, Any], order: Sequence[str] | None) -> list[str]:
    kinds = list(order) if order is not None else list(configs)
    if sorted(kinds) != sorted(configs):
        raise ValueError(f"order {' -> '.join(kinds)} must list the recipe's stages "
                         f"({', '.join(configs)}) once each")
    return kinds


def _dims(config: dict[str, Any] | None) -> Dims | None:
    """Dims of a config.json, or None when it lacks the sizes (then shape rules are skipped)."""
    if not config:
        return None
    try:
        return Dims.from_config(config)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


# --------------------------------------------------------------------------------------------
# prune-over-50
# --------------------------------------------------------------------------------------------


def approx_params(dims: Dims, vocab: int, tied: bool) -> int:
    """Parameters of a Llama-family decoder: projections, norms and embeddings (no biases).

    Exact for SmolLM2-135M (134,515,008); Gemma's q/k norms add a few thousand, which does not
    move a >50% threshold.
    """
    attention = dims.hidden * dims.head_dim * 2 * (dims.heads + dims.kv_heads)
    mlp = 3 * dims.hidden * dims.ffn
    per_layer = attention + mlp + 2 * dims.hidden
    return dims.layers * per_layer + vocab * dims.hidden * (1 if tied else 2) + dims.hidden


def _axis_cuts(cfg: PruneConfig, plan: PrunePlan | None) -> list[tuple[str, float, str]]:
    """(axis, fraction removed, what that is in sizes) for every pruned axis.

    With a plan the fraction is what the stage will really cut (after rounding to round_to and
    to whole KV groups); without one only ratio targets can be judged.
    """
    cuts = []
    for axis in cfg.axes():
        if plan is not None:
            before = getattr(plan.before, AXIS_FIELD[axis])
            after = getattr(plan.after, AXIS_FIELD[axis])
            cuts.append((axis, 1 - after / before, f"{before} -> {after}"))
        elif getattr(cfg, axis).ratio is not None:
            ratio = getattr(cfg, axis).ratio
            cuts.append((axis, ratio, f"ratio {ratio:g}"))
    return cuts


def _prune_over_half(cfg: PruneConfig, plan: PrunePlan | None,
                     config: dict[str, Any]) -> list[RuleWarning]:
    parts = [f"{frac:.0%} of {AXIS_UNITS[axis]} ({detail})"
             for axis, frac, detail in _axis_cuts(cfg, plan) if frac > ONE_SHOT_LIMIT]
    if plan is not None:
        vocab = int(config.get("vocab_size") or 0)
        tied = bool(config.get("tie_word_embeddings", True))
        before, after = (approx_params(d, vocab, tied) for d in (plan.before, plan.after))
        if 1 - after / before > ONE_SHOT_LIMIT:
            parts.append(f"{1 - after / before:.0%} of the parameters ({before / 1e6:.1f}M -> "
                         f"{after / 1e6:.1f}M)")
    if not parts:
        return []
    return [RuleWarning(
        "prune-over-50",
        f"one-shot prune removes {', '.join(parts)}; more than half in one step is hard to "
        "recover: Minitron compresses in steps of about half (15B -> 8B -> 4B) with distillation "
        "after each; cut less, or chain two recipes (the second one's model: the first run's "
        "02-distill/model)",
        MINITRON)]


# --------------------------------------------------------------------------------------------
# Order rules
# --------------------------------------------------------------------------------------------


def _order_rules(kinds: list[str]) -> list[RuleWarning]:
    pos = {kind: i for i, kind in enumerate(kinds)}

    def before(a: str, b: str) -> bool:
        return a in pos and b in pos and pos[a] < pos[b]

    found = []
    if before("quantize", "distill"):
        found.append(RuleWarning(
            "quantize-before-distill",
            "quantize runs before distill, so KD can only train on the frozen quantization grid "
            "and cannot win back what rounding lost; the ordering study found pipelines that "
            "quantize early degrade severely and P-KD-Q (prune -> distill -> quantize) best",
            ORDERING_STUDY))
    if before("quantize", "prune"):
        found.append(RuleWarning(
            "quantize-before-prune",
            "prune runs after quantize: it cuts dequantized grid weights (down_proj loses input "
            "columns, shifting whole quantization groups), so the pruned model is quantized a "
            "second time and pays rounding twice; P-KD-Q quantizes once, last",
            ORDERING_STUDY))
    if "distill" in pos and not (before("prune", "distill") or before("quantize", "distill")):
        found.append(RuleWarning(
            "distill-without-prune",
            "distill runs before anything is pruned or quantized: the student starts equal to "
            "the teacher (self-distillation), so KD has nothing to recover and only fine-tunes",
            f"{ORDERING_STUDY}: KD placed to recover from pruning (P-KD-Q) ranks best",
            level="info"))
    return found


# --------------------------------------------------------------------------------------------
# Quantization shapes: group-size-divides, marlin-128
# --------------------------------------------------------------------------------------------


def _in_features(dims: Dims) -> dict[str, tuple[int, str]]:
    """in_features of each quantized linear kind of a Llama/Gemma decoder block, and its origin.

    The prune stage shrinks them through the config sizes: hidden -> every input projection,
    kept heads x head_dim -> o_proj, kept FFN neurons -> down_proj.
    """
    return {
        "q/k/v/gate/up_proj": (dims.hidden, "hidden size"),
        "o_proj": (dims.heads * dims.head_dim, f"{dims.heads} heads x {dims.head_dim}"),
        "down_proj": (dims.ffn, "FFN size"),
    }


def _quantized_shapes(kinds: list[str], dims: Dims,
                      plan: PrunePlan | None) -> list[tuple[str, Dims]]:
    """(when, sizes) of every quantization pass, the served checkpoint's last.

    Quantize after prune sees the pruned sizes; quantize before prune sees the full model and
    then re-quantizes the pruned one (tasks.compare.orderings). An invalid prune target leaves the
    pruned sizes unknown, so only a pass on the full model is checked then.
    """
    if "prune" not in kinds:
        return [("of the model", dims)]
    prune_first = kinds.index("prune") < kinds.index("quantize")
    shapes = [] if prune_first else [("before pruning", dims)]
    if plan is not None:
        shapes.append(("after pruning" if prune_first else "when re-quantized after pruning",
                       plan.after))
    return shapes


def _quantize_shape_rules(cfg: QuantizeConfig,
                          shapes: list[tuple[str, Dims]]) -> list[RuleWarning]:
    found = []
    g = cfg.group_size
    for when, dims in shapes:
        inputs = _in_features(dims)
        bad = [f"{kind} in_features {n} ({why})" for kind, (n, why) in inputs.items() if n % g]
        if bad:
            hint = group_size_hint(n for n, _ in inputs.values())
            found.append(RuleWarning(
                "group-size-divides",
                f"quantize group_size {g} does not divide in_features {when}: {', '.join(bad)}; "
                f"{hint}; the quantize stage would refuse it after the stages before it ran",
                GPTQ_GROUPS))
    if shapes:
        served = _in_features(shapes[-1][1])
        off_tile = {kind: n for kind, (n, _) in served.items() if n % MARLIN_K_MULTIPLE}
        if off_tile:
            found.append(RuleWarning("marlin-128", marlin_k_note(off_tile), MARLIN_SOURCE,
                                     level="info"))
    return found
