"""`--grid key=v1,v2,...` options into recipe variants, each validated like a recipe file.

A key is a dotted path into the recipe: its first part names a stage of the recipe (`distill.lr`,
`prune.ffn.ratio`, `quantize.group_size`) or a top-level field (`seed`). Every variant goes
through `parse_recipe`, so a misspelt key or an out-of-range value is refused in the recipe's own
one-line words before anything runs.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any

import yaml

from tasks.core.recipe import STAGE_ORDER, Recipe, RecipeError, parse_recipe, short_repr

MAX_VARIANTS = 256  # a grid past this is a typo (or weeks of CPU)


@dataclass(frozen=True)
class GridAxis:
    key: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Variant:
    """One point of the grid: its settings (key -> value) and the recipe they make."""

    settings: tuple[tuple[str, Any], ...]
    recipe: Recipe

    @property
    def label(self) -> str:
        return ", ".join(f"{key}={format_value(value)}" for key, value in self.settings) or "base"


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def parse_value(text: str) -> Any:
    """A grid value as YAML would read it, except that `1e-4` is a float (YAML 1.1 wants `1.0e-4`,
    which nobody types on a command line)."""
    text = text.strip()
    for number in (int, float):
        try:
            value = number(text)
        except ValueError:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            break
        return value
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_grid(specs: list[str]) -> list[GridAxis]:
    """`["distill.lr=1e-4,3e-4", ...]` -> axes; one-line RecipeError for a malformed option."""
    axes: list[GridAxis] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise RecipeError(f"--grid {short_repr(spec)}: write KEY=V1,V2,... "
                              "(e.g. distill.lr=1e-4,3e-4)")
        if any(not part for part in key.split(".")):
            raise RecipeError(f"--grid {short_repr(spec)}: '{key}' is not a dotted key path")
        parsed = tuple(parse_value(v) for v in values.split(",") if v.strip())
        if len(set(map(repr, parsed))) != len(parsed):
            raise RecipeError(f"--grid {key}: a value is listed twice")
        if any(axis.key == key for axis in axes):
            raise RecipeError(f"--grid {key}: the key is given twice; list all its values in one "
                              "--grid")
        axes.append(GridAxis(key, parsed))
    if not axes:
        raise RecipeError("give at least one --grid KEY=V1,V2,... (e.g. distill.lr=1e-4,3e-4)")
    size = math.prod(len(axis.values) for axis in axes)
    if size > MAX_VARIANTS:
        raise RecipeError(f"--grid: {size} variants; at most {MAX_VARIANTS} (sweep fewer values "
                          "or run several sweeps)")
    return axes


def set_key(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of the recipe mapping `raw` with `key` set; a stage name addresses that stage."""
    out = copy.deepcopy(raw)
    head, *rest = key.split(".")
    if head in STAGE_ORDER:
        stages = out.get("stages") or []
        matches = [s for s in stages if isinstance(s, dict) and head in s]
        if not matches:
            present = ", ".join(next(iter(s)) for s in stages if isinstance(s, dict)) or "none"
            raise RecipeError(f"--grid {key}: the recipe has no {head} stage (stages: {present})")
        if not rest:
            raise RecipeError(f"--grid {key}: name a field of the {head} stage, e.g. {head}."
                              + {"prune": "ffn.ratio", "distill": "lr",
                                 "quantize": "group_size"}[head])
        target = matches[0][head] if matches[0][head] is not None else {}
        matches[0][head] = target
        path = rest
    else:
        target, path = out, [head, *rest]
    for part in path[:-1]:
        child = target.get(part)
        if child is None:
            child = target[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"--grid {key}: '{part}' holds a value, not a section")
        target = child
    target[path[-1]] = value
    return out


def expand(recipe: Recipe, axes: list[GridAxis], source: str) -> list[Variant]:
    """Every combination of the axes' values (first axis slowest), each a validated recipe."""
    base = recipe.model_dump(mode="json")
    variants: list[Variant] = []
    for combo in itertools.product(*(axis.values for axis in axes)):
        raw = base
        settings = tuple((axis.key, value) for axis, value in zip(axes, combo, strict=True))
        for key, value in settings:
            raw = set_key(raw, key, value)
        label = ", ".join(f"{k}={format_value(v)}" for k, v in settings)
        variants.append(Variant(settings, parse_recipe(raw, f"{source} [{label}]")))
    return variants


def scaled_tokens(recipe: Recipe, fraction: float) -> Recipe:
    """The recipe with every KD token budget scaled by `fraction` (screening on a reduced budget),
    never below one optimizer step."""
    raw = recipe.model_dump(mode="json")
    found = False
    for stage in raw["stages"]:
        cfg = stage.get("distill")
        if cfg is None:
            continue
        found = True
        step = cfg["seq_len"] * cfg["batch_size"] * cfg["grad_accum"]
        cfg["tokens"] = max(step, int(round(cfg["tokens"] * fraction / step)) * step)
    if not found:
        raise RecipeError("--fraction scales the KD token budget; the recipe has no distill stage")
    return parse_recipe(raw, f"{recipe.name} (KD tokens x{fraction:g})")
