"""What the embedding's type costs and saves in a 4-bit GGUF (issue 17's size lever).

SmolLM2-135M ties its output head to its input embedding: 28.3M of 134.5M parameters, a fifth
of the model, which every pruning axis leaves whole. At 16 bits it alone is 0.21x the baseline's
bf16 bytes, so no 4-bit model with a 16-bit embedding can reach the issue's 0.30x; the question is
what a Q8_0, Q5_1, Q5_0 or Q4_0 embedding costs in perplexity. Each row exports one source model
as Q4_0 (a GPTQ W4 sym g32 grid code for code, any other source re-quantized by gguf-py) with the
embedding in f16, q8_0, q5_1, q5_0 or q4_0, and scores WikiText-2 test (first 8,192 tokens,
windows of 512, the same token ids for every row) in llama.cpp. Bytes are the file's, against
the baseline in bf16.

    flock /tmp/pkdq-heavy.lock .venv/bin/python bench/embedding_types.py \
        --model gptq-w4g32=~/.cache/pkdq/bench-llama-cpp/gptq-w4-g32-sym/model \
        --model distilled=runs/smollm2-ffn25-kd-w4/02-distill/model
Writes bench/results/embedding_types.{json,md}; rows are cached under --work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.core.common import cache_dir, data_dir, set_offline_env  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TOKENS, WINDOW = 8192, 512
EMBEDDINGS = ("f16", "q8_0", "q5_1", "q5_0", "q4_0")


def _row(name: str, src: Path, embedding: str, ids: list[int], work: Path,
         threads: int) -> dict[str, Any]:
    from tasks.core.llama_cpp import llama_cpp_perplexity
    from tasks.quantize.gguf_export import export_gguf

    cached = work / "rows" / f"{name}-{embedding}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    print(f"[embedding-types] {name}: q4_0, embedding {embedding}", file=sys.stderr, flush=True)
    gguf = work / "exports" / f"{name}-{embedding}.gguf"
    written = export_gguf(src, gguf, "q4_0", verify=False, embedding=embedding, threads=threads)
    started = time.perf_counter()
    ppl = llama_cpp_perplexity(gguf, ids=ids, max_length=WINDOW, threads=threads)
    row = {"model": name, "source": str(src), "embedding": embedding,
           "bytes": gguf.stat().st_size, "exact_grid": written["exact_grid"],
           "tensor_types": written["tensor_types"], "embedding_error": written["embedding_error"],
           "llama_cpp_perplexity": ppl["token_perplexity"],
           "ppl_s": time.perf_counter() - started}
    gguf.unlink()
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(row, indent=1))
    return row


def render(rows: list[dict[str, Any]], baseline: dict[str, Any], command: str) -> str:
    bf16 = 2 * baseline["params"]
    lines = ["# The embedding's type in a 4-bit GGUF: bytes against perplexity", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             f"Baseline: {baseline['params'] / 1e6:.1f}M parameters, {bf16 / 1e6:.1f} MB in "
             f"bf16, WikiText-2 ppl {baseline['ppl']:.2f} (f16 GGUF in llama.cpp).", "",
             "| source | Q4_0 grid | embedding | MB | x bf16 baseline | llama.cpp ppl "
             "| x baseline ppl | embedding rel. RMS error |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {'exact' if r['exact_grid'] else 're-quantized'} "
            f"| {r['embedding']} | {r['bytes'] / 1e6:.1f} | {r['bytes'] / bf16:.3f} "
            f"| {r['llama_cpp_perplexity']:.2f} "
            f"| {r['llama_cpp_perplexity'] / baseline['ppl']:.2f} "
            f"| {r['embedding_error']['relative_rms']:.4f} |")
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[], metavar="NAME=FOLDER",
                    help="a source model folder (float or GPTQ) and its row name")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=cache_dir() / "bench-embedding-types")
    args = ap.parse_args()
    set_offline_env()
    from transformers import AutoTokenizer

    from tasks.core.llama_cpp import llama_cpp_perplexity
    from tasks.core.model_store import resolve_model
    from tasks.core.perplexity import wikitext_ids
    from tasks.quantize.gguf_export import export_gguf

    base = resolve_model("smollm2-135m")
    ids = wikitext_ids(AutoTokenizer.from_pretrained(str(base.path)), data_dir(), TOKENS)
    baseline_file = args.work / "baseline.json"
    if not baseline_file.is_file():
        gguf = args.work / "exports" / "baseline-f16.gguf"
        export_gguf(base.path, gguf, "f16", verify=False)
        ppl = llama_cpp_perplexity(gguf, ids=ids, max_length=WINDOW, threads=args.threads)
        gguf.unlink()
        from tasks.core.model_store import load_model

        model, _ = load_model(base)
        params = sum(p.numel() for p in model.parameters())  # the tied head counted once
        baseline_file.parent.mkdir(parents=True, exist_ok=True)
        baseline_file.write_text(json.dumps({"params": params,
                                             "ppl": ppl["token_perplexity"]}))
    baseline = json.loads(baseline_file.read_text())
    rows = []
    command = "flock /tmp/pkdq-heavy.lock .venv/bin/python bench/embedding_types.py " + \
        " ".join(sys.argv[1:])
    for spec in args.model:
        name, _, folder = spec.partition("=")
        for embedding in EMBEDDINGS:
            rows.append(_row(name, Path(folder).expanduser(), embedding, ids, args.work,
                             args.threads))
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / "embedding_types.json").write_text(
                json.dumps({"baseline": baseline, "rows": rows}, indent=1))
            (RESULTS / "embedding_types.md").write_text(render(rows, baseline, command))
    print((RESULTS / "embedding_types.md").read_text())


if __name__ == "__main__":
    main()
