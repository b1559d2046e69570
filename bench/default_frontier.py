"""The old default beside the new one: what each ships, what it keeps, what each stage costs.

Both recipes run through the real CLI (`pkdq run`, so a finished run in --runs-dir is reused and
an interrupted one resumes), one after the other in this process tree on this machine. Then the
baseline and each recipe's final model are scored again on more docs than a run scores (500 per
task by default, the same seeded doc ids for every model, so differences are paired): ARC-Easy,
PIQA and HellaSwag, and WikiText-2 test (first 8,192 tokens, windows of 512). A final model
that has a GGUF beside it (the quantize stage's `gguf:`) is scored as that file too: its bytes,
its own weights' scores on the same docs, its perplexity in llama.cpp. That row is what a
llama.cpp user ships; the GPTQ folder's row is what a GPTQModel / vLLM user ships.

    flock /tmp/pkdq-heavy.lock .venv/bin/python bench/default_frontier.py \
        --old bench/recipes/smollm2-ffn25-kd-w4-frontier.yaml --new smollm2-ffn12-kd-w4-gguf \
        --extra 'quantization only=smollm2-w4-gguf'

Writes bench/results/default_frontier.{json,md}; scores are cached under --work (a rerun only
renders). The goal lines check issue 17's targets: WikiText-2 ppl <= 1.6x the baseline, bytes
<= 0.30x the baseline in bf16, chance-normalised retention >= 0.80 on the three benchmarks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tasks.core.common import (  # noqa: E402
    GGUF_SAMPLES_JSON,
    SAMPLES_JSON,
    read_json,
    write_json_atomic,
)
from tasks.report import paired_text, stage_retention  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TASKS = ("arc_easy", "piqa", "hellaswag")
GOALS = {"ppl_ratio": 1.6, "bytes_ratio_bf16": 0.30, "norm_retention": 0.80}


def run_recipe(recipe: str, runs_dir: Path) -> dict[str, Any]:
    """`pkdq run RECIPE` (reused when finished); its run folder, final model and stage times."""
    from tasks.core.recipe import load_recipe

    name = load_recipe(recipe).name
    started = time.perf_counter()
    cmd = [str(ROOT / ".venv" / "bin" / "pkdq"), "run", recipe, "--runs-dir", str(runs_dir)]
    print(f"[frontier] {' '.join(cmd)}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    run_dir = runs_dir / name
    run = read_json(run_dir / "run.json")
    stages = []
    for folder in run["stages"]:
        metrics = read_json(run_dir / folder / "metrics.json")
        evaluation = run_dir / folder / "eval.json"
        stages.append({"stage": folder, "stage_wall_s": metrics.get("stage_wall_s"),
                       "eval_wall_s": (read_json(evaluation).get("wall_s")
                                       if evaluation.is_file() else None)})
    return {"recipe": recipe, "name": name, "run_dir": str(run_dir),
            "baseline": run["model"]["path"], "final": run["final_model"]["path"],
            "stages": stages, "status": run.get("status"),
            "this_call_s": time.perf_counter() - started}


def model_key(model_path: str) -> dict[str, Any]:
    """What a cached score stands for: the folder's content fingerprint and, where the quantize
    stage wrote one beside it, the GGUF's bytes (a recipe change that rewrites only the GGUF,
    such as its embedding type, must not reuse the old file's scores)."""
    from tasks.core.common import GGUF_FILE
    from tasks.core.model_folder import file_digest, fingerprint_folder

    folder = Path(model_path)
    key: dict[str, Any] = {"model": str(folder),
                           "fingerprint": fingerprint_folder(folder, skip_card=True)}
    gguf = folder.parent / GGUF_FILE
    if gguf.is_file():
        key["gguf"] = list(file_digest(gguf))
    return key


