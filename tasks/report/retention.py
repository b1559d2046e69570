"""Retention: how much of the baseline's quality a stage kept, with honest error bars.

Per benchmark: the raw ratio s/b, the chance-normalised ratio (s-c)/(b-c) (a 4-way benchmark at
chance keeps "100%" of a baseline that is itself at chance, which means nothing), and the paired
difference s-b. Standard errors use the delta method; when per-doc results of both models on the
same docs are given, the covariance between the two scores enters too, which is what makes a
paired comparison far tighter than two independent error bars. A benchmark whose baseline is
within 2 standard errors of chance is flagged `uninformative` and kept out of the averages.

Inputs are the dicts `tasks.evaluate.stage.evaluate_model` returns (eval.json) and, optionally, the
per-doc files it writes (eval_samples.json: {task: {metric: {doc_id: 0/1}}}). Pure Python.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tasks.core.common import EVAL_JSON, SAMPLES_JSON

UNINFORMATIVE_SIGMAS = 2.0

PerDoc = dict[str, float]


def primary_metric(task: dict[str, Any]) -> str:
    """The task's primary metric as recorded by evaluate, else acc_norm when present, else acc."""
    if task.get("metric"):
        return str(task["metric"])
    return "acc_norm" if "acc_norm" in task else "acc"


def per_doc(samples: dict[str, Any] | None, task: str, metric: str) -> PerDoc | None:
    """{doc_id: value} for one task/metric; accepts {metric: {id: v}} or a flat {id: v}."""
    if not samples or task not in samples:
        return None
    entry = samples[task]
    if metric in entry and isinstance(entry[metric], dict):
        return {str(k): float(v) for k, v in entry[metric].items()}
    if entry and all(isinstance(v, (int, float)) for v in entry.values()):
        return {str(k): float(v) for k, v in entry.items()}
    return None


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def paired_stats(base: PerDoc, stage: PerDoc) -> dict[str, Any] | None:
    """Paired difference and covariance of the two means over the docs both models scored.

    Returns None with fewer than 2 shared docs (no variance estimate). `same_docs` says whether
    both models scored exactly the same docs, the case in which `cov` belongs with their stderrs.
    """
    ids = sorted(set(base) & set(stage))
    n = len(ids)
    if n < 2:
        return None
    b = [base[i] for i in ids]
    s = [stage[i] for i in ids]
    d = [y - x for x, y in zip(b, s, strict=True)]
    mb, ms, md = _mean(b), _mean(s), _mean(d)
    var_d = sum((x - md) ** 2 for x in d) / (n - 1)
    cov = sum((x - mb) * (y - ms) for x, y in zip(b, s, strict=True)) / (n - 1) / n
    return {"n": n, "diff": md, "diff_stderr": math.sqrt(var_d / n), "cov": cov,
            "same_docs": set(base) == set(stage)}


def paired_text(against: dict[str, Any] | None, mine: dict[str, Any] | None, task: str,
                metric: str) -> str:
    """'+3.5 ± 2.1': `mine` minus `against` in points over the docs both scored, from two per-doc
    samples files; '–' when either lacks the task (tables print it as a cell)."""
    theirs, ours = per_doc(against, task, metric), per_doc(mine, task, metric)
    stats = paired_stats(theirs, ours) if theirs and ours else None
    if stats is None:
        return "–"
    return f"{100 * stats['diff']:+.1f} ± {100 * stats['diff_stderr']:.1f}"


def ratio_stderr(s: float, ss: float, b: float, sb: float, cov: float = 0.0) -> float | None:
    """Delta-method stderr of s/b: sqrt(ss^2 + R^2 sb^2 - 2 R cov) / |b|."""
    if b == 0:
        return None
    r = s / b
    var = (ss ** 2 + r ** 2 * sb ** 2 - 2 * r * cov) / b ** 2
    return math.sqrt(max(var, 0.0))


def benchmark_retention(base: dict[str, Any], stage: dict[str, Any],
                        paired: dict[str, Any] | None = None) -> dict[str, Any]:
    """Scores, ratios and differences of one benchmark (see module docstring)."""
    metric = primary_metric(base)
    b, s = float(base[metric]), float(stage[metric])
    sb = float(base.get(f"{metric}_stderr") or 0.0)
    ss = float(stage.get(f"{metric}_stderr") or 0.0)
    c = float(base.get("chance", 0.0))
    cov = paired["cov"] if paired and paired["same_docs"] else 0.0
    out: dict[str, Any] = {
        "metric": metric, "baseline": b, "baseline_stderr": sb, "score": s, "stderr": ss,
        "chance": c, "n": stage.get("n"),
        "uninformative": (b - c) <= UNINFORMATIVE_SIGMAS * sb + 1e-12,  # float-safe "within"
        "ratio": s / b if b else None,
        "ratio_stderr": ratio_stderr(s, ss, b, sb, cov),
        # (s-c)/(b-c): the same delta method, shifting both scores by the constant c
        "norm_ratio": (s - c) / (b - c) if b != c else None,
        "norm_ratio_stderr": ratio_stderr(s - c, ss, b - c, sb, cov),
        "diff": s - b,
    }
    if paired:
        out.update(diff_stderr=paired["diff_stderr"], paired=True, n_paired=paired["n"],
                   paired_diff=paired["diff"])
    else:
        out.update(diff_stderr=math.sqrt(ss ** 2 + sb ** 2), paired=False, n_paired=0)
    return out


