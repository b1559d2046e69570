"""Perplexity right after pruning (no recovery), every axis x criterion at two sizes.

Run under the heavy-job lock (about 15 min on 2 cores):
    flock /tmp/pkdq-heavy.lock .venv/bin/python bench/prune_table.py --threads 2
Writes bench/results/prune_table.md (+ .json). Every importance score is computed once on the
unpruned model, then each cut is applied to a fresh copy and scored on the first `--tokens` tokens
of WikiText-2 test in non-overlapping `--max-length` windows.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.core.common import StageContext, data_dir, set_offline_env  # noqa: E402
from tasks.core.dims import Dims
from tasks.core.model_store import load_model, resolve_model  # noqa: E402
from tasks.core.recipe import (  # noqa: E402
    DepthTarget,
    FfnTarget,
    HeadsTarget,
    HiddenTarget,
    PruneConfig,
    TextSample,
)
from tasks.evaluate.stage import wikitext_perplexity  # noqa: E402
from tasks.prune.plan import plan_prune  # noqa: E402
from tasks.prune.stage import (  # noqa: E402
    AxisScores,
    Measurements,
    apply_plan,
    calibration_blocks,
    score_axes,
)
from tasks.prune.units import Anatomy, count_params  # noqa: E402

UNIT = ["activation", "magnitude", "magnitude_l2", "taylor", "random"]
DEPTH = ["block_influence", "ppl_skip", "random"]
LABEL = {"activation": "activation", "magnitude": "magnitude L1", "magnitude_l2": "magnitude L2",
         "taylor": "taylor", "random": "random", "block_influence": "block influence",
         "ppl_skip": "ppl skip"}
OUT = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Cut:
    """One row: a prune config without criteria (they are filled in per column)."""

    label: str
    cfg: PruneConfig


def width_rows() -> list[Cut]:
    return [
        Cut("FFN 25%", PruneConfig(ffn=FfnTarget(ratio=0.25))),
        Cut("FFN 50%", PruneConfig(ffn=FfnTarget(ratio=0.5))),
        Cut("KV groups 3->2", PruneConfig(heads=HeadsTarget(mode="kv_groups", size=2))),
        Cut("KV groups 3->1", PruneConfig(heads=HeadsTarget(mode="kv_groups", size=1))),
        Cut("query heads 3->2 per group", PruneConfig(heads=HeadsTarget(mode="query", size=2))),
        Cut("query heads 3->1 per group", PruneConfig(heads=HeadsTarget(mode="query", size=1))),
        Cut("hidden 576->512", PruneConfig(hidden=HiddenTarget(size=512))),
        Cut("hidden 576->448", PruneConfig(hidden=HiddenTarget(size=448))),
    ]


def depth_rows() -> list[Cut]:
    return [Cut("remove 6 of 30 layers", PruneConfig(depth=DepthTarget(remove=6))),
            Cut("remove 12 of 30 layers", PruneConfig(depth=DepthTarget(remove=12)))]


def budget_rows() -> list[Cut]:
    """About 20M of 135M parameters removed four ways (Minitron: width beats depth)."""
    return [
        Cut("depth: remove 6 layers", PruneConfig(depth=DepthTarget(remove=6))),
        Cut("FFN 1536->1152", PruneConfig(ffn=FfnTarget(size=1152))),
        Cut("width mix: hidden 512 + FFN 1408",
            PruneConfig(hidden=HiddenTarget(size=512), ffn=FfnTarget(size=1408))),
        Cut("heads: KV groups 3->2 + FFN 1536->1280",
            PruneConfig(heads=HeadsTarget(mode="kv_groups", size=2), ffn=FfnTarget(size=1280))),
    ]


def with_criterion(cfg: PruneConfig, unit: str, depth: str) -> PruneConfig:
    """The row's targets with one criterion on every axis (depth gets its own kind)."""
    fields = {axis: getattr(cfg, axis).model_copy(update={"criterion": depth if axis == "depth"
                                                          else unit})
              for axis in cfg.axes()}
    return cfg.model_copy(update=fields)


class Scores:
    """Every score of every (axis, criterion), measured once on the unpruned model.

    One activation pass, one gradient pass and one layer-skip sweep serve all of them; the
    gradients are released before any cut, so model copies don't carry them.
    """

    def __init__(self, model, blocks, seed: int, taylor_samples: int, skip_samples: int):
        measured = Measurements(Anatomy.of(model), blocks, taylor_samples, skip_samples,
                                stage="prune-table")
        self.cache: dict[tuple[str, str], AxisScores] = {}
        targets = {
            ("ffn", ""): lambda c: FfnTarget(ratio=0.5, criterion=c),
            ("hidden", ""): lambda c: HiddenTarget(ratio=0.5, criterion=c),
            ("heads", "kv_groups"): lambda c: HeadsTarget(mode="kv_groups", size=1, criterion=c),
            ("heads", "query"): lambda c: HeadsTarget(mode="query", size=1, criterion=c),
        }
        try:
            for (axis, mode), target in targets.items():
                for criterion in UNIT:
                    self._score(axis, mode, criterion, target(criterion), measured, seed)
            for criterion in DEPTH:
                self._score("depth", "", criterion, DepthTarget(remove=1, criterion=criterion),
                            measured, seed)
        finally:
            measured.release()

    def _score(self, axis: str, mode: str, criterion: str, target, measured, seed: int) -> None:
        t0 = time.perf_counter()
        cfg = PruneConfig(**{axis: target})
        self.cache[(f"{axis}:{mode}", criterion)] = score_axes(cfg, measured, seed)
        log(f"scored {axis} {mode} by {criterion} in {time.perf_counter() - t0:.1f}s")

    def for_config(self, cfg: PruneConfig) -> AxisScores:
        out = AxisScores()
        for axis in cfg.axes():
            target = getattr(cfg, axis)
            key = (f"{axis}:{target.mode if axis == 'heads' else ''}", target.criterion)
            out = replace(out, **{axis: getattr(self.cache[key], axis)})
        return out


