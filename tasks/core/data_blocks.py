"""Token blocks from any data source, with the token accounting the stage metrics report.

Text kinds are packed (`tasks.core.data.token_blocks`: documents shuffled by seed, joined by
EOS, no padding). Chat for KD with `loss_on: assistant` is one conversation per row, rendered with
the model's own chat template, right-padded, and masked: the mask marks the assistant tokens the
loss trains on. Chat for calibration, or with `loss_on: all`, is the rendered conversations
packed like text (every token counts, so padding would only waste positions).
Right padding under a causal model changes nothing at the real
positions, so no attention mask is needed; padded positions are simply outside the loss mask.

The bundled text (`kind: builtin`) takes exactly the path it always took, so its blocks and the
stage keys of existing recipes are unchanged.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.data import load_train_texts, token_blocks
from tasks.core.recipe import DataSpec
from tasks.core.text_sources import Corpus, DataError, load_corpus

if TYPE_CHECKING:
    import torch


@dataclass
class Blocks:
    """Rows of token ids [n, seq_len], the loss mask (chat) and how the data was used."""

    ids: torch.Tensor
    mask: torch.Tensor | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def _where(corpus: Corpus) -> str:
    return ", ".join(corpus.files[:2]) + (" ..." if len(corpus.files) > 2 else "")


def chat_template_problem(tokenizer) -> str | None:
    """Why this tokenizer cannot render chat data (one line), or None."""
    if not getattr(tokenizer, "chat_template", None):
        return ("the model's tokenizer has no chat template (tokenizer_config.json "
                "chat_template); use a chat model, add a template, or use kind jsonl")
    return None


def _render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def render_chat(tokenizer, messages: list[dict[str, str]], loss_on: str = "assistant"
                ) -> tuple[list[int], list[int]]:
    """(token ids, mask) of one conversation in the model's chat template.

    The mask is 1 on the tokens of each assistant turn (its content and the template's
    end-of-turn marker, so the model learns to stop) and 0 elsewhere; `loss_on="all"` marks every
    token. The assistant spans come from rendering prefixes: the text before turn k with the
    generation prompt, and the text through turn k; that needs no `{% generation %}` support in
    the template, only that rendering is incremental (checked).
    """
    problem = chat_template_problem(tokenizer)
    if problem:
        raise DataError(f"data: kind chat: {problem}")
    full = _render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    for k, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:k], True) if k else ""
        through = _render(tokenizer, messages[: k + 1])
        if not (full.startswith(through) and through.startswith(before)):
            raise DataError("data: kind chat: the chat template does not render turns "
                            "incrementally, so assistant tokens cannot be located; use "
                            "loss_on: all")
        spans.append((len(before), len(through)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    if loss_on == "all":
        return ids, [1] * len(ids)
    mask = [int(any(lo <= start < hi for lo, hi in spans)) for start, _ in
            encoded["offset_mapping"]]
    return ids, mask


def chat_texts(tokenizer, chats: list[list[dict[str, str]]]) -> list[str]:
    """Conversations as the template renders them: calibration text for chat data."""
    problem = chat_template_problem(tokenizer)
    if problem:
        raise DataError(f"data: kind chat: {problem}")
    return [_render(tokenizer, chat) for chat in chats]


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def chat_rows(tokenizer, chats: list[list[dict[str, str]]], seq_len: int, n_rows: int,
              seed: int, loss_on: str, repeat: bool, where: str) -> Blocks:
    """`n_rows` rows of one conversation each (shuffled by seed), cut at `seq_len`, padded."""
    import torch

    rendered = [render_chat(tokenizer, chat, loss_on) for chat in chats]
    available = sum(len(ids) for ids, _ in rendered)
    truncated = sum(len(ids) > seq_len for ids, _ in rendered)
    rows = [(ids[:seq_len], mask[:seq_len]) for ids, mask in rendered]
    rows = [row for row in rows if any(row[1])]  # cut before its first assistant token
    if not rows:
        raise DataError(f"data: {where}: no conversation keeps an assistant token within "
                        f"seq_len {seq_len}; raise seq_len or shorten the prompts")
    if len(rows) < n_rows and not repeat:
        raise DataError(f"data: {where}: {len(rows)} conversations, {n_rows} rows needed "
                        f"(one conversation per row of {seq_len}); lower the token budget, add "
                        "data, or set data.repeat: true")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    picks = [order[i % len(order)] for i in range(n_rows)]
    ids = torch.full((n_rows, seq_len), _pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((n_rows, seq_len), dtype=torch.long)
    for r, pick in enumerate(picks):
        row_ids, row_mask = rows[pick]
        ids[r, : len(row_ids)] = torch.tensor(row_ids)
        mask[r, : len(row_mask)] = torch.tensor(row_mask)
    real = sum(len(rows[p][0]) for p in picks)
    stats = {"conversations": len(chats), "rows": n_rows, "tokens_available": available,
             "tokens_used": real, "loss_tokens": int(mask.sum()),
             "padding_tokens": n_rows * seq_len - real, "truncated": truncated,
             "epochs": round(n_rows / len(rows), 4), "loss_on": loss_on}
    return Blocks(ids, mask, stats)


def packed(tokenizer, docs: list[str], seq_len: int, n_blocks: int, seed: int, repeat: bool,
           where: str, prefix: Sequence[int] = ()) -> Blocks:
    """Packed blocks of a user's documents; with `repeat`, several epochs when they are short."""
    need = seq_len * n_blocks
    lengths = [len(x) + 1 for x in tokenizer(docs, add_special_tokens=False)["input_ids"]]
    available = sum(lengths)
    epochs = 1
    if available < need:
        if not repeat:
            raise DataError(f"data: {where}: {available} tokens, {need} needed ({n_blocks} "
                            f"blocks of {seq_len}); lower the budget, add data, or set "
                            "data.repeat: true")
        epochs = math.ceil(need / available)
    ids = token_blocks(tokenizer, docs * epochs, seq_len, n_blocks, seed=seed, prefix=prefix)
    return Blocks(ids, None, {"documents": len(docs), "tokens_available": available,
                              "tokens_used": need, "epochs": round(need / available, 4)})


