"""SmolLM2-135M and a pkdq run's stages in llama.cpp: file size, WikiText-2 perplexity (pkdq's
own loader on the source vs llama.cpp on the GGUF, same token ids), prefill / decode tokens/s
and peak RSS, same prompt length and threads for every row.

Rows: the baseline as f16, q4_0 (gguf-py's quantizer) and q4_k_m (llama.cpp's own quantizer,
no importance matrix); a GPTQ W4 sym group-32 quantization of the baseline exported exactly to
Q4_0 (`pkdq export --format gguf-q4_0`), and the same through Q4_K_M; and, with --run, every
stage model of that run as q4_0 (a GPTQ stage with group 64 is re-gridded, and says so); with
--model NAME=FOLDER, any pkdq model folder as q4_0 (say, a search winner).
Each row is cached as JSON under the work folder, so the table can be rebuilt in pieces.
Run it under the heavy-job lock:

    flock /tmp/pkdq-heavy.lock python -m bench.llama_cpp_table --threads 2 \
        --run runs/smollm2-ffn25-kd-w4
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tasks.core.common import REPO_ROOT, StageContext, cache_dir, data_dir, set_offline_env

RESULTS = REPO_ROOT / "bench" / "results"
TOKENS, WINDOW = 8192, 512  # 16 windows of 512 of WikiText-2 test
PROMPT, DECODE = 512, 64


def _gptq_baseline(base: Path, work: Path, threads: int) -> Path:
    """GPTQ W4 sym g32 of the baseline (the Q4_0 grid), default calibration (C4, 16 x 512)."""
    out = work / "gptq-w4-g32-sym"
    if (out / "model" / ".pkdq-fingerprint").is_file():
        return out / "model"
    from tasks.core.model_folder import model_ref
    from tasks.core.recipe import QuantizeConfig
    from tasks.quantize import quantize_stage

    cfg = QuantizeConfig(method="gptq", bits=4, group_size=32, sym=True)
    return quantize_stage(model_ref(base), cfg,
                          StageContext(out_dir=out, seed=0, threads=threads)).model.path


def _row(name: str, src: Path, fmt: str, work: Path, threads: int, fresh: bool,
         embedding: str | None = None) -> dict[str, Any]:
    from tasks.core.llama_cpp import llama_cpp_perplexity
    from tasks.quantize import gguf_speed_row

    cached = work / "rows" / f"{name}.json"
    if cached.is_file() and not fresh:
        return json.loads(cached.read_text())
    print(f"[llama-cpp-table] {name}: {fmt} of {src}", file=sys.stderr, flush=True)
    gguf = work / "exports" / name / "model.gguf"
    # the same export and timing as a run's llama.cpp speed unit; the file is kept for the ppl
    speed = gguf_speed_row(src, fmt.removeprefix("gguf-"), gguf, PROMPT, DECODE, threads,
                           repeats=3, keep=True, embedding=embedding)
    ppl = _pkdq_ppl(src, threads)
    start = time.perf_counter()
    got = llama_cpp_perplexity(gguf, ids=ppl.pop("ids"), max_length=WINDOW, threads=threads)
    gguf.unlink()
    row = {
        "name": name, "source": str(src), "format": fmt, "file_mb": speed["file_bytes"] / 1e6,
        "embedding_type": speed.get("embedding_type"),
        "tensor_types": speed["tensor_types"], "exact_grid": speed["grid"] == "exact",
        "exact_grid_note": speed["grid_note"],
        "pkdq_perplexity": ppl["token_perplexity"], "pkdq_loader": ppl["loader"],
        "llama_cpp_perplexity": got["token_perplexity"],
        "llama_cpp_ppl_s": time.perf_counter() - start, "speed": speed,
    }
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(row, indent=1))
    return row


_PKDQ_PPL: dict[str, dict[str, Any]] = {}


def _pkdq_ppl(src: Path, threads: int) -> dict[str, Any]:
    """WikiText-2 perplexity of the source folder with pkdq's own loader (cached per folder)."""
    if str(src) not in _PKDQ_PPL:
        import torch

        from tasks.core.model_store import load_model
        from tasks.core.perplexity import wikitext_ids
        from tasks.quantize.export import _torch_perplexity

        torch.set_num_threads(threads)
        model, tokenizer = load_model(src)
        ids = wikitext_ids(tokenizer, data_dir(), TOKENS)
        out = _torch_perplexity(model, ids, WINDOW)
        _PKDQ_PPL[str(src)] = out | {"ids": ids, "loader": "pkdq load_model (fp32 compute"
                                     + (", GPTQModel TORCH kernel)" if hasattr(
                                         model.model.layers[0].mlp.up_proj, "qweight") else ")")}
    return dict(_PKDQ_PPL[str(src)])


def _stage_rows(run: Path) -> list[tuple[str, Path, str]]:
    rows = []
    for model in sorted(run.glob("[0-9][0-9]-*/model")):
        rows.append((f"run-{model.parent.name}-q4_0", model, "gguf-q4_0"))
    return rows


