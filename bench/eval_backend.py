"""pkdq's lm-eval backend vs stock HFLM: same model, tasks and doc ids, side by side in one run.

For every task both backends run through lm-eval's `simple_evaluate` on the same seeded docs;
the table gives the largest per-request log-likelihood difference, whether every per-doc
accuracy is identical, and the speed ratio of the time spent inside the model backend (process
CPU seconds, which other jobs on a shared machine disturb far less than wall time; wall time is
listed too). A second table measures bfloat16 against float32 in the pkdq backend: score drift in
standard errors and speed. Run it under the heavy-job lock:

    flock /tmp/pkdq-heavy.lock python -m bench.eval_backend --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from tasks.core.common import REPO_ROOT, set_offline_env, write_json_atomic

RESULTS = REPO_ROOT / "bench" / "results"
TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "lambada_openai",
         "boolq", "wikitext")
BF16_TASKS = ("arc_easy", "piqa")


class Stopwatch:
    """Wall and CPU seconds spent inside the wrapped LM methods (not lm-eval's own work)."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall += time.perf_counter() - wall
                self.cpu += time.process_time() - cpu
        return timed


def instrument(lm: Any) -> Stopwatch:
    """Time the request types lm-eval calls (HFLM's rolling path calls the token-level method
    directly, so nothing is counted twice)."""
    watch = Stopwatch()
    for name in ("loglikelihood", "loglikelihood_rolling"):
        setattr(lm, name, watch.wrap(getattr(lm, name)))
    return watch


def _numbers(resps: Any) -> Iterable[float]:
    """Log-likelihoods inside a sample's responses (nested lists/tuples), greedy flags skipped."""
    if isinstance(resps, bool):
        return
    if isinstance(resps, (int, float)):
        yield float(resps)
        return
    for item in resps:
        yield from _numbers(item)


def per_doc(raw: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(s["doc_id"]): s for s in raw["samples"]}


def compare(ref: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Largest |Δ log-likelihood| over all requests, and per-doc metric disagreements."""
    a, b = per_doc(ref), per_doc(new)
    assert a.keys() == b.keys(), "backends scored different docs"
    worst, n_req, flips = 0.0, 0, 0
    for doc_id, sa in a.items():
        xs, ys = list(_numbers(sa["resps"])), list(_numbers(b[doc_id]["resps"]))
        assert len(xs) == len(ys), f"doc {doc_id}: different request counts"
        n_req += len(xs)
        worst = max([worst, *(abs(x - y) for x, y in zip(xs, ys, strict=True))])
        flips += sum(sa.get(m) != b[doc_id].get(m) for m in ("acc", "acc_norm") if m in sa)
    return {"requests": n_req, "max_abs_delta": worst, "metric_flips": flips}


def paired_stderr(ref: dict[str, Any], new: dict[str, Any], metric: str) -> float:
    """Standard error of the mean per-doc difference new - ref (same docs): the error bar of a
    comparison between two evaluations of the same docs, smaller than either score's own."""
    import math

    a, b = per_doc(ref), per_doc(new)
    diffs = [float(b[d][metric]) - float(a[d][metric]) for d in a]
    n = len(diffs)
    if n < 2:
        return float("nan")
    mean = sum(diffs) / n
    return math.sqrt(sum((x - mean) ** 2 for x in diffs) / (n - 1) / n)


def run(lm: Any, task: str, ids: list[int], n_docs: int, manager: Any, seed: int) -> dict[str, Any]:
    from tasks.evaluate.stage import run_task, summarise_task

    watch = instrument(lm)
    start = time.perf_counter()
    raw = run_task(lm, task, ids, n_docs, manager, seed)
    return {"raw": raw, "summary": summarise_task(task, raw), "model_cpu_s": watch.cpu,
            "model_wall_s": watch.wall, "total_wall_s": time.perf_counter() - start}


def _score(summary: dict[str, Any], task: str) -> tuple[str, float, float]:
    """(metric, value, stderr) for the table: primary accuracy, or word perplexity."""
    if task == "wikitext":
        return "word_ppl", summary["word_perplexity"], float("nan")
    metric = summary["metric"]
    return metric, summary[metric], summary.get(f"{metric}_stderr", float("nan"))


def side_by_side(model: Any, tokenizer: Any, tasks: list[str], samples: int, seed: int,
                 batch_size: int, wikitext_pages: int, max_length: int) -> list[dict[str, Any]]:
    from tasks.evaluate.stage import make_lm, sample_doc_ids, task_manager, task_size

    manager = task_manager()
    rows = []
    for task in tasks:
        n_docs = task_size(task)
        wiki = task == "wikitext"
        ids = sample_doc_ids(task, n_docs, wikitext_pages if wiki else samples, seed)
        length = max_length if wiki else None
        hf = run(make_lm(model, tokenizer, "hf", batch_size, length), task, ids, n_docs, manager,
                 seed)
        pk = run(make_lm(model, tokenizer, "pkdq", batch_size, length), task, ids, n_docs,
                 manager, seed)
        metric, hf_score, stderr = _score(hf["summary"], task)
        row = {"task": task, "docs": len(ids), "metric": metric, "hf": hf_score,
               "pkdq": _score(pk["summary"], task)[1], "stderr": stderr,
               **compare(hf["raw"], pk["raw"]),
               **{f"{k}_{name}": v[k] for name, v in (("hf", hf), ("pkdq", pk))
                  for k in ("model_cpu_s", "model_wall_s", "total_wall_s")}}
        row["cpu_ratio"] = row["model_cpu_s_hf"] / row["model_cpu_s_pkdq"]
        row["wall_ratio"] = row["model_wall_s_hf"] / row["model_wall_s_pkdq"]
        print(json.dumps({k: v for k, v in row.items()}, default=str), flush=True)
        rows.append(row)
    return rows


def seeded_tasks(tasks: list[str], samples: int,
                 seed: int) -> Iterator[tuple[str, int, list[int], Any]]:
    """(task, split size, seeded doc ids, task manager) per task: every comparison scores the
    same docs."""
    from tasks.evaluate.stage import sample_doc_ids, task_manager, task_size

    manager = task_manager()
    for task in tasks:
        n_docs = task_size(task)
        yield task, n_docs, sample_doc_ids(task, n_docs, samples, seed), manager


def bf16_drift(model_path: Path, fp32_model: Any, tokenizer: Any, tasks: list[str], samples: int,
               seed: int, batch_size: int) -> list[dict[str, Any]]:
    """pkdq backend in bfloat16 vs float32 on the same docs: drift and speed."""
    import torch

    from tasks.core.model_store import load_model
    from tasks.evaluate.stage import make_lm

    bf16_model, _ = load_model(model_path, dtype=torch.bfloat16)
    rows = []
    for task, n_docs, ids, manager in seeded_tasks(tasks, samples, seed):
        fp = run(make_lm(fp32_model, tokenizer, "pkdq", batch_size), task, ids, n_docs, manager,
                 seed)
        bf = run(make_lm(bf16_model, tokenizer, "pkdq", batch_size), task, ids, n_docs, manager,
                 seed)
        metric, fp_score, stderr = _score(fp["summary"], task)
        bf_score = _score(bf["summary"], task)[1]
        paired = paired_stderr(fp["raw"], bf["raw"], metric) if task != "wikitext" else \
            float("nan")
        row = {"task": task, "docs": len(ids), "metric": metric, "fp32": fp_score,
               "bf16": bf_score, "stderr": stderr, "drift_in_stderr": abs(bf_score - fp_score)
               / stderr if stderr else float("nan"), "paired_stderr": paired,
               **compare(fp["raw"], bf["raw"]),
               "cpu_s_fp32": fp["model_cpu_s"], "cpu_s_bf16": bf["model_cpu_s"],
               "speedup": fp["model_cpu_s"] / bf["model_cpu_s"]}
        print(json.dumps(row, default=str), flush=True)
        rows.append(row)
    return rows


def fp64_reference(model_path: Path, fp32_model: Any, tokenizer: Any, tasks: list[str],
                   samples: int, seed: int, batch_size: int) -> list[dict[str, Any]]:
    """Both fp32 backends against stock HFLM in float64 on the same docs: how far each is from
    the exact log-likelihoods, i.e. whether pkdq-vs-HFLM differences are fp32 rounding."""
    import torch

    from tasks.core.model_store import load_model
    from tasks.evaluate.stage import make_lm

    exact_model, _ = load_model(model_path, dtype=torch.float64)
    rows = []
    for task, n_docs, ids, manager in seeded_tasks(tasks, samples, seed):
        exact, hf, pk = (run(make_lm(m, tokenizer, backend, batch_size), task, ids, n_docs,
                             manager, seed)["raw"]
                         for m, backend in ((exact_model, "hf"), (fp32_model, "hf"),
                                            (fp32_model, "pkdq")))
        hf_err, pk_err = compare(exact, hf), compare(exact, pk)
        row = {"task": task, "docs": len(ids), "requests": hf_err["requests"],
               "hf_max_abs_error": hf_err["max_abs_delta"], "hf_flips": hf_err["metric_flips"],
               "pkdq_max_abs_error": pk_err["max_abs_delta"],
               "pkdq_flips": pk_err["metric_flips"]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]], bf16: list[dict[str, Any]],
             floor: list[dict[str, Any]]) -> str:
    out = [
        "# pkdq lm-eval backend vs stock HFLM",
        "",
        f"Model `{meta['model']}`, {meta['threads']} CPU thread(s), batch size "
        f"{meta['batch_size']}, seed {meta['seed']}: the same seeded docs for both backends. "
        "Times are seconds inside the LM backend (process CPU time; wall time in brackets), "
        "lm-eval's own task building excluded. Δ ll: largest per-request |log-likelihood "
        "difference| (for wikitext one request is a whole article of thousands of tokens). "
        "Flips: per-doc acc/acc_norm values that differ.",
    ]
    if rows:
        out += ["", "| task | docs | requests | max Δ ll | flips | metric | HFLM | pkdq | HFLM s "
                "| pkdq s | speed-up |",
                "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(
            f"| {r['task']} | {r['docs']} | {r['requests']} | {r['max_abs_delta']:.1e} | "
            f"{r['metric_flips']} | {r['metric']} | {r['hf']:.4f} | {r['pkdq']:.4f} | "
            f"{r['model_cpu_s_hf']:.1f} ({r['model_wall_s_hf']:.1f}) | "
            f"{r['model_cpu_s_pkdq']:.1f} ({r['model_wall_s_pkdq']:.1f}) | "
            f"{r['cpu_ratio']:.2f}x ({r['wall_ratio']:.2f}x) |")
    if bf16:
        out += ["", "## bfloat16 vs float32 (pkdq backend)", "",
                "Drift: |bf16 − fp32| of the primary metric in standard errors of the fp32 score; "
                "paired se: the standard error of the per-doc bf16 − fp32 difference (what a "
                "stage-vs-stage comparison on the same docs resolves).",
                "", "| task | docs | metric | fp32 | bf16 | stderr | drift | paired se | max Δ ll "
                "| flips | fp32 s | bf16 s | speed-up |",
                "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
                "| ---: | ---: |"]
        for r in bf16:
            out.append(
                f"| {r['task']} | {r['docs']} | {r['metric']} | {r['fp32']:.4f} | "
                f"{r['bf16']:.4f} | {r['stderr']:.4f} | {r['drift_in_stderr']:.2f} | "
                f"{r['paired_stderr']:.4f} | "
                f"{r['max_abs_delta']:.2f} | {r['metric_flips']} | {r['cpu_s_fp32']:.1f} | "
                f"{r['cpu_s_bf16']:.1f} | {r['speedup']:.2f}x |")
    if floor:
        out += ["", "## Distance from exact (float64) log-likelihoods", "",
                "Stock HFLM with the model in float64 as the reference; both fp32 backends' "
                "largest per-request error and per-doc metric flips against it.", "",
                "| task | docs | requests | HFLM fp32 max error | flips | pkdq fp32 max error "
                "| flips |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        out += [f"| {r['task']} | {r['docs']} | {r['requests']} | {r['hf_max_abs_error']:.1e} | "
                f"{r['hf_flips']} | {r['pkdq_max_abs_error']:.1e} | {r['pkdq_flips']} |"
                for r in floor]
    out += ["", f"Total wall time of this benchmark: {meta['wall_s']:.0f} s.", ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--samples", type=int, default=100, help="docs per task (seeded)")
    parser.add_argument("--wikitext-pages", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512, help="wikitext window")
    parser.add_argument("--bf16-tasks", default=",".join(BF16_TASKS), help="'' to skip")
    parser.add_argument("--fp64-tasks", default="", help="errors against float64 HFLM")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=RESULTS / "eval_backend.md")
    args = parser.parse_args()

    set_offline_env()
    import torch

    from tasks.core.model_store import load_model, resolve_model
    from tasks.evaluate.stage import quiet_lm_eval

    torch.set_num_threads(args.threads)
    quiet_lm_eval()
    start = time.perf_counter()
    ref = resolve_model(args.model)
    model, tokenizer = load_model(ref)
    rows = side_by_side(model, tokenizer, [t for t in args.tasks.split(",") if t], args.samples,
                        args.seed, args.batch_size, args.wikitext_pages, args.max_length)
    bf16 = bf16_drift(ref.path, model, tokenizer, [t for t in args.bf16_tasks.split(",") if t],
                      args.samples, args.seed, args.batch_size)
    floor = fp64_reference(ref.path, model, tokenizer,
                           [t for t in args.fp64_tasks.split(",") if t], args.samples, args.seed,
                           args.batch_size)
    meta = {"model": args.model, "threads": args.threads, "batch_size": args.batch_size,
            "seed": args.seed, "samples": args.samples, "wall_s": time.perf_counter() - start}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(meta, rows, bf16, floor))
    write_json_atomic(args.out.with_suffix(".json"),
                      {"meta": meta, "rows": rows, "bf16": bf16, "floor": floor})
    print(args.out.read_text())


if __name__ == "__main__":
    main()
