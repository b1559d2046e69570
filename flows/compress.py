"""The compress flow: one Prefect flow per run, one task per stage and per evaluation.

Tasks pass ModelRefs (paths + fingerprints), never model objects: a 135M model as a Prefect result
is a 736 MB pickle. Resuming is the run folder's job (tasks.pipeline), so Prefect result caching is
off; a reused unit shows up in the task's log and in the run log. The flow reads the user's recipe
once and freezes it in run.json; tasks read that frozen copy, and the plan (`tasks.pipeline.plan`)
says which model feeds and teaches each stage: this file only wires.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.holding import hold_for_flow
from tasks.core.common import ModelRef
from tasks.core.model_store import resolve_model
from tasks.core.recipe import RecipeError, load_recipe
from tasks.core.resources import check_machine
from tasks.pipeline import (
    BASELINE,
    RUN_FILE,
    evaluate_stage,
    frozen_recipe,
    init_run,
    llama_cpp_rounds_unit,
    mark_run,
    plan,
    run_stage,
)
from tasks.rules import recipe_errors
from tasks.search import prune_target_index


@task(name="resolve-model", cache_policy=NO_CACHE, persist_result=False)
def resolve_task(spec: str) -> dict[str, str]:
    return resolve_model(spec).to_json()


@task(cache_policy=NO_CACHE, persist_result=False)
def stage_task(run_dir: str, index: int, input_ref: dict[str, str],
               teacher: dict[str, str] | None) -> dict[str, Any]:
    recipe = frozen_recipe(Path(run_dir) / RUN_FILE)
    stage = plan(recipe)[index]
    record, reused = run_stage(Path(run_dir), stage, recipe, ModelRef.from_json(input_ref),
                               ModelRef.from_json(teacher) if teacher else None)
    get_run_logger().info("[%s] %s", stage.folder,
                          "reused (finished earlier)" if reused else "done")
    return record


@task(cache_policy=NO_CACHE, persist_result=False)
def eval_task(run_dir: str, index: int, model: dict[str, str]) -> dict[str, Any]:
    recipe = frozen_recipe(Path(run_dir) / RUN_FILE)
    stage = plan(recipe)[index]
    record, reused = evaluate_stage(Path(run_dir), stage, recipe, ModelRef.from_json(model))
    get_run_logger().info("[%s] evaluation %s", stage.folder, "reused" if reused else "done")
    return record


@task(name="llama-cpp-rounds", cache_policy=NO_CACHE, persist_result=False)
def rounds_task(run_dir: str, base: dict[str, str], final: dict[str, str]) -> None:
    recipe = frozen_recipe(Path(run_dir) / RUN_FILE)
    llama_cpp_rounds_unit(Path(run_dir), recipe, ModelRef.from_json(base),
                          ModelRef.from_json(final))


@task(name="report", cache_policy=NO_CACHE, persist_result=False)
def report_task(run_dir: str) -> str:
    from flows.artifacts import publish_report_artifacts
    from tasks.core.common import read_json
    from tasks.report import quality_figures, write_report

    paths = write_report(Path(run_dir))
    create_markdown_artifact(key="pkdq-retention", markdown=paths["markdown"].read_text(),
                             description=f"pkdq retention report for {Path(run_dir).name}")
    data = read_json(paths["json"])
    publish_report_artifacts(data, quality_figures({data["run"]["run_id"]: data}))
    return str(paths["markdown"])


# One task at a time: stages run in order anyway, and a budget search's candidates (submitted
# as futures) load models in threads, which transformers' meta-device init does not survive.
@flow(name="pkdq-compress", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def compress_flow(recipe_file: str, run_dir: str) -> str:
    """Baseline eval, then each stage and its eval in recipe order, the baseline and final
    GGUFs timed side by side, then the report.

    The run folder is held for the whole flow (one writer; `hold_run_folder`), here rather than
    in the CLI alone so that a run a pool worker picks up is covered too.
    """
    with hold_for_flow(run_dir, "pkdq run", recipe_file):
        return _compress(recipe_file, run_dir)


def _compress(recipe_file: str, run_dir: str) -> str:
    recipe = load_recipe(recipe_file)
    check_machine(recipe.resources)  # on the machine that runs it, before any stage starts
    errors = recipe_errors(recipe)  # model, data, prune targets: here too for pool workers
    if errors:
        raise RecipeError(f"{recipe_file}: {errors[0].message}")
    base = ModelRef.from_json(resolve_task(recipe.model))
    search: dict[str, Any] = {}
    if prune_target_index(recipe) is not None:  # a budget: the search picks the prune shape
        from flows.search import resolved_recipe, run_search_here

        result = run_search_here(recipe, recipe_file, Path(run_dir) / "search", base)
        recipe = resolved_recipe(result, recipe_file)
        search = {"search": {"winner": result["rows"][result["winner"]]["label"],
                             "folder": "search", "target": result["plan"]["target"]}}
    init_run(Path(run_dir), recipe, recipe_file, base, **search)
    outputs: dict[int, ModelRef] = {}  # stage index -> the model it produced
    try:
        for stage in plan(recipe):
            if stage.kind == BASELINE:
                outputs[stage.index] = base
            else:
                teacher = outputs[stage.teacher] if stage.teacher is not None else None
                record = stage_task.with_options(name=stage.folder)(
                    run_dir, stage.index, outputs[stage.index - 1].to_json(),
                    teacher.to_json() if teacher else None)
                outputs[stage.index] = ModelRef.from_json(record["model"])
            eval_task.with_options(name=f"eval-{stage.folder}")(
                run_dir, stage.index, outputs[stage.index].to_json())
        current = outputs[max(outputs)]
        rounds_task(run_dir, base.to_json(), current.to_json())  # the speed goal's timing
    except BaseException as exc:
        mark_run(Path(run_dir), "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    mark_run(Path(run_dir), "finished", final_model=current.to_json())
    return report_task(run_dir)  # after marking, so the report shows the final status

