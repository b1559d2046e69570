"""pkdq's lm-eval model backend (`--model pkdq`): HFLM's scores for less compute.

Stock HFLM runs one forward of context + continuation per request and projects every position
onto the vocabulary. Here requests are packed into prefix trees (`tasks.evaluate.tree_pack`): a
question's
context is encoded once for all its choices (and any longer shared prefix, e.g. PIQA solutions
that start alike) in one forward with a tree attention mask, and the vocabulary projection runs
only where a continuation token is scored (transformers' boolean `logits_to_keep`). Rows are
batched longest first and bounded in scored positions, so the logits tensor stays small.

Everything else is HFLM's own: tokenization, context/continuation split, left truncation, the
rolling windows of `loglikelihood_rolling` (it calls `_loglikelihood_tokens`, which is the one
method replaced) and `generate_until`. So log-likelihoods equal HFLM's up to float summation order,
which the tests and `bench/eval_backend.py` check.

The tree mask is verified against a plain forward when the backend is built (a few tokens, well
under a second), so a model whose attention ignores custom masks fails loudly, not silently.

Command line: lm-eval's CLI only imports its own models, so run it through this module, which
registers `pkdq` and adds pkdq's offline task folder:
    python -m tasks.evaluate.backend --model pkdq --model_args pretrained=smollm2-135m \
        --tasks arc_easy --limit 20
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from tasks.core.conventions import needs_bos, tokenizer_adds_bos
from tasks.evaluate.tree_pack import Row, ScoreRequest, ancestor_mask, batch_rows, pack

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
# Largest |packed - plain| log-likelihood the build-time check accepts: float rounding only
# (a wrong mask is off by whole nats). Lower precision rounds more.
CHECK_TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-3}
CHECK_TOLERANCE_LOW_PRECISION = 0.25
RELATIVE_SLACK = 1e-4  # of the plain log-likelihood's magnitude, on top of the tolerance
CHECK_TEXT = ("Question: Which gas do plants take in from the air to make food?\n"
              "Answer: carbon dioxide, which leaves then turn into sugar")


def resolve_dtype(value: str | torch.dtype | None) -> torch.dtype:
    """'float32' / 'bf16' / torch dtype -> torch dtype (None = float32, the accurate default)."""
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype):
        return value
    try:
        return DTYPES[str(value).lower()]
    except KeyError:
        raise ValueError(f"dtype {value!r}: use one of {', '.join(DTYPES)}") from None


def load_for_eval(spec: str | os.PathLike[str], dtype: torch.dtype,
                  device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) for any model spec pkdq resolves (built-in name, folder, GGUF, HF id).

    Quantized folders load through `tasks.core.gptq_checkpoint.load_quantized` (their own compute
    dtype).
    """
    from tasks.core.model_store import load_model, resolve_model

    ref = resolve_model(str(spec))
    return load_model(ref, dtype=dtype, device=device)


def _rows_per_batch(batch_size: int | str | None) -> int:
    """lm-eval passes batch sizes as ints or strings ('16', 'auto'); 'auto' means 16 here."""
    text = str(batch_size or 16)
    return int(text) if text.isdigit() else 16


def _device(device: str | None) -> str:
    """The device to load on: as asked, CPU when unset or when CUDA is asked but absent."""
    if not device or (device.startswith("cuda") and not torch.cuda.is_available()):
        return "cpu"
    return device


