"""The HTML report page of one run, from `tasks.report.run_report.collect`'s data; reusable pieces
for others.

Helpers take plain dicts (a run's collected data, i.e. report.json) and return page sections or
table rows for `tasks.report.html.render_html`, so a comparison report can stack several runs:
every numeric cell is tagged with its dotted path into the report JSON, and `prefix` says where a
run's data sits in that JSON ("" for a single run's report.json, e.g. "orderings.P-KD-Q" when a
comparison nests runs). Only `load_loss_curves` and `write_html` touch the run folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tasks.core.common import read_json, write_text_atomic
from tasks.report import plots
from tasks.report.data_section import DATA_COLUMNS, DATA_NOTE, data_rows
from tasks.report.deploy_speed import COLUMNS as SPEED_COLUMNS
from tasks.report.deploy_speed import (
    GOAL_COLUMNS,
    ROUNDS_COLUMNS,
    goal_rows,
    goal_sentence,
    rounds_note,
    rounds_rows,
    speed_note,
    speed_rows,
)
from tasks.report.format import (
    DASH,
    RETENTION_NOTE,
    SIZE_NOTE,
    Cell,
    extra_retentions,
    json_path,
    num,
    scores_note,
    short_stage,
)
from tasks.report.html import render_html
from tasks.report.retention import primary_metric
from tasks.report.side_by_side import GENERATIONS_NOTE, max_new_tokens, side_by_side

Section = dict[str, Any]
ONE: Cell = {"text": "1"}  # the baseline against itself: numeric-looking, not a report number


def _pct(value: float) -> str:
    return f"{value * 100:.1f}%"


def _ratio(value: float) -> str:
    return f"{value:.3f}"


def _labelled(columns: list[str], label_column: str | None) -> list[str]:
    return [label_column, *columns] if label_column else columns


def _row(label: str | None, cells: list[Cell]) -> list[Cell]:
    return [label, *cells] if label is not None else cells


# --------------------------------------------------------------------------- tables

STAGE_COLUMNS = ["stage", "params", "MB on disk", "WikiText-2 ppl", "ppl ratio",
                 "size vs fp32 baseline", "size vs bf16 baseline", "stage wall time (s)"]


def stage_columns(label_column: str | None = None) -> list[str]:
    return _labelled(STAGE_COLUMNS, label_column)


def stage_rows(data: dict[str, Any], prefix: str = "",
               label: str | None = None) -> list[list[Cell]]:
    """Size, perplexity and time of every stage (the markdown report's Stages table)."""
    rows = []
    for i, entry in enumerate(data["stages"]):
        ev = entry.get("eval") or {}
        ret = entry.get("retention") or {}
        base = json_path(prefix, "stages", i)
        ppl = (ev.get("wikitext") or {}).get("token_perplexity")
        ppl_ratio = (ret.get("perplexity") or {}).get("ratio")
        size_ratio = (ret.get("size") or {}).get("bytes_ratio")
        bf16_ratio = (ret.get("size") or {}).get("bytes_ratio_bf16")
        wall = (entry.get("metrics") or {}).get("stage_wall_s")
        rows.append(_row(label, [
            entry["stage"],
            num(f"{base}.eval.params", ev.get("params"), f"{ev.get('params') or 0:,}"),
            num(f"{base}.eval.bytes_on_disk", ev.get("bytes_on_disk"),
                f"{(ev.get('bytes_on_disk') or 0) / 1e6:,.1f}"),
            num(f"{base}.eval.wikitext.token_perplexity", ppl, f"{ppl or 0:.2f}"),
            num(f"{base}.retention.perplexity.ratio", ppl_ratio, _ratio(ppl_ratio or 0)),
            num(f"{base}.retention.size.bytes_ratio", size_ratio, _ratio(size_ratio or 0)),
            num(f"{base}.retention.size.bytes_ratio_bf16", bf16_ratio, _ratio(bf16_ratio or 0)),
            num(f"{base}.metrics.stage_wall_s", wall, f"{wall or 0:,.0f}"),
        ]))
        if ev.get("gguf"):
            rows.append(_row(label, _gguf_stage_cells(entry, base, ev)))
    return rows


def _gguf_stage_cells(entry: dict[str, Any], base: str, ev: dict[str, Any]) -> list[Cell]:
    """The stage's GGUF as a row of the stage table: the file's bytes, its weights' perplexity
    (llama.cpp's in brackets), its ratios against the baseline."""
    shipped, ret = ev["gguf"], entry.get("retention_gguf") or {}
    ppl = (shipped.get("wikitext") or {}).get("token_perplexity")
    llama = (shipped.get("llama_cpp_wikitext") or {}).get("token_perplexity")
    ppl_ratio = (ret.get("perplexity") or {}).get("ratio")
    size_ratio = (ret.get("size") or {}).get("bytes_ratio")
    bf16_ratio = (ret.get("size") or {}).get("bytes_ratio_bf16")
    text = f"{ppl or 0:.2f}" + (f" ({llama:.2f})" if llama else "")
    return [
        f"{entry['stage']} {shipped['label']}",
        num(f"{base}.eval.params", ev.get("params"), f"{ev.get('params') or 0:,}"),
        num(f"{base}.eval.gguf.bytes_on_disk", shipped.get("bytes_on_disk"),
            f"{(shipped.get('bytes_on_disk') or 0) / 1e6:,.1f}"),
        num(f"{base}.eval.gguf.wikitext.token_perplexity", ppl, text),
        num(f"{base}.retention_gguf.perplexity.ratio", ppl_ratio, _ratio(ppl_ratio or 0)),
        num(f"{base}.retention_gguf.size.bytes_ratio", size_ratio, _ratio(size_ratio or 0)),
        num(f"{base}.retention_gguf.size.bytes_ratio_bf16", bf16_ratio,
            _ratio(bf16_ratio or 0)),
        DASH]


RETENTION_COLUMNS = ["stage", "benchmark", "metric", "n", "score", "± se", "retention s/b",
                     "± se", "chance-normalised", "± se", "paired Δ vs baseline", "± se"]


def retention_columns(label_column: str | None = None) -> list[str]:
    return _labelled(RETENTION_COLUMNS, label_column)


def _pair(path: str, row: dict[str, Any], key: str, err_key: str, fmt: Any) -> list[Cell]:
    """A value and its standard error as two tagged cells."""
    value, err = row.get(key), row.get(err_key)
    return [num(f"{path}.{key}", value, fmt(value or 0)),
            num(f"{path}.{err_key}", err, fmt(err or 0))]


def retention_rows(data: dict[str, Any], prefix: str = "",
                   label: str | None = None) -> list[list[Cell]]:
    """Per benchmark and stage: score, s/b, (s-c)/(b-c), paired Δ, each with its stderr.

    The baseline rows come from the first evaluated stage's retention (which records the
    baseline score and stderr); each stage ends with its mean over informative benchmarks.
    """
    measured = [(i, e) for i, e in enumerate(data["stages"]) if e.get("retention")]
    if not measured:
        return []
    first_i, first = measured[0]
    rows: list[list[Cell]] = []
    for name, r in first["retention"]["benchmarks"].items():
        path = json_path(prefix, "stages", first_i, "retention", "benchmarks", name)
        rows.append(_row(label, [
            "baseline", name, r["metric"], num(f"{path}.n", r.get("n"), str(r.get("n"))),
            num(f"{path}.baseline", r["baseline"], _pct(r["baseline"])),
            num(f"{path}.baseline_stderr", r["baseline_stderr"], _pct(r["baseline_stderr"])),
            ONE, DASH, ONE, DASH, DASH, DASH]))
    for i, entry in measured:
        ret = entry["retention"]
        for name, r in ret["benchmarks"].items():
            path = json_path(prefix, "stages", i, "retention", "benchmarks", name)
            flag = " (uninformative)" if r.get("uninformative") else ""
            rows.append(_row(label, [
                entry["stage"], name + flag, r["metric"],
                num(f"{path}.n", r.get("n"), str(r.get("n"))),
                *_pair(path, r, "score", "stderr", _pct),
                *_pair(path, r, "ratio", "ratio_stderr", _ratio),
                *_pair(path, r, "norm_ratio", "norm_ratio_stderr", _ratio),
                *_pair(path, r, "diff", "diff_stderr", _pct)]))
        avg, norm = ret.get("average_retention"), ret.get("average_norm_retention")
        if avg:
            path = json_path(prefix, "stages", i, "retention")
            rows.append(_row(label, [
                entry["stage"], f"mean of {avg['k']} informative", "", "", "", "",
                *_pair(f"{path}.average_retention", avg, "mean", "stderr", _ratio),
                *(_pair(f"{path}.average_norm_retention", norm, "mean", "stderr", _ratio)
                  if norm else [DASH, DASH]),
                "", ""]))
        for key, extra, other in extra_retentions(entry):
            for name, r in (other.get("benchmarks") or {}).items():
                path = json_path(prefix, "stages", i, key, "benchmarks", name)
                rows.append(_row(label, [
                    f"{entry['stage']} {extra}", name, r["metric"],
                    num(f"{path}.n", r.get("n"), str(r.get("n"))),
                    *_pair(path, r, "score", "stderr", _pct),
                    *_pair(path, r, "ratio", "ratio_stderr", _ratio),
                    *_pair(path, r, "norm_ratio", "norm_ratio_stderr", _ratio),
                    *_pair(path, r, "diff", "diff_stderr", _pct)]))
    return rows


def generations_section(data: dict[str, Any]) -> Section | None:
    """Every stage's greedy answer next to the baseline's, one row per prompt."""
    stages, prompts = side_by_side(data)
    if not prompts:
        return None
    rows: list[list[Cell]] = [[p["prompt"], *[p["answers"].get(s, DASH) for s in stages]]
                              for p in prompts]
    section = table_section("Generations side by side", ["prompt", *stages], rows,
                            note=f"{GENERATIONS_NOTE} At most {max_new_tokens(data)} new tokens.")
    section["css_class"] = "generations"
    return section


def table_section(title: str, columns: list[str], rows: list[list[Cell]],
                  note: str | None = None) -> Section:
    section: Section = {"kind": "table", "title": title, "columns": columns, "rows": rows}
    if note:
        section["note"] = note
    return section


def table_records(columns: list[str], rows: list[list[Cell]]) -> list[dict[str, str]]:
    """Rows as {column: text}, for places that show text only (a Prefect table artifact).

    A repeated column name ("± se") is prefixed with the column before it, to stay unique.
    """
    names = [f"{columns[i - 1]} {col}" if i and columns.count(col) > 1 else col
             for i, col in enumerate(columns)]
    return [{name: (c["text"] if isinstance(c, dict) else str(c))
             for name, c in zip(names, row, strict=True)} for row in rows]


# --------------------------------------------------------------------------- figures

def stage_quality(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per evaluated stage: label, baseline flag, bytes, WikiText-2 ppl, mean primary accuracy.

    The accuracy averages the primary metric of the benchmarks the baseline ran, so every
    stage averages the same benchmarks.
    """
    baseline_tasks: list[str] | None = None
    out = []
    for entry in data["stages"]:
        ev = entry.get("eval")
        if not ev:
            continue
        tasks = ev.get("tasks") or {}
        if baseline_tasks is None:
            baseline_tasks = list(tasks)
        scores = [float(tasks[t][primary_metric(tasks[t])]) for t in baseline_tasks if t in tasks]
        errs = [tasks[t].get(f"{primary_metric(tasks[t])}_stderr") for t in baseline_tasks
                if t in tasks]
        complete = bool(scores) and len(scores) == len(baseline_tasks)
        out.append({
            "stage": entry["stage"], "label": short_stage(entry["stage"]),
            "baseline": entry["stage"].endswith("baseline"),
            "bytes": ev.get("bytes_on_disk"),
            "ppl": (ev.get("wikitext") or {}).get("token_perplexity"),
            "accuracy": sum(scores) / len(scores) if complete else None,
            # the mean's standard error, the benchmarks taken as independent (the table's)
            "accuracy_stderr": (math.sqrt(sum(float(e) ** 2 for e in errs)) / len(errs)
                                if complete and all(e is not None for e in errs) else None),
            "benchmarks": baseline_tasks,
        })
    return out


def _series(quality: dict[str, list[dict[str, Any]]], key: str
            ) -> tuple[dict[str, list[tuple[str, float]]], float | None]:
    series = {name: [(q["label"], q[key]) for q in qs if q[key] is not None]
              for name, qs in quality.items()}
    base = next((q[key] for qs in quality.values() for q in qs if q["baseline"]), None)
    return {k: v for k, v in series.items() if v}, base


def quality_figures(runs: dict[str, dict[str, Any]]) -> dict[str, bytes]:
    """Perplexity and mean accuracy per stage, and ppl against size; one series per run.

    `runs` maps a series name (the run id, or an ordering such as "P-KD-Q") to collected data.
    Keys of the result: "ppl", "accuracy", "size" (a figure is left out when it has no data).
    """
    quality = {name: stage_quality(data) for name, data in runs.items()}
    figures: dict[str, bytes] = {}
    ppl, ppl_base = _series(quality, "ppl")
    if ppl:
        figures["ppl"] = plots.quality_per_stage(ppl, "WikiText-2 perplexity", ppl_base)
    acc, acc_base = _series(quality, "accuracy")
    if acc:
        names = next((q["benchmarks"] for qs in quality.values() for q in qs), [])
        errors = {name: [q["accuracy_stderr"] for q in qs if q["accuracy"] is not None]
                  for name, qs in quality.items()}
        figures["accuracy"] = plots.quality_per_stage(
            acc, f"mean accuracy ({', '.join(names)}), ± 1 s.e.", acc_base, errors=errors)
    points = [{"label": q["label"], "series": name, "bytes": q["bytes"], "value": q["ppl"],
               "baseline": q["baseline"]}
              for name, qs in quality.items() for q in qs
              if q["bytes"] is not None and q["ppl"] is not None]
    if points:
        figures["size"] = plots.size_vs_quality(points)
    return figures


FIGURE_TITLES = {
    "ppl": "WikiText-2 perplexity per stage",
    "accuracy": "Mean benchmark accuracy per stage",
    "size": "Size on disk against WikiText-2 perplexity",
}


def figure_sections(figures: dict[str, bytes]) -> list[Section]:
    return [{"kind": "image", "title": FIGURE_TITLES.get(key, key), "png": png,
             "alt": FIGURE_TITLES.get(key, key)} for key, png in figures.items()]


def load_loss_curves(run_dir: Path, data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{stage folder: loss_curve.json} for every stage that wrote one (the KD stages)."""
    curves = {}
    for entry in data["stages"]:
        path = Path(run_dir) / entry["stage"] / "loss_curve.json"
        if path.is_file():
            curves[entry["stage"]] = read_json(path)
    return curves


def loss_curve_sections(curves: dict[str, dict[str, Any]], label: str = "") -> list[Section]:
    prefix = f"{label}: " if label else ""
    return [{"kind": "image", "title": f"{prefix}KD loss curve ({stage})",
             "png": plots.loss_curve(curve), "alt": f"training loss and held-out KL of {stage}"}
            for stage, curve in curves.items()]


# --------------------------------------------------------------------------- context

def environment_sections(run: dict[str, Any], prefix: str = "run") -> list[Section]:
    """What reproduces the run: seed, fingerprints, package versions, and the full recipe."""
    rows: list[list[Cell]] = [
        ["run id", run.get("run_id", DASH)],
        ["status", str(run.get("status", "?"))],
        ["seed", num(json_path(prefix, "seed"), run.get("seed"), str(run.get("seed")))],
        ["threads", num(json_path(prefix, "threads"), run.get("threads"),
                        str(run.get("threads")))],
        ["model", str((run.get("model") or {}).get("spec", DASH))],
        ["model fingerprint", str((run.get("model") or {}).get("fingerprint", DASH))],
        ["data fingerprint", str((run.get("data") or {}).get("fingerprint", DASH))],
        ["recipe source", str(run.get("recipe_source", DASH))],
        ["created", str(run.get("created", DASH))],
        *[[name, str(version)] for name, version in (run.get("versions") or {}).items()],
    ]
    return [table_section("Environment", ["", "value"], rows),
            {"kind": "code", "title": "Recipe (as run)",
             "text": json.dumps(run.get("recipe"), indent=2)}]


def speed_sections(data: dict[str, Any]) -> list[Section]:
    """Speed where it is deployed (llama.cpp, transformers beside it) and the goal verdict;
    nothing when no stage was timed in llama.cpp."""
    rows = speed_rows(data)
    if not rows:
        return []
    summary = data.get("deploy_speed")
    sections = [table_section("Speed where it is deployed", SPEED_COLUMNS, rows,
                              note=speed_note(data))]
    if data.get("llama_cpp_rounds"):
        sections.append(table_section("Speed side by side (llama.cpp, baseline and final model)",
                                      ROUNDS_COLUMNS, rounds_rows(data), note=rounds_note(data)))
    goal = goal_rows(summary)
    sections.append(table_section("Speed goal (llama.cpp, final model)", GOAL_COLUMNS, goal,
                                  note=goal_sentence(summary).replace("**", ""))
                    if goal else {"kind": "text", "title": "Speed goal (llama.cpp, final model)",
                                  "text": goal_sentence(summary).replace("**", "")})
    return sections


def warnings_section(items: list[str]) -> Section:
    return {"kind": "warnings", "title": "Warnings", "items": list(items)}


def run_subtitle(run: dict[str, Any]) -> str:
    recipe = run["recipe"]
    chain = " → ".join(k for s in recipe["stages"] for k in s)
    return (f"Recipe {recipe['name']} ({chain}) on {run['model']['spec']}; "
            f"status {run.get('status', '?')}, seed {run['seed']}.")


def run_page(data: dict[str, Any], curves: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The page of one run: warnings first, then tables, figures, loss curves, environment."""
    run = data["run"]
    sections: list[Section] = [
        warnings_section(data["warnings"]),
        table_section("Stages", stage_columns(), stage_rows(data), note=SIZE_NOTE),
        table_section("Retention per benchmark", retention_columns(), retention_rows(data),
                      note=f"{RETENTION_NOTE} {scores_note(data['stages'])}"),
        *speed_sections(data),
        *([table_section("Training data and contamination", DATA_COLUMNS, data_rows(data),
                         note=DATA_NOTE)] if data_rows(data) else []),
        *figure_sections(quality_figures({run["run_id"]: data})),
        *[s for s in [generations_section(data)] if s is not None],
        *loss_curve_sections(curves),
        *environment_sections(run),
    ]
    return {"title": f"pkdq report: {run['run_id']}", "subtitle": run_subtitle(run),
            "sections": sections}


def write_html(run_dir: Path, data: dict[str, Any]) -> Path:
    """report.html next to report.json; `data` is what report.json holds."""
    path = Path(run_dir) / "report.html"
    write_text_atomic(path, render_html(run_page(data, load_loss_curves(run_dir, data))))
    return path
