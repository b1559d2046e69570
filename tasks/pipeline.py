"""Plan a recipe into numbered stage folders and run each unit once, resumably.

Flows call these; they also run without Prefect (tests, notebooks). Each unit (a stage, or the
evaluation of a stage's model) is keyed by content, so a rerun reuses every finished unit.
The plan holds every decision a run makes (which stage runs where, which model teaches KD), so
flows only wire; the validated recipe is frozen in the run file once and every unit reads it
from there (`frozen_recipe`), never from the user's YAML, which may change while a run goes on.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.core.common import (
    CHECKPOINT_DIR,
    GGUF_FILE,
    LLAMA_CPP_FILE,
    LLAMA_CPP_ROUNDS_FILE,
    ModelRef,
    StageContext,
    StageResult,
    data_dir,
    one_line,
    read_json,
    write_json_atomic,
)
from tasks.core.contamination import refusal
from tasks.core.disk_full import DiskFullError, disk_full_error, is_disk_full
from tasks.core.recipe import DataSpec, Recipe, parse_recipe
from tasks.core.resources import Resources, settle_for_machine
from tasks.core.text_sources import DataError, load_corpus
from tasks.run_folder import (
    EVAL_FILE,
    STAGE_FILE,
    begin_stage,
    check_finished,
    data_fingerprint,
    finish_record,
    package_versions,
    stage_key,
)

BASELINE = "baseline"
RUN_FILE = "run.json"
EVAL_DONE = EVAL_FILE + ".done"  # an evaluation's record, beside its stage's stage.json
LLAMA_CPP_DONE = LLAMA_CPP_FILE + ".done"
LLAMA_CPP_WORK = "llama_cpp"  # the GGUF being timed; removed once timed
LLAMA_CPP_ROUNDS_DONE = LLAMA_CPP_ROUNDS_FILE + ".done"
LLAMA_CPP_ROUNDS_WORK = "llama_cpp_rounds"  # the GGUFs timed side by side; removed once timed


@dataclass(frozen=True)
class PlannedStage:
    index: int
    kind: str
    config: Any  # the stage's pydantic config; None for the baseline
    teacher: int | None = None  # distill: index of the stage whose output model teaches

    @property
    def folder(self) -> str:
        return f"{self.index:02d}-{self.kind}"


def plan(recipe: Recipe) -> list[PlannedStage]:
    """The baseline, then the recipe's stages in order, each with its teacher when it has one.

    KD's teacher is the model as it was before the most recent prune stage (the base model when
    nothing was pruned): what the student lost by pruning is what it should learn back.
    """
    stages = [PlannedStage(0, BASELINE, None)]
    before_prune = 0  # the base model is stage 0's output
    for i, (kind, config) in enumerate(recipe.stage_list(), start=1):
        if kind == "prune":
            before_prune = i - 1
        stages.append(PlannedStage(i, kind, config,
                                   teacher=before_prune if kind == "distill" else None))
    return stages


def frozen_recipe(run_file: Path) -> Recipe:
    """The recipe a run or comparison was started with, as frozen in its run file."""
    return parse_recipe(read_json(run_file)["recipe"], source=str(run_file))


def stage_runner(kind: str, resources: Resources | None = None
                 ) -> Callable[[ModelRef, Any, StageContext], StageResult]:
    """Import lazily: each stage pulls heavy libraries the others don't need.

    Distill runs in-process, or under torchrun when `resources.distill` asks for several
    processes or a GPU (`tasks.distill.launch`); the result is the same StageResult either way.
    """
    if kind == "prune":
        from tasks.prune import prune_stage

        return prune_stage
    if kind == "distill":
        from tasks.distill import distill_runner

        return distill_runner(resources.distill if resources else None)
    if kind == "quantize":
        from tasks.quantize import quantize_stage

        return quantize_stage
    raise ValueError(f"unknown stage kind '{kind}'")


def write_run_file(path: Path, recipe: Recipe, source: str, base: ModelRef,
                   **fields: Any) -> dict[str, Any]:
    """Write a run's JSON header: what a reader needs to reproduce it (recipe, versions,
    fingerprints), counting attempts so a resumed run says so. Used by runs and comparisons."""
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = read_json(path) if path.is_file() else {}
    data = data_dir()
    info = {
        "run_id": path.parent.name,
        "recipe_source": source,
        "recipe": recipe.model_dump(mode="json"),
        "seed": recipe.seed,
        "threads": recipe.threads,
        "model": {"spec": recipe.model, **base.to_json()},
        "data": {"path": str(data), "fingerprint": data_fingerprint(data)},
        "versions": package_versions(),
        **fields,
        "created": previous.get("created", datetime.now(UTC).isoformat()),
        "attempts": previous.get("attempts", 0) + 1,
        "status": "running",
    }
    write_json_atomic(path, info)
    return info


def mark_run_file(path: Path, status: str, **extra: Any) -> None:
    info = read_json(path)
    info.update(status=status, **extra)
    write_json_atomic(path, info)


def init_run(run_dir: Path, recipe: Recipe, source: str, base: ModelRef,
             **fields: Any) -> dict[str, Any]:
    """Write run.json (see `write_run_file`) with the run's stage folders."""
    return write_run_file(run_dir / RUN_FILE, recipe, source, base,
                          stages=[s.folder for s in plan(recipe)], **fields)


