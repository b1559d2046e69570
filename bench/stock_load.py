"""A run's stage models loaded the way a user would, with stock transformers, against pkdq's own
loader: the code a user types, its logits and WikiText-2 perplexity next to pkdq's.

    flock /tmp/pkdq-heavy.lock python -m bench.stock_load runs/smollm2-ffn25-kd-w4

Writes bench/results/stock_load.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tasks.core.common import REPO_ROOT, data_dir, set_offline_env

RESULTS = REPO_ROOT / "bench" / "results"
PROMPT = "The library opened early on Saturday, and the first visitors went to the map room."
TOKENS, WINDOW = 8192, 512
USER_CODE = ("from transformers import AutoModelForCausalLM\n"
             "model = AutoModelForCausalLM.from_pretrained({folder!r})")


def compare(folder: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.core.model_store import load_model
    from tasks.core.perplexity import wikitext_ids
    from tasks.quantize.export import _torch_perplexity

    ours, tokenizer = load_model(folder)
    stock = AutoModelForCausalLM.from_pretrained(str(folder)).eval()  # USER_CODE
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        a, b = ours(ids).logits.float(), stock(ids).logits.float()
    text_ids = wikitext_ids(tokenizer, data_dir(), TOKENS)
    return {
        "folder": str(folder), "stock_class": type(stock).__name__, "stock_dtype": str(stock.dtype),
        "max_abs_logit_diff": (a - b).abs().max().item(), "max_abs_logit": a.abs().max().item(),
        "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "pkdq_perplexity": _torch_perplexity(ours, text_ids, WINDOW)["token_perplexity"],
        "stock_perplexity": _torch_perplexity(stock, text_ids, WINDOW)["token_perplexity"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "stock_load.md")
    args = parser.parse_args(argv)
    set_offline_env()
    import torch

    torch.set_num_threads(args.threads)
    rows = [compare(m) for m in sorted(args.run.glob("[0-9][0-9]-*/model"))]
    lines = ["# Stage models in stock transformers vs pkdq's loader", "",
             "The code a user types (transformers 5.23, optimum 2.3.0 + gptqmodel 7.6.0 for GPTQ):",
             "", "```python", USER_CODE.format(folder="<run>/03-quantize/model"), "```", "",
             f"Logits on one {len(PROMPT.split())}-word prompt; perplexity on the first {TOKENS} "
             f"tokens of WikiText-2 test, windows of {WINDOW}. pkdq's loader computes in fp32 "
             "(GPTQ: fp32 scales); stock transformers loads GPTQ in fp16.", "",
             "| model | stock class, dtype | max abs logit diff (of max) | top-1 agree "
             "| pkdq ppl | stock ppl |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {Path(r['folder']).parent.name} | {r['stock_class']}, {r['stock_dtype']} "
                     f"| {r['max_abs_logit_diff']:.4f} ({r['max_abs_logit']:.1f}) "
                     f"| {r['top1_agreement']:.3f} | {r['pkdq_perplexity']:.2f} "
                     f"| {r['stock_perplexity']:.2f} |")
    command = "flock /tmp/pkdq-heavy.lock python -m bench.stock_load " + \
        " ".join(sys.argv[1:] if argv is None else argv)
    lines += ["", f"Command: `{command}`", ""]
    args.out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