def score(label: str, model_path: str, work: Path, args: argparse.Namespace,
          doc_ids: dict[str, list[int]] | None) -> Path:
    """evaluate_model on the frontier's docs, cached per label and model content; returns its
    folder. Scores of another model under the same label are removed, never reused."""
    import shutil

    from tasks.core.recipe import EvalConfig
    from tasks.evaluate import evaluate_model

    out = work / label
    key = {**model_key(model_path), "samples": args.samples, "tasks": list(args.tasks),
           "seed": args.seed}
    if (out / "eval.json").is_file():
        if (out / "scored.json").is_file() and read_json(out / "scored.json") == key:
            return out
        print(f"[frontier] {label}: cached scores are of another model; scoring again",
              file=sys.stderr, flush=True)
        shutil.rmtree(out)
    cfg = EvalConfig(tasks=list(args.tasks), samples=args.samples, served=False,
                     generations={"enabled": False}, speed={"enabled": False})
    print(f"[frontier] scoring {label}: {model_path}", file=sys.stderr, flush=True)
    tmp = out.with_name(out.name + ".partial")
    evaluate_model(Path(model_path), cfg, tmp, seed=args.seed, threads=args.threads,
                   doc_ids=doc_ids)
    if out.exists():
        raise SystemExit(f"{out} appeared while scoring; remove it and rerun")
    write_json_atomic(tmp / "scored.json", key)
    tmp.rename(out)
    return out


def _row(label: str, ev: dict[str, Any], samples: dict[str, Any] | None,
         base: tuple[dict[str, Any], dict[str, Any]],
         llama_ppl: float | None = None) -> dict[str, Any]:
    ret = stage_retention(base[0], ev, base[1], samples)
    return {"label": label, "bytes": ev.get("bytes_on_disk"), "params": ev.get("params"),
            "ppl": (ev.get("wikitext") or {}).get("token_perplexity"),
            "llama_cpp_ppl": llama_ppl, "retention": ret, "samples": samples}


def collect(folders: dict[str, Path]) -> list[dict[str, Any]]:
    """One row per scored model (and per GGUF beside one), against the baseline."""
    def load(folder: Path, name: str) -> Any:
        path = folder / name
        return json.loads(path.read_text()) if path.is_file() else None

    base_eval = load(folders["baseline"], "eval.json")
    base = (base_eval, load(folders["baseline"], SAMPLES_JSON))
    rows = []
    for label, folder in folders.items():
        ev = load(folder, "eval.json")
        rows.append(_row(label, ev, load(folder, SAMPLES_JSON), base))
        if ev.get("gguf"):
            shipped = {**ev["gguf"], "params": ev.get("params")}
            rows.append(_row(f"{label} {ev['gguf']['label']}", shipped,
                             load(folder, GGUF_SAMPLES_JSON), base,
                             ev["gguf"]["llama_cpp_wikitext"]["token_perplexity"]))
    return rows


def _goal(row: dict[str, Any]) -> dict[str, Any]:
    ret = row["retention"]
    ppl = (ret.get("perplexity") or {}).get("ratio")
    size = (ret.get("size") or {}).get("bytes_ratio_bf16")
    norm = (ret.get("average_norm_retention") or {}).get("mean")
    return {"ppl_ratio": ppl, "bytes_ratio_bf16": size, "norm_retention": norm,
            "met": {"ppl_ratio": ppl is not None and ppl <= GOALS["ppl_ratio"],
                    "bytes_ratio_bf16": size is not None and size <= GOALS["bytes_ratio_bf16"],
                    "norm_retention": norm is not None and norm >= GOALS["norm_retention"]}}


