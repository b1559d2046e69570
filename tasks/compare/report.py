"""The report of an ordering comparison, from its run folder alone: JSON, Markdown and HTML.

Every ordering's steps are read from the unit folders named in compare.json, with retention
against the shared baseline (same doc ids everywhere, so differences are paired). The ranking is
compared with the 2025 ordering study (arXiv 2511.19495): P-KD-Q best, quantizing before KD worst.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.compare.folder import COMPARE_FILE, baseline_folder
from tasks.compare.orderings import PRODUCTION_ORDER
from tasks.core.common import EVAL_JSON, read_json, write_json_atomic
from tasks.report import SAMPLES_FILE, stage_retention
from tasks.report import pm as _pm

STUDY = ("arXiv 2511.19495 (2025 ordering study): P-KD-Q ranks best; orders that quantize "
         "before distilling degrade most (the issue tracker summarises it as perplexity up by "
         "an order of magnitude)")


def _maybe(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


def _unit(folder: Path) -> dict[str, Any]:
    return {"eval": _maybe(folder / EVAL_JSON), "samples": _maybe(folder / SAMPLES_FILE),
            "metrics": _maybe(folder / "metrics.json") or {},
            "record": _maybe(folder / "stage.json")}


def _ppl(evaluation: dict[str, Any] | None) -> float | None:
    return ((evaluation or {}).get("wikitext") or {}).get("token_perplexity")


def _step_entry(unit: dict[str, Any], step: dict[str, Any], base: dict[str, Any],
                computed_by: str, ordering: str) -> dict[str, Any]:
    ev = unit["eval"]
    entry = {**step, "finished": unit["record"] is not None, "evaluated": ev is not None,
             "computed_here": computed_by == ordering, "computed_by": computed_by,
             "metrics": unit["metrics"], "eval": ev, "ppl": _ppl(ev),
             "bytes": (ev or {}).get("bytes_on_disk"), "params": (ev or {}).get("params")}
    if ev is not None and base["eval"] is not None:
        entry["retention"] = stage_retention(base["eval"], ev, base["samples"], unit["samples"])
    return entry


def _wall(entry: dict[str, Any]) -> float:
    """Seconds this ordering spent on a step: 0 when another ordering computed it."""
    if not entry["computed_here"]:
        return 0.0
    return float(entry["metrics"].get("stage_wall_s") or 0) + float(
        (entry["eval"] or {}).get("wall_s") or 0)


def _summary(name: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
    final = steps[-1] if steps else {}
    ret = final.get("retention") or {}
    kd = next((s for s in steps if s["kind"] == "distill"), None)
    kd_metrics = (kd or {}).get("metrics") or {}
    return {
        "ordering": name,
        "complete": bool(steps) and all(s["evaluated"] for s in steps),
        "final_ppl": final.get("ppl"),
        "ppl_ratio": (ret.get("perplexity") or {}).get("ratio"),
        "mean_retention": ret.get("average_retention"),
        "mean_norm_retention": ret.get("average_norm_retention"),
        "benchmarks": {k: {key: v.get(key) for key in ("score", "stderr", "ratio",
                                                       "ratio_stderr", "diff", "diff_stderr",
                                                       "uninformative")}
                       for k, v in (ret.get("benchmarks") or {}).items()},
        "bytes": final.get("bytes"),
        "params": final.get("params"),
        "kd_early_stopped": bool(kd_metrics.get("early_stopped")),
        "wall_s": sum(_wall(s) for s in steps),
    }


def _ranking(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    done = [s for s in summaries if s["final_ppl"] is not None]
    by_ppl = [s["ordering"] for s in sorted(done, key=lambda s: s["final_ppl"])]
    q_before_kd = [s["ordering"] for s in done
                   if s["ordering"].split("-").index("Q") < s["ordering"].split("-").index("KD")]
    agrees_best = bool(by_ppl) and by_ppl[0] == PRODUCTION_ORDER
    worst = by_ppl[-1] if by_ppl else None
    agrees_worst = worst in q_before_kd if q_before_kd else None
    return {"by_final_ppl": by_ppl, "best": by_ppl[0] if by_ppl else None, "worst": worst,
            "quantize_before_kd": q_before_kd, "study": STUDY,
            "agrees_best": agrees_best, "agrees_worst": agrees_worst}


def _warnings(orderings: list[dict[str, Any]], base_ret: dict[str, Any] | None) -> list[str]:
    out: list[str] = []
    for ordering in orderings:
        for step in ordering["steps"]:
            where = f"{ordering['name']} {step['label']}"
            for name, bench in ((step.get("retention") or {}).get("benchmarks") or {}).items():
                if bench.get("uninformative"):
                    out.append(f"{name}: baseline within 2 standard errors of chance — "
                               "uninformative at this size, kept out of averages")
            if not step["evaluated"]:
                out.append(f"{where}: not finished")
            metrics = step["metrics"]
            if metrics.get("early_stopped"):
                out.append(f"{where}: KD stopped early at step {metrics.get('steps')}")
            for layer in metrics.get("layers_skipped") or []:
                out.append(f"{where}: layer skipped by quantization: {layer}")
    return sorted(set(out), key=out.index)


def collect_compare(run_dir: Path) -> dict[str, Any]:
    """Every number of the comparison, per ordering and step."""
    run_dir = Path(run_dir)
    info = read_json(run_dir / COMPARE_FILE)
    base = _unit(baseline_folder(run_dir))
    first: dict[str, str] = {}
    for ordering in info["orderings"]:
        for step in ordering["steps"]:
            first.setdefault(step["unit"], ordering["name"])
    orderings = []
    for ordering in info["orderings"]:
        steps = [_step_entry(_unit(run_dir / "units" / s["unit"]), s, base, first[s["unit"]],
                             ordering["name"]) for s in ordering["steps"]]
        orderings.append({"name": ordering["name"], "steps": steps,
                          "summary": _summary(ordering["name"], steps)})
    summaries = [o["summary"] for o in orderings]
    return {
        "compare": info,
        "baseline": {"eval": base["eval"], "ppl": _ppl(base["eval"]),
                     "bytes": (base["eval"] or {}).get("bytes_on_disk"),
                     "params": (base["eval"] or {}).get("params")},
        "orderings": orderings,
        "summary": summaries,
        "ranking": _ranking(summaries),
        "shared_units": sorted({s["unit"] for o in orderings for s in o["steps"]
                                if not s["computed_here"]}),
        "warnings": _warnings(orderings, None),
    }


# ------------------------------------------------------------------------------ markdown

def _mb(value: float | None) -> str:
    return f"{value / 1e6:,.1f} MB" if value else "–"


def _num(value: float | None, fmt: str = ".2f") -> str:
    return format(value, fmt) if value is not None else "–"


def summary_rows(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the headline table (shared by Markdown and HTML)."""
    benches = list((data["baseline"]["eval"] or {}).get("tasks", {}))
    columns = ["ordering", "final WikiText-2 ppl", "ppl ratio", "mean retention",
               "chance-normalised", *[f"{b} Δ vs baseline" for b in benches], "bytes on disk",
               "compute time"]
    rows = [["baseline (original)", _num(data["baseline"]["ppl"]), "1", "1", "1",
             *["–" for _ in benches], _mb(data["baseline"]["bytes"]), "–"]]
    for s in data["summary"]:
        avg, norm = s["mean_retention"] or {}, s["mean_norm_retention"] or {}
        rows.append([
            s["ordering"] + ("" if s["complete"] else " (incomplete)"),
            _num(s["final_ppl"]), _num(s["ppl_ratio"], ".3f"),
            _pm(avg.get("mean"), avg.get("stderr")) if avg else "–",
            _pm(norm.get("mean"), norm.get("stderr")) if norm else "–",
            *[_pm(s["benchmarks"].get(b, {}).get("diff"),
                  s["benchmarks"].get(b, {}).get("diff_stderr"), pct=True) for b in benches],
            _mb(s["bytes"]), f"{s['wall_s'] / 60:,.1f} min"])
    return columns, rows


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns),
            *["| " + " | ".join(r) + " |" for r in rows]]


