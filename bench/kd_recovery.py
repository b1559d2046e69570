"""KD recovery of a 50%-FFN-pruned SmolLM2: which loss buys back the most, for the same tokens.

    flock /tmp/pkdq-heavy.lock python bench/kd_recovery.py --tokens 12288

Student = SmolLM2-135M with half its FFN neurons removed (`tasks.prune.stage`, activation
criterion);
teacher = SmolLM2-135M. Each variant runs the real distill stage
(`tasks.distill.stage.distill_stage`:
bf16 autocast, chunked loss, top-k logit cache shared by the variants that do not need live
teacher states) for the same token budget, data and seed, then WikiText-2 test perplexity
(`tasks.evaluate.stage.wikitext_perplexity`, first 8192 tokens, 512-token windows) is measured:

- ce:          alpha 0 (plain fine-tuning on the same text: the baseline KD must beat)
- fkl:         forward KL (T=1, alpha 1: pure KD)
- rkl:         reverse KL (MiniLLM; T=1, alpha 1)
- fkl+hidden:  forward KL + hidden-state matching (relative MSE, uniform map, 4 layer pairs)
- diagnostics, to find out which knob makes KD trail CE when it does: the classic mix
  (T=2, alpha 0.5: `fkl-t2-mix`, `rkl-t2-mix`, `fkl+hidden-t2-mix`), the mix at T=1
  (`fkl-t1-mix`) and pure KD at T=2 (`fkl-t2`).

Results: `bench/results/kd_recovery.json` for the default budget of 12,288 tokens,
`kd_recovery_<tokens>.json` for any other; variants already measured at a budget are kept, so
`--variants` adds rows.

Output: a table on stdout and `bench/results/kd_recovery.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kd_common import BATCH, SEED, SEQ_LEN, limit_threads, teacher_and_student  # noqa: E402

MIX = {"temperature": 2.0, "alpha": 0.5}  # the classic Hinton mix, pkdq's earlier default
HIDDEN = {"hidden_loss": "mse", "hidden_weight": 1.0}
VARIANTS: dict[str, dict] = {
    "ce": {"alpha": 0.0},
    "fkl": {"loss": "forward_kl"},
    "rkl": {"loss": "reverse_kl"},
    "fkl+hidden": {"loss": "forward_kl", **HIDDEN},
    "fkl-t2-mix": {"loss": "forward_kl", **MIX},
    "rkl-t2-mix": {"loss": "reverse_kl", **MIX},
    "fkl+hidden-t2-mix": {"loss": "forward_kl", **HIDDEN, **MIX},
    "fkl-t1-mix": {"loss": "forward_kl", "alpha": 0.5},
    "fkl-t2": {"loss": "forward_kl", "temperature": 2.0},
}
DEFAULT_TOKENS = 12288
RESULTS = Path(__file__).resolve().parent / "results"


def result_path(tokens: int) -> Path:
    """One JSON per token budget (the default budget keeps the historical name)."""
    name = "kd_recovery.json" if tokens == DEFAULT_TOKENS else f"kd_recovery_{tokens}.json"
    return RESULTS / name


def wikitext_ppl(path: Path, tokens: int) -> float:
    from tasks.core.common import data_dir
    from tasks.core.model_store import load_model
    from tasks.evaluate.stage import wikitext_perplexity

    model, tok = load_model(path)
    model.eval()
    import torch

    with torch.no_grad():
        result = wikitext_perplexity(model, tok, data_dir() / "wikitext" / "wiki.test.raw",
                                     tokens, 512)
    return result["token_perplexity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                        help="KD token budget per variant")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--variants", nargs="*", default=["ce", "fkl", "rkl", "fkl+hidden"],
                        choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("/tmp/pkdq-kd-recovery"))
    args = parser.parse_args()
    limit_threads(args.threads)
    from tasks.core.common import StageContext
    from tasks.core.recipe import DistillConfig
    from tasks.distill.stage import distill_stage

    teacher, student = teacher_and_student(args.threads)
    result_file = result_path(args.tokens)
    earlier = json.loads(result_file.read_text()) if result_file.is_file() else {}
    rows: dict[str, dict] = dict(earlier.get("rows", {})) if earlier.get("tokens") == args.tokens \
        else {}  # same budget: keep the variants measured by an earlier invocation
    rows |= {
        "teacher": {"wikitext_ppl": wikitext_ppl(teacher.path, args.eval_tokens)},
        "pruned": {"wikitext_ppl": wikitext_ppl(student.path, args.eval_tokens)},
    }
    print(f"teacher ppl {rows['teacher']['wikitext_ppl']:.2f}, pruned "
          f"{rows['pruned']['wikitext_ppl']:.2f}", file=sys.stderr, flush=True)
    for name in args.variants:
        cfg = DistillConfig(**{
            "tokens": args.tokens, "seq_len": SEQ_LEN, "batch_size": BATCH, "lr": args.lr,
            "warmup_steps": 2, "temperature": 1.0, "alpha": 1.0, "precision": "bf16-autocast",
            "loss_chunk": 64, "logit_cache": True, "cache_topk": 64, "eval_blocks": 4,
            **VARIANTS[name]})
        ctx = StageContext(out_dir=args.out / name, seed=SEED, threads=args.threads,
                           teacher=teacher, stage_name=f"kd-{name}")
        start = time.perf_counter()
        result = distill_stage(student, cfg, ctx)
        m = result.metrics
        rows[name] = {
            "wikitext_ppl": wikitext_ppl(result.model.path, args.eval_tokens),
            "heldout_kl_before": m["heldout_kl_before"], "heldout_kl_after": m["heldout_kl_after"],
            "tokens": m["tokens"], "tokens_per_s": m["tokens_per_s"],
            "wall_s": time.perf_counter() - start,
            "logit_cache_reused": m.get("logit_cache_reused"),
        }
        print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
        result_file.parent.mkdir(exist_ok=True)
        result_file.write_text(json.dumps({"tokens": args.tokens, "rows": rows}, indent=2))

    before = rows["pruned"]["wikitext_ppl"]
    print(f"\nSmolLM2-135M, 50% FFN pruned; KD {args.tokens} tokens each (seq {SEQ_LEN} x batch "
          f"{BATCH}, bf16, lr {args.lr}); WikiText-2 test ppl on {args.eval_tokens} tokens")
    print(f"teacher {rows['teacher']['wikitext_ppl']:.2f} | pruned, before KD {before:.2f}")
    print(f"{'variant':<18} {'ppl after':>10} {'recovered':>10} {'held-out KL':>18} {'tok/s':>7}")
    gap = before - rows["teacher"]["wikitext_ppl"]
    for name in [v for v in VARIANTS if v in rows]:
        r = rows[name]
        recovered = (before - r["wikitext_ppl"]) / gap if gap > 0 else float("nan")
        print(f"{name:<18} {r['wikitext_ppl']:>10.2f} {recovered:>10.1%} "
              f"{r['heldout_kl_before']:>8.3f} -> {r['heldout_kl_after']:<7.3f} "
              f"{r['tokens_per_s']:>7.1f}")


if __name__ == "__main__":
    main()