def mark_run(run_dir: Path, status: str, **extra: Any) -> None:
    mark_run_file(run_dir / RUN_FILE, status, **extra)


def unit_context(folder: Path, name: str, recipe: Recipe,
                 teacher: ModelRef | None) -> StageContext:
    return StageContext(out_dir=folder, seed=recipe.seed, threads=recipe.threads,
                        data=data_dir(), teacher=teacher, stage_name=name)


def run_unit(folder: Path, name: str, kind: str, config: Any, recipe: Recipe,
             input_ref: ModelRef, teacher: ModelRef | None,
             extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], bool]:
    """Run one stage into `folder` unless an identical, intact finished one is there:
    (record, reused).

    Shared by the compress flow (numbered stage folders) and the ordering comparison (unit
    folders shared by orderings with a common prefix). A finished unit whose files changed since
    it finished is run again, with one line naming the file; a full disk ends the unit with a
    one-line DiskFullError and removes its unfinished attempt, so a rerun starts clean.
    """
    config = settle_for_machine(kind, config, recipe.resources)
    extra = dict(extra or {})
    if kind == "distill" and teacher:
        extra["teacher"] = teacher.fingerprint
    spec = stage_data(kind, config)
    content = data_content_key(spec)
    if content is not None:
        extra["data"] = content
    key = stage_key(kind, input_ref.fingerprint, config.model_dump(mode="json"), recipe.seed,
                    extra or None)
    record, why = check_finished(folder, key)
    if record is not None:
        print(f"[{name}] finished earlier (key {key}): reused", flush=True)
        return record, True
    if why:
        print(f"[{name}] finished earlier but {why}: recomputing", flush=True)
    overlap = stage_contamination(spec, recipe, name)
    begin_stage(folder)
    print(f"[{name}] starting", flush=True)
    started = time.perf_counter()
    with _unfinished_on_disk_full(folder):
        result = stage_runner(kind, recipe.resources)(input_ref, config,
                                                      unit_context(folder, name, recipe, teacher))
        metrics = {"stage": kind, "input": input_ref.to_json(), **result.metrics,
                   "stage_wall_s": time.perf_counter() - started}
        if overlap is not None:
            metrics["contamination"] = overlap
        write_json_atomic(folder / "metrics.json", metrics)
        return finish_record(folder, key, result.model, metrics,
                             files=_unit_files(folder, result.model)), False


def data_content_key(spec: DataSpec | None) -> str | None:
    """The content fingerprint of a user's data for a unit's key, so an edited file is never
    served from a cache keyed on its path; None for no data or the bundled text (whose keys
    predate data sources and stay as they were)."""
    if spec is None or spec.kind == "builtin":
        return None
    return load_corpus(spec, data_dir()).fingerprint


def stage_data(kind: str, config: Any) -> DataSpec | None:
    """The training text a stage reads (None: it reads none, e.g. data-free pruning, RTN)."""
    if kind == "distill":
        return config.spec()
    if kind == "prune" and config.needs_calibration():
        return config.calibration.spec()
    if kind == "quantize":
        return config.calibration.spec()
    return None


def stage_contamination(spec: DataSpec | None, recipe: Recipe, name: str
                        ) -> dict[str, Any] | None:
    """The overlap of the stage's training text with the evaluation sets the recipe scores
    (cached: `pkdq validate` has usually measured it). Refuses in one line above the threshold
    unless the recipe allows it, before the stage trains or calibrates on anything."""
    from tasks.evaluate import training_overlap

    if spec is None:
        return None
    cfg = recipe.contamination
    try:
        report = training_overlap(spec, recipe.evaluate, data_dir(), cfg.ngram)
    except (ValueError, OSError, KeyError, TypeError) as exc:  # an unreadable benchmark file
        return {"unchecked": one_line(exc, limit=200, with_type=False)}
    line = refusal(report, cfg.threshold, name)
    if line and not cfg.allow_overlap:
        raise ContaminationError(line)
    return {**report, "threshold": cfg.threshold, "allow_overlap": cfg.allow_overlap}


