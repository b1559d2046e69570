"""What a sweep runs: the screening variants, and the winner's rerun at the full budget.

The CLI validates the whole plan (every variant parses as a recipe) before anything runs; the
flow rebuilds it from the same recipe and grid, so a resumed sweep runs exactly what it started.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.core.recipe import Recipe, RecipeError
from tasks.sweep.grid import GridAxis, Variant, expand, scaled_tokens

METRIC_CHOICES = ("kl", "ppl")


@dataclass(frozen=True)
class SweepPlan:
    recipe: Recipe  # the base recipe at its full budget
    axes: tuple[GridAxis, ...]
    fraction: float | None  # screen at this share of the KD tokens, then run the winner in full
    metric: str

    def screen(self, source: str = "sweep") -> list[Variant]:
        """The variants the selection ranks (at the reduced budget when `fraction` is set)."""
        base = scaled_tokens(self.recipe, self.fraction) if self.fraction else self.recipe
        return expand(base, list(self.axes), source)

    def full(self, winner: Variant, source: str = "sweep") -> Variant:
        """The winner's settings at the full budget (only with `fraction`)."""
        single = [GridAxis(key, (value,)) for key, value in winner.settings]
        return expand(self.recipe, single, source)[0]

    def to_json(self) -> dict[str, Any]:
        return {"grid": [{"key": a.key, "values": list(a.values)} for a in self.axes],
                "fraction": self.fraction, "metric": self.metric}


def sweep_plan(recipe: Recipe, axes: list[GridAxis], fraction: float | None = None,
               metric: str = "kl") -> SweepPlan:
    """Validate the whole sweep up front: every variant (and the full-budget rerun) parses."""
    if metric not in METRIC_CHOICES:
        raise RecipeError(f"--select {metric}: use one of {', '.join(METRIC_CHOICES)}")
    if fraction is not None and not 0 < fraction < 1:
        raise RecipeError(f"--fraction {fraction:g}: a share of the KD tokens, between 0 and 1")
    plan = SweepPlan(recipe, tuple(axes), fraction, metric)
    variants = plan.screen()
    if fraction:
        plan.full(variants[0])
    return plan
