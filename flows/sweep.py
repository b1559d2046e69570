"""The sweep flow: every variant of a recipe grid as Prefect tasks sharing common prefixes.

Each distinct unit (a stage of some variant, keyed by its whole path from the base model) is one
task run, submitted once: variants that share the prune stage wait on the same future, so it runs
once. Each variant's final model is scored on training-side held-out text; the best one wins.
With a screening fraction, the winner's settings then run at the full KD budget. Unit folders on
disk are the source of truth for resuming (`tasks.pipeline.run_unit`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from flows.holding import hold_for_flow
from tasks.compare import unit_folder
from tasks.core.common import ModelRef, read_json
from tasks.core.model_store import resolve_model
from tasks.core.recipe import Recipe, load_recipe, parse_recipe
from tasks.core.resources import check_machine
from tasks.run_folder import STAGE_FILE
from tasks.sweep import (
    Variant,
    init_sweep,
    mark_sweep,
    rank,
    run_variant_step,
    score_config,
    score_unit,
    variant_ordering,
    winner_reason,
    write_sweep_report,
)
from tasks.sweep.plan import SweepPlan


def _from_json(recipe_json: dict[str, Any], label: str) -> Variant:
    return Variant((("variant", label),), parse_recipe(recipe_json, f"sweep variant {label}"))


@task(cache_policy=NO_CACHE, persist_result=False)
def unit_step_task(run_dir: str, recipe_json: dict[str, Any], label: str, step: int,
                   input_model: dict[str, str], base: dict[str, str]) -> dict[str, str]:
    """One step of one variant (or the reuse of its finished unit); returns the output model.

    The variant's recipe travels as JSON (a few hundred bytes): sweeps and searches build their
    variants differently, and the task runs whichever it is given."""
    record, _ = run_variant_step(Path(run_dir), _from_json(recipe_json, label), step,
                                 ModelRef.from_json(input_model), ModelRef.from_json(base))
    return record["model"]


@task(cache_policy=NO_CACHE, persist_result=False)
def score_task(run_dir: str, unit: str, model: dict[str, str], base: dict[str, str],
               ruler_recipe: dict[str, Any]) -> dict[str, Any]:
    """Held-out score of a unit's model against the base model, on one ruler for all."""
    recipe = parse_recipe(ruler_recipe, "sweep ruler")
    score, reused = score_unit(Path(run_dir) / "units" / unit, ModelRef.from_json(model),
                               ModelRef.from_json(base), score_config(recipe), recipe)
    print(f"[sweep] {unit}: held-out KL {score['kl']:.4f} ppl {score['ppl']:.2f}"
          + (" (reused)" if reused else ""), flush=True)
    return score


class UnitSubmitter:
    """Submits each distinct unit once; later variants reuse the same futures (a variant that
    shares a prefix with an earlier one waits on it instead of running it again)."""

    def __init__(self, run_dir: str, base: ModelRef, ruler: Recipe) -> None:
        self.run_dir, self.base = run_dir, base
        self.ruler = ruler.model_dump(mode="json")
        self.units: dict[str, Any] = {}
        self.scores: dict[str, Any] = {}

    def variant(self, variant: Variant) -> tuple[list[str], Any]:
        """(unit folder names, score future of its final model) of one variant."""
        ordering = variant_ordering(variant.recipe)
        ids = ordering.unit_ids(self.base.fingerprint, variant.recipe.seed)
        recipe_json = variant.recipe.model_dump(mode="json")
        upstream: Any = self.base.to_json()
        names = []
        for step, (uid, st) in enumerate(zip(ids, ordering.steps, strict=True)):
            name = unit_folder(Path(self.run_dir), uid, st.role).name
            names.append(name)
            if name not in self.units:
                self.units[name] = unit_step_task.with_options(
                    name=f"{variant.label} {step + 1}:{st.label}").submit(
                    self.run_dir, recipe_json, variant.label, step, upstream, self.base.to_json())
            upstream = self.units[name]
        last = names[-1]
        if last not in self.scores:
            self.scores[last] = score_task.with_options(name=f"score {variant.label}").submit(
                self.run_dir, last, upstream, self.base.to_json(), self.ruler)
        return names, self.scores[last]


def _row(run_dir: Path, variant: Variant, phase: str, names: list[str],
         score: dict[str, Any]) -> dict[str, Any]:
    wall = 0.0
    for name in names:
        record = read_json(run_dir / "units" / name / STAGE_FILE)
        wall += float(record["metrics"].get("stage_wall_s", 0.0))
    tokens = next((cfg.tokens for kind, cfg in variant.recipe.stage_list() if kind == "distill"),
                  None)
    return {"label": variant.label, "settings": dict(variant.settings), "phase": phase,
            "units": names, "kd_tokens": tokens, "score": score, "compute_s": wall}


@flow(name="pkdq-sweep", log_prints=True)
def sweep_flow(recipe_file: str, run_dir: str, plan_json: dict[str, Any]) -> str:
    """Screen every variant, select on held-out score, optionally rerun the winner in full."""
    with hold_for_flow(run_dir, "pkdq sweep", recipe_file):
        return _sweep(recipe_file, run_dir, plan_json)


def _sweep(recipe_file: str, run_dir: str, plan_json: dict[str, Any]) -> str:
    from tasks.sweep import GridAxis, sweep_plan

    recipe = load_recipe(recipe_file)
    check_machine(recipe.resources)
    base = resolve_model(recipe.model)
    axes = [GridAxis(a["key"], tuple(a["values"])) for a in plan_json["grid"]]
    plan: SweepPlan = sweep_plan(recipe, axes, plan_json.get("fraction"),
                                 plan_json.get("metric", "kl"))
    root = Path(run_dir)
    variants = plan.screen(recipe_file)
    init_sweep(root, recipe, recipe_file, base, plan.to_json(), variants)
    submit = UnitSubmitter(run_dir, base, recipe)
    try:
        pending = [(i, v, *submit.variant(v)) for i, v in enumerate(variants)]
        wait([s for *_, s in pending])
        rows = [_row(root, v, "screen", names, score.result())
                for _, v, names, score in pending]
        rows = rank(rows, plan.metric)
        best = next(i for i, r in enumerate(rows) if r["rank"] == 1)
        winner = variants[best]
        if plan.fraction:
            full = plan.full(winner)
            names, score = submit.variant(full)
            row = _row(root, full, "full", names, score.result())
            rows.append({**row, "rank": None})
            winner = full
    except BaseException as exc:
        mark_sweep(root, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    teacher_ppl = rows[0]["score"].get("teacher_ppl")
    data = {"name": root.name, "recipe": recipe.name, "metric": plan.metric,
            "grid": plan.to_json()["grid"], "fraction": plan.fraction, "rows": rows,
            "winner": variants[best].label, "reason": winner_reason(
                [r for r in rows if r["phase"] == "screen"], plan.metric),
            "ruler": {"seq_len": score_config(recipe).seq_len,
                      "blocks": rows[0]["score"].get("blocks")},
            "teacher_ppl": teacher_ppl}
    paths = write_sweep_report(root, data, winner.recipe)
    mark_sweep(root, "finished", winner=variants[best].label)
    print(f"[sweep] winner: {data['reason']}", flush=True)
    return str(paths["markdown"])


def run_sweep(recipe_file: str, run_dir: str, plan_json: dict[str, Any],
              concurrency: int = 1) -> str:
    """Run the flow with a task runner sized for `concurrency` units at once."""
    runner = ThreadPoolTaskRunner(max_workers=max(1, concurrency))
    return sweep_flow.with_options(task_runner=runner)(recipe_file, run_dir, plan_json)
