"""Equivalent scaling before 4-bit rounding (`quantize.equalize`): what it buys, per grid.

The same float model (the embedded SmolLM2 baseline, or `--model`), each linear of its decoder
layers rounded three ways, with and without the scales folded in first:
- GPTQModel's grid by round-to-nearest (min-max, symmetric, group 32: what GPTQ and RTN write);
- llama.cpp's Q4_0 by round-to-nearest (gguf-py's own rounding: the extreme weight of each
  block lands on -8 exactly, so its step is max/8 against GPTQ's 2max/15, with no clipping);
- GPTQ W4 sym g32 through the quantize stage (Wikipedia calibration, 16 x 512 tokens), which
  writes GPTQModel's grid and so Q4_0 code for code; with and without GPTQModel's per-group
  clipping search (`quantize.mse`, norm 2.4), which keeps the zero point and so the exactness.
Scored by held-out KL to the float model and held-out perplexity on the training-side held-out
Wikipedia slice (8 x 256 tokens; never an evaluation split). The embedding stays float.

    flock /tmp/pkdq-heavy.lock .venv/bin/python bench/equalize.py

Writes bench/results/equalize.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.core.common import write_json_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 1234


def _scores(model: Any, reference: Any, held: Any) -> dict[str, float]:
    import torch

    kl = nll = 0.0
    with torch.no_grad():
        for row in range(0, len(held), 2):
            ids = held[row:row + 2]
            logp = torch.log_softmax(model(ids).logits.float(), -1)
            ref = reference[row:row + 2]
            kl += float((ref.exp() * (ref - logp)).sum())
            nll += float(-logp[:, :-1].gather(-1, ids[:, 1:, None]).sum())
    return {"kl": round(kl / held.numel(), 4),
            "ppl": round(math.exp(nll / held[:, 1:].numel()), 2)}


def _round_linears(model: Any, rounding: Any) -> Any:
    import torch

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight.copy_(rounding(module.weight))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default="equalize")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-equalize"))
    args = parser.parse_args()

    import torch

    from tasks.core.common import StageContext, data_dir
    from tasks.core.data_blocks import builtin_blocks
    from tasks.core.model_store import load_model, resolve_model
    from tasks.core.recipe import QuantizeConfig
    from tasks.quantize import quantize_stage
    from tasks.quantize.equalize import equalized_copy, round_to_grid
    from tasks.quantize.mixed_layers import ggml_round_trip

    torch.set_num_threads(2)
    source = resolve_model(args.model)
    base, tokenizer = load_model(source)
    held = builtin_blocks(tokenizer, "wikipedia", data_dir(), 256, 8, SEED, heldout=True).ids
    calib = builtin_blocks(tokenizer, "wikipedia", data_dir(), 512, 16, SEED).ids
    with torch.no_grad():
        reference = torch.cat([torch.log_softmax(base(held[r:r + 2]).logits.float(), -1)
                               for r in range(0, len(held), 2)])
    started = time.perf_counter()
    scaled, record = equalized_copy(source.path, calib, 4, 32, True, args.work / "equalized")
    search_s = time.perf_counter() - started
    folders = {"plain": Path(source.path), "equalized": scaled}
    roundings = {"GPTQModel grid, round-to-nearest": lambda w: round_to_grid(w, 4, 32, True),
                 "Q4_0 (gguf-py), round-to-nearest": lambda w: ggml_round_trip(w, "q4_0")}
    rows: list[dict[str, Any]] = []
    for label, rounding in roundings.items():
        for kind, folder in folders.items():
            model = _round_linears(load_model(folder)[0], rounding)
            rows.append({"rounding": label, "model": kind, **_scores(model, reference, held)})
            print(rows[-1], flush=True)
    for mse in (0.0, 2.4):
        for kind, folder in folders.items():
            cfg = QuantizeConfig(method="gptq", bits=4, group_size=32, sym=True, mse=mse,
                                 calibration={"source": "wikipedia", "samples": 16,
                                              "seq_len": 512})
            result = quantize_stage(resolve_model(str(folder)), cfg, StageContext(
                out_dir=args.work / f"gptq-{kind}-mse{mse}", seed=SEED, threads=2))
            model = load_model(result.model)[0]
            label = "GPTQ W4 sym g32 (= Q4_0 code for code)" + (
                f", clipping search (mse {mse})" if mse else "")
            rows.append({"rounding": label, "model": kind,
                         "gptq_s": round(result.metrics["wall_s"], 1),
                         **_scores(model, reference, held)})
            print(rows[-1], flush=True)
    float_scores = _scores(base, reference, held)
    write_json_atomic(RESULTS / f"{args.out}.json", {
        "model": args.model, "float": float_scores, "rows": rows, "search_s": round(search_s, 1),
        "equalize": {k: record[k] for k in ("grid", "alphas", "tokens", "mean_error_ratio")}})
    lines = ["# Equivalent scaling before 4-bit rounding (`quantize.equalize`)", "",
             f"`{args.model}`; held-out KL to the float model and held-out perplexity (float: "
             f"{float_scores['ppl']}) on the training-side held-out Wikipedia slice, 8 x 256 "
             "tokens; decoder linears only (the embedding stays float). Scales searched on 16 x "
             f"512 Wikipedia training tokens in {search_s:.0f} s (mean output-error ratio "
             f"{record['mean_error_ratio']} on GPTQModel's grid).", "",
             "| rounding | model | held-out KL | held-out ppl |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {r['rounding']} | {r['model']} | {r['kl']:.4f} | {r['ppl']:.2f} |" for r in rows]
    lines += ["", "Command: `flock /tmp/pkdq-heavy.lock .venv/bin/python bench/equalize.py` "
              "(2 threads)."]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