def _average(rows: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """Mean of a ratio over benchmarks; stderr assumes the benchmarks are independent."""
    vals = [(r[key], r[f"{key}_stderr"]) for r in rows if r[key] is not None]
    if not vals:
        return None
    k = len(vals)
    se = [e for _, e in vals if e is not None]
    stderr = math.sqrt(sum(e ** 2 for e in se)) / k if len(se) == k else None
    return {"mean": sum(v for v, _ in vals) / k, "stderr": stderr, "k": k}


def safe_ratio(num: Any, den: Any) -> float | None:
    """num / den, or None when either is missing or den is 0 (a ratio the data cannot give)."""
    if num is None or den in (None, 0):
        return None
    return float(num) / float(den)


def perplexity_ratio(baseline: dict[str, Any], stage: dict[str, Any]) -> dict[str, Any] | None:
    """stage / baseline WikiText perplexity (> 1 means worse); token and word level."""
    bw, sw = baseline.get("wikitext"), stage.get("wikitext")
    if not bw or not sw:
        return None
    return {
        "baseline": bw.get("token_perplexity"),
        "stage": sw.get("token_perplexity"),
        "ratio": safe_ratio(sw.get("token_perplexity"), bw.get("token_perplexity")),
        "word_ratio": safe_ratio(sw.get("word_perplexity"), bw.get("word_perplexity")),
        "same_slice": (bw.get("tokens"), bw.get("max_length"))
        == (sw.get("tokens"), sw.get("max_length")),
    }


BF16_BYTES = 2


def size_ratio(baseline: dict[str, Any], stage: dict[str, Any]) -> dict[str, Any]:
    """stage / baseline parameter count and bytes on disk, and bytes against the baseline in
    bf16 (its parameters at 2 bytes each): what a team would otherwise ship, where the fp32
    folder pkdq evaluates is twice that and flatters every ratio by 2x."""
    params = baseline.get("params")
    bf16 = params * BF16_BYTES if params else None
    return {
        "bytes_baseline_bf16": bf16,
        "bytes_ratio_bf16": safe_ratio(stage.get("bytes_on_disk"), bf16),
        "params_baseline": baseline.get("params"),
        "params_stage": stage.get("params"),
        "params_ratio": safe_ratio(stage.get("params"), baseline.get("params")),
        "bytes_baseline": baseline.get("bytes_on_disk"),
        "bytes_stage": stage.get("bytes_on_disk"),
        "bytes_ratio": safe_ratio(stage.get("bytes_on_disk"), baseline.get("bytes_on_disk")),
    }


def stage_retention(baseline: dict[str, Any], stage: dict[str, Any],
              baseline_samples: dict[str, Any] | None = None,
              stage_samples: dict[str, Any] | None = None) -> dict[str, Any]:
    """Retention of `stage` against `baseline` on every benchmark both evaluated.

    The averages (`average_retention` of s/b, `average_norm_retention` of (s-c)/(b-c)) cover
    informative benchmarks only; `uninformative` lists the ones left out and why is in each row.
    """
    rows: dict[str, dict[str, Any]] = {}
    base_tasks, stage_tasks = baseline.get("tasks", {}), stage.get("tasks", {})
    for task in base_tasks:
        if task not in stage_tasks:
            continue
        metric = primary_metric(base_tasks[task])
        bdocs = per_doc(baseline_samples, task, metric)
        sdocs = per_doc(stage_samples, task, metric)
        paired = paired_stats(bdocs, sdocs) if bdocs and sdocs else None
        rows[task] = benchmark_retention(base_tasks[task], stage_tasks[task], paired)
    informative = [r for r in rows.values() if not r["uninformative"]]
    return {
        "benchmarks": rows,
        "average_retention": _average(informative, "ratio"),
        "average_norm_retention": _average(informative, "norm_ratio"),
        "informative": [t for t, r in rows.items() if not r["uninformative"]],
        "uninformative": [t for t, r in rows.items() if r["uninformative"]],
        "perplexity": perplexity_ratio(baseline, stage),
        "size": size_ratio(baseline, stage),
    }


def retention_from_dirs(baseline_dir: Path, stage_dir: Path) -> dict[str, Any]:
    """`retention` from two evaluate output folders (eval.json + eval_samples.json if present)."""
    def load(folder: Path, name: str) -> Any:
        path = Path(folder) / name
        return json.loads(path.read_text()) if path.is_file() else None

    return stage_retention(load(baseline_dir, EVAL_JSON), load(stage_dir, EVAL_JSON),
                     load(baseline_dir, SAMPLES_JSON), load(stage_dir, SAMPLES_JSON))
