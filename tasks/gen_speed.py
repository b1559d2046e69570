"""CPU generation speed: prefill latency and greedy decode throughput with a KV cache.

Measured the same way for every stage's model (same prompt, lengths, threads), so the report
can say what pruning and quantization bought in latency, not only in bytes. Timings are medians
of a few repeats after an untimed warm-up (first calls pay for kernel selection and allocation).
"""

from __future__ import annotations

import statistics
import time
from typing import Any


def _greedy_next(logits: Any) -> Any:
    return logits[:, -1].argmax(dim=-1, keepdim=True)


def generation_speed(model: Any, prompt_ids: list[int], new_tokens: int,
                     repeats: int) -> dict[str, Any]:
    """Prefill `prompt_ids` (only the last position projected, as `generate` does), then decode
    `new_tokens` greedy tokens one by one through the KV cache; median seconds of `repeats`."""
    import torch

    ids = torch.tensor([prompt_ids], device=model.device)
    prefill: list[float] = []
    decode: list[float] = []
    with torch.inference_mode():
        model(input_ids=ids[:, :8], use_cache=True, logits_to_keep=1)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            prefill.append(time.perf_counter() - start)
            cache, token = out.past_key_values, _greedy_next(out.logits)
            start = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, _greedy_next(out.logits)
            decode.append(time.perf_counter() - start)
    prefill_s, decode_s = statistics.median(prefill), statistics.median(decode)
    return {
        "prompt_tokens": len(prompt_ids),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": len(prompt_ids) / prefill_s,
        "decode_tokens_per_s": new_tokens / decode_s,
        "decode_ms_per_token": 1000.0 * decode_s / new_tokens,
        "threads": torch.get_num_threads(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