def step_rows(ordering: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    columns = ["step", "what pkdq did", "unit", "WikiText-2 ppl", "mean retention", "bytes",
               "time"]
    rows = []
    for i, s in enumerate(ordering["steps"], start=1):
        avg = (s.get("retention") or {}).get("average_retention") or {}
        origin = "" if s["computed_here"] else f" (shared with {s['computed_by']}: cache hit)"
        wall = s["metrics"].get("stage_wall_s")
        rows.append([f"{i}. {s['label']}", s["note"], s["unit"] + origin, _num(s["ppl"]),
                     _pm(avg.get("mean"), avg.get("stderr")) if avg else "–", _mb(s["bytes"]),
                     f"{wall:,.0f} s" if wall else "–"])
    return columns, rows


def render_markdown(data: dict[str, Any]) -> str:
    info = data["compare"]
    recipe = info["recipe"]
    rank = data["ranking"]
    lines = [
        f"# pkdq ordering comparison: {info['run_id']}",
        "",
        f"Recipe **{recipe['name']}** on `{info['model']['spec']}`, orderings "
        f"{', '.join(o['name'] for o in data['orderings'])}; equal budgets (same stage configs, "
        f"seed {info['seed']}, evaluation doc ids); status **{info.get('status', '?')}**.",
        "",
        "## Final models",
        "",
        "Retention = stage / baseline over the informative benchmarks (± standard error); "
        "Δ = paired difference on the same docs. Compute time counts only the steps an ordering "
        "computed itself (shared steps are cache hits).",
        "",
        *_table(*summary_rows(data)),
        "",
        "## Ranking",
        "",
        f"By final perplexity: {' < '.join(rank['by_final_ppl']) or '–'}.",
        f"Study: {rank['study']}.",
        f"Best matches the study: {rank['agrees_best']}; worst is a quantize-before-KD order: "
        f"{rank['agrees_worst']}.",
        "",
    ]
    for ordering in data["orderings"]:
        lines += [f"## {ordering['name']}", "", *_table(*step_rows(ordering)), ""]
    if data["warnings"]:
        lines += ["## Warnings", "", *[f"- {w}" for w in data["warnings"]], ""]
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if k != "platform")
    lines += ["## Reproduce", "",
              f"- model fingerprint `{info['model']['fingerprint']}`, data fingerprint "
              f"`{info['data']['fingerprint']}`",
              f"- versions: {versions}",
              f"- `pkdq compare {info['recipe_source']} --orders "
              f"{','.join(o['name'] for o in data['orderings'])}`", ""]
    return "\n".join(lines)


def write_compare_report(run_dir: Path) -> dict[str, Path]:
    """report.json, report.md and report.html in the comparison's folder."""
    from tasks.compare.page import render_compare_html

    run_dir = Path(run_dir)
    data = collect_compare(run_dir)
    paths = {"json": run_dir / "report.json", "markdown": run_dir / "report.md",
             "html": run_dir / "report.html"}
    write_json_atomic(paths["json"], data)
    paths["markdown"].write_text(render_markdown(data))
    paths["html"].write_text(render_compare_html(data, run_dir))
    shot = screenshot_if_possible(paths["html"], run_dir / "report.png")
    if shot is not None:
        paths["screenshot"] = shot
    return paths


def screenshot_if_possible(html: Path, png: Path) -> Path | None:
    """A PNG of the page as headless Chromium renders it, for people who won't open HTML.

    Best effort: without Debian's chromium the report is complete, just without the picture.
    """
    from tasks.report import browser

    if browser.find_chromium() is None:
        return None
    try:
        return browser.screenshot(html, png, width=1280, height=3200)
    except RuntimeError as exc:
        print(f"[report] no screenshot: {exc}", flush=True)
        return None
