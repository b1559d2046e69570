"""Q4_K_M with and without llama.cpp's importance matrix, beside f16 and q4_0: WikiText-2 test
perplexity in llama.cpp (the same token ids and windows as bench/llama_cpp_table.py) and file
size, for the SmolLM2-135M baseline and a pkdq run's pruned + distilled (dense) stage model.

The importance matrix is computed on the run recipe's quantize calibration text (training-side
C4 for the default recipe: 16 x 512 tokens, the recipe's seed), for both models: the stage model
through its run folder (as `pkdq export RUN/02-distill/model --format gguf-q4_k_m` does), the
baseline with `--calibration` naming the same source (same budget and seed by default).
The run folder is read only: its run.json and stage model are copied into the work folder.
Rows are cached as JSON under the work folder. Run it under the heavy-job lock:

    nice -n 19 flock /tmp/pkdq-heavy.lock python -m bench.imatrix --threads 2 \
        --run runs/smollm2-ffn25-kd-w4 --stage 02-distill
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench.llama_cpp_table import RESULTS, TOKENS, WINDOW, _pkdq_ppl
from tasks.core.common import cache_dir, set_offline_env

VARIANTS = (  # (row suffix, export format, use an importance matrix)
    ("f16", "gguf-f16", False), ("q4_0", "gguf-q4_0", False),
    ("q4_k_m", "gguf-q4_k_m", False), ("q4_k_m-imatrix", "gguf-q4_k_m", True))


def _stage_copy(run: Path, stage: str, work: Path) -> Path:
    """run.json and the stage's model copied under `work` (a run folder of its own)."""
    dest = work / f"run-{run.name}"
    model = dest / stage / "model"
    if not (model / "config.json").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        model.parent.mkdir(parents=True)
        shutil.copy2(run / "run.json", dest / "run.json")
        shutil.copytree(run / stage / "model", model)
    return model


def _row(name: str, src: Path, fmt: str, imatrix: bool, calibration: str | None, work: Path,
         threads: int, fresh: bool) -> dict[str, Any]:
    from tasks.core.llama_cpp import llama_cpp_perplexity
    from tasks.quantize import export_model

    cached = work / "rows" / f"{name}.json"
    if cached.is_file() and not fresh:
        return json.loads(cached.read_text())
    print(f"[imatrix-bench] {name}: {fmt} of {src}", file=sys.stderr, flush=True)
    dest = work / "exports" / name
    start = time.perf_counter()
    record = export_model(src, dest, fmt, overwrite=True, verify=False, threads=threads,
                          imatrix=imatrix, calibration=calibration if imatrix else None)
    write_s = time.perf_counter() - start
    gguf = dest / "model.gguf"
    ppl = _pkdq_ppl(src, threads)
    got = llama_cpp_perplexity(gguf, ids=ppl.pop("ids"), max_length=WINDOW, threads=threads)
    written = record["written"]
    row = {"name": name, "source": str(src), "format": fmt, "bytes": gguf.stat().st_size,
           "tensor_types": written["tensor_types"], "imatrix": written.get("imatrix"),
           "quantizer_note": written.get("exact_grid_note"), "write_s": write_s,
           "pkdq_perplexity": ppl["token_perplexity"],
           "llama_cpp_perplexity": got["token_perplexity"], "llama_cpp_ppl_s": got["wall_s"]}
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(row, indent=1))
    shutil.rmtree(dest, ignore_errors=True)
    return row


def _summary(rows: list[dict[str, Any]]) -> list[str]:
    """Per model: what Q4_K_M costs over f16 in llama.cpp perplexity, without and with the
    importance matrix (same file size: the matrix changes the rounding, not the types)."""
    by = {(r["source"], r["format"], bool((r.get("imatrix") or {}).get("used"))): r for r in rows}
    out = []
    for (source, fmt, used), row in by.items():
        f16, plain = by.get((source, "gguf-f16", False)), by.get((source, fmt, False))
        if not used or f16 is None or plain is None:
            continue
        cost = [100 * (r["llama_cpp_perplexity"] / f16["llama_cpp_perplexity"] - 1)
                for r in (plain, row)]
        out.append(f"- {row['name'].removesuffix('-q4_k_m-imatrix')}: Q4_K_M costs "
                   f"{cost[0]:+.1f}% perplexity over f16 without an importance matrix, "
                   f"{cost[1]:+.1f}% with one ({plain['llama_cpp_perplexity']:.2f} -> "
                   f"{row['llama_cpp_perplexity']:.2f}), same file size "
                   f"({row['bytes'] / 1e6:.1f} MB vs {plain['bytes'] / 1e6:.1f} MB).")
    return out


