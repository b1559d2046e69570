"""The run report from the run folder alone: report.json (every number), report.md, report.html.

Nothing here reads live state: a report can be rebuilt on another machine from a copied folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.core.common import (
    EVAL_JSON,
    GGUF_SAMPLES_JSON,
    LLAMA_CPP_FILE,
    LLAMA_CPP_ROUNDS_FILE,
    SAMPLES_JSON,
    SERVED_SAMPLES_JSON,
    read_json,
    write_json_atomic,
)
from tasks.report.data_section import data_markdown
from tasks.report.deploy_speed import deploy_summary, speed_markdown
from tasks.report.format import RETENTION_NOTE, SIZE_NOTE, extra_retentions, scores_note
from tasks.report.format import fmt as _fmt  # old private names: other modules import them here
from tasks.report.format import pm as _pm
from tasks.report.retention import stage_retention
from tasks.report.side_by_side import GENERATIONS_NOTE, max_new_tokens, side_by_side

SAMPLES_FILE = Path("eval") / SAMPLES_JSON
SERVED_SAMPLES_FILE = Path("eval") / SERVED_SAMPLES_JSON
GGUF_SAMPLES_FILE = Path("eval") / GGUF_SAMPLES_JSON
GENERATIONS_FILE = Path("eval") / "generations.json"


def _maybe_json(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


def collect(run_dir: Path) -> dict[str, Any]:
    """Every number of the run, stage by stage, with retention against the baseline."""
    run = read_json(run_dir / "run.json")
    stages: list[dict[str, Any]] = []
    baseline_eval = baseline_samples = None
    for folder in run["stages"]:
        stage_dir = run_dir / folder
        evaluation = _maybe_json(stage_dir / EVAL_JSON)
        samples = _maybe_json(stage_dir / SAMPLES_FILE)
        record = _maybe_json(stage_dir / "stage.json")
        metrics = _maybe_json(stage_dir / "metrics.json") or {}
        entry: dict[str, Any] = {"stage": folder, "finished": evaluation is not None,
                                 "metrics": metrics, "eval": evaluation,
                                 "model": (record or {}).get("model")}
        entry["generations"] = _maybe_json(stage_dir / GENERATIONS_FILE)
        entry["llama_cpp"] = _maybe_json(stage_dir / LLAMA_CPP_FILE)  # speed where deployed
        if folder.endswith("baseline"):
            baseline_eval, baseline_samples = evaluation, samples
        elif evaluation is not None and baseline_eval is not None:
            entry["retention"] = stage_retention(baseline_eval, evaluation, baseline_samples,
                                                 samples)
            served = evaluation.get("served")
            if served:  # the same docs scored as a user's runtime loads the model
                entry["retention_served"] = stage_retention(
                    baseline_eval, {"tasks": served["tasks"]}, baseline_samples,
                    _maybe_json(stage_dir / SERVED_SAMPLES_FILE))
            shipped = evaluation.get("gguf")
            if shipped:  # the stage's GGUF, its own weights: the file a llama.cpp user ships
                entry["retention_gguf"] = stage_retention(
                    baseline_eval, {**shipped, "params": evaluation.get("params")},
                    baseline_samples, _maybe_json(stage_dir / GGUF_SAMPLES_FILE))
        stages.append(entry)
    rounds = _maybe_json(run_dir / stages[-1]["stage"] / LLAMA_CPP_ROUNDS_FILE) if stages \
        else None  # the baseline and the final model timed side by side
    return {"run": run, "stages": stages, "llama_cpp_rounds": rounds,
            "deploy_speed": deploy_summary(stages, rounds),
            "warnings": warnings(stages)}


def warnings(stages: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for entry in stages:
        ret = entry.get("retention") or {}
        for name, bench in (ret.get("benchmarks") or {}).items():
            if bench.get("uninformative"):
                out.append(f"{name}: baseline within 2 standard errors of chance — "
                           "uninformative at this size, kept out of averages")
        if not entry["finished"]:
            out.append(f"{entry['stage']}: not finished")
        metrics = entry.get("metrics") or {}
        for layer in metrics.get("layers_skipped") or []:
            out.append(f"{entry['stage']}: layer skipped by quantization: {layer}")
        for name, row in ((metrics.get("contamination") or {}).get("sets") or {}).items():
            if row["overlapping_documents"]:
                out.append(f"{entry['stage']}: {row['overlapping_documents']} of "
                           f"{row['documents']} {name} documents share a 13-gram with its "
                           "training text")
        if metrics.get("early_stopped"):
            out.append(f"{entry['stage']}: KD stopped early at step {metrics.get('steps')}")
    return sorted(set(out), key=out.index)


def _stage_row(stage: str, ev: dict[str, Any], ret: dict[str, Any], wall: float | None,
               llama_ppl: float | None = None) -> str:
    ppl = (ev.get("wikitext") or {}).get("token_perplexity")
    ppl_cell = f"{ppl:.2f}" if ppl else "–"
    if llama_ppl:
        ppl_cell += f" ({llama_ppl:.2f})"
    return "| {} | {} | {} | {} | {} | {} | {} | {} |".format(
        stage,
        f"{ev['params']:,}" if ev.get("params") else "–",
        f"{ev['bytes_on_disk'] / 1e6:,.1f} MB" if "bytes_on_disk" in ev else "–",
        ppl_cell,
        _fmt((ret.get("perplexity") or {}).get("ratio")),
        _fmt((ret.get("size") or {}).get("bytes_ratio")),
        _fmt((ret.get("size") or {}).get("bytes_ratio_bf16")),
        f"{wall:,.0f} s" if wall else "–",
    )


def _stage_rows(data: dict[str, Any]) -> list[str]:
    rows = ["| stage | params | bytes on disk | WikiText-2 ppl | ppl ratio "
            "| size vs fp32 baseline | size vs bf16 baseline | wall time |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for entry in data["stages"]:
        ev = entry.get("eval") or {}
        rows.append(_stage_row(entry["stage"], ev, entry.get("retention") or {},
                               (entry["metrics"] or {}).get("stage_wall_s")))
        shipped = ev.get("gguf")
        if shipped:
            llama = (shipped.get("llama_cpp_wikitext") or {}).get("token_perplexity")
            rows.append(_stage_row(f"{entry['stage']} {shipped['label']}",
                                   {**shipped, "params": ev.get("params")},
                                   entry.get("retention_gguf") or {}, None, llama))
    return rows


def _retention_rows(data: dict[str, Any]) -> list[str]:
    measured = [e for e in data["stages"] if e.get("retention")]
    if not measured:
        return ["(no stage evaluated against the baseline yet)"]
    rows = ["| stage | benchmark | metric | n | score | retention s/b | chance-normalised "
            "| paired Δ vs baseline |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in measured[0]["retention"]["benchmarks"].items():
        rows.append(f"| baseline | {name} | {r['metric']} | {r.get('n', '–')} | "
                    f"{_pm(r['baseline'], r['baseline_stderr'], pct=True)} | 1 | 1 | – |")
    for entry in measured:
        ret = entry["retention"]
        for name, r in ret["benchmarks"].items():
            flag = " (uninformative)" if r.get("uninformative") else ""
            rows.append(
                f"| {entry['stage']} | {name}{flag} | {r['metric']} | {r.get('n', '–')} | "
                f"{_pm(r['score'], r['stderr'], pct=True)} | "
                f"{_pm(r['ratio'], r['ratio_stderr'])} | "
                f"{_pm(r['norm_ratio'], r['norm_ratio_stderr'])} | "
                f"{_pm(r['diff'], r['diff_stderr'], pct=True)} |")
        rows += _mean_row(entry["stage"], ret)
        for _, extra, other in extra_retentions(entry):
            label = f"{entry['stage']} {extra}"
            for name, r in other["benchmarks"].items():
                rows.append(
                    f"| {label} | {name} | {r['metric']} | {r.get('n', '–')} | "
                    f"{_pm(r['score'], r['stderr'], pct=True)} | "
                    f"{_pm(r['ratio'], r['ratio_stderr'])} | "
                    f"{_pm(r['norm_ratio'], r['norm_ratio_stderr'])} | "
                    f"{_pm(r['diff'], r['diff_stderr'], pct=True)} |")
            rows += _mean_row(label, other)
    return rows


def _mean_row(label: str, ret: dict[str, Any]) -> list[str]:
    """The informative benchmarks' mean retention (plain and chance-normalised), if any."""
    avg, norm = ret.get("average_retention"), ret.get("average_norm_retention")
    if not avg:
        return []
    return [f"| {label} | **mean of {avg['k']} informative** | | | | "
            f"{_pm(avg['mean'], avg['stderr'])} | "
            f"{_pm(norm['mean'], norm['stderr']) if norm else '–'} | |"]


