"""A sweep's folder: one unit per distinct step of any variant, plus each variant's score.

    <sweep>/sweep.json             recipe, grid, variants and their unit folders, status
    <sweep>/units/<id>-<role>/     a step's model and metrics (the compare layout: a unit id
                                   hashes the whole path from the base model, so variants that
                                   share a prefix, e.g. the prune stage, share its unit)
    <sweep>/units/<id>-<role>/heldout.json   the final model's held-out score (selection)
    <sweep>/sweep.md sweep.json sweep.png winner.yaml

Units run through `tasks.pipeline.run_unit` (via the compare folder), so a crashed sweep resumes
like a run: finished units are reused, a half-written one is redone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.compare import KIND_LETTER, Ordering, plan_ordering, run_ordering_step, unit_folder
from tasks.core.common import ModelRef, StageContext, data_dir, write_json_atomic
from tasks.core.recipe import DistillConfig, Recipe
from tasks.pipeline import data_content_key, mark_run_file, write_run_file
from tasks.run_folder import check_finished, finish_record, stage_key
from tasks.sweep.grid import Variant

SWEEP_FILE = "sweep.json"
SCORE_FILE = "heldout.json"
SCORE_DONE = SCORE_FILE + ".done"


def variant_ordering(recipe: Recipe) -> Ordering:
    """The variant's stages in its own (P-KD-Q) order, as compare steps: same unit ids for the
    same path, so a sweep and a comparison of one recipe even share units' meaning."""
    order = "-".join(KIND_LETTER[kind] for kind, _ in recipe.stage_list())
    return plan_ordering(recipe, order)


def score_config(recipe: Recipe) -> DistillConfig:
    """One ruler for every variant: the base recipe's KD held-out settings (or KD's defaults)."""
    for kind, cfg in recipe.stage_list():
        if kind == "distill":
            return cfg
    return DistillConfig()


def describe(variants: list[Variant], base: ModelRef, run_dir: Path) -> list[dict[str, Any]]:
    out = []
    for variant in variants:
        ordering = variant_ordering(variant.recipe)
        ids = ordering.unit_ids(base.fingerprint, variant.recipe.seed)
        out.append({"label": variant.label,
                    "settings": {key: value for key, value in variant.settings},
                    "units": [unit_folder(run_dir, uid, step.role).name
                              for uid, step in zip(ids, ordering.steps, strict=True)]})
    return out


def init_sweep(run_dir: Path, recipe: Recipe, source: str, base: ModelRef,
               plan: dict[str, Any], variants: list[Variant], **fields: Any) -> dict[str, Any]:
    """Write sweep.json: the frozen recipe and grid (tasks rebuild the variants from it)."""
    return write_run_file(Path(run_dir) / SWEEP_FILE, recipe, source, base, kind="sweep",
                          **plan, variants=describe(variants, base, Path(run_dir)), **fields)


def mark_sweep(run_dir: Path, status: str, **extra: Any) -> None:
    mark_run_file(Path(run_dir) / SWEEP_FILE, status, **extra)


def run_variant_step(run_dir: Path, variant: Variant, index: int, input_ref: ModelRef,
                     base: ModelRef) -> tuple[dict[str, Any], bool]:
    """Run (or reuse) step `index` of a variant; KD's teacher is the base model (P-KD-Q)."""
    return run_ordering_step(Path(run_dir), variant.recipe, variant_ordering(variant.recipe),
                             index, input_ref, base)


def score_unit(folder: Path, model: ModelRef, teacher: ModelRef, cfg: DistillConfig,
               recipe: Recipe) -> tuple[dict[str, Any], bool]:
    """Held-out score of a unit's model, once per (model, teacher, ruler, seed): (score, reused)."""
    from tasks.distill import heldout_score

    folder = Path(folder)
    # the held-out slice is part of the ruler: its source spec, and its content for user data
    ruler = {"seq_len": cfg.seq_len, "eval_blocks": cfg.eval_blocks,
             "batch_size": cfg.batch_size, "teacher": teacher.fingerprint,
             "data": cfg.spec().model_dump(mode="json"), "masked": cfg.masked(),
             "data_content": data_content_key(cfg.spec())}
    key = stage_key("heldout-score", model.fingerprint, ruler, recipe.seed)
    record, _ = check_finished(folder, key, SCORE_DONE, check_model=False)
    if record is not None:
        return record["metrics"], True
    (folder / SCORE_DONE).unlink(missing_ok=True)
    ctx = StageContext(out_dir=folder, seed=recipe.seed, threads=recipe.threads, data=data_dir(),
                       teacher=teacher, stage_name=f"score {folder.name}")
    score = heldout_score(model, teacher, cfg, ctx)
    write_json_atomic(folder / SCORE_FILE, score)
    finish_record(folder, key, model, score, SCORE_DONE, files=[SCORE_FILE])
    return score, False
