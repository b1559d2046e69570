"""Mixed 4/8-bit by sensitivity: does keeping a few layers in Q8_0 pay inside the size budget?

Issue 17 asks whether per-layer 4 or 8 bits under a byte budget (the idea of Model Optimizer's
AutoQuantize) pays. This measures it on a finished run before any of it is built into the
quantize stage: the run's GPTQ W4 g32 grid (its Q4_0 file, code for code) with the linears of
k transformer layers replaced by the Q8_0 blocks of the same layers of the KD stage's float
model (llama.cpp's own Q8_0 rounding, through gguf-py), the embedding in the file's own type.

- Sensitivity: each layer alone in Q8_0, scored by held-out KL to the teacher on the KD
  stage's training-side held-out slice (never an evaluation split). Layers are ranked by how
  much KL they win back; every layer costs the same bytes (its weights x 16 more bytes per 32).
- The curve: the top-k layers by sensitivity for growing k, against a control that spends the
  same bytes on the first and last layers (the placement heuristic of llama.cpp's mixes), each
  scored by held-out KL and WikiText-2 test perplexity (torch, fp32, the model's BOS
  convention); bytes are the file's plus what each Q8_0 layer adds.
- What this leaves out: a real mixed-precision GPTQ pass would quantize the 8-bit layers with
  GPTQ at 8 bits and the later 4-bit layers against the 8-bit ones' outputs; Q8_0 round-to-
  nearest is within 0.5% perplexity of float on this model, so the numbers here are what
  the 8-bit layers can buy, up to that.

    flock /tmp/pkdq-heavy.lock .venv/bin/python bench/mixed_precision.py \
        --run runs/smollm2-ffn12-kd-w4-gguf

Writes bench/results/mixed_precision.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.core.common import data_dir, read_json, write_json_atomic  # noqa: E402
from tasks.quantize.mixed_layers import ggml_round_trip  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Q4_0_BYTES, Q8_0_BYTES = 18, 34  # per 32-weight block: an fp16 scale and the codes
BUDGET = 0.30  # issue 17: at most 0.30x the baseline's bf16 bytes


def layer_linears(model: Any, index: int) -> dict[str, Any]:
    layer = model.model.layers[index]
    return {name: getattr(layer.self_attn if name in LINEARS[:4] else layer.mlp, name)
            for name in LINEARS}


class Mixer:
    """The 4-bit model with chosen layers swapped to their Q8_0 weights (and back)."""

    def __init__(self, quantized: Any, float_model: Any) -> None:
        self.model = quantized
        self.four = {i: {n: m.weight.detach().clone() for n, m in
                         layer_linears(quantized, i).items()}
                     for i in range(len(quantized.model.layers))}
        self.eight = {i: {n: ggml_round_trip(m.weight, "q8_0") for n, m in
                          layer_linears(float_model, i).items()}
                      for i in range(len(float_model.model.layers))}

    def set(self, eight_bit: set[int]) -> Any:
        import torch

        with torch.no_grad():
            for i, weights in self.four.items():
                source = self.eight[i] if i in eight_bit else weights
                for name, module in layer_linears(self.model, i).items():
                    module.weight.copy_(source[name])
        return self.model

    def extra_bytes(self, layers: set[int]) -> int:
        return sum(w.numel() // 32 * (Q8_0_BYTES - Q4_0_BYTES)
                   for i in layers for w in self.four[i].values())


def first_and_last(count: int, k: int) -> list[int]:
    """0, n-1, 1, n-2, ...: the ends of the stack first."""
    order = [x for pair in zip(range(count), reversed(range(count)), strict=True) for x in pair]
    return list(dict.fromkeys(order))[:k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/smollm2-ffn12-kd-w4-gguf"))
    parser.add_argument("--ks", default="1,2,3,4,6,8,12")
    parser.add_argument("--tokens", type=int, default=8192, help="WikiText-2 test tokens")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from pkdq.env import configure_environment
    from tasks.core.common import GGUF_FILE, StageContext
    from tasks.core.gptq_checkpoint import load_dequantized
    from tasks.core.llama_cpp import gguf_main_types
    from tasks.core.model_store import load_model
    from tasks.core.perplexity import WIKITEXT_TEST
    from tasks.core.recipe import parse_recipe
    from tasks.distill.heldout import heldout_blocks, heldout_metrics
    from tasks.evaluate.stage import wikitext_perplexity

    configure_environment()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    run = read_json(args.run / "run.json")
    recipe = parse_recipe(run["recipe"], "run.json recipe")
    stages = list(run["stages"])
    distill_cfg = next(s.distill for s in recipe.stages if hasattr(s, "distill"))
    quant_dir = args.run / stages[-1]
    distill_dir = args.run / next(s for s in stages if s.endswith("distill"))
    gguf_file = quant_dir / GGUF_FILE
    _, main_type, embedding_type = gguf_main_types(gguf_file)
    file_bytes = gguf_file.stat().st_size

    teacher, _ = load_model(Path(run["model"]["path"]))
    bf16_bytes = 2 * sum(p.numel() for p in teacher.parameters())
    quantized, tokenizer = load_dequantized(quant_dir / "model")
    float_model, _ = load_model(distill_dir / "model")
    with torch.no_grad():  # the embedding (tied head) as the file holds it
        embed = quantized.get_input_embeddings().weight
        embed.copy_(ggml_round_trip(embed, embedding_type))
    mixer = Mixer(quantized, float_model)
    del float_model
    ctx = StageContext(out_dir=args.run, seed=recipe.seed, threads=args.threads)
    held = heldout_blocks(tokenizer, distill_cfg, ctx, teacher.config).ids
    wikitext = data_dir() / WIKITEXT_TEST

    def score(layers: set[int], ppl: bool) -> dict[str, Any]:
        model = mixer.set(layers)
        row = {"layers": sorted(layers), "extra_bytes": mixer.extra_bytes(layers),
               "bytes": file_bytes + mixer.extra_bytes(layers),
               "heldout_kl": heldout_metrics(model, teacher, held, 4)["kl"]}
        row["x_bf16"] = row["bytes"] / bf16_bytes
        if ppl:
            row["wikitext_ppl"] = wikitext_perplexity(model, tokenizer, wikitext, args.tokens,
                                                      512)["token_perplexity"]
        print(f"[mixed] {len(layers)} layers in q8_0 {sorted(layers)}: KL "
              f"{row['heldout_kl']:.4f}" + (f", ppl {row['wikitext_ppl']:.2f}" if ppl else ""),
              file=sys.stderr, flush=True)
        return row

    count = len(quantized.model.layers)
    four_bit = score(set(), ppl=True)
    singles = [{"layer": i, **score({i}, ppl=False)} for i in range(count)]
    for row in singles:
        row["kl_gain"] = four_bit["heldout_kl"] - row["heldout_kl"]
    ranked = [r["layer"] for r in sorted(singles, key=lambda r: -r["kl_gain"])]
    ks = [int(k) for k in args.ks.split(",") if 0 < int(k) <= count]
    curve = {"sensitivity": [], "first and last": []}
    for k in ks:
        curve["sensitivity"].append({"k": k, **score(set(ranked[:k]), ppl=True)})
        curve["first and last"].append({"k": k, **score(set(first_and_last(count, k)), ppl=True)})
    all_eight = {"k": count, **score(set(range(count)), ppl=True)}
    out = {"run": str(args.run), "main_type": main_type, "embedding_type": embedding_type,
           "file_bytes": file_bytes, "bf16_bytes": bf16_bytes, "budget": BUDGET,
           "heldout": {"blocks": int(held.shape[0]), "seq_len": int(held.shape[1])},
           "wikitext_tokens": args.tokens, "four_bit": four_bit, "singles": singles,
           "ranked": ranked, "curve": curve, "all_eight": all_eight,
           "wall_s": time.perf_counter() - started, "threads": args.threads,
           "command": "flock /tmp/pkdq-heavy.lock .venv/bin/python bench/mixed_precision.py "
                      + " ".join(sys.argv[1:])}
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / "mixed_precision.json", out)
    (RESULTS / "mixed_precision.md").write_text(render(out))
    print(render(out))


def render(out: dict[str, Any]) -> str:
    budget_bytes = out["budget"] * out["bf16_bytes"]
    base = out["four_bit"]
    lines = ["# Mixed 4/8-bit by sensitivity", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             f"Run `{out['run']}`: main type {out['main_type']}, embedding "
             f"{out['embedding_type']}, {out['file_bytes'] / 1e6:.1f} MB "
             f"({out['file_bytes'] / out['bf16_bytes']:.3f}x the baseline's bf16 "
             f"{out['bf16_bytes'] / 1e6:.1f} MB); budget {out['budget']:.2f}x = "
             f"{budget_bytes / 1e6:.1f} MB. Held-out: {out['heldout']['blocks']} blocks of "
             f"{out['heldout']['seq_len']} tokens; WikiText-2 test: first "
             f"{out['wikitext_tokens']:,} tokens, windows of 512.", "",
             "| layers in Q8_0 | chosen by | which | MB | x bf16 | within budget | held-out KL "
             "| WikiText-2 ppl |", "| ---: | --- | --- | ---: | ---: | --- | ---: | ---: |"]

    def line(k: int, by: str, row: dict[str, Any]) -> str:
        which = ", ".join(map(str, row["layers"])) if 0 < k < 30 else ("none" if not k else "all")
        return (f"| {k} | {by} | {which} | {row['bytes'] / 1e6:.1f} | {row['x_bf16']:.3f} "
                f"| {'yes' if row['bytes'] <= budget_bytes else 'no'} | {row['heldout_kl']:.4f} "
                f"| {row['wikitext_ppl']:.2f} |")

    lines.append(line(0, "-", base))
    for a, b in zip(out["curve"]["sensitivity"], out["curve"]["first and last"],
                    strict=True):
        lines += [line(a["k"], "sensitivity", a), line(b["k"], "first and last", b)]
    lines.append(line(out["all_eight"]["k"], "-", out["all_eight"]))
    gains = sorted(out["singles"], key=lambda r: -r["kl_gain"])
    lines += ["", "Held-out KL won back by one layer in Q8_0 (the rest 4-bit), best first: "
              + ", ".join(f"layer {r['layer']} {r['kl_gain']:+.4f}" for r in gains[:10])
              + f"; the median layer {gains[len(gains) // 2]['kl_gain']:+.4f}.", "",
              f"Command: `{out['command']}` ({out['wall_s'] / 60:.1f} min, "
              f"{out['threads']} threads).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
