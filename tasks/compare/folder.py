"""The folder of an ordering comparison: one unit folder per distinct step, shared by orderings.

    <run>/compare.json              recipe, orderings, their steps and unit ids, versions, status
    <run>/units/baseline/           the original model's evaluation
    <run>/units/<unit id>-<role>/   a step's model, metrics, eval (stage.json when finished)

A unit id hashes the whole path from the base model (tasks.compare.orderings), so P-KD-Q and P-Q-KD
point at the same prune unit. Units reuse `tasks.pipeline.run_unit`, so a crashed comparison
resumes exactly like a run: finished units are kept, a half-written one is redone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.compare.orderings import Ordering
from tasks.core.common import ModelRef
from tasks.core.recipe import Recipe
from tasks.pipeline import evaluate_unit, mark_run_file, run_unit, write_run_file

COMPARE_FILE = "compare.json"
BASELINE_UNIT = "baseline"


def unit_folder(run_dir: Path, unit_id: str, role: str) -> Path:
    return Path(run_dir) / "units" / f"{unit_id}-{role}"


def baseline_folder(run_dir: Path) -> Path:
    return Path(run_dir) / "units" / BASELINE_UNIT


def describe(orderings: list[Ordering], base: ModelRef, seed: int,
             run_dir: Path) -> list[dict[str, Any]]:
    """Orderings as JSON: every step's unit folder, label and what it does."""
    out = []
    for ordering in orderings:
        ids = ordering.unit_ids(base.fingerprint, seed)
        out.append({"name": ordering.name, "steps": [
            {"unit": unit_folder(run_dir, uid, step.role).name, "kind": step.kind,
             "role": step.role, "label": step.label, "note": step.note}
            for uid, step in zip(ids, ordering.steps, strict=True)]})
    return out


def init_compare(run_dir: Path, recipe: Recipe, source: str, base: ModelRef,
                 orderings: list[Ordering], concurrency: int) -> dict[str, Any]:
    """Write compare.json: everything needed to read the folder and to reproduce it."""
    return write_run_file(Path(run_dir) / COMPARE_FILE, recipe, source, base, kind="compare",
                          concurrency=concurrency,
                          orderings=describe(orderings, base, recipe.seed, Path(run_dir)))


def mark_compare(run_dir: Path, status: str, **extra: Any) -> None:
    mark_run_file(Path(run_dir) / COMPARE_FILE, status, **extra)


def run_ordering_step(run_dir: Path, recipe: Recipe, ordering: Ordering, index: int,
                      input_ref: ModelRef, base: ModelRef) -> tuple[dict[str, Any], bool]:
    """Run (or reuse) step `index` of an ordering; KD's teacher is always the original model."""
    step = ordering.steps[index]
    unit_id = ordering.unit_ids(base.fingerprint, recipe.seed)[index]
    return run_unit(unit_folder(run_dir, unit_id, step.role), f"{ordering.name} {step.label}",
                    step.kind, step.config, recipe, input_ref,
                    base if step.kind == "distill" else None, extra={"role": step.role})


def evaluate_folder(folder: Path, recipe: Recipe, model: ModelRef,
                    baseline: bool = False) -> tuple[dict[str, Any], bool]:
    return evaluate_unit(Path(folder), Path(folder).name, recipe, model, baseline=baseline)