def _generation_lines(data: dict[str, Any]) -> list[str]:
    stages, prompts = side_by_side(data)
    if not prompts:
        return []
    lines = ["## Generations side by side", "",
             f"{GENERATIONS_NOTE} At most {max_new_tokens(data)} new tokens.", ""]
    for row in prompts:
        lines += [f"**{row['prompt']}**", "", "| stage | answer |", "| --- | --- |"]
        for stage in stages:
            text = row["answers"].get(stage, "–")
            cell = " ".join(text.replace("|", "\\|").split("\n")).strip() or "(empty)"
            lines.append(f"| {stage} | {cell} |")
        lines.append("")
    return lines


def render_markdown(data: dict[str, Any]) -> str:
    run = data["run"]
    recipe = run["recipe"]
    stage_chain = " → ".join(k for s in recipe["stages"] for k in s)
    lines = [
        f"# pkdq report: {run['run_id']}",
        "",
        f"Recipe **{recipe['name']}** ({stage_chain}) on `{run['model']['spec']}`; "
        f"status **{run.get('status', '?')}**, seed {run['seed']}.",
        "",
        "## Stages",
        "",
        *_stage_rows(data),
        "",
        SIZE_NOTE,
        "",
        "## Retention per benchmark",
        "",
        RETENTION_NOTE,
        "",
        scores_note(data["stages"]),
        "",
        *_retention_rows(data),
        "",
        *speed_markdown(data),
        *_generation_lines(data),
    ]
    lines += data_markdown(data)
    if data["warnings"]:
        lines += ["## Warnings", "", *[f"- {w}" for w in data["warnings"]], ""]
    versions = ", ".join(f"{k} {v}" for k, v in run["versions"].items() if k != "platform")
    lines += [
        "## Reproduce",
        "",
        f"- model fingerprint `{run['model']['fingerprint']}`, data fingerprint "
        f"`{run['data']['fingerprint']}`",
        f"- versions: {versions}",
        f"- `pkdq run {run['recipe_source']}`",
        "",
    ]
    return "\n".join(lines)


def write_report(run_dir: Path) -> dict[str, Path]:
    """report.json, report.md and the self-contained report.html (plots inline)."""
    from tasks.report.page import write_html  # matplotlib: only when a page is written

    run_dir = Path(run_dir)
    data = collect(run_dir)
    json_path, md_path = run_dir / "report.json", run_dir / "report.md"
    search = run_dir / "search" / "search.md"  # a budget search chose the prune stage's shape
    if search.is_file():
        data["search"] = read_json(run_dir / "search" / "results.json")
    write_json_atomic(json_path, data)
    md_path.write_text(render_markdown(data) + ("\n" + search.read_text() if search.is_file()
                                                else ""))
    return {"markdown": md_path, "json": json_path, "html": write_html(run_dir, data)}
