"""Tiny random models of each supported family, built from the family's own config class.

No weights are downloaded: each model is a 2-layer (Gemma 3: 4-layer) random model with GQA
(4 query / 2 KV heads of 16), hidden 64, FFN 128, and SmolLM2's real tokenizer made to follow
the family's convention: Mistral's tokenizer adds `<s>` (BOS) itself, Qwen's has no BOS token at
all, SmolLM2-style Llama adds nothing, and Gemma 3 is trained with `<bos>` whatever its tokenizer
says (`tasks.core.conventions`). Biases (Qwen2 q/k/v) and norms (Qwen3 per-head q/k norms, Gemma)
are randomised, since constant initial values would hide a mis-sliced tensor.
"""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
# Does every sequence of this family start with BOS?
EXPECTS_BOS = {"llama": False, "mistral": True, "qwen2": False, "qwen3": False, "gemma3": True}
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512)


def family_tokenizer(name: str, base_path: Path):
    """SmolLM2's tokenizer, adjusted to the family's BOS convention."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_path))
    if name == "mistral":
        tok.add_bos_token = True  # Llama-2 / Mistral tokenizers put <s> first by themselves
    elif name.startswith("qwen"):
        tok.bos_token = None  # Qwen2/Qwen3 tokenizers have no BOS token
    return tok


def family_config(name: str, tok):
    from transformers import (
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if name == "llama":
        return LlamaConfig(**COMMON, **ids, tie_word_embeddings=True)
    if name == "mistral":
        return MistralConfig(**COMMON, **ids, tie_word_embeddings=False, sliding_window=None)
    if name == "qwen2":
        return Qwen2Config(**COMMON, **ids, tie_word_embeddings=True)
    if name == "qwen3":
        return Qwen3Config(**COMMON, **ids, tie_word_embeddings=True)
    if name == "gemma3":
        return Gemma3TextConfig(
            **{**COMMON, "num_hidden_layers": 4}, **ids, query_pre_attn_scalar=16,
            sliding_window=8, tie_word_embeddings=True, pad_token_id=tok.eos_token_id,
            layer_types=["sliding_attention", "sliding_attention", "full_attention",
                         "sliding_attention"])
    raise ValueError(name)


def randomise_small_tensors(model, seed: int = 0) -> None:
    """Norm weights and biases start constant; give them random values."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=gen)
                            if "norm" in name else 0.1 * torch.randn(param.shape, generator=gen))


def build_family(name: str, base_path: Path, out_dir: Path):
    """Save a tiny random model of family `name` to `out_dir`; returns its ModelRef."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.core.model_store import save_model

    tok = family_tokenizer(name, base_path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(name, tok))
    randomise_small_tensors(model)
    return save_model(model, tok, out_dir)
