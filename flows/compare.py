"""The compare flow: every ordering of a recipe's stages under equal budgets, as one Prefect flow.

Each step of each ordering is one task run; evaluations are task runs too. A step that two
orderings share (P in P-KD-Q and P-Q-KD) has one unit id, used as the Prefect cache key: the
second ordering's task run ends in the `Cached` state in the UI, and the run log says which
ordering computed it. The unit folders on disk (tasks.compare.folder) are the source of truth for
resuming; the Prefect cache only mirrors them within a run folder.

Independent orderings run concurrently when `concurrency` > 1 (a thread-pool task runner);
steps are submitted in dependency order, so concurrency 1 (the default on a 2-core machine)
runs everything one after another without deadlock.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from flows.holding import hold_for_flow
from tasks.compare import (
    COMPARE_FILE,
    baseline_folder,
    evaluate_folder,
    init_compare,
    mark_compare,
    plan_ordering,
    run_ordering_step,
    shared_prefixes,
    unit_folder,
)
from tasks.core.common import ModelRef
from tasks.core.model_folder import check_folder
from tasks.core.model_store import resolve_model
from tasks.core.recipe import Recipe, load_recipe
from tasks.core.resources import check_machine
from tasks.pipeline import EVAL_DONE, frozen_recipe
from tasks.run_folder import STAGE_FILE, intact_record


def _scope(run_dir: str) -> str:
    return hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:10]


def _unit_key(context: Any, params: dict[str, Any]) -> str:
    return f"pkdq-unit-{_scope(params['run_dir'])}-{params['unit']}"


def _eval_key(context: Any, params: dict[str, Any]) -> str:
    return f"pkdq-eval-{_scope(params['run_dir'])}-{params['unit']}-{params['eval_digest']}"


def _eval_digest(recipe: Recipe) -> str:
    """Short hash of the evaluation config: an eval cached under another config is not reused."""
    return hashlib.sha256(recipe.evaluate.model_dump_json().encode()).hexdigest()[:8]


def _recipe(run_dir: str) -> Recipe:
    return frozen_recipe(Path(run_dir) / COMPARE_FILE)


@task(cache_key_fn=_unit_key, persist_result=True)
def step_task(run_dir: str, order: str, index: int, input_model: dict[str, str],
              base: dict[str, str], unit: str) -> dict[str, str]:
    """One step of one ordering; returns the output ModelRef (JSON)."""
    recipe = _recipe(run_dir)
    ordering = plan_ordering(recipe, order)
    record, reused = run_ordering_step(Path(run_dir), recipe, ordering, index,
                                       ModelRef.from_json(input_model), ModelRef.from_json(base))
    get_run_logger().info("[compare] %s step %d (%s): %s", order, index + 1, unit,
                          "reused from the unit folder" if reused else "done")
    return record["model"]


@task(cache_key_fn=_eval_key, persist_result=True)
def eval_unit_task(run_dir: str, eval_digest: str, unit: str, model: dict[str, str],
                   baseline: bool = False) -> str:
    """Evaluate a unit's model (same doc ids for every unit: same seed and eval config)."""
    recipe = _recipe(run_dir)
    folder = Path(run_dir) / "units" / unit
    _, reused = evaluate_folder(folder, recipe, ModelRef.from_json(model), baseline=baseline)
    get_run_logger().info("[compare] eval %s %s", unit, "reused" if reused else "done")
    return unit


@task(name="compare-report", cache_policy=NO_CACHE, persist_result=False)
def compare_report_task(run_dir: str) -> str:
    from tasks.compare import write_compare_report

    paths = write_compare_report(Path(run_dir))
    publish_compare_artifacts(paths)
    return str(paths["markdown"])


def publish_compare_artifacts(paths: dict[str, Path]) -> None:
    """The headline table, the key plot and the full Markdown report, shown in the Prefect UI."""
    import base64

    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tasks.compare import summary_rows
    from tasks.core.common import read_json
    from tasks.report import plots

    data = read_json(paths["json"])
    columns, rows = summary_rows(data)
    create_table_artifact(key="pkdq-orderings", table=[dict(zip(columns, r, strict=True))
                                                       for r in rows],
                          description="final model of each ordering (pkdq compare)")
    base_ppl = data["baseline"]["ppl"]
    series = {o["name"]: [("baseline", base_ppl)] + [
        (s["label"], s["ppl"]) for s in o["steps"] if s["ppl"] is not None]
        for o in data["orderings"]}
    if base_ppl is not None:
        png = plots.quality_per_stage(series, "WikiText-2 perplexity", base_ppl)
        create_markdown_artifact(key="pkdq-orderings-plot", markdown=(
            f"![perplexity per step](data:image/png;base64,{base64.b64encode(png).decode()})"),
            description="WikiText-2 perplexity after each step, one line per ordering")
    create_markdown_artifact(key="pkdq-orderings-report", markdown=paths["markdown"].read_text(),
                             description=f"full comparison report ({paths['html']})")


def _ensure_folder(future: Any, run_dir: str) -> None:
    """A result (cached or not) whose model folder changed or vanished must not be trusted: the
    same integrity check as a unit's reuse (`tasks.core.model_folder.check_folder`)."""
    model = future.result()
    problem = check_folder(Path(model["path"]), model["fingerprint"], label=model["path"])
    if problem:
        raise RuntimeError(f"{problem} after its step finished; rerun the comparison in "
                           f"{run_dir} to recompute it")


