"""WikiText-2 perplexity with and without the family's BOS, on the same text windows.

    flock /tmp/pkdq-heavy.lock python bench/bos_conventions.py [--models gemma3-270m smollm2-135m]

The first 8,192 tokens of wiki.test.raw (as the evaluate stage), cut into windows of 511 text
tokens; each window is scored once as is and once with `<bos>` in front (512 positions), on the
same targets (every text token but the first of its window). `stage` is what the evaluate stage
reports now (`tasks.evaluate.stage.wikitext_perplexity`, the family's convention from
`tasks.core.conventions`). Output: a table on stdout and bench/results/bos_conventions.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bos_conventions.json"
TOKENS, WINDOW = 8192, 512


def measure(name: str) -> dict:
    import torch

    from tasks.core.common import data_dir
    from tasks.core.conventions import needs_bos
    from tasks.core.model_store import load_model, resolve_model
    from tasks.core.perplexity import text_prefix_ids
    from tasks.evaluate.stage import _window_nll, wikitext_perplexity

    t0 = time.perf_counter()
    model, tok = load_model(resolve_model(name))
    model.eval()
    path = data_dir() / "wikitext" / "wiki.test.raw"
    ids = text_prefix_ids(tok, path.read_text(encoding="utf-8"), TOKENS)
    with torch.inference_mode():
        nll_off, n_off = _window_nll(model, ids, WINDOW - 1, [])
        nll_on, n_on = _window_nll(model, ids, WINDOW, [int(tok.bos_token_id)])
        stage = wikitext_perplexity(model, tok, path, TOKENS, WINDOW)
    assert n_on == n_off
    return {
        "model": name, "model_type": model.config.model_type,
        "bos_token": tok.bos_token, "family_needs_bos": needs_bos(tok, model.config),
        "ppl_without_bos": math.exp(nll_off / n_off), "ppl_with_bos": math.exp(nll_on / n_on),
        "predicted_tokens": n_on, "stage_token_perplexity": stage["token_perplexity"],
        "stage_prefix_ids": stage["prefix_ids"], "wall_s": time.perf_counter() - t0,
    }


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2-135m"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for name in args.models:
        rows[name] = measure(name)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    print("| model | BOS token | family needs BOS | ppl without BOS | ppl with BOS | stage now |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for r in rows.values():
        print(f"| {r['model']} | `{r['bos_token']}` | {r['family_needs_bos']} | "
              f"{r['ppl_without_bos']:.2f} | {r['ppl_with_bos']:.2f} | "
              f"{r['stage_token_perplexity']:.2f} |")


if __name__ == "__main__":
    main()
