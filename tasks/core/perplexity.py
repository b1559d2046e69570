"""The perplexity convention every runtime is scored with: non-overlapping windows, the first
token of each window unpredicted, NLL summed in float64.

One home so pkdq's own loader (torch) and llama.cpp score the same tokens the same way and their
perplexities can be compared number for number (the evaluate stage's WikiText-2 slice uses the
same windows). Torch-free: numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

WIKITEXT_TEST = "wikitext/wiki.test.raw"  # under the data root (evaluation split)


def windows(ids: list[int], max_length: int) -> Iterator[list[int]]:
    """Consecutive non-overlapping windows of at most `max_length` tokens (>= 2 tokens each)."""
    for start in range(0, len(ids), max_length):
        window = ids[start:start + max_length]
        if len(window) >= 2:
            yield window


def window_nll(logits: np.ndarray, window: list[int]) -> float:
    """Summed next-token NLL of `window` given logits [len(window), vocab] (last row unused)."""
    x = np.asarray(logits[:-1], dtype=np.float64)
    top = x.max(-1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(x - top).sum(-1))
    targets = np.asarray(window[1:])
    return float((log_z - x[np.arange(len(targets)), targets]).sum())


def perplexity(logits_of: Callable[[list[int]], np.ndarray], ids: list[int],
               max_length: int) -> dict[str, float | int]:
    """Token perplexity of `ids` under `logits_of(window) -> [len, vocab]` logits."""
    total, count = 0.0, 0
    for window in windows(ids, max_length):
        total += window_nll(logits_of(window), window)
        count += len(window) - 1
    return {"token_perplexity": math.exp(total / count), "nll": total,
            "predicted_tokens": count, "tokens": len(ids), "max_length": max_length}


def text_prefix_ids(tokenizer, text: str, tokens: int | None) -> list[int]:
    """The first `tokens` ids of `text` (all with None; no special tokens), tokenising only a
    prefix of it: WikiText-2 test is 1.3 MB and a slice needs a few thousand tokens."""
    if tokens is None:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    budget = tokens * 6 + 1024
    while True:
        ids = tokenizer(text[:budget], add_special_tokens=False)["input_ids"]
        # margin: the last few tokens before the cut may tokenise differently than in full text
        if len(ids) >= tokens + 64 or budget >= len(text):
            return ids[:tokens]
        budget *= 2


def wikitext_ids(tokenizer, data_root: Path, tokens: int) -> list[int]:
    """The first `tokens` ids of WikiText-2 test (no special tokens)."""
    text = (Path(data_root) / WIKITEXT_TEST).read_text(encoding="utf-8")
    return text_prefix_ids(tokenizer, text, tokens)