def render(out: dict[str, Any]) -> str:
    rows, tasks = out["rows"], out["tasks"]
    against = out.get("against", "old default")
    old = next((r for r in rows if r["label"].startswith(against)), None)
    vs = "old" if against == "old default" else "ref"
    recipes = (f"`{out['old']['recipe']}` (old) and `{out['new']['recipe']}` (new)" if out["old"]
               else f"`{out['new']['recipe']}` (\"{out.get('new_label', 'new default')}\"; no "
                    "old default in this run)")
    title = ("Old default vs new default" if out["old"] or out.get("new_label") in
             (None, "new default") else f"{out['new_label']} against the baseline")
    lines = [
        f"# {title} (issue 17)", "",
        f"{recipes}, each run by "
        f"`pkdq run` on this machine, then the baseline and the final models scored on the "
        f"same {out['samples']} seeded docs per task (seed {out['seed']}); Δ = paired per-doc "
        "difference in points (± its standard error). Bytes are the files a user ships; x bf16 "
        "is against the baseline's parameters at 2 bytes each. Perplexity: WikiText-2 test, "
        "first 8,192 tokens in windows of 512, in torch with fp32 activations (llama.cpp's on "
        "the same tokens in brackets for a GGUF). Retention: chance-normalised, (s − chance) / "
        "(b − chance), mean of the informative benchmarks."
        + ("" if old is None or vs == "old" else
           f" Δ vs ref pairs each row with \"{old['label']}\" on the same docs."), "",
        "| model | MB | x bf16 | WikiText-2 ppl | x baseline | "
        + " | ".join(f"{t} acc_norm | Δ vs baseline | Δ vs {vs}" for t in tasks)
        + " | retention |",
        "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---: | ---: | ---:" for _ in tasks)
        + " | ---: |"]
    for row in rows:
        ret = row["retention"]
        size = ret.get("size") or {}
        ppl = f"{row['ppl']:.2f}" + (f" ({row['llama_cpp_ppl']:.2f})"
                                     if row["llama_cpp_ppl"] else "")
        cells = [row["label"], f"{row['bytes'] / 1e6:,.1f}",
                 f"{size.get('bytes_ratio_bf16') or 0:.3f}", ppl,
                 f"{(ret.get('perplexity') or {}).get('ratio') or 1:.2f}"]
        for task in tasks:
            bench = (ret.get("benchmarks") or {}).get(task)
            if row["label"] == "baseline" or bench is None:
                base_bench = next(iter(r for r in rows if r["label"] != "baseline"))
                b = base_bench["retention"]["benchmarks"][task]
                cells += [f"{100 * b['baseline']:.1f} ± {100 * b['baseline_stderr']:.1f}",
                          "–", "–"]
                continue
            cells += [f"{100 * bench['score']:.1f} ± {100 * bench['stderr']:.1f}",
                      f"{100 * bench['diff']:+.1f} ± {100 * bench['diff_stderr']:.1f}",
                      "–" if old is None or row is old else
                      paired_text(old["samples"], row["samples"], task, bench["metric"])]
        norm = ret.get("average_norm_retention")
        cells.append("1" if row["label"] == "baseline" else
                     f"{norm['mean']:.2f} ± {norm['stderr']:.2f}" if norm else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "**Issue 17's targets** (ppl ≤ 1.6x, bytes ≤ 0.30x bf16, retention ≥ 0.80):",
              ""]
    for row in rows:
        if row["label"] == "baseline":
            continue
        goal = row["goal"]
        marks = [f"ppl {goal['ppl_ratio']:.2f}x {'met' if goal['met']['ppl_ratio'] else 'not met'}",
                 f"bytes {goal['bytes_ratio_bf16']:.3f}x "
                 f"{'met' if goal['met']['bytes_ratio_bf16'] else 'not met'}",
                 f"retention {goal['norm_retention']:.2f} "
                 f"{'met' if goal['met']['norm_retention'] else 'not met'}"]
        lines.append(f"- {row['label']}: " + "; ".join(marks))
    lines += ["", "**Wall time per stage** (each run's own record: the stage's work, then its "
              "evaluation at the run's own sample size):", "",
              "| recipe | stage | stage s | its evaluation s |", "| --- | --- | ---: | ---: |"]
    for run in [r for r in (out["old"], out["new"]) if r] + [*out.get("extras", {}).values()]:
        for stage in run["stages"]:
            work, ev = stage["stage_wall_s"], stage["eval_wall_s"]
            lines.append(f"| {run['name']} | {stage['stage']} | "
                         f"{f'{work:,.0f}' if work else '–'} | {f'{ev:,.0f}' if ev else '–'} |")
    lines += ["", f"Scoring here: {out['scoring_s']:,.0f} s for the models not cached. "
              f"Command: `{out['command']}` ({out['threads']} threads, {out['date']}).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", default="bench/recipes/smollm2-ffn25-kd-w4-frontier.yaml",
                        help="the old default's recipe; none: score the new default alone")
    parser.add_argument("--new", default="smollm2-ffn12-kd-w4-gguf")
    parser.add_argument("--extra", action="append", default=[], metavar="LABEL=RECIPE",
                        help="another recipe scored the same way, as a reference row (e.g. "
                        "quantization alone); run after the two defaults")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-frontier")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--tasks", type=lambda s: tuple(s.split(",")), default=TASKS)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-label", default="new default",
                        help="the new recipe's row label (e.g. a candidate that is not a default)")
    parser.add_argument("--against", default="old default", metavar="LABEL",
                        help="the row (label or its start) the last Δ column pairs every row "
                        "with, e.g. 'new default as GGUF' to compare shipped files")
    parser.add_argument("--out", default="default_frontier",
                        help="results file name under bench/results/ (.md and .json)")
    args = parser.parse_args()

    from pkdq.env import configure_environment

    configure_environment()
    runs = {"new": run_recipe(args.new, args.runs_dir)}  # the new default's run first: the
    runs["old"] = (run_recipe(args.old, args.runs_dir)   # README's table comes from it
                   if args.old != "none" else None)
    extras = {label: run_recipe(recipe, args.runs_dir)
              for label, _, recipe in (spec.partition("=") for spec in args.extra)}
    if len({r["baseline"] for r in [*runs.values(), *extras.values()] if r}) > 1:
        raise SystemExit("the two recipes start from different models; nothing to compare")
    started = time.perf_counter()
    folders = {"baseline": score("baseline", runs["new"]["baseline"], args.work, args, None)}
    base_ids = {t: v["doc_ids"] for t, v in read_json(folders["baseline"] / "eval.json")
                ["tasks"].items()}
    if runs["old"]:
        folders["old default"] = score("old", runs["old"]["final"], args.work, args, base_ids)
    folders[args.new_label] = score("new", runs["new"]["final"], args.work, args, base_ids)
    for label, run in extras.items():
        folders[label] = score(label.replace(" ", "-"), run["final"], args.work, args, base_ids)
    rows = collect(folders)
    for row in rows:
        row["goal"] = _goal(row)
    command = ("flock /tmp/pkdq-heavy.lock .venv/bin/python bench/default_frontier.py "
               f"--old {args.old} --new {args.new}"
               + "".join(f" --extra '{e}'" for e in args.extra)
               + "".join(f" --{flag} '{value}'" for flag, value, default in (
                   ("runs-dir", args.runs_dir, ROOT / "runs"),
                   ("work", args.work, ROOT / "runs" / "bench-frontier"),
                   ("new-label", args.new_label, "new default"),
                   ("against", args.against, "old default")) if value != default)
               + (f" --out {args.out}" if args.out != "default_frontier" else ""))
    out = {"old": runs["old"], "new": runs["new"], "extras": extras, "tasks": list(args.tasks),
           "samples": args.samples, "seed": args.seed, "threads": args.threads,
           "rows": rows, "against": args.against, "new_label": args.new_label,
           "scoring_s": time.perf_counter() - started, "command": command,
           "date": time.strftime("%Y-%m-%d")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / f"{args.out}.json",
                      {**out, "rows": [{k: v for k, v in r.items() if k != "samples"}
                                       for r in rows]})
    (RESULTS / f"{args.out}.md").write_text(render(out))
    print(render(out))


if __name__ == "__main__":
    main()
