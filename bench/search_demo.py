"""Issue 16's evidence: the budget search on SmolLM2 against hand-picked single-axis shapes.

For one parameter target it runs `pkdq search`'s flow (every candidate's one-shot proxy, the
finalists' short KD), then gives each arm the same total KD tokens, search tokens counted in:
- the search winner: the search's short-KD tokens (all finalists) + `--tokens` of full KD;
- the best FFN-only and depth-only shapes of the same size (prune-table axes): all of it as KD;
- the median finalist (by short-KD rank): all of it as KD.
Each arm's KD model is scored on WikiText-2 test perplexity and ARC-Easy / PIQA (seeded docs,
the same for every arm), with retention against the baseline. Units are cached in the bench
folder, so an interrupted run resumes.

    flock /tmp/pkdq-heavy.lock .venv/bin/python bench/search_demo.py --target 0.75 --threads 2
Writes bench/results/search_<target>.json and .md (the candidate table, then every arm's
WikiText-2 ppl and benchmark scores with chance-normalised retention and paired differences
against the winner on the same docs); `--render-only` rewrites the .md from the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pkdq.env import configure_environment  # noqa: E402 - before prefect is imported

configure_environment()

from tasks.core.common import read_json  # noqa: E402
from tasks.core.model_store import read_config, resolve_model  # noqa: E402
from tasks.core.recipe import PruneConfig, parse_recipe  # noqa: E402
from tasks.pipeline import evaluate_unit, run_unit  # noqa: E402
from tasks.prune import enumerate_candidates  # noqa: E402
from tasks.report import paired_text, stage_retention  # noqa: E402
from tasks.search.report import render_markdown  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


def recipe_raw(target: float, args: argparse.Namespace) -> dict:
    return {
        "name": f"search-{target:g}", "model": "smollm2-135m", "seed": 1234,
        "threads": args.threads,
        "stages": [
            {"prune": {"target": {"params": target}, "round_to": 64,
                       "calibration": {"source": "wikipedia", "samples": 16, "seq_len": 256},
                       "search": {"candidates": args.candidates, "top_k": args.top_k,
                                  "tokens": args.search_tokens}}},
            {"distill": {"tokens": args.tokens, "precision": "auto", "seq_len": 256,
                         "batch_size": 4, "lr": 1e-4, "warmup_steps": 5}},
        ],
        "evaluate": {"tasks": ["arc_easy", "piqa"], "samples": args.samples,
                     "wikitext": {"tokens": 8192, "max_length": 512, "pages": 0},
                     "speed": {"enabled": False}, "generations": {"enabled": False},
                     "served": False},
    }


def single_axis(config: dict, goal: float, axis: str) -> PruneConfig:
    """The one-axis shape closest to `goal` params (bounds relaxed: the prune table's shapes)."""
    prune = PruneConfig(round_to=64, target={"params": goal, "tolerance": 0.2, "axes": [axis],
                                             "max_depth_cut": 0.6, "max_width_cut": 0.8})
    return enumerate_candidates(config, prune, None)[0].prune


def run_arm(folder: Path, name: str, prune: PruneConfig, tokens: int, recipe, base) -> dict:
    """Prune + KD (`tokens`) + evaluation of one arm, each a cached unit under `folder`."""
    raw = recipe.model_dump(mode="json")
    raw["stages"][0] = {"prune": prune.model_dump(mode="json")}
    raw["stages"][1]["distill"]["tokens"] = tokens
    arm = parse_recipe(raw, name)
    (_, pcfg), (_, dcfg) = arm.stage_list()
    started = time.perf_counter()
    pruned, _ = run_unit(folder / f"{name}-prune", f"{name} prune", "prune", pcfg, arm, base,
                         None)
    from tasks.core.common import ModelRef

    pruned_ref = ModelRef.from_json(pruned["model"])
    kd, _ = run_unit(folder / f"{name}-kd", f"{name} KD", "distill", dcfg, arm, pruned_ref, base)
    kd_ref = ModelRef.from_json(kd["model"])
    evaluate_unit(folder / f"{name}-kd", f"{name} KD", arm, kd_ref)
    ev = json.loads((folder / f"{name}-kd" / "eval.json").read_text())
    return {"arm": name, "prune": pcfg.model_dump(mode="json"), "kd_tokens": tokens,
            "params": pruned["metrics"].get("params_after"), "eval": ev,
            "heldout_kl": kd["metrics"].get("heldout_kl_after"),
            "wall_s": time.perf_counter() - started}


def _samples(folder: Path, unit: str) -> dict | None:
    path = folder / unit / "eval" / "eval_samples.json"
    return read_json(path) if path.is_file() else None


def every_shape(folder: Path, recipe) -> list[str]:
    """All shapes that met the target (the search scores an even spread of them), as a
    compact list: which were scored, and their sizes."""
    stages = dict(recipe.stage_list())
    config = read_config(resolve_model(recipe.model).path)
    found = enumerate_candidates(config, stages["prune"], stages.get("quantize"))
    scored = {r["label"] for r in read_json(folder / "search" / "results.json")["rows"]}
    lines = [f"<details><summary>All {len(found)} shapes that met the target (closest to it "
             "first; scored ones in bold)</summary>", "",
             "| shape | params (M) |", "|---|---:|"]
    for cand in found:
        name = f"**{cand.label}**" if cand.label in scored else cand.label
        lines.append(f"| {name} | {cand.params / 1e6:.1f} |")
    return [*lines, "", "</details>", ""]


def _shape(prune: dict) -> str:
    """A prune config in the candidate table's words (layers -5, heads KV groups 2, ffn 1152)."""
    parts = []
    if (prune.get("depth") or {}).get("remove"):
        parts.append(f"layers -{prune['depth']['remove']}")
    heads = prune.get("heads") or {}
    if heads.get("size"):
        parts.append(f"heads {'KV groups' if heads.get('mode') == 'kv_groups' else 'q/group'} "
                     f"{heads['size']}")
    for axis in ("ffn", "hidden"):
        if (prune.get(axis) or {}).get("size"):
            parts.append(f"{axis} {prune[axis]['size']}")
    return ", ".join(parts) or "uncut"


def render(out: dict, folder: Path) -> str:
    """The search's candidate table, then the arms at equal total KD tokens."""
    import yaml

    recipe = parse_recipe(yaml.safe_load((folder / "recipe.yaml").read_text()), "search")
    # results written before the plan recorded it: whether the bytes are quantized ones
    out["search"]["plan"].setdefault("quantized", "quantize" in dict(recipe.stage_list()))
    lines = [render_markdown(out["search"]), f"Search wall time, whole flow (this script): "
             f"{out['search_wall_s']:.0f} s on this CPU.", "", *every_shape(folder, recipe)]
    if not out.get("arms"):
        return "\n".join(lines)
    base = out["baseline"]
    tasks = list(base["tasks"])
    lines += [f"### Arms at equal KD tokens ({out['total_kd_tokens']:,} each, search tokens "
              "counted in; seed 1234)", "",
              "Scores: acc_norm % ± one standard error on the same seeded docs; in brackets the "
              "paired per-doc difference against the winner. Retention: chance-normalised "
              "(s - c) / (b - c), mean over the benchmarks.", "",
              "| arm | shape | params (M) | KD tokens | held-out KL | WikiText-2 ppl | "
              + " | ".join(tasks) + " | retention |",
              "|---|---|---:|---:|---:|---:|" + "---:|" * len(tasks) + "---:|",
              f"| baseline | – | {base['params'] / 1e6:.1f} | – | – | "
              f"{base['wikitext']['token_perplexity']:.2f} | "
              + " | ".join(f"{100 * base['tasks'][t][base['tasks'][t]['metric']]:.1f}"
                           for t in tasks) + " | 1 |"]
    base_samples = _samples(folder, "baseline")
    for arm in out["arms"]:
        unit = f"{arm['arm']}-kd"
        ev = arm["eval"]
        ret = stage_retention(base, ev, base_samples, _samples(folder, unit))
        avg = ret["average_norm_retention"]
        cells = []
        for task in tasks:
            t = ev["tasks"][task]
            cell = f"{100 * t[t['metric']]:.1f} ± {100 * t[t['metric'] + '_stderr']:.1f}"
            if arm["arm"] != "winner":
                diff = paired_text(_samples(folder, "winner-kd"), _samples(folder, unit), task,
                                   t["metric"])
                cell += f" ({diff})"
            cells.append(cell)
        shape = _shape(arm["prune"])
        lines.append(
            f"| {arm['arm']} | {shape} | {(arm['params'] or 0) / 1e6:.1f} | "
            f"{arm['kd_tokens']:,} | {arm['heldout_kl']:.4f} | "
            f"{ev['wikitext']['token_perplexity']:.2f} | " + " | ".join(cells) + " | "
            + (f"{avg['mean']:.3f} ± {avg['stderr']:.3f}" if avg and avg["stderr"] is not None
               else "–") + " |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", type=float, default=0.75)
    ap.add_argument("--tokens", type=int, default=8192, help="full KD tokens of the winner")
    ap.add_argument("--search-tokens", type=int, default=2048)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--folder", default="runs/bench-search")
    ap.add_argument("--search-only", action="store_true")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    if args.render_only:
        out = read_json(OUT / f"search_{args.target:g}.json")
        md = OUT / f"search_{args.target:g}.md"
        md.write_text(render(out, Path(args.folder) / f"t{args.target:g}"))
        print(f"wrote {md}")
        return

    from flows.search import run_search

    folder = Path(args.folder) / f"t{args.target:g}"
    folder.mkdir(parents=True, exist_ok=True)
    recipe_file = folder / "recipe.yaml"
    import yaml

    recipe_file.write_text(yaml.safe_dump(recipe_raw(args.target, args), sort_keys=False))
    started = time.perf_counter()
    run_search(str(recipe_file), str(folder / "search"))
    search_s = time.perf_counter() - started
    result = json.loads((folder / "search" / "results.json").read_text())
    out = {"target": args.target, "search": result, "search_wall_s": search_s}
    if not args.search_only:
        recipe = parse_recipe(result["recipe"], "winner")
        base = resolve_model(recipe.model)
        config = read_config(base.path)
        rows = result["rows"]
        finalists = sorted((r for r in rows if r["short_rank"]), key=lambda r: r["short_rank"])
        search_tokens = len(finalists) * args.search_tokens
        total = args.tokens + search_tokens
        median = finalists[len(finalists) // 2]
        winner = rows[result["winner"]]
        target_params = winner["params"]
        base_eval_folder = folder / "baseline"
        evaluate_unit(base_eval_folder, "baseline", recipe, base, baseline=True)
        arms = [("winner", PruneConfig(**winner["prune"]), args.tokens),
                ("median-finalist", PruneConfig(**median["prune"]), total),
                ("ffn-only", single_axis(config, target_params, "ffn"), total),
                ("depth-only", single_axis(config, target_params, "depth"), total)]
        out["baseline"] = json.loads((base_eval_folder / "eval.json").read_text())
        out["total_kd_tokens"] = total
        out["arms"] = [run_arm(folder, name, prune, tokens, recipe, base)
                       for name, prune, tokens in arms]
    OUT.mkdir(exist_ok=True)
    path = OUT / f"search_{args.target:g}.json"
    path.write_text(json.dumps(out, indent=1, default=str))
    path.with_suffix(".md").write_text(render(out, folder))
    print(f"wrote {path} and .md")


if __name__ == "__main__":
    main()
