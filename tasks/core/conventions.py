"""Each model family's input conventions, in one place, for every path that feeds a model text.

Why this module exists: a model scored or trained on inputs its family was never trained on
looks worse (or, after KD, better) for reasons that have nothing to do with compression. Gemma 3
270M on the same WikiText-2 blocks: perplexity 107.8 without `<bos>`, 28.2 with it
(bench/results/bos_conventions.md); a student distilled on blocks without `<bos>` learns to do
without it and then "beats" a baseline that was scored without it too. Calibration, KD training
blocks, the KD held-out slice, WikiText perplexity, the lm-eval backend and generation all ask
here, so no path can drift from another.

The conventions, per family:
- BOS: a sequence starts with the tokenizer's BOS token when the family was trained that way.
  Decided from the tokenizer itself (does its default encoding put BOS first? that is what
  `tokenizer(text)` and lm-eval's HFLM do) and forced for families that always need it even when a
  converted tokenizer forgets it (Gemma: Google's reference code always prepends `<bos>`).
  Llama-2/3 and Mistral tokenizers add BOS; SmolLM2 (Llama architecture, GPT-2 style tokenizer)
  and Qwen2/Qwen3 (no BOS token at all) do not.
- Chat templates: the tokenizer's own (`chat_template.jinja`), applied by whoever formats chat
  data; the template text already carries any BOS, so chat-formatted text is tokenized with
  `add_special_tokens=False` and never gets a second one (`encode_text(..., templated=True)`).
- Logit soft-capping (Gemma 2: final 30, attention 50; Gemma 3: none) and sliding windows
  (Gemma 3: 5 local layers of 512 tokens per global layer; Mistral v0.1: 4096 everywhere) live in
  the HF config and are applied inside the model's own forward, so every path that calls
  `model(...)` gets them; the two places that build their own attention inputs (the lm-eval
  backend's tree masks, GGUF metadata) read them through `family_notes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# model_type prefixes whose checkpoints were trained with BOS at the start of every sequence
# whatever the tokenizer file says.
ALWAYS_BOS = ("gemma",)
# The families pkdq compresses end to end (prune, KD, quantize, evaluate); the one-line refusal
# for other architectures names these.
SUPPORTED_FAMILIES: dict[str, str] = {
    "llama": "Llama / SmolLM2",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "gemma3_text": "Gemma 3 (text)",
}
_PROBE = "a"


def model_type(config: Any) -> str:
    """The config's model_type ('' when unknown); works for a PretrainedConfig or a dict."""
    if config is None:
        return ""
    if isinstance(config, dict):
        return str(config.get("model_type") or "")
    return str(getattr(config, "model_type", "") or "")


def supported_families_line() -> str:
    """'Llama / SmolLM2, Mistral, ...' for one-line refusals."""
    return ", ".join(SUPPORTED_FAMILIES.values())


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Does the tokenizer's default encoding start with BOS? (What HFLM and users get.)"""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer(_PROBE)["input_ids"]
    return bool(ids) and ids[0] == bos


def needs_bos(tokenizer: Any, config: Any = None) -> bool:
    """True when every sequence fed to this model must start with the tokenizer's BOS token."""
    if getattr(tokenizer, "bos_token_id", None) is None:
        return False
    if model_type(config).startswith(ALWAYS_BOS):
        return True
    return tokenizer_adds_bos(tokenizer)


def prefix_ids(tokenizer: Any, config: Any = None) -> list[int]:
    """The token ids every sequence starts with: `[bos]` or `[]`."""
    return [int(tokenizer.bos_token_id)] if needs_bos(tokenizer, config) else []


def encode_text(tokenizer: Any, text: str, config: Any = None,
                templated: bool = False) -> list[int]:
    """`text` as the model expects to see it at the start of a sequence.

    Plain text: the family's prefix, then the text's tokens without the tokenizer's own special
    tokens (so a tokenizer that adds EOS or adds BOS twice cannot disagree with `prefix_ids`).
    `templated=True` (text produced by a chat template, which writes its own BOS): the text's
    tokens only.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if templated:
        return list(ids)
    prefix = prefix_ids(tokenizer, config)
    if prefix and ids[:1] == prefix:
        return list(ids)
    return prefix + list(ids)


@dataclass(frozen=True)
class FamilyNotes:
    """What a model's config says about conventions applied inside its forward."""

    family: str
    bos: bool
    final_logit_softcapping: float | None
    attn_logit_softcapping: float | None
    sliding_window: int | None
    sliding_layers: int  # layers that attend through the sliding window

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def family_notes(config: Any, tokenizer: Any = None) -> FamilyNotes:
    """The conventions of one model (for metrics, reports and the paths that build masks)."""
    def get(key: str) -> Any:
        return config.get(key) if isinstance(config, dict) else getattr(config, key, None)

    window = get("sliding_window")
    types = get("layer_types") or []
    if window and types:
        sliding = sum(1 for t in types if t == "sliding_attention")
    else:
        sliding = int(get("num_hidden_layers") or 0) if window else 0
    return FamilyNotes(
        family=model_type(config),
        bos=needs_bos(tokenizer, config) if tokenizer is not None else False,
        final_logit_softcapping=get("final_logit_softcapping"),
        attn_logit_softcapping=get("attn_logit_softcapping"),
        sliding_window=int(window) if window else None,
        sliding_layers=sliding,
    )
