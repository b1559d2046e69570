"""How far KD carries a cut that llama.cpp decode needs, read from finished run folders.

Issue 18's speed goal (decode >= 2x the baseline's f16 and >= 1.3x its same GGUF type) needs
whole layers cut: on this CPU decode follows depth far more than FFN width. Issue 17's quality
goal is what a 32k-token KD can win back from the default's light FFN cut. This script puts the
two side by side from real runs: the first run's held-out curve over KD tokens (a run with
`eval_every` and a constant lr after warm-up, so each point reads as what a shorter budget would
have reached), every run's stages with retention, and every run's side-by-side decode ratios
(each run's own interleaved rounds: ratios are within a run, never across runs).

    .venv/bin/python bench/kd_budget_curve.py --out kd_budget_curve \\
        'layers -6, KD 262k=/tmp/runs-curve/smollm2-depth6-kd256k-w4-gguf' \\
        'default=runs/smollm2-ffn12-kd-w4-gguf'

Writes bench/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.publish import publish  # noqa: E402
from bench.run_records import read_record, sealed_s  # noqa: E402

PPL_GOAL, BYTES_GOAL, RETENTION_GOAL = 1.6, 0.30, 0.80  # issue 17


def distill_folder(run_dir: Path) -> Path | None:
    run = read_record(run_dir / "run.json")
    return next((run_dir / s for s in run.get("stages", []) if s.endswith("-distill")), None)


def heldout_curve(run_dir: Path) -> dict[str, Any]:
    """The distill stage's held-out rows, with how long KD had run at each (tokens / tokens/s)."""
    folder = distill_folder(run_dir)
    if folder is None:
        return {}
    curve, metrics = read_record(folder / "loss_curve.json"), read_record(folder / "metrics.json")
    rate = metrics.get("tokens_per_s") or 0.0
    rows = [{"tokens": r["train_tokens"], "kl": r["kl"], "ppl": r["ppl"],
             "ppl_vs_teacher": r["ppl"] / r["teacher_ppl"],
             "kd_minutes": r["train_tokens"] / rate / 60 if rate else None}
            for r in curve.get("heldout", [])]
    return {"rows": rows, "tokens_per_s": rate, "train_s": metrics.get("train_s"),
            "teacher_ppl": (curve.get("heldout") or [{}])[0].get("teacher_ppl")}