REFRESH: dict[str, Any] = {"refresh_cache": True}


def _cache_options(folder: Path, label: str, filename: str = STAGE_FILE,
                   check_model: bool = True) -> dict[str, Any]:
    """Task options for a unit's first task run in this flow: a Prefect cache record may only
    stand in for a unit whose folder is finished and intact, so otherwise the cache is refreshed
    (the task runs, and `run_unit` recomputes what changed). Later task runs of the same unit
    in this flow keep the cache: the first one has just made the folder whole."""
    record, why = intact_record(folder, filename, check_model)
    if record is not None:
        return {}
    if why:
        print(f"[compare] {label}: {why}: not taken from the Prefect cache", flush=True)
    return REFRESH


@flow(name="pkdq-compare", log_prints=True)
def compare_flow(recipe_file: str, run_dir: str, orders: list[str]) -> str:
    """Baseline eval, then every ordering's steps and evals, then the comparison report.

    The folder is held for the whole flow (one writer; `hold_run_folder`), as in the compress
    flow.
    """
    with hold_for_flow(run_dir, "pkdq compare", recipe_file):
        return _compare(recipe_file, run_dir, orders)


def _compare(recipe_file: str, run_dir: str, orders: list[str]) -> str:
    recipe = load_recipe(recipe_file)
    check_machine(recipe.resources)
    base = resolve_model(recipe.model)
    orderings = [plan_ordering(recipe, order) for order in orders]
    root = Path(run_dir)
    info = init_compare(root, recipe, recipe_file, base, orderings,
                        concurrency=_concurrency_of_runner())
    first = shared_prefixes(orderings, base.fingerprint, recipe.seed)
    digest = _eval_digest(recipe)
    futures: list[Any] = [eval_unit_task.with_options(
        name="eval baseline", **_cache_options(baseline_folder(root), "baseline eval", EVAL_DONE,
                                               check_model=False)).submit(
        run_dir, digest, baseline_folder(root).name, base.to_json(), baseline=True)]
    by_unit: dict[str, Any] = {}  # unit -> the first step future computing it
    evals: dict[str, Any] = {}
    try:
        refreshed: set[str] = set()  # units whose Prefect cache record is not trusted
        for ordering, described in zip(orderings, info["orderings"], strict=True):
            upstream: Any = base.to_json()
            stale = False  # an earlier step of this ordering was not taken from the cache
            ids = ordering.unit_ids(base.fingerprint, recipe.seed)
            for index, (step, uid) in enumerate(zip(ordering.steps, ids, strict=True)):
                unit = unit_folder(root, uid, step.role).name
                name = f"{ordering.name} {index + 1}:{step.label}"
                earlier = by_unit.get(unit)
                if earlier is not None:
                    print(f"[compare] {name}: same unit {unit} as {first[uid]}: Prefect cache "
                          "hit, not recomputed", flush=True)
                folder = root / "units" / unit
                options: dict[str, Any] = {}
                if earlier is None:  # after an upstream refresh, run_unit checks the key
                    options = REFRESH if stale else _cache_options(folder, unit)
                    if options:
                        refreshed.add(unit)
                stale = stale or unit in refreshed
                future = step_task.with_options(name=name, **options).submit(
                    run_dir, ordering.name, index, upstream, base.to_json(), unit,
                    wait_for=[earlier] if earlier is not None else None)
                earlier_eval = evals.get(unit)
                eval_options: dict[str, Any] = {}
                if earlier_eval is None:  # a recomputed step clears its folder's evaluation
                    eval_options = REFRESH if unit in refreshed else _cache_options(
                        folder, f"{unit} eval", EVAL_DONE, check_model=False)
                evaluation = eval_unit_task.with_options(name=f"eval {name}",
                                                         **eval_options).submit(
                    run_dir, digest, unit, future,
                    wait_for=[earlier_eval] if earlier_eval is not None else None)
                futures += [future, evaluation]
                by_unit.setdefault(unit, future)
                evals.setdefault(unit, evaluation)
                upstream = future
            assert described["name"] == ordering.name
        wait(futures)
        failed = [f for f in futures if f.state.is_failed() or f.state.is_crashed()]
        for future in by_unit.values():
            if not future.state.is_failed():
                _ensure_folder(future, run_dir)
        if failed:
            for f in failed:
                f.result()  # raises the first failure with its own traceback
    except BaseException as exc:
        mark_compare(root, "failed", error=f"{type(exc).__name__}: {exc}")
        compare_report_task(run_dir)  # what finished is still worth reading
        raise
    mark_compare(root, "finished")
    return compare_report_task(run_dir)


def _concurrency_of_runner() -> int:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    runner = getattr(ctx, "task_runner", None) if ctx else None
    return int(getattr(runner, "_max_workers", None) or getattr(runner, "max_workers", 1) or 1)


def run_compare(recipe_file: str, run_dir: str, orders: list[str], concurrency: int = 1) -> str:
    """Run the flow with a task runner sized for `concurrency` orderings at once."""
    runner = ThreadPoolTaskRunner(max_workers=max(1, concurrency))
    return compare_flow.with_options(task_runner=runner)(recipe_file, run_dir, orders)
