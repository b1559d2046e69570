"""The HTML page of an ordering comparison: headline table, plots, per-ordering steps, loss curves.

Numbers come from `tasks.compare.report.collect_compare` (the same dict written to report.json);
every numeric cell names its JSON path, so the browser check can prove the page shows exactly the
report's numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.core.common import read_json
from tasks.report import plots, render_html


def _num(value: float | None, path: str, fmt: str = ".2f", scale: float = 1.0,
         err: float | None = None, suffix: str = "") -> Any:
    """A numeric cell tagged with its report.json path ("–" when missing)."""
    if value is None:
        return "–"
    text = format(value * scale, fmt) + suffix
    if err is not None:
        text += f" ± {format(err * scale, fmt)}{suffix}"
    return {"text": text, "json": path, "value": value}


def _summary_table(data: dict[str, Any]) -> dict[str, Any]:
    benches = list((data["baseline"]["eval"] or {}).get("tasks", {}))
    columns = ["ordering", "final WikiText-2 ppl", "ppl ratio", "mean retention (± se)",
               "chance-normalised (± se)", *[f"{b} paired Δ (pts)" for b in benches],
               "bytes on disk (MB)", "compute min"]
    base = data["baseline"]
    rows = [["baseline (original)", _num(base["ppl"], "baseline.ppl"), "1", "1", "1",
             *["–" for _ in benches], _num(base["bytes"], "baseline.bytes", ".1f", 1e-6), "–"]]
    for i, s in enumerate(data["summary"]):
        p = f"summary.{i}"
        avg, norm = s["mean_retention"] or {}, s["mean_norm_retention"] or {}
        row = [s["ordering"] + ("" if s["complete"] else " (incomplete)"),
               _num(s["final_ppl"], f"{p}.final_ppl"),
               _num(s["ppl_ratio"], f"{p}.ppl_ratio", ".3f"),
               _num(avg.get("mean"), f"{p}.mean_retention.mean", ".3f", err=avg.get("stderr")),
               _num(norm.get("mean"), f"{p}.mean_norm_retention.mean", ".3f",
                    err=norm.get("stderr"))]
        for b in benches:
            bench = s["benchmarks"].get(b) or {}
            row.append(_num(bench.get("diff"), f"{p}.benchmarks.{b}.diff", "+.1f", 100.0,
                            bench.get("diff_stderr")))
        row += [_num(s["bytes"], f"{p}.bytes", ".1f", 1e-6),
                _num(s["wall_s"], f"{p}.wall_s", ".1f", 1 / 60)]
        rows.append(row)
    return {"kind": "table", "title": "Final model of each ordering", "columns": columns,
            "rows": rows, "note": "Retention = final / baseline over the informative benchmarks; "
            "paired Δ = final − baseline on the same doc ids. Compute time counts only steps an "
            "ordering computed itself (shared steps are cache hits)."}


def _steps_table(ordering: dict[str, Any], index: int) -> dict[str, Any]:
    rows = []
    for j, s in enumerate(ordering["steps"]):
        p = f"orderings.{index}.steps.{j}"
        avg = (s.get("retention") or {}).get("average_retention") or {}
        origin = "computed here" if s["computed_here"] else f"cache hit ({s['computed_by']})"
        rows.append([f"{j + 1}. {s['label']}", s["note"], f"{s['unit']} — {origin}",
                     _num(s["ppl"], f"{p}.ppl"),
                     _num(avg.get("mean"), f"{p}.retention.average_retention.mean", ".3f",
                          err=avg.get("stderr")),
                     _num(s["bytes"], f"{p}.bytes", ".1f", 1e-6),
                     _num(s["metrics"].get("stage_wall_s"), f"{p}.metrics.stage_wall_s", ".0f")])
    return {"kind": "table", "title": f"{ordering['name']}: what each step did",
            "columns": ["step", "what pkdq did", "unit", "WikiText-2 ppl", "mean retention",
                        "MB", "stage s"], "rows": rows}


def _plots(data: dict[str, Any]) -> list[dict[str, Any]]:
    base = data["baseline"]
    ppl_series = {o["name"]: [("baseline", base["ppl"])] + [
        (s["label"], s["ppl"]) for s in o["steps"] if s["ppl"] is not None]
        for o in data["orderings"]}
    ret_series = {o["name"]: [("baseline", 1.0)] + [
        (s["label"], s["retention"]["average_retention"]["mean"]) for s in o["steps"]
        if (s.get("retention") or {}).get("average_retention")] for o in data["orderings"]}
    ret_errors = {o["name"]: [0.0] + [  # the table's standard errors, drawn as error bars
        s["retention"]["average_retention"].get("stderr") for s in o["steps"]
        if (s.get("retention") or {}).get("average_retention")] for o in data["orderings"]}
    points = []
    for i, o in enumerate(data["orderings"]):
        if base["ppl"] and base["bytes"]:  # every ordering's path starts at the baseline star
            points.append({"label": "baseline" if i == 0 else "", "series": o["name"],
                           "bytes": base["bytes"], "value": base["ppl"], "baseline": True})
        points += [{"label": f"{o['name']}:{s['label']}", "series": o["name"], "bytes": s["bytes"],
                    "value": s["ppl"]} for s in o["steps"] if s["ppl"] and s["bytes"]]
    out = [{"kind": "image", "title": "Perplexity after each step",
            "png": plots.quality_per_stage(ppl_series, "WikiText-2 perplexity", base["ppl"]),
            "alt": "WikiText-2 perplexity per step, one line per ordering"}]
    if any(len(v) > 1 for v in ret_series.values()):
        out.append({"kind": "image", "title": "Benchmark retention after each step",
                    "png": plots.quality_per_stage(ret_series, "mean retention (± 1 s.e.)", 1.0,
                                                   errors=ret_errors),
                    "alt": "mean benchmark retention per step, one line per ordering"})
    if points:
        out.append({"kind": "image", "title": "Size vs quality (every step of every ordering)",
                    "png": plots.size_vs_quality(points), "alt": "bytes on disk vs perplexity"})
    return out


def _loss_curves(data: dict[str, Any], run_dir: Path) -> list[dict[str, Any]]:
    out, seen = [], set()
    for o in data["orderings"]:
        for s in o["steps"]:
            curve_path = run_dir / "units" / s["unit"] / "loss_curve.json"
            if s["kind"] != "distill" or s["unit"] in seen or not curve_path.is_file():
                continue
            seen.add(s["unit"])
            out.append({"kind": "image", "title": f"KD loss curve: {o['name']} {s['label']}",
                        "png": plots.loss_curve(read_json(curve_path)),
                        "alt": f"loss curve of {s['unit']}"})
    return out


def _ranking_text(data: dict[str, Any]) -> str:
    rank = data["ranking"]
    order = " < ".join(rank["by_final_ppl"]) or "–"
    return (f"By final perplexity (lower is better): {order}. Study: {rank['study']}. "
            f"Best matches the study: {rank['agrees_best']}; worst is a quantize-before-KD "
            f"order: {rank['agrees_worst']}.")


def render_compare_html(data: dict[str, Any], run_dir: Path) -> str:
    info = data["compare"]
    sections: list[dict[str, Any]] = [
        {"kind": "warnings", "items": data["warnings"]},
        _summary_table(data),
        {"kind": "text", "title": "Ranking", "text": _ranking_text(data)},
        *_plots(data),
        *[_steps_table(o, i) for i, o in enumerate(data["orderings"])],
        *_loss_curves(data, Path(run_dir)),
        {"kind": "code", "title": "Recipe", "text": json.dumps(info["recipe"], indent=2)},
        {"kind": "code", "title": "Environment", "text": json.dumps(
            {"seed": info["seed"], "threads": info["threads"], "model": info["model"],
             "data": info["data"], "versions": info["versions"]}, indent=2)},
    ]
    subtitle = (f"{info['recipe']['name']} on {info['model']['spec']}: "
                f"{', '.join(o['name'] for o in data['orderings'])} under equal budgets; "
                f"status {info.get('status', '?')}; reproduce with `pkdq compare "
                f"{info['recipe_source']} --orders "
                f"{','.join(o['name'] for o in data['orderings'])}`")
    return render_html({"title": f"pkdq ordering comparison: {info['run_id']}",
                        "subtitle": subtitle, "sections": sections})