def _transformers_rows(run: Path) -> list[str]:
    """The same run's stages as pkdq's evaluation measured them in transformers (the reference
    runtime): same prompt length, decode length and threads as the llama.cpp rows above."""
    lines = [f"## The same stages in transformers (pkdq's evaluation of `{run.name}`)", "",
             "Read from each stage's eval.json: prefill 512 / decode 64 tokens, median of 3, "
             "the run's threads; peak RSS is the evaluating process's.", "",
             "| stage | compute dtype | prefill tok/s | decode tok/s | peak RSS MB |",
             "| --- | --- | ---: | ---: | ---: |"]
    for ev in sorted(run.glob("[0-9][0-9]-*/eval.json")):
        data = json.loads(ev.read_text())
        speed = data.get("speed") or {}
        if not speed.get("decode_tokens_per_s"):
            continue
        lines.append(f"| {ev.parent.name} | {speed.get('dtype', '?')} "
                     f"| {speed['prefill_tokens_per_s']:.0f} | {speed['decode_tokens_per_s']:.1f} "
                     f"| {(data.get('peak_rss_bytes') or 0) / 1e6:.0f} |")
    return lines


def write_table(rows: list[dict[str, Any]], out: Path, command: str, threads: int,
                run: Path | None = None) -> None:
    from tasks.core.llama_cpp import llama_cpp_version

    lines = [
        "# SmolLM2-135M in llama.cpp: size, perplexity, speed",
        "",
        f"llama-cpp-python {llama_cpp_version()} (built from source by setup.sh), CPU, "
        f"{threads} threads; prefill {PROMPT} tokens, greedy decode {DECODE} tokens (median of "
        f"3 after a warm-up); perplexity on the first {TOKENS} tokens of WikiText-2 test in "
        f"windows of {WINDOW} (the same token ids in both runtimes). `pkdq ppl` is pkdq's own "
        "loader on the source folder (fp32 compute; GPTQ through GPTQModel's TORCH kernel); "
        "peak RSS is the measuring process (Python + llama.cpp + model).",
        "",
        "| model | GGUF | embedding | MB | exact grid | pkdq ppl | llama.cpp ppl | prefill tok/s "
        "| decode tok/s | peak RSS MB |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        s = r["speed"]
        exact = "yes" if r["exact_grid"] else "no"
        lines.append(f"| {r['name']} | {r['format'].removeprefix('gguf-')} "
                     f"| {r.get('embedding_type') or '–'} | {r['file_mb']:.1f} "
                     f"| {exact} | {r['pkdq_perplexity']:.2f} | {r['llama_cpp_perplexity']:.2f} "
                     f"| {s['prefill_tok_s']:.0f} | {s['decode_tok_s']:.1f} "
                     f"| {s['peak_rss_mb']:.0f} |")
    if run is not None:
        lines += ["", *_transformers_rows(run)]
    lines += ["", "Notes:", ""]
    lines += [f"- {r['name']}: {r['exact_grid_note']}" for r in rows if r.get("exact_grid_note")]
    lines += ["", f"Command: `{command}`", ""]
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run", type=Path, help="a pkdq run folder: each stage model as q4_0")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=FOLDER",
                        help="any pkdq model folder as a q4_0 row named NAME (repeatable)")
    parser.add_argument("--embedding", action="append", default=[], metavar="NAME=TYPE",
                        help="the embedding/output type of --model row NAME (f16, q8_0, q4_0; "
                        "default q8_0), e.g. a recipe's gguf_embedding")
    parser.add_argument("--work", type=Path, default=cache_dir() / "bench-llama-cpp")
    parser.add_argument("--only", nargs="*", help="row names to (re)compute")
    parser.add_argument("--fresh", action="store_true", help="ignore cached rows")
    parser.add_argument("--out", type=Path, default=RESULTS / "llama_cpp.md")
    args = parser.parse_args(argv)
    set_offline_env()
    from tasks.core.model_store import resolve_model

    base = resolve_model("smollm2-135m").path
    args.work.mkdir(parents=True, exist_ok=True)
    plan = [("baseline-f16", base, "gguf-f16"), ("baseline-q4_0", base, "gguf-q4_0"),
            ("baseline-q4_k_m", base, "gguf-q4_k_m")]
    gptq = None if args.only and not any("gptq" in n for n in args.only) else \
        _gptq_baseline(base, args.work, args.threads)
    if gptq is not None:
        plan += [("baseline-gptq-w4g32sym-q4_0", gptq, "gguf-q4_0"),
                 ("baseline-gptq-w4g32sym-q4_k_m", gptq, "gguf-q4_k_m")]
        plan = plan[:1] + plan[-2:-1] + plan[1:-2] + plan[-1:]  # the exact export early
    if args.run:
        plan += _stage_rows(args.run)
    embeddings = dict(spec.partition("=")[::2] for spec in args.embedding)
    for spec in args.model:
        name, _, folder = spec.partition("=")
        plan.append((name, Path(folder), "gguf-q4_0"))
    command = "flock /tmp/pkdq-heavy.lock python -m bench.llama_cpp_table " + \
        " ".join(sys.argv[1:] if argv is None else argv)
    rows = []
    for name, src, fmt in plan:
        if args.only and name not in args.only and \
                not (args.work / "rows" / f"{name}.json").is_file():
            continue
        rows.append(_row(name, src, fmt, args.work, args.threads,
                         args.fresh or bool(args.only and name in args.only),
                         embeddings.get(name)))
        write_table(rows, args.out, command, args.threads, args.run)  # a partial table survives
    print(args.out.read_text())
    shutil.rmtree(args.work / "exports", ignore_errors=True)


if __name__ == "__main__":
    main()