@register_model("pkdq")
class PkdqLM(HFLM):
    """HFLM with shared-prefix packing and continuation-only vocabulary projection.

    Arguments beyond HFLM's: `dtype` (float32 default; bf16 is opt-in, see the README for its
    score drift), `min_shared` (tokens two requests must share to go into one row), `max_row`
    (tree nodes per row), `max_scored` (scored positions per forward: the logits tensor is
    max_scored x vocab floats), `max_tokens` (padded tokens per forward), `self_check`.
    `add_bos_token` unset means the family's convention (`tasks.core.conventions.needs_bos`):
    Gemma always gets `<bos>` first, even from a tokenizer that would not add it.
    """

    def __init__(self, pretrained: Any, tokenizer: Any = None,
                 dtype: str | torch.dtype | None = None, batch_size: int | str | None = 16,
                 max_length: int | None = None, device: str | None = "cpu",
                 min_shared: int = 8, max_row: int = 512, max_scored: int = 2048,
                 max_tokens: int = 2048, self_check: bool = True,
                 add_bos_token: bool | None = None, **kwargs: Any) -> None:
        if isinstance(pretrained, (str, os.PathLike)):
            pretrained, loaded_tokenizer = load_for_eval(pretrained, resolve_dtype(dtype),
                                                         _device(device))
            tokenizer = tokenizer or loaded_tokenizer
        if tokenizer is None:
            raise ValueError("pkdq backend: pass `tokenizer` along with an already loaded model")
        kwargs.pop("max_batch_size", None)
        if add_bos_token is None:
            add_bos_token = needs_bos(tokenizer, getattr(pretrained, "config", None))
        add_bos_token = str(add_bos_token).lower() not in ("false", "0", "no")
        self._bos = [int(tokenizer.bos_token_id)] if add_bos_token else []
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, batch_size=batch_size,
                         max_length=int(max_length) if max_length else None,
                         add_bos_token=add_bos_token, **kwargs)
        self.rows_per_batch = _rows_per_batch(batch_size)
        self.min_shared, self.max_row = int(min_shared), int(max_row)
        self.max_scored, self.max_tokens = int(max_scored), int(max_tokens)
        self._truncation_warned = False
        if str(self_check).lower() not in ("false", "0", "no"):
            check_tree_attention(self)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
        """HFLM's encoding, plus the family's BOS where the tokenizer itself would not add it."""
        ids = super().tok_encode(string, add_special_tokens=add_special_tokens, **kwargs)
        if self._bos and add_special_tokens is not False and ids[:1] != self._bos:
            ids = self._bos + ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_batch_encode(self, strings: list[str], *args: Any, **kwargs: Any) -> Any:
        """HFLM's left-padded batch encoding (generation); where the family needs BOS and the
        tokenizer would not add it, the BOS text goes in front of each string, which the
        tokenizer maps to the BOS id and HFLM then encodes without further special tokens."""
        if self._bos and not tokenizer_adds_bos(self.tokenizer):
            text = self.tokenizer.bos_token
            strings = [s if s.startswith(text) else text + s for s in strings]
        return super().tok_batch_encode(strings, *args, **kwargs)

    # ------------------------------------------------------------------ requests -> rows

    def _score_request(self, context: list[int], continuation: list[int]) -> ScoreRequest:
        """HFLM's input window: (context + continuation)[-(max_length + 1):][:-1]."""
        if not context or not continuation:
            raise ValueError("pkdq backend: empty context or continuation (lm-eval never sends "
                             "these; an empty context becomes the prefix token upstream)")
        if len(continuation) > self.max_length:
            raise ValueError(f"continuation of {len(continuation)} tokens exceeds max_length "
                             f"{self.max_length}")
        whole = context + continuation
        if len(whole) > self.max_length + 1 and not self._truncation_warned:
            log.warning("pkdq backend: inputs longer than max_length %d are left-truncated, "
                        "as HFLM does", self.max_length)
            self._truncation_warned = True
        return ScoreRequest(tuple(whole[-(self.max_length + 1):][:-1]), tuple(continuation))

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        """(sum log P(continuation | context), continuation is the greedy one) per request."""
        scored = [self._score_request(ctx, cont) for _, ctx, cont in requests]
        # HFLM's rolling path sends window batches (override_bs set) with tqdm forced on
        quiet = disable_tqdm or override_bs is not None or self.rank != 0
        results = self.score(scored, disable_tqdm=quiet)
        for (key, _, _), answer in zip(requests, results, strict=True):
            if key is not None:  # rolling windows come with key None; HFLM caches those per doc
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def score(self, requests: Sequence[ScoreRequest],
              disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """Score token-level requests: pack into prefix-tree rows, forward rows in batches."""
        rows = pack(requests, self.min_shared, self.max_row)
        batches = batch_rows(rows, self.rows_per_batch, self.max_scored, self.max_tokens)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="pkdq loglikelihood") as bar:
            for batch in batches:
                picked = [rows[i] for i in batch]
                for idx, answer in self._score_rows(picked, requests):
                    results[idx] = answer
                bar.update(sum(len(r.members) for r in picked))
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ one forward

    def _attention_mask(self, masks: np.ndarray) -> Any:
        """The [B, 1, W, W] mask in the form the model's attention takes.

        sdpa takes booleans (True = attend); eager adds the mask to the scores, so it gets 0 /
        dtype-min floats. Models with sliding-window layers (layer_types) take a mask per layer
        type; the sliding one also drops ancestors beyond the window. Models with one window on
        every layer and no layer types (Mistral) take the sliding mask alone.
        """
        config = self.model.config
        dtype = next(self.model.parameters()).dtype

        def convert(array: np.ndarray) -> torch.Tensor:
            allowed = torch.from_numpy(array).unsqueeze(1).to(self.device)
            if getattr(config, "_attn_implementation", "sdpa") != "eager":
                return allowed
            zero = torch.zeros((), dtype=dtype, device=self.device)
            return torch.where(allowed, zero, torch.finfo(dtype).min)

        return convert(masks)

    def _masks(self, rows: Sequence[Row], width: int) -> Any:
        config = self.model.config
        full = np.stack([ancestor_mask(r, width) for r in rows])
        window = getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None)
        if not window or (types and "sliding_attention" not in types):
            return self._attention_mask(full)
        sliding = self._attention_mask(np.stack([ancestor_mask(r, width, window) for r in rows]))
        if not types:  # Mistral: one window for every layer, no per-layer types
            return sliding
        return {"full_attention": self._attention_mask(full), "sliding_attention": sliding}

    def _score_rows(self, rows: Sequence[Row],
                    requests: Sequence[ScoreRequest]) -> list[tuple[int, tuple[float, bool]]]:
        """One forward of a batch of rows; (request index, (log-likelihood, is greedy))."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), int(self.tokenizer.pad_token_id or 0),
                         dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        keep = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, row in enumerate(rows):
            ids[b, :len(row)] = torch.tensor(row.tokens)
            positions[b, :len(row)] = torch.tensor(row.depths)
            keep[b, row.scored_nodes()] = True
        with torch.inference_mode():
            out = self.model(input_ids=ids.to(self.device), position_ids=positions.to(self.device),
                             attention_mask=self._masks(rows, width),
                             logits_to_keep=keep.to(self.device), use_cache=False)
            logits = out.logits.float()  # [scored positions, vocab], row-major over (b, node)
            lse = torch.logsumexp(logits, dim=-1)
            greedy = logits.argmax(dim=-1)
        flat = (torch.cumsum(keep.flatten(), 0) - 1).view(keep.shape)
        at, targets, owner = [], [], []
        for b, row in enumerate(rows):
            for idx, nodes in row.members:
                at.extend(int(flat[b, n]) for n in nodes)
                targets.extend(requests[idx].targets)
                owner.extend([idx] * len(nodes))
        at_t = torch.tensor(at, device=logits.device)
        tgt_t = torch.tensor(targets, device=logits.device)
        token_lp = (logits[at_t, tgt_t] - lse[at_t]).double().cpu().numpy()
        hit = (greedy[at_t] == tgt_t).cpu().numpy()
        out_list: list[tuple[int, tuple[float, bool]]] = []
        start = 0
        for row in rows:
            for idx, nodes in row.members:
                end = start + len(nodes)
                out_list.append((idx, (float(token_lp[start:end].sum()),
                                       bool(hit[start:end].all()))))
                start = end
        return out_list


def _plain_loglikelihood(model: Any, req: ScoreRequest, device: Any) -> float:
    """Reference: one unpacked forward of the request's inputs, full log-softmax."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([req.inputs], device=device)).logits[0].float()
    logp = torch.log_softmax(logits[-len(req.targets):], dim=-1)
    return float(logp.gather(1, torch.tensor(req.targets, device=device)[:, None]).sum())