def second_half(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What the second half of the tokens bought: held-out KL and perplexity at the curve's
    midpoint and end. A curve that has flattened says more tokens at this lr buy little."""
    if len(rows) < 3:
        return None
    mid, last = rows[(len(rows) - 1) // 2], rows[-1]
    return {"from_tokens": mid["tokens"], "to_tokens": last["tokens"],
            "kl": [mid["kl"], last["kl"]], "ppl": [mid["ppl"], last["ppl"]],
            "kl_change": last["kl"] / mid["kl"] - 1, "ppl_change": last["ppl"] / mid["ppl"] - 1}


def stage_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Per stage: WikiText-2 ppl and its ratio, acc_norm per task, retention, bytes vs bf16;
    the shipped GGUF as its own row."""
    report = read_record(run_dir / "report.json")
    out = []
    for stage in report.get("stages", []):
        ev = stage.get("eval") or {}
        for label, ret, tasks, ppl in (
                (stage["stage"], stage.get("retention"), ev.get("tasks"),
                 (ev.get("wikitext") or {}).get("token_perplexity")),
                (f"{stage['stage']}: model.gguf", stage.get("retention_gguf"),
                 (ev.get("gguf") or {}).get("tasks"),
                 ((ev.get("gguf") or {}).get("wikitext") or {}).get("token_perplexity"))):
            if tasks is None:
                continue
            baseline, ret = not ret, ret or {}  # the baseline has no retention: it is the 1
            norm = ret.get("average_norm_retention") or {}
            out.append({
                "stage": label, "ppl": ppl,
                "ppl_ratio": 1.0 if baseline else (ret.get("perplexity") or {}).get("ratio"),
                "scores": {t: v.get(v.get("metric", "acc_norm")) for t, v in tasks.items()},
                "retention": 1.0 if baseline else norm.get("mean"),
                "retention_stderr": norm.get("stderr"),
                "bytes_ratio_bf16": (ret.get("size") or {}).get("bytes_ratio_bf16")})
    return out


def decode_rows(run_dir: Path) -> dict[str, Any]:
    return read_record(run_dir / "report.json").get("deploy_speed") or {}


def collect(name: str, run_dir: Path) -> dict[str, Any]:
    run = read_record(run_dir / "run.json")
    return {"name": name, "run_dir": str(run_dir), "recipe": run.get("recipe", {}).get("name"),
            "created": run.get("created"), "curve": heldout_curve(run_dir),
            "stages": stage_rows(run_dir), "decode": decode_rows(run_dir),
            "wall_s": sealed_s(run_dir, run)}


def _f(value: Any, fmt: str = "{:.2f}") -> str:
    return "–" if value is None else fmt.format(value)


def render(out: dict[str, Any]) -> str:
    runs = out["runs"]
    lines = ["# How far KD carries the cut llama.cpp decode needs (issues 17 and 18)", "",
             __doc__.split("\n\n")[1].replace("\n", " "), ""]
    first = runs[0]
    curve = first["curve"]
    if curve.get("rows"):
        lines += [f"## {first['name']}: held-out curve over KD tokens", "",
                  f"Training-side held-out text (never an evaluation split); the teacher's "
                  f"held-out perplexity is {_f(curve['teacher_ppl'])}. KD ran at "
                  f"{_f(curve['tokens_per_s'], '{:.0f}')} tokens/s.", "",
                  "| KD tokens | KD minutes | held-out KL | held-out ppl | x teacher |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['tokens']:,} | {_f(r['kd_minutes'], '{:.1f}')} | {r['kl']:.4f} | "
                  f"{r['ppl']:.2f} | {r['ppl_vs_teacher']:.2f} |" for r in curve["rows"]]
        for other in runs[1:]:
            rows = other["curve"].get("rows") or []
            if rows:
                last = rows[-1]
                lines += ["", f"{other['name']}: held-out KL {last['kl']:.4f}, ppl "
                          f"{last['ppl']:.2f} ({last['ppl_vs_teacher']:.2f}x the teacher) after "
                          f"{last['tokens']:,} tokens."]
        half = second_half(curve["rows"])
        if half:
            lines += ["", f"From {half['from_tokens']:,} to {half['to_tokens']:,} tokens, the "
                      f"second half of the budget moved held-out KL {half['kl'][0]:.4f} -> "
                      f"{half['kl'][1]:.4f} ({half['kl_change']:+.1%}) and held-out perplexity "
                      f"{half['ppl'][0]:.2f} -> {half['ppl'][1]:.2f} ({half['ppl_change']:+.1%})."]
        lines += ["", "Held-out KL is comparable between runs only for the same student shape: "
                  "a model with layers removed keeps a higher KL at equal perplexity."]
    for run in runs:
        lines += ["", f"## {run['name']}: stages (`{run['recipe']}`, {run['created']}, "
                  f"{_f(run['wall_s'] and run['wall_s'] / 60, '{:.1f}')} min to its last unit)", "",
                  "100 seeded docs per task (error bars about ±0.13 on retention); WikiText-2 "
                  "test, 8,192 tokens.", ""]
        tasks = sorted({t for s in run["stages"] for t in s["scores"]})
        lines += ["| stage | WikiText-2 ppl | x baseline | " + " | ".join(tasks)
                  + " | retention | x bf16 bytes |",
                  "| --- | ---: | ---: | " + " | ".join("---:" for _ in tasks) + " | ---: | ---: |"]
        for s in run["stages"]:
            ret = _f(s["retention"]) + (f" ± {s['retention_stderr']:.2f}"
                                        if s["retention_stderr"] is not None else "")
            lines.append(f"| {s['stage']} | {_f(s['ppl'])} | {_f(s['ppl_ratio'])} | "
                         + " | ".join(_f(s["scores"].get(t), "{:.2f}") for t in tasks)
                         + f" | {ret} | {_f(s['bytes_ratio_bf16'], '{:.3f}')} |")
        shipped = run["stages"][-1] if run["stages"] else None
        if shipped:
            checks = [("ppl", shipped["ppl_ratio"], PPL_GOAL, "<="),
                      ("bytes", shipped["bytes_ratio_bf16"], BYTES_GOAL, "<="),
                      ("retention (100 docs)", shipped["retention"], RETENTION_GOAL, ">=")]
            lines += ["", "Issue 17's targets for the last row: " + "; ".join(
                f"{name} {_f(v, '{:.3f}')} {op} {goal}: "
                + ("met" if v is not None and (v <= goal if op == "<=" else v >= goal)
                   else "not met") for name, v, goal, op in checks) + "."]
        decode = run["decode"]
        if decode.get("by_type"):
            lines += ["", f"llama.cpp decode ({decode.get('timing')}), goal "
                      f"{decode['goal']['decode_vs_baseline_f16']}x f16 and "
                      f"{decode['goal']['decode_vs_baseline_same_type']}x same type at "
                      f"<= {decode['goal']['bytes_vs_baseline_bf16']}x bytes:", "",
                      "| file | decode x baseline f16 | x baseline same type | x bf16 bytes | "
                      "goal |", "| --- | ---: | ---: | ---: | --- |"]
            lines += [f"| {r['type']} | {r['decode_vs_baseline_f16']:.2f} | "
                      f"{r['decode_vs_baseline_same_type']:.2f} | "
                      f"{r['bytes_vs_baseline_bf16']:.3f} | {'met' if r['met'] else 'not met'} |"
                      for r in decode["by_type"]]
    lines += ["", f"Command: `{out['command']}` ({out['date']})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=RUN_DIR",
                        help="the first run's KD curve is tabled in full")
    parser.add_argument("--out", default="kd_budget_curve")
    args = parser.parse_args()
    pairs = [(name, Path(path)) for name, _, path in (r.partition("=") for r in args.runs)]
    missing = [str(p) for _, p in pairs if not (p / "report.json").is_file()]
    if missing:
        raise SystemExit(f"not a finished pkdq run folder (no report.json): {', '.join(missing)}")
    runs = [collect(name, path) for name, path in pairs]
    out: dict[str, Any] = {"runs": runs,
                           "command": ".venv/bin/python bench/kd_budget_curve.py --out "
                           f"{args.out} " + " ".join(f"'{r}'" for r in args.runs),
                           "date": time.strftime("%Y-%m-%d")}
    publish(args.out, out, render(out))


if __name__ == "__main__":
    main()