def log(msg: str) -> None:
    print(f"[prune-table] {msg}", file=sys.stderr, flush=True)


def fmt(ppl: float) -> str:
    if ppl != ppl or ppl == float("inf"):
        return "inf"
    return f"{ppl:.1f}" if ppl < 1000 else f"{ppl:.2g}"


def run_row(base, scores: Scores, cut: Cut, criteria: list[tuple[str, str]], ppl,
            done: dict[str, tuple[float, int]]) -> dict:
    """Cut a copy of the model once per criterion column; returns ppl per column + params.

    `done` memoises (ppl, params) by config, so a cut repeated in another table is not rerun.
    """
    dims = Dims.from_config(base.config)
    result: dict = {"label": cut.label, "ppl": {}}
    for unit, depth in criteria:
        cfg = with_criterion(cut.cfg, unit, depth)
        plan = plan_prune(dims, cfg)
        column = depth if cut.cfg.axes() == ["depth"] else unit
        criteria = {axis: getattr(cfg, axis).criterion for axis in cfg.axes()}
        key = json.dumps([plan.after.to_json(), plan.heads_mode, criteria], sort_keys=True)
        if key not in done:
            model = copy.deepcopy(base)
            apply_plan(Anatomy.of(model), plan, scores.for_config(cfg))
            done[key] = (ppl(model), count_params(model))
            del model
        result["ppl"][column], result["params"] = done[key]
        result["after"] = plan.after.to_json()
        log(f"{cut.label} / {column}: ppl {result['ppl'][column]:.2f}")
    return result


def table(rows: list[dict], columns: list[str], base_params: int, title: str) -> list[str]:
    lines = [f"### {title}", "",
             "| cut | params (M) | " + " | ".join(LABEL[c] for c in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for row in rows:
        params = f"{row['params'] / 1e6:.1f} ({row['params'] / base_params:.0%})"
        lines.append(f"| {row['label']} | {params} | "
                     + " | ".join(fmt(row["ppl"][c]) for c in columns) + " |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--samples", type=int, default=32, help="calibration blocks")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--taylor-samples", type=int, default=8, help="blocks backpropagated")
    parser.add_argument("--skip-samples", type=int, default=8, help="ppl_skip blocks")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=OUT / "prune_table.md")
    args = parser.parse_args()

    set_offline_env()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    ref = resolve_model(args.model)
    base, tokenizer = load_model(ref)
    wikitext = data_dir() / "wikitext" / "wiki.test.raw"

    def ppl(model) -> float:
        return wikitext_perplexity(model, tokenizer, wikitext, args.tokens,
                                   args.max_length)["token_perplexity"]

    calibration = TextSample(samples=args.samples, seq_len=args.seq_len)
    ctx = StageContext(out_dir=Path("."), seed=args.seed)
    blocks = calibration_blocks(tokenizer, PruneConfig(ffn=FfnTarget(ratio=0.5),
                                                       calibration=calibration), ctx,
                                base.config)
    base_ppl, base_params = ppl(base), count_params(base)
    log(f"baseline ppl {base_ppl:.2f}, {base_params / 1e6:.1f}M params")
    scores = Scores(base, blocks, args.seed, args.taylor_samples, args.skip_samples)

    unit_cols = [(c, "random") for c in UNIT]
    depth_cols = [("random", c) for c in DEPTH]
    done: dict[str, tuple[float, int]] = {}
    width = [run_row(base, scores, cut, unit_cols, ppl, done) for cut in width_rows()]
    depth = [run_row(base, scores, cut, depth_cols, ppl, done) for cut in depth_rows()]
    paired = [("activation", "block_influence"), ("taylor", "ppl_skip"), ("random", "random")]
    budget = []
    for cut in budget_rows():
        row = run_row(base, scores, cut, paired, ppl, done)
        if cut.cfg.axes() == ["depth"]:  # one column per pairing: informed, second, control
            row["ppl"] = dict(zip(["activation", "taylor", "random"], row["ppl"].values(),
                                  strict=True))
        budget.append(row)
    wall = time.perf_counter() - start

    lines = [
        f"## Prune-only WikiText-2 perplexity: {args.model} (no recovery)", "",
        f"Baseline: perplexity **{fmt(base_ppl)}**, {base_params / 1e6:.1f}M parameters. "
        f"WikiText-2 test, first {args.tokens} tokens, {args.max_length}-token windows. "
        f"Calibration: {args.samples} x {args.seq_len} tokens of `train/wikipedia`; taylor "
        f"backpropagates {args.taylor_samples} of them, ppl skip scores each layer on "
        f"{args.skip_samples}. One-shot: scores on the unpruned model. "
        f"{args.threads} threads, {wall / 60:.1f} min.", "",
        *table(width, UNIT, base_params, "Width axes (every layer cut alike)"),
        *table(depth, DEPTH, base_params, "Depth"),
        "### Equal budget (~20M parameters removed): width vs depth", "",
        "Columns: informed = activation (width) / block influence (depth); second = taylor / "
        "perplexity-when-skipped; control = random.", "",
        "| cut | params (M) | informed | second | control |",
        "|---|---:|---:|---:|---:|",
        *[f"| {r['label']} | {r['params'] / 1e6:.1f} | "
          + " | ".join(fmt(r["ppl"][c]) for c in ("activation", "taylor", "random")) + " |"
          for r in budget],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"baseline": {"ppl": base_ppl, "params": base_params}, "width": width, "depth": depth,
         "budget": budget, "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    log(f"written {args.out} in {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