def write_results(rows: list[dict[str, Any]], out: Path, command: str, threads: int) -> None:
    from tasks.core.llama_cpp import llama_cpp_version

    lines = [
        "# Q4_K_M with llama.cpp's importance matrix: SmolLM2-135M and the default run's "
        "pruned + distilled model", "",
        f"llama.cpp of llama-cpp-python {llama_cpp_version()} (the binding for perplexity; "
        "`llama-imatrix` / `llama-quantize` built by setup.sh from the same vendored source), "
        f"CPU, {threads} threads. Perplexity: the first {TOKENS} tokens of WikiText-2 test in "
        f"windows of {WINDOW}, the same token ids as bench/results/llama_cpp.md; `pkdq ppl` is "
        "pkdq's own loader on the source folder (fp32). q4_0 is gguf-py's quantizer (token "
        "embedding Q8_0); q4_k_m is llama.cpp's, on the f16 file.",
        "",
        "Measured on a shared 2-core machine (other jobs running; nice 19): the times are "
        "wall-clock under load, the perplexities and sizes do not depend on it. One importance "
        "matrix per model (one calibration draw: the recipe's seed); how far another draw of "
        "the same source would move the with-imatrix perplexity was not measured.", "",
        "| model | GGUF | imatrix | MB | pkdq ppl | llama.cpp ppl | vs f16 | write s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    f16 = {r["source"]: r["llama_cpp_perplexity"] for r in rows if r["format"] == "gguf-f16"}
    for r in rows:
        m = r.get("imatrix") or {}
        used = f"{m['tokens']} tokens" if m.get("used") else "no"
        base = f16.get(r["source"])
        rel = f"{100 * (r['llama_cpp_perplexity'] / base - 1):+.1f}%" if base else ""
        lines.append(f"| {r['name']} | {r['format'].removeprefix('gguf-')} | {used} "
                     f"| {r['bytes'] / 1e6:.1f} | {r['pkdq_perplexity']:.2f} "
                     f"| {r['llama_cpp_perplexity']:.2f} | {rel} | {r['write_s']:.0f} |")
    lines += ["", *_summary(rows), "", "Importance matrices:", ""]
    for r in rows:
        m = r.get("imatrix") or {}
        if m.get("used"):
            lines.append(f"- {r['name']}: {m['source']}, seed {m['seed']}: {m['chunks']} windows "
                         f"x {m['chunk_tokens']} = {m['tokens']} tokens ({m['text_bytes']} "
                         f"bytes of text), statistics for {m['tensors_with_statistics']} "
                         f"matrices, llama-imatrix {m['wall_s']:.0f} s")
    lines += ["", f"Command: `{command}` (the run folder is read only; rows are cached under "
              "`~/.cache/pkdq/bench-imatrix/rows`, `--fresh` recomputes)", ""]
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run", type=Path, required=True, help="a pkdq run folder (read only)")
    parser.add_argument("--stage", default="02-distill", help="its stage whose model is used")
    parser.add_argument("--work", type=Path, default=cache_dir() / "bench-imatrix")
    parser.add_argument("--fresh", action="store_true", help="ignore cached rows")
    parser.add_argument("--out", type=Path, default=RESULTS / "imatrix.md")
    args = parser.parse_args(argv)
    set_offline_env()
    from tasks.core.model_store import resolve_model
    from tasks.quantize.imatrix import recipe_calibration

    args.work.mkdir(parents=True, exist_ok=True)
    stage_model = _stage_copy(args.run, args.stage, args.work)
    recipe_source = recipe_calibration(stage_model.parent.parent).spec
    calibration = recipe_source.get("source") if recipe_source.get("kind") == "builtin" else None
    if calibration is None:
        raise SystemExit("the run's recipe calibrates on its own data: name it for the baseline")
    models = [("baseline", resolve_model("smollm2-135m").path, calibration),
              (f"{args.run.name}-{args.stage}", stage_model, None)]
    command = "nice -n 19 flock /tmp/pkdq-heavy.lock python -m bench.imatrix " + \
        " ".join(sys.argv[1:] if argv is None else argv)
    rows = []
    for label, src, cal in models:
        for suffix, fmt, imatrix in VARIANTS:
            rows.append(_row(f"{label}-{suffix}", src, fmt, imatrix, cal, args.work,
                             args.threads, args.fresh))
            write_results(rows, args.out, command, args.threads)  # a partial table survives
    print(args.out.read_text())


if __name__ == "__main__":
    main()
