"""What a budget search runs: the candidates' proxy variants and the finalists' short-KD variants.

Each candidate is scored twice at most, with the stage code a run uses (no copy of it):
- proxy: the candidate's prune stage alone, one-shot, then held-out KL to the unpruned model on
  training-side held-out text (never an evaluation split);
- finalist (top k by proxy): the same prune unit (shared, not recomputed) plus a short KD, then
  the same held-out score. The lowest short-KD KL wins and becomes the run's prune stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.core.recipe import DistillConfig, PruneConfig, QuantizeConfig, Recipe, parse_recipe
from tasks.prune import Candidate, enumerate_candidates, spread
from tasks.sweep import Variant

SHORT_KD_SHARE = 8  # default finalist budget: an eighth of the distill stage's tokens


def prune_target_index(recipe: Recipe) -> int | None:
    """Index (in the recipe's stages) of a prune stage with a budget target, else None."""
    for i, (kind, cfg) in enumerate(recipe.stage_list()):
        if kind == "prune" and cfg.target is not None:
            return i
    return None


def with_prune(recipe: Recipe, prune: PruneConfig, keep: tuple[str, ...] | None = None,
               distill_tokens: int | None = None) -> Recipe:
    """`recipe` with its prune stage replaced by `prune`; `keep` limits the stages kept (by
    kind), `distill_tokens` resets the KD budget."""
    raw = recipe.model_dump(mode="json")
    stages = []
    for stage in raw["stages"]:
        kind = next(iter(stage))
        if keep is not None and kind not in keep:
            continue
        if kind == "prune":
            stage = {"prune": prune.model_dump(mode="json")}
        elif kind == "distill" and distill_tokens is not None:
            stage["distill"]["tokens"] = distill_tokens
        stages.append(stage)
    raw["stages"] = stages
    return parse_recipe(raw, f"{recipe.name} (search)")


def _variant(label: str, recipe: Recipe) -> Variant:
    return Variant((("candidate", label),), recipe)


@dataclass(frozen=True)
class SearchPlan:
    recipe: Recipe  # the user's recipe, prune stage with a target
    target: PruneConfig
    quant: QuantizeConfig | None
    distill: DistillConfig
    candidates: tuple[Candidate, ...]  # the ones the proxy scores (an even spread)
    enumerated: int  # how many met the target before the spread
    short_tokens: int

    def proxy_variant(self, index: int) -> Variant:
        cand = self.candidates[index]
        return _variant(cand.label, with_prune(self.recipe, cand.prune, keep=("prune",)))

    def finalist_variant(self, index: int) -> Variant:
        cand = self.candidates[index]
        return _variant(cand.label, with_prune(self.recipe, cand.prune,
                                               keep=("prune", "distill"),
                                               distill_tokens=self.short_tokens))

    def concrete(self, index: int) -> Recipe:
        """The user's recipe with the winner's shape as its prune stage."""
        return with_prune(self.recipe, self.candidates[index].prune)

    def describe(self) -> dict[str, Any]:
        t = self.target.target
        assert t is not None
        return {"target": t.model_dump(mode="json"), "top_k": self.target.search.top_k,
                "enumerated": self.enumerated, "scored": len(self.candidates),
                "short_kd_tokens": self.short_tokens, "quantized": self.quant is not None}


def search_plan(recipe: Recipe, model_config: dict[str, Any]) -> SearchPlan:
    """Candidates for the recipe's target (SearchSpaceError, one line, when none fit)."""
    index = prune_target_index(recipe)
    if index is None:
        raise ValueError(f"{recipe.name}: no prune stage with a target to search for")
    stages = dict(recipe.stage_list())
    prune: PruneConfig = stages["prune"]
    quant = stages.get("quantize")
    distill = stages.get("distill") or DistillConfig()
    found = enumerate_candidates(model_config, prune, quant)
    picked = spread(found, prune.search.candidates)
    share = prune.search.tokens or max(distill.seq_len * distill.batch_size,
                                       distill.tokens // SHORT_KD_SHARE)
    return SearchPlan(recipe, prune, quant, distill, tuple(picked), len(found), share)