def builtin_blocks(tokenizer, source: str, data: Path, seq_len: int, n_blocks: int,
                   seed: int, heldout: bool = False, prefix: Sequence[int] = ()) -> Blocks:
    """The bundled text, exactly as before user data existed (same blocks, same keys)."""
    texts = load_train_texts(data, source, heldout=heldout)
    ids = token_blocks(tokenizer, texts, seq_len, n_blocks, seed=seed, prefix=prefix)
    return Blocks(ids, None, {"kind": "builtin", "source": "wikipedia held-out" if heldout
                              else source, "documents": len(texts),
                              "tokens_used": seq_len * n_blocks})


def training_blocks(tokenizer, spec: DataSpec, data: Path, seq_len: int, n_blocks: int,
                    seed: int, *, masked: bool = False, prefix: Sequence[int] = ()) -> Blocks:
    """Training / calibration blocks of `spec`. Chat gives masked rows when `masked` (KD) and
    packed rendered conversations otherwise (calibration sees the whole conversation).

    `prefix` (the family's BOS, `tasks.core.conventions.prefix_ids`) opens every packed text
    block; rendered chat carries whatever its template puts first (Gemma's starts with BOS)."""
    if spec.kind == "builtin":
        return builtin_blocks(tokenizer, spec.source, data, seq_len, n_blocks, seed,
                              prefix=prefix)
    corpus = load_corpus(spec, data)
    where = _where(corpus)
    if spec.kind == "chat" and masked:
        blocks = chat_rows(tokenizer, corpus.chats, seq_len, n_blocks, seed, spec.loss_on,
                           spec.repeat, where)
    elif spec.kind == "chat":
        blocks = packed(tokenizer, chat_texts(tokenizer, corpus.chats), seq_len, n_blocks,
                        seed, spec.repeat, where)
    else:
        blocks = packed(tokenizer, corpus.docs, seq_len, n_blocks, seed, spec.repeat, where,
                        prefix)
    blocks.stats = {"kind": spec.kind, "fingerprint": corpus.fingerprint, **blocks.stats}
    return blocks


def heldout_blocks(tokenizer, spec: DataSpec, data: Path, seq_len: int, n_blocks: int,
                   seed: int, prefix: Sequence[int] = ()) -> Blocks:
    """KD's held-out slice of `spec`: never trained on. Builtin: the held-out Wikipedia files.

    A user's slice may be shorter than `n_blocks` blocks; then it gives as many whole blocks
    as it has (at least one, else a one-line error).
    """
    if spec.kind == "builtin":
        return builtin_blocks(tokenizer, spec.source, data, seq_len, n_blocks, seed, True,
                              prefix)
    corpus = load_corpus(spec, data)
    where = f"held-out slice of {_where(corpus)}"
    fix = "raise data.heldout or give data.heldout_paths"
    if spec.kind == "chat" and spec.loss_on == "assistant":
        if not corpus.heldout_chats:
            raise DataError(f"data: {where} is empty; {fix}")
        n = min(n_blocks, len(corpus.heldout_chats))
        blocks = chat_rows(tokenizer, corpus.heldout_chats, seq_len, n, seed, spec.loss_on,
                           False, where)
    else:  # text kinds, and chat on every token: packed like its training blocks
        docs = corpus.heldout_docs if spec.kind != "chat" else \
            chat_texts(tokenizer, corpus.heldout_chats)
        lengths = [len(x) + 1 for x in tokenizer(docs, add_special_tokens=False)["input_ids"]]
        n = min(n_blocks, sum(lengths) // (seq_len - len(prefix)))
        if n < 1:
            raise DataError(f"data: {where} has {sum(lengths)} tokens, less than one block "
                            f"of {seq_len}; {fix}")
        blocks = packed(tokenizer, docs, seq_len, n, seed, False, where,
                        prefix if spec.kind != "chat" else ())
    blocks.stats = {"kind": spec.kind, **blocks.stats}
    return blocks
