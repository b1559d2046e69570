"""The folder of an ordering comparison: one unit folder per distinct step, shared by orderings.

    <run>/compare.json              recipe, orderings, their steps and unit ids, versions, status
    <run>/units/baseline/           the original model's evaluation
    <run>/units/<unit id>-<role>/   a step's model, metrics, eval (stage.json when finished)

A unit id hashes the whole path from the base model (tasks.orderings), so P-KD-Q and P-Q-KD
point at the same prune unit. Units reuse `tasks.pipeline.run_unit`, so a crashed comparison
resumes exactly like a run: finished units are kept, a half-written one is redone.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.common import ModelRef, data_dir, read_json, write_json_atomic
from tasks.orderings import Ordering
from tasks.pipeline import evaluate_unit, run_unit
from tasks.recipe import Recipe
from tasks.run_folder import data_fingerprint, package_versions

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
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / COMPARE_FILE
    previous = read_json(path) if path.is_file() else {}
    data = data_dir()
    info = {
        "run_id": run_dir.name,
        "kind": "compare",
        "recipe_source": source,
        "recipe": recipe.model_dump(mode="json"),
        "seed": recipe.seed,
        "threads": recipe.threads,
        "concurrency": concurrency,
        "model": {"spec": recipe.model, **base.to_json()},
        "data": {"path": str(data), "fingerprint": data_fingerprint(data)},
        "versions": package_versions(),
        "orderings": describe(orderings, base, recipe.seed, run_dir),
        "created": previous.get("created", datetime.now(UTC).isoformat()),
        "attempts": previous.get("attempts", 0) + 1,
        "status": "running",
    }
    write_json_atomic(path, info)
    return info


def mark_compare(run_dir: Path, status: str, **extra: Any) -> None:
    path = Path(run_dir) / COMPARE_FILE
    info = read_json(path)
    info.update(status=status, **extra)
    write_json_atomic(path, info)


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