def check_tree_attention(lm: PkdqLM) -> float:
    """Packed-tree scores of two requests sharing a prefix must equal plain forwards.

    Returns the largest difference; raises when it is beyond float rounding, i.e. when this
    model's attention does not honour the custom mask or position ids.
    """
    ids = lm.tok_encode(CHECK_TEXT)
    split = len(ids) // 2
    other = ids[:split] + ids[split:][::-1]
    reqs = [ScoreRequest(tuple(seq[:-1]), tuple(seq[split - 2:])) for seq in (ids, other)]
    reqs.append(ScoreRequest(tuple(ids[:split]), tuple(ids[1:split + 1])))  # a plain prefix
    packed = lm.score(reqs)
    plain = [_plain_loglikelihood(lm.model, r, lm.device) for r in reqs]
    dtype = next(lm.model.parameters()).dtype
    # Rounding grows with the log-likelihood's size (a sum over tokens of log-softmaxes over
    # the vocabulary: Gemma's 262k): allow 1e-4 of it on top; a mask the attention ignores
    # moves scores by whole nats.
    worst = max(abs(p - q) - RELATIVE_SLACK * abs(q)
                for (p, _), q in zip(packed, plain, strict=True))
    tolerance = CHECK_TOLERANCE.get(dtype, CHECK_TOLERANCE_LOW_PRECISION)
    if not worst <= tolerance:
        raise RuntimeError(
            f"pkdq backend: tree-packed log-likelihoods differ from plain forwards by {worst:.3g} "
            f"(> {tolerance:g}) for {type(lm.model).__name__}: its attention does not honour "
            "custom 4D masks / position ids; evaluate with the hf backend instead")
    return worst


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the `pkdq` model registered and pkdq's task folder included."""
    from lm_eval.__main__ import cli_evaluate

    from tasks.core.common import set_offline_env
    from tasks.evaluate.lm_eval_tasks import TASKS_DIR

    set_offline_env()
    args = list(sys.argv[1:] if argv is None else argv)
    if args and not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