class ContaminationError(DataError):
    """A stage's training text overlaps an evaluation set above the threshold (one line)."""


def _unit_files(folder: Path, model: ModelRef | None) -> list[str]:
    """Every file a stage left in its folder, outside its sealed model folder (which carries its
    own manifest): metrics, loss curves, a GGUF export."""
    skip = model.path.resolve() if model else None
    files = []
    for file in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        if skip is not None and file.resolve().is_relative_to(skip):
            continue
        rel = file.relative_to(folder).as_posix()
        if file.name != STAGE_FILE and not rel.startswith(f"{CHECKPOINT_DIR}/"):
            files.append(rel)
    return files


@contextmanager
def _unfinished_on_disk_full(attempt: Path) -> Iterator[None]:
    """A full disk: raise one line naming the file, after clearing the unfinished `attempt` as
    `begin_stage` would (its half-written files hold the space the user is asked to free; no
    record names them). A KD stage's last complete checkpoint stays, so the rerun resumes from
    it; only a checkpoint file cut short (`*.tmp`) goes."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc, attempt):
            raise
        error = disk_full_error(exc, attempt)
        begin_stage(attempt)
        for partial in (attempt / CHECKPOINT_DIR).glob("*.tmp"):
            partial.unlink(missing_ok=True)
        raise error from (None if isinstance(exc, DiskFullError) else exc)


def run_stage(run_dir: Path, stage: PlannedStage, recipe: Recipe, input_ref: ModelRef,
              teacher: ModelRef | None) -> tuple[dict[str, Any], bool]:
    """Run one stage unless an identical finished one exists; returns (record, reused).

    The stage's model folder gets its model card (README.md) now, rewritten with the
    retention table once the evaluation exists (`evaluate_stage`).
    """
    out = run_unit(run_dir / stage.folder, stage.folder, stage.kind, stage.config, recipe,
                   input_ref, teacher)
    write_stage_card(run_dir, stage.folder, recipe)
    return out


def write_stage_card(run_dir: Path, folder: str, recipe: Recipe) -> Path | None:
    """README.md (the model card) in a stage's model folder, from the run folder's records.

    A card that cannot be written costs the run nothing but the card: one line says why, and
    the next evaluation or rerun writes it again.
    """
    from tasks.core.model_store import source_metadata
    from tasks.report import write_card

    try:
        return write_card(run_dir, folder, source_metadata(recipe.model))
    except Exception as exc:  # noqa: BLE001 - documentation must never fail a finished stage
        print(f"[{folder}] model card not written: {one_line(exc, limit=200)}", flush=True)
        return None


def _reuse_or_reset(folder: Path, key: str, done: str, what: str,
                    required: str | None = None) -> dict[str, Any] | None:
    """The finished record of a unit sealed by `done` whose key matches, else None after
    removing the seal (saying why when it was there), so the unit runs again from scratch."""
    record, why = check_finished(folder, key, done, check_model=False)
    if record is not None and required and not (folder / required).is_file():
        record, why = None, f"{required} is missing"  # a record listing no files
    if record is not None:
        print(f"{what} finished earlier: reused", flush=True)
        return record
    if why:
        print(f"{what} finished earlier but {why}: recomputing", flush=True)
    (folder / done).unlink(missing_ok=True)
    return None


def evaluate_unit(folder: Path, name: str, recipe: Recipe, model: ModelRef,
                  baseline: bool = False) -> tuple[dict[str, Any], bool]:
    """Evaluate a model into `folder` once per (model fingerprint, eval config, seed); an
    evaluation whose eval.json or per-doc samples changed since it finished is run again."""
    from tasks.evaluate import evaluate_model

    folder.mkdir(parents=True, exist_ok=True)
    key = stage_key("evaluate", model.fingerprint, recipe.evaluate.unit_config(), recipe.seed)
    record = _reuse_or_reset(folder, key, EVAL_DONE, f"[{name}] evaluation", EVAL_FILE)
    if record is not None:
        return record, True
    print(f"[{name}] evaluating {model.path.name}", flush=True)
    out_dir = folder / "eval"
    begin_stage(out_dir)
    with _unfinished_on_disk_full(out_dir):
        metrics = evaluate_model(model.path, recipe.evaluate, out_dir, data=data_dir(),
                                 seed=recipe.seed, threads=recipe.threads)
        write_json_atomic(folder / EVAL_FILE, metrics)
        files = [EVAL_FILE] + [f"eval/{p.relative_to(out_dir).as_posix()}"
                               for p in sorted(out_dir.rglob("*")) if p.is_file()]
        if baseline:
            write_json_atomic(folder / "metrics.json",
                              {"stage": BASELINE, "model": model.to_json()})
            files.append("metrics.json")
        return finish_record(folder, key, model, {"eval": EVAL_FILE}, EVAL_DONE,
                             files=files), False


def llama_cpp_unit(folder: Path, name: str, recipe: Recipe,
                   model: ModelRef) -> tuple[dict[str, Any] | None, bool]:
    """Time `model` in llama.cpp as each GGUF type `evaluate.speed.llama_cpp` lists, into
    `folder`/llama_cpp.json, once per (model fingerprint, types, prompt, threads): (record,
    reused); (None, False) when the recipe does not ask for it.

    The GGUF files are written into `llama_cpp/`, emptied first (a file an interrupted attempt
    left is never timed) and removed once timed: one on disk at a time. An architecture the
    exporter cannot write is recorded in one line and sealed like a measurement; llama.cpp
    failing (the runtime, not the model) is recorded but not sealed, so a rerun tries again.
    Neither fails the run.
    """
    from tasks.core.model_store import read_config
    from tasks.quantize import gguf_speed_rows

    speed = recipe.evaluate.speed
    if not speed.llama_cpp_on():
        return None, False
    types = list(speed.llama_cpp.types)
    config = {"types": types, "prompt_tokens": speed.prompt_tokens,
              "new_tokens": speed.new_tokens, "repeats": speed.repeats,
              "threads": recipe.threads}
    shipped = folder / GGUF_FILE  # a quantize stage's own GGUF: timed as it ships
    if shipped.is_file():  # (keyed only when present: other stages keep their keys)
        from tasks.core.model_folder import file_digest

        config["shipped_gguf"] = list(file_digest(shipped))
    key = stage_key("llama_cpp_speed", model.fingerprint, config, recipe.seed)
    record = _reuse_or_reset(folder, key, LLAMA_CPP_DONE, f"[{name}] llama.cpp speed")
    if record is not None:
        return record, True
    (folder / LLAMA_CPP_FILE).unlink(missing_ok=True)
    print(f"[{name}] llama.cpp speed: {', '.join(types)} GGUF of {model.path.name}", flush=True)
    prompt = speed.prompt_within(read_config(model.path).get("max_position_embeddings"))
    work = folder / LLAMA_CPP_WORK
    begin_stage(work)
    started, load = time.perf_counter(), os.getloadavg()[0]
    try:
        with _unfinished_on_disk_full(work):
            measured = gguf_speed_rows(model.path, types, work, prompt, speed.new_tokens,
                                       recipe.threads, speed.repeats,
                                       shipped if shipped.is_file() else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"model_path": str(model.path), **config, "prompt_tokens": prompt, **measured,
              # other processes on the CPU slow every rate; the run cannot know whether they
              # ran, the load average before timing is the one hint it has
              "load_average_1m_before": load, "cpus": os.cpu_count(),
              "wall_s": time.perf_counter() - started}
    write_json_atomic(folder / LLAMA_CPP_FILE, result)
    for line in _llama_cpp_lines(result):
        print(f"[{name}] {line}", flush=True)
    if any("error" in row for row in result["rows"]):
        return None, False
    return finish_record(folder, key, model, {"llama_cpp": LLAMA_CPP_FILE}, LLAMA_CPP_DONE,
                         files=[LLAMA_CPP_FILE]), False


def _llama_cpp_lines(result: dict[str, Any]) -> list[str]:
    """What the terminal shows of a llama.cpp speed unit: a line per type, or the refusal."""
    if result.get("refused"):
        return [f"llama.cpp speed not measured: {result['refused']}"]
    lines = []
    for row in result["rows"]:
        if "prefill_tok_s" in row:
            lines.append(f"llama.cpp {row['type']} ({row['grid']}, "
                         f"{row['file_bytes'] / 1e6:,.1f} MB): prefill "
                         f"{row['prefill_tok_s']:,.0f} tok/s, decode {row['decode_tok_s']:.1f} "
                         f"tok/s, peak RSS {row['peak_rss_mb']:,.0f} MB")
        else:
            lines.append(f"llama.cpp {row['type']}: not measured: "
                         f"{row.get('refused') or row.get('error')}")
    return lines


def llama_cpp_rounds_unit(run_dir: Path, recipe: Recipe, base: ModelRef, final: ModelRef
                          ) -> tuple[dict[str, Any] | None, bool]:
    """The baseline's and the final stage's GGUFs (each type `evaluate.speed.llama_cpp` lists,
    and the final stage's own model.gguf) timed side by side in interleaved rounds, once per
    (both fingerprints, types, rounds, prompt, threads): (record, reused); (None, False) when
    the recipe does not ask for it or llama.cpp failed (recorded, not sealed: a rerun tries
    again).

    The per-stage units time each stage minutes apart, on a machine whose speed drifts by more
    than the goal's margins; the report judges the speed goal on these rounds instead
    (`tasks.quantize.speed_rounds`). Written into the final stage's folder, so a rerun of that
    stage (which clears its folder) also drops them. Never fails the run.
    """
    from tasks.core.model_folder import file_digest
    from tasks.core.model_store import read_config
    from tasks.quantize import time_side_by_side

    speed = recipe.evaluate.speed
    stages = plan(recipe)
    if not speed.llama_cpp_on() or not speed.llama_cpp.rounds or len(stages) < 2:
        return None, False
    base_folder, final_folder = stages[0].folder, stages[-1].folder
    folder = run_dir / final_folder
    config = {"types": list(speed.llama_cpp.types), "rounds": speed.llama_cpp.rounds,
              "prompt_tokens": speed.prompt_tokens, "new_tokens": speed.new_tokens,
              "threads": recipe.threads, "baseline": base.fingerprint}
    shipped = folder / GGUF_FILE
    if shipped.is_file():
        config["shipped_gguf"] = list(file_digest(shipped))
    what = f"[{final_folder}] llama.cpp side by side"
    key = stage_key("llama_cpp_rounds", final.fingerprint, config, recipe.seed)
    record = _reuse_or_reset(folder, key, LLAMA_CPP_ROUNDS_DONE, what, LLAMA_CPP_ROUNDS_FILE)
    if record is not None:
        return record, True
    (folder / LLAMA_CPP_ROUNDS_FILE).unlink(missing_ok=True)
    print(f"{what}: {base_folder} and {final_folder}, {config['rounds']} interleaved rounds",
          flush=True)
    prompt = speed.prompt_within(read_config(final.path).get("max_position_embeddings"))
    work = folder / LLAMA_CPP_ROUNDS_WORK
    begin_stage(work)
    started = time.perf_counter()
    try:
        with _unfinished_on_disk_full(work):
            measured = time_side_by_side(
                {base_folder: base.path, final_folder: final.path}, config["types"], work,
                shipped if shipped.is_file() else None, config["rounds"], prompt,
                speed.new_tokens, recipe.threads,
                lambda line: print(f"{what}: {line}", flush=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {**config, "prompt_tokens": prompt, **measured, "cpus": os.cpu_count(),
              "wall_s": time.perf_counter() - started}
    write_json_atomic(folder / LLAMA_CPP_ROUNDS_FILE, result)
    if result.get("error"):
        print(f"{what}: not measured: {result['error']}", flush=True)
        return None, False
    record = finish_record(folder, key, final, {"llama_cpp_rounds": LLAMA_CPP_ROUNDS_FILE},
                           LLAMA_CPP_ROUNDS_DONE, files=[LLAMA_CPP_ROUNDS_FILE])
    write_stage_card(run_dir, final_folder, recipe)  # the card states these ratios too
    return record, False


def evaluate_stage(run_dir: Path, stage: PlannedStage, recipe: Recipe,
                   model: ModelRef) -> tuple[dict[str, Any], bool]:
    """Evaluate a stage's model once per (model fingerprint, eval config, seed), then time it in
    llama.cpp when the recipe asks (`llama_cpp_unit`); the stage's model card is rewritten with
    the scores."""
    out = evaluate_unit(run_dir / stage.folder, stage.folder, recipe, model,
                        baseline=stage.kind == BASELINE)
    llama_cpp_unit(run_dir / stage.folder, stage.folder, recipe, model)
    for other in plan(recipe)[1:]:  # the baseline's scores enter every stage's card
        if other.index == stage.index or stage.kind == BASELINE:
            write_stage_card(run_dir, other.folder, recipe)
    return out
