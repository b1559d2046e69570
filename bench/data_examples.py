"""Issue 19's worked examples: does data from the job recover more of the job?

Three arms at the same pruning config, KD token budget and seed, each with its recipe's own data
for calibration and KD (`recipes/smollm2-ffn25-kd-w4*.yaml`):
- general: the default recipe (bundled Wikipedia);
- domain-text: WikiText-2 *validation* text as a user's `text` source;
- arc-chat: ARC-Easy + ARC-Challenge *Dev* questions as `chat` data (assistant tokens only).
Every arm's KD model (and the baseline) is scored on WikiText-2 *test* perplexity, ARC-Easy *Test*
through the JSONL multiple-choice shortcut, and PIQA / HellaSwag (general ability), on the same
seeded docs. Units are cached under the bench folder, so a rerun resumes.

    python examples/arc_chat.py && python bench/arc_to_jsonl.py
    flock /tmp/pkdq-heavy.lock .venv/bin/python bench/data_examples.py --tokens 16384
Writes bench/results/data_examples.json and .md (paired differences per doc: each arm against
the general arm and against the baseline, on the same seeded docs); `--render-only` rewrites the
.md from the JSON and the arms' per-doc files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pkdq.env import configure_environment  # noqa: E402 - before prefect/lm-eval imports

configure_environment()

from tasks.core.common import ModelRef, read_json  # noqa: E402
from tasks.core.model_store import resolve_model  # noqa: E402
from tasks.core.recipe import load_recipe, parse_recipe  # noqa: E402
from tasks.pipeline import evaluate_unit, run_unit  # noqa: E402
from tasks.report import paired_text  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
ARMS = {"general": "smollm2-ffn25-kd-w4", "domain-text": "smollm2-ffn25-kd-w4-domain-text",
        "arc-chat": "smollm2-ffn25-kd-w4-arc-chat"}
JOB_TASK = {"name": "arc_easy_test_jsonl", "jsonl": "${repo}/generated/arc_easy_test_mc.jsonl",
            "kind": "multiple_choice"}


def eval_config(samples: int) -> dict:
    return {"tasks": [JOB_TASK, "piqa", "hellaswag"], "samples": samples,
            "wikitext": {"tokens": 8192, "max_length": 512, "pages": 0},
            "speed": {"enabled": False}, "generations": {"enabled": False}, "served": False}


def arm_recipe(name: str, tokens: int, samples: int, threads: int):
    raw = load_recipe(ARMS[name]).model_dump(mode="json")
    raw["stages"] = [s for s in raw["stages"] if "quantize" not in s]  # the data effect is KD's
    raw["stages"][1]["distill"]["tokens"] = tokens
    raw["evaluate"] = eval_config(samples)
    raw["threads"] = threads
    return parse_recipe(raw, f"{ARMS[name]} (bench)")


def _samples(folder: Path, unit: str) -> dict:
    return read_json(folder / unit / "eval" / "eval_samples.json")


def render(out: dict, folder: Path) -> str:
    """The worked examples' table: WikiText-2 test ppl, the job's task, general benchmarks."""
    tasks = list(out["baseline"]["tasks"])
    head = ["arm", "KD data (tokens trained on)", "WikiText-2 test ppl", *tasks]
    rows = [head, ["---"] + ["---:"] * (len(head) - 1)]
    units = {"baseline": "baseline", **{name: f"{name}-kd" for name in out["arms"]}}
    for name, unit in units.items():
        ev = out["baseline"] if name == "baseline" else out["arms"][name]["eval"]
        data = {} if name == "baseline" else out["arms"][name]["kd"].get("data") or {}
        used = "–" if name == "baseline" else (
            f"{data.get('kind')}: {data.get('loss_tokens', data.get('tokens_used')):,} "
            f"{'assistant' if 'loss_tokens' in data else ''} tokens".replace("  ", " "))
        cells = [name, used, f"{ev['wikitext']['token_perplexity']:.2f}"]
        for task in tasks:
            t = ev["tasks"][task]
            metric = t["metric"]
            cell = f"{100 * t[metric]:.1f} ± {100 * t[metric + '_stderr']:.1f}"
            if name not in ("baseline", "general"):
                diff = paired_text(_samples(folder, "general-kd"), _samples(folder, unit), task,
                                   metric)
                cell += f" (vs general {diff})"
            cells.append(cell)
        rows.append(cells)
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--folder", default="runs/bench-data-examples")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    folder = Path(args.folder)
    if args.render_only:
        out = read_json(OUT / "data_examples.json")
        (OUT / "data_examples.md").write_text(render(out, folder))
        print(f"wrote {OUT / 'data_examples.md'}")
        return
    out: dict = {"tokens": args.tokens, "samples": args.samples, "arms": {}}
    base = None
    for name in ARMS:
        recipe = arm_recipe(name, args.tokens, args.samples, args.threads)
        base = base or resolve_model(recipe.model)
        if "baseline" not in out:
            evaluate_unit(folder / "baseline", "baseline", recipe, base, baseline=True)
            out["baseline"] = read_json(folder / "baseline" / "eval.json")
        (_, pcfg), (_, dcfg) = recipe.stage_list()
        started = time.perf_counter()
        pruned, _ = run_unit(folder / f"{name}-prune", f"{name} prune", "prune", pcfg, recipe,
                             base, None)
        pruned_ref = ModelRef.from_json(pruned["model"])
        kd, _ = run_unit(folder / f"{name}-kd", f"{name} KD", "distill", dcfg, recipe,
                         pruned_ref, base)
        evaluate_unit(folder / f"{name}-kd", f"{name} KD", recipe,
                      ModelRef.from_json(kd["model"]))
        out["arms"][name] = {"eval": read_json(folder / f"{name}-kd" / "eval.json"),
                             "kd": {k: v for k, v in kd["metrics"].items() if k != "config"},
                             "prune": pruned["metrics"].get("data"),
                             "wall_s": time.perf_counter() - started}
        OUT.mkdir(exist_ok=True)
        (OUT / "data_examples.json").write_text(json.dumps(out, indent=1, default=str))
    (OUT / "data_examples.md").write_text(render(out, folder))
    print(f"wrote {OUT / 'data_examples.json'} and .md")


if __name__ == "__main__":
    main()
