"""Stage orderings for `pkdq compare`: what each order of P, KD and Q means, step by step.

Every ordering uses the recipe's own stage configs (same pruning targets and criterion, same KD
loss and token budget, same quantization config, same seed), so the only thing that differs is
the order. Some orders have no textbook meaning; pkdq picks a well-defined substitute and says so
in each step's `note`, which the report prints verbatim:

- KD before any P or Q: nothing has been lost yet, so KD is self-distillation of the full model
  (student starts equal to the teacher; the CE part of the loss is plain fine-tuning).
- KD after Q: quantization-aware KD (straight-through fake quantization on the frozen grid), so
  the model after KD still sits exactly on the quantization grid.
- P after Q: pruning cuts the dequantized grid weights (down_proj loses input columns, so whole
  quantization groups change), then the pruned model is quantized again with the same config.

The teacher is always the original model (the model before any stage), as in P-KD-Q where KD
recovers from pruning with the unpruned model as teacher.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from tasks.core.recipe import Recipe, RecipeError

LETTERS = {"P": "prune", "KD": "distill", "Q": "quantize"}
KIND_LETTER = {kind: letter for letter, kind in LETTERS.items()}
DEFAULT_ORDERS = ("P-KD-Q", "KD-P-Q", "P-Q-KD", "Q-KD-P")
PRODUCTION_ORDER = "P-KD-Q"


@dataclass(frozen=True)
class Step:
    kind: str  # prune | distill | quantize (the stage runner)
    role: str  # prune, kd, self-kd, qat-kd, quantize, requantize
    config: Any  # the recipe's pydantic config of that stage
    note: str  # what pkdq does here, in words, for the report

    @property
    def label(self) -> str:
        return {"prune": "P", "kd": "KD", "self-kd": "KD (self)", "qat-kd": "KD (QAT)",
                "quantize": "Q", "requantize": "re-Q"}[self.role]


@dataclass(frozen=True)
class Ordering:
    name: str  # e.g. "P-Q-KD"
    steps: tuple[Step, ...]

    def unit_ids(self, base_fingerprint: str, seed: int) -> list[str]:
        """One id per step, a hash of the whole path from the base model to that step.

        Two orderings that start with the same steps (P-KD-Q and P-Q-KD share P) get the same
        ids for that prefix, so the unit runs once and the other ordering reuses it.
        """
        ids, path = [], [base_fingerprint, str(seed)]
        for step in self.steps:
            path.append(json.dumps([step.role, step.config.model_dump(mode="json")],
                                   sort_keys=True))
            ids.append(hashlib.sha256("\n".join(path).encode()).hexdigest()[:12])
        return ids


def _letters(order: str) -> list[str]:
    return [part.strip().upper() for part in order.split("-")]


def parse_orders(text: str, recipe: Recipe) -> list[str]:
    """Validate a comma list like 'P-KD-Q,Q-KD-P' against the recipe's stages (one line errors)."""
    kinds = sorted(kind for kind, _ in recipe.stage_list())
    wanted = "-".join(KIND_LETTER[k] for k, _ in recipe.stage_list())
    orders: list[str] = []
    for raw in (part.strip() for part in text.split(",")):
        if not raw:
            continue
        letters = _letters(raw)
        unknown = [x for x in letters if x not in LETTERS]
        if unknown:
            raise RecipeError(f"--orders: '{raw}': unknown stage letter {unknown[0]!r}; use P "
                              "(prune), KD (distill), Q (quantize), e.g. P-KD-Q")
        if sorted(LETTERS[x] for x in letters) != kinds:
            raise RecipeError(f"--orders: '{raw}' must use each of the recipe's stages once "
                              f"({wanted})")
        name = "-".join(letters)
        if name in orders:
            raise RecipeError(f"--orders: '{name}' is listed twice")
        orders.append(name)
    if not orders:
        raise RecipeError("--orders: give at least one ordering, e.g. P-KD-Q,Q-KD-P")
    return orders


def plan_ordering(recipe: Recipe, order: str) -> Ordering:
    """The steps of one ordering, with the substitutes described in the module docstring."""
    configs = dict(recipe.stage_list())
    steps: list[Step] = []
    pruned = quantized = False
    for letter in _letters(order):
        kind = LETTERS[letter]
        cfg = configs[kind]
        if kind == "prune":
            if quantized:
                steps.append(Step("prune", "prune", cfg, "prune the dequantized grid weights "
                                  "(pruning cuts quantization groups, so the result is float)"))
                steps.append(Step("quantize", "requantize", configs["quantize"],
                                  "quantize the pruned model again with the same config, so the "
                                  "final weights are on a quantization grid"))
            else:
                steps.append(Step("prune", "prune", cfg, "prune the full-precision model"))
            pruned = True
        elif kind == "distill":
            if quantized:
                steps.append(Step("distill", "qat-kd", cfg, "quantization-aware KD: train float "
                                  "shadow weights through straight-through fake quantization on "
                                  "the frozen grid (same scales/zeros), teacher = original model"
                                  ))
            elif not pruned:
                steps.append(Step("distill", "self-kd", cfg, "nothing to recover yet: "
                                  "self-distillation of the full model from the original model "
                                  "(KL starts at 0; the CE part fine-tunes on the KD text)"))
            else:
                steps.append(Step("distill", "kd", cfg, "KD recovering from pruning, teacher = "
                                  "original model"))
        else:
            steps.append(Step("quantize", "quantize", cfg,
                              "quantize the float model" + (" (unpruned)" if not pruned else "")))
            quantized = True
    return Ordering(order, tuple(steps))


def shared_prefixes(orderings: list[Ordering], base_fingerprint: str,
                    seed: int) -> dict[str, str]:
    """{unit id: ordering that computes it first}: every later use of the id is a cache hit."""
    first: dict[str, str] = {}
    for ordering in orderings:
        for unit_id in ordering.unit_ids(base_fingerprint, seed):
            first.setdefault(unit_id, ordering.name)
    return first
