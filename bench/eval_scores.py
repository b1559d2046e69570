"""The embedded model's scores on all seven benchmarks (pkdq backend), with standard errors.

One `evaluate_model` call, exactly what a recipe's evaluation runs, on larger seeded samples;
writes a Markdown table and, in the folder of the same name, eval.json and the per-doc scores.
Run it under the heavy-job lock:

    flock /tmp/pkdq-heavy.lock python -m bench.eval_scores --samples 500 --threads 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tasks.core.common import REPO_ROOT, set_offline_env

RESULTS = REPO_ROOT / "bench" / "results"
ALL_TASKS = ["arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "lambada_openai",
             "boolq"]


def markdown(metrics: dict[str, Any], model: str) -> str:
    cfg = metrics["config"]
    lines = [
        f"# {model}: seven benchmarks, pkdq backend ({cfg['dtype']})",
        "",
        f"{cfg['samples'] or 'all'} seeded docs per task (seed {metrics['seed']}; full split when "
        f"smaller), {metrics['threads']} CPU thread(s), batch size {cfg['batch_size']}. "
        "Standard errors are lm-eval's (sample standard deviation / sqrt(n)).",
        "",
        "| task | docs | acc | acc_norm | chance | time |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, res in metrics["tasks"].items():
        def cell(metric: str, res: dict[str, Any] = res) -> str:
            if metric not in res:
                return "–"
            bold = "**" if metric == res["metric"] else ""
            return f"{bold}{res[metric]:.4f} ± {res[f'{metric}_stderr']:.4f}{bold}"

        lines.append(f"| {name} | {res['n']} | {cell('acc')} | {cell('acc_norm')} | "
                     f"{res['chance']:.3f} | {res['wall_s']:.0f} s |")
    wiki, speed = metrics["wikitext"], metrics.get("speed")
    lines += ["", "Bold: the metric retention uses. LAMBADA's chance is 0 (open vocabulary).", "",
              f"- WikiText-2 token perplexity (first {wiki['tokens']} tokens, windows of "
              f"{wiki['max_length']}): {wiki['token_perplexity']:.2f}"]
    rolling = wiki.get("lm_eval")
    if rolling:
        lines.append(f"- WikiText-2 word perplexity (lm-eval rolling windows of "
                     f"{rolling['max_length']}, {rolling['n']} articles): "
                     f"{rolling['word_perplexity']:.2f}; bits per byte "
                     f"{rolling['bits_per_byte']:.4f}")
    if speed:
        lines.append(f"- Speed ({speed['threads']} thread(s), {speed['dtype']}): prefill "
                     f"{speed['prefill_tokens']} tokens in {speed['prefill_s']:.2f} s, decode "
                     f"{speed['decode_tokens_per_s']:.1f} tokens/s")
    lines += [f"- Parameters {metrics['params']:,}; {metrics['bytes_on_disk'] / 1e6:.1f} MB on "
              f"disk; peak RSS {metrics['peak_rss_bytes'] / 2**20:.0f} MiB "
              f"({metrics['peak_rss_scope']})",
              f"- Total wall time {metrics['wall_s']:.0f} s (CPU {metrics['cpu_s']:.0f} s)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=500, help="docs per task; 0 = full split")
    parser.add_argument("--wikitext-pages", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=RESULTS / "eval_scores.md")
    args = parser.parse_args()

    set_offline_env()
    from tasks.core.model_store import resolve_model
    from tasks.core.recipe import EvalConfig
    from tasks.evaluate.stage import evaluate_model

    cfg = EvalConfig(tasks=ALL_TASKS, samples=args.samples or None, dtype=args.dtype,
                     wikitext={"pages": args.wikitext_pages})
    metrics = evaluate_model(resolve_model(args.model).path, cfg, args.out.with_suffix(""),
                             threads=args.threads)
    args.out.write_text(markdown(metrics, args.model))
    print(args.out.read_text())
    print(json.dumps({k: metrics[k] for k in ("wall_s", "cpu_s")}))


if __name__ == "__main__":
    main()
