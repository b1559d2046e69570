"""GPTQ vs AWQ vs RTN on SmolLM2-135M (unpruned and 50% FFN-pruned): quality, size, CPU speed.

Each cell is a real quantize_stage run followed by WikiText-2 test perplexity (first 8192
tokens, 512-token windows), bytes of the weight files, and CPU prefill latency (512 tokens,
measured in a fresh process). Every run's row is cached as JSON under bench/results/quant_runs/,
so the grid can be filled in pieces (`--configs`, `--models`) and the table rebuilt at any time
with `--table-only`. Run it under the heavy-job lock:

    flock /tmp/pkdq-heavy.lock python -m bench.quant_table --threads 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tasks.core.common import REPO_ROOT, StageContext, cache_dir, data_dir, set_offline_env

RESULTS = REPO_ROOT / "bench" / "results"
ROWS = RESULTS / "quant_runs"
WIKITEXT_TOKENS, WINDOW = 8192, 512
METHODS = ("rtn", "gptq", "awq")
# SmolLM2 hidden 576 = 64 x 9: group 128 does not divide it (check_group_size refuses g128)
CONFIGS = [(4, 64), (8, 64), (4, 32)]  # (bits, group size)
MODELS = ("base", "ffn50")


def _work() -> Path:
    path = cache_dir() / "bench-quant"
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_folder(name: str, threads: int):
    """The unpruned SmolLM2 folder, or its 50%-FFN-pruned version (made once, cached)."""
    from tasks.core.model_folder import model_ref
    from tasks.core.model_store import resolve_model

    base = resolve_model("smollm2-135m")
    if name == "base":
        return base
    out = _work() / "ffn50"
    if (out / "model" / "config.json").is_file():
        return model_ref(out / "model")
    from tasks.core.recipe import PruneConfig
    from tasks.prune.stage import prune_stage

    cfg = PruneConfig.model_validate({
        "ffn": {"ratio": 0.5, "criterion": "activation"}, "round_to": 128,
        "calibration": {"source": "wikipedia", "samples": 32, "seq_len": 256},
    })
    return prune_stage(base, cfg, StageContext(out_dir=out, seed=1234, threads=threads)).model


def perplexity(path: Path, dtype: str = "fp32") -> float:
    """Token perplexity; float folders computed in `dtype`, quantized ones in fp32."""
    from tasks.core.model_store import load_model
    from tasks.evaluate.speed import DTYPES
    from tasks.evaluate.stage import wikitext_perplexity

    model, tokenizer = load_model(path, dtype=DTYPES[dtype])
    result = wikitext_perplexity(model, tokenizer, data_dir() / "wikitext" / "wiki.test.raw",
                                 WIKITEXT_TOKENS, WINDOW)
    return result["token_perplexity"]


def _row_path(model: str, label: str) -> Path:
    return ROWS / f"{model}-{label}.json"


def _weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def measure(model: str, label: str, path: Path, threads: int, extra: dict[str, Any],
            speed_timeout: float = 900) -> dict:
    """Perplexity + size + prefill latency of one folder; cached as a JSON row."""
    from tasks.evaluate.speed import profile_in_subprocess

    dtype = extra.pop("compute_dtype", "fp32")
    t0 = time.perf_counter()
    ppl = perplexity(path, dtype)
    ppl_s = time.perf_counter() - t0
    try:
        speed = profile_in_subprocess(path, dtype=dtype, prefill_tokens=512, decode_tokens=16,
                                      repeats=2, threads=threads, timeout_s=speed_timeout)
    except subprocess.TimeoutExpired:  # e.g. AWQ's torch kernel on CPU: say so, keep the row
        speed = {"weights_bytes": _weights_bytes(path), "rss_load_bytes": None,
                 "rss_peak_after_run_bytes": None, "prefill_s": None,
                 "decode_tokens_per_s": None,
                 "speed_error": f"prefill+decode did not finish in {speed_timeout:.0f} s"}
    row = {"model": model, "label": label, "ppl": ppl, "ppl_eval_s": ppl_s,
           "weights_bytes": speed["weights_bytes"], "rss_load_bytes": speed["rss_load_bytes"],
           "rss_after_run_bytes": speed["rss_peak_after_run_bytes"],
           "speed_error": speed.get("speed_error"),
           "torch_compile": speed.get("torch_compile"),
           "prefill_s": speed["prefill_s"], "decode_tokens_per_s": speed["decode_tokens_per_s"],
           "compute_dtype": dtype, "threads": threads, **extra}
    ROWS.mkdir(parents=True, exist_ok=True)
    _row_path(model, label).write_text(json.dumps(row, indent=2))
    print(f"[bench] {model} {label}: ppl {ppl:.2f} {row['weights_bytes'] / 1e6:.0f} MB "
          f"prefill {row['prefill_s']:.2f}s", file=sys.stderr, flush=True)
    return row


def quantize_one(model: str, ref, method: str, bits: int, group: int, threads: int,
                 keep: bool) -> dict:
    from tasks.core.recipe import QuantizeConfig
    from tasks.quantize.stage import quantize_stage

    label = f"{method}-w{bits}-g{group}"
    if _row_path(model, label).is_file():
        return json.loads(_row_path(model, label).read_text())
    cfg = QuantizeConfig(method=method, bits=bits, group_size=group)
    out = _work() / model / label
    result = quantize_stage(ref, cfg, StageContext(out_dir=out, seed=1234, threads=threads))
    m = result.metrics
    row = measure(model, label, result.model.path, threads, {
        "method": method, "bits": bits, "group_size": group, "quant_wall_s": m["wall_s"],
        "serving_warnings": m["serving"]["warnings"],
        "loaders_verified": sorted(k for k, v in m["loaders_verified"].items()
                                   if isinstance(v, dict)),
    })
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def float_rows(model: str, ref, threads: int) -> None:
    for dtype in ("fp32", "bf16"):
        if not _row_path(model, dtype).is_file():
            measure(model, dtype, ref.path, threads, {"method": dtype, "compute_dtype": dtype})


def _opt(value: float | None, fmt: str) -> str:
    return "timed out" if value is None else format(value, fmt)


def _rss(row: dict) -> str:
    if row.get("rss_after_run_bytes") is None and row.get("rss_load_bytes") is None:
        return "–"
    if row.get("rss_after_run_bytes") is not None:
        return f"{row['rss_after_run_bytes'] / 1e6:.0f}"
    return f"{row['rss_load_bytes'] / 1e6:.0f}*"


def table() -> str:
    """Markdown table from every cached row (fp32/bf16 first, then by method and config)."""
    from tasks.evaluate.speed import speed_notes

    rows = [json.loads(p.read_text()) for p in sorted(ROWS.glob("*.json"))]
    order = {"fp32": 0, "bf16": 1, "rtn": 2, "gptq": 3, "awq": 4}
    rows.sort(key=lambda r: (MODELS.index(r["model"]), r.get("bits", 99) * -1 + 99,
                             r.get("group_size", 0), order.get(r["method"], 9)))
    lines = [
        f"WikiText-2 test perplexity (first {WIKITEXT_TOKENS} tokens, {WINDOW}-token windows); "
        "bytes of the weight files; CPU prefill of 512 tokens and greedy decode, "
        f"{rows[0]['threads'] if rows else '?'} threads, each model in a fresh process "
        "(quantized models compute in fp32 with dequantized weights, eager; RSS = resident "
        "memory growth after load + one run, since safetensors weights are mmapped lazily; "
        "* = RSS right after load only). The machine's 2 cores were shared with other jobs, "
        "so latencies are noisy; compare within a column, not across days.",
        "",
        "| model | method | bits | group | ppl | Δppl vs fp32 | weights MB | RSS MB | "
        "prefill 512 s | decode tok/s | quantize wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base_ppl = {r["model"]: r["ppl"] for r in rows if r["method"] == "fp32"}
    for r in rows:
        if r.get("torch_compile"):  # an early row timed with GPTQModel's torch.compile on
            r = dict(r, method=f"{r['method']} (timed compiled)")
        ref = base_ppl.get(r["model"])
        delta = f"{r['ppl'] - ref:+.2f}" if ref and r["method"] != "fp32" else ""
        lines.append(
            f"| {r['model']} | {r['method']} | {r.get('bits', '')} | {r.get('group_size', '')} | "
            f"{r['ppl']:.2f} | {delta} | {r['weights_bytes'] / 1e6:.0f} | "
            f"{_rss(r)} | {_opt(r['prefill_s'], '.2f')} | "
            f"{_opt(r['decode_tokens_per_s'], '.1f')} | "
            f"{r['quant_wall_s']:.0f} |" if "quant_wall_s" in r else
            f"| {r['model']} | {r['method']} | | | {r['ppl']:.2f} | | "
            f"{r['weights_bytes'] / 1e6:.0f} | {_rss(r)} | "
            f"{r['prefill_s']:.2f} | {r['decode_tokens_per_s']:.1f} | |")
    notes = []
    for model in MODELS:
        subset = {r["label"]: r for r in rows if r["model"] == model}
        notes += [f"{model}: {n}" for n in speed_notes(subset)]
    warnings = sorted({w for r in rows for w in r.get("serving_warnings", [])})
    if notes or warnings:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes + warnings]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="base", help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--configs", default="4:64,8:64,4:32", help="bits:group, comma list")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the quantized folders")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--remeasure", nargs=2, metavar=("LABEL", "FOLDER"),
                        help="measure an already quantized folder left by an interrupted cell, "
                             "e.g. awq-w4-g64 ~/.cache/pkdq/bench-quant/base/awq-w4-g64/model")
    parser.add_argument("--quant-wall-s", type=float, help="with --remeasure: the quantize "
                        "wall time read from that run's log")
    parser.add_argument("--speed-timeout", type=float, default=900)
    args = parser.parse_args(argv)
    set_offline_env()
    if args.remeasure:
        label, folder = args.remeasure
        method, bits, group = label.split("-")
        measure(args.models.split(",")[0], label, Path(folder), args.threads,
                {"method": method, "bits": int(bits[1:]), "group_size": int(group[1:]),
                 "quant_wall_s": args.quant_wall_s, "remeasured": True},
                speed_timeout=args.speed_timeout)
    elif not args.table_only:
        configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
        for model in args.models.split(","):
            ref = model_folder(model, args.threads)
            float_rows(model, ref, args.threads)
            for bits, group in configs:
                for method in args.methods.split(","):
                    try:
                        quantize_one(model, ref, method, bits, group, args.threads, args.keep)
                    except Exception as exc:  # noqa: BLE001 - one failed cell must not end the grid
                        print(f"[bench] {model} {method} w{bits} g{group} failed: {exc}",
                              file=sys.stderr, flush=True)
    text = table()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quant_table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
