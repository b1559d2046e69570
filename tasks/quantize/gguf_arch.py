"""Which llama.cpp architecture a model folder becomes in GGUF, and what that architecture needs.

One table (`ARCHS`) per HF architecture pkdq writes, following what llama.cpp's own converter
(`convert_hf_to_gguf.py`, now `conversion/{llama,qwen,gemma}.py`) does for it, so a file pkdq
writes is read by llama.cpp exactly as the converter's would be:

- Llama / Mistral -> `llama`: q/k rows permuted per head (GGML's rope rotates adjacent pairs,
  HF's rotates halves), no biases, SiLU, no sliding window.
- Qwen2 -> `qwen2`: q/k/v biases (F32), NEOX rope (HF's own layout: no permutation).
- Qwen3 -> `qwen3`: per-head q/k RMSNorm (`attn_q_norm`/`attn_k_norm`), NEOX rope.
- Gemma 3 text (`Gemma3ForCausalLM`) -> `gemma3`: every `*norm.weight` gets +1 (HF's
  Gemma3RMSNorm computes x * (1 + w), llama.cpp's RMSNorm x * w: the converter's
  `Gemma3Model.modify_tensors` shifts them); post-attention / pre- and post-feedforward norms
  and q/k norms; sliding window written with the per-layer pattern (llama.cpp otherwise assumes
  5 sliding : 1 full) and the local rope base; embeddings scaled by sqrt(hidden) and GELU(tanh)
  in llama.cpp's graph itself. llama.cpp scales queries by 1/sqrt(head_dim) (27B: by
  1/sqrt(hidden/heads)) and applies no logit soft-capping on sliding models, so configs that
  differ are refused rather than written wrong.

Torch-free (config dicts only): `pkdq validate` and `pkdq export` refuse before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONVERTER = "convert it with llama.cpp's convert_hf_to_gguf.py"
LLAMA_BLOCK = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
               "ffn_up", "ffn_down")


LAYER_TYPES = ("full_attention", "sliding_attention")


class ArchRefused(ValueError):
    """The folder's architecture or settings cannot be written as llama.cpp reads them."""


@dataclass(frozen=True)
class GgufArch:
    """How one HF architecture is written: gguf-py's MODEL_ARCH member, the transforms llama.cpp's
    converter applies, and the tensors llama.cpp's loader requires per block."""

    model_types: tuple[str, ...]  # config model_type values this architecture carries
    gguf_arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool  # Llama's rotary-half -> adjacent-pair row permutation
    norm_shift: float  # added to every `*norm.weight` (Gemma's (1 + w) RMSNorm)
    activation: str  # hidden_act / hidden_activation llama.cpp's graph hard-codes
    block: tuple[str, ...]  # per-block tensors (".weight" unless the name says ".bias")

    @property
    def name(self) -> str:
        import gguf

        return gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[self.gguf_arch]]


ARCHS: dict[str, GgufArch] = {
    "LlamaForCausalLM": GgufArch(("llama",), "LLAMA", True, 0.0, "silu", LLAMA_BLOCK),
    # llama.cpp's converter maps Mistral to LLAMA too: same tensors, same RoPE
    "MistralForCausalLM": GgufArch(("mistral",), "LLAMA", True, 0.0, "silu", LLAMA_BLOCK),
    "Qwen2ForCausalLM": GgufArch(("qwen2",), "QWEN2", False, 0.0, "silu", LLAMA_BLOCK + (
        "attn_q.bias", "attn_k.bias", "attn_v.bias")),
    "Qwen3ForCausalLM": GgufArch(("qwen3",), "QWEN3", False, 0.0, "silu", LLAMA_BLOCK + (
        "attn_q_norm", "attn_k_norm")),
    "Gemma3ForCausalLM": GgufArch(("gemma3_text",), "GEMMA3", False, 1.0, "gelu_pytorch_tanh",
                                  LLAMA_BLOCK + ("attn_q_norm", "attn_k_norm",
                                                 "post_attention_norm", "post_ffw_norm")),
}


def arch_of(config: dict[str, Any], path: Path) -> GgufArch:
    """The GGUF architecture of a config, after every check that needs no weights."""
    archs = config.get("architectures") or [config.get("model_type", "?")]
    spec = ARCHS.get(archs[0]) if len(archs) == 1 else None
    if spec is None or config.get("model_type") not in spec.model_types:
        raise ArchRefused(f"GGUF export writes {', '.join(ARCHS)} only; {path} is "
                          f"{', '.join(archs)} ({config.get('model_type')}): {CONVERTER}")
    act = config.get("hidden_activation") or config.get("hidden_act") or spec.activation
    if act != spec.activation:
        raise ArchRefused(f"GGUF {spec.name} needs activation {spec.activation}; {path} has "
                          f"{act}")
    for kind, rope in _rope_params(config).items():
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ArchRefused(f"GGUF export writes plain RoPE only; {path} uses rope_type "
                              f"{rope_type!r}{f' for {kind}' if kind else ''}")
    _CHECKS[spec.gguf_arch](config, path)
    return spec


def _rope_params(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{layer type or "": rope parameters}: Gemma 3 keeps one set per attention type (a GPTQ
    checkpoint's config may carry flat leftovers beside them, which the per-type sets override).
    """
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    per_type = {k: v for k, v in rope.items() if k in LAYER_TYPES and isinstance(v, dict)}
    return per_type or {"": rope}


def rope_theta(config: dict[str, Any], layer_type: str = "full_attention") -> float:
    rope = _rope_params(config)
    theta = rope.get(layer_type, rope.get("", {})).get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise ArchRefused(f"config has no rope_theta for {layer_type}")
    return float(theta)


def _full_attention_only(config: dict[str, Any], path: Path, name: str) -> None:
    """Refuse a sliding window: these llama.cpp graphs attend over the whole context."""
    window = config.get("sliding_window")
    if config.get("layer_types"):
        sliding = set(config["layer_types"]) != {"full_attention"}
    elif "use_sliding_window" in config:  # Qwen2/3 configs without layer_types
        sliding = bool(config["use_sliding_window"])
    else:
        sliding = bool(window) and window < int(config.get("max_position_embeddings") or 0)
    if sliding:
        raise ArchRefused(f"GGUF {name} has no sliding window; {path} attends through "
                          f"{window} of {config.get('max_position_embeddings')} positions")


def _check_llama(config: dict[str, Any], path: Path) -> None:
    _full_attention_only(config, path, "llama")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ArchRefused(f"GGUF export does not support Llama models with biases ({path})")


def _check_qwen2(config: dict[str, Any], path: Path) -> None:
    _full_attention_only(config, path, "qwen2")


def _check_qwen3(config: dict[str, Any], path: Path) -> None:
    _full_attention_only(config, path, "qwen3")
    if config.get("attention_bias"):
        raise ArchRefused(f"GGUF qwen3 has no q/k/v biases; {path} sets attention_bias")


def gemma_query_scale(config: dict[str, Any]) -> float:
    """The query_pre_attn_scalar llama.cpp assumes: head_dim, or hidden/heads for the 62-layer
    (27B) model (`llama_model_gemma3::load_arch_hparams`)."""
    if int(config["num_hidden_layers"]) == 62:
        return config["hidden_size"] / config["num_attention_heads"]
    return float(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _check_gemma3(config: dict[str, Any], path: Path) -> None:
    if config.get("attn_logit_softcapping") or config.get("final_logit_softcapping"):
        raise ArchRefused(f"GGUF gemma3 (sliding) applies no logit soft-capping; {path} sets it")
    if config.get("use_bidirectional_attention"):
        raise ArchRefused(f"GGUF gemma3 is causal; {path} uses bidirectional attention")
    scale, wanted = config.get("query_pre_attn_scalar"), gemma_query_scale(config)
    if scale is not None and float(scale) != wanted:
        raise ArchRefused(f"llama.cpp's gemma3 scales queries by 1/sqrt({wanted:g}); {path} has "
                          f"query_pre_attn_scalar {scale}")
    types = gemma_layer_types(config)
    if "sliding_attention" not in types or not config.get("sliding_window"):
        raise ArchRefused(f"GGUF gemma3 without sliding layers takes llama.cpp's soft-capped "
                          f"graph; {path} has none: {CONVERTER}")


def gemma_layer_types(config: dict[str, Any]) -> list[str]:
    """Per-layer attention type; HF's old `sliding_window_pattern` n means n-1 sliding, 1 full."""
    types = config.get("layer_types")
    if types:
        return list(types)
    period = int(config.get("sliding_window_pattern") or config.get("_sliding_window_pattern")
                 or 6)
    return ["full_attention" if (i + 1) % period == 0 else "sliding_attention"
            for i in range(int(config["num_hidden_layers"]))]


_CHECKS = {"LLAMA": _check_llama, "QWEN2": _check_qwen2, "QWEN3": _check_qwen3,
           "GEMMA3": _check_gemma3}


def write_arch_metadata(writer: Any, spec: GgufArch, config: dict[str, Any],
                        layers: int) -> dict[str, Any]:
    """The keys beyond the common set that this architecture's converter writes."""
    if spec.gguf_arch != "GEMMA3":
        return {}
    types = gemma_layer_types(config)
    if len(types) != layers:
        raise ArchRefused(f"config layer_types lists {len(types)} layers, the model has {layers}")
    pattern = [t == "sliding_attention" for t in types]
    window = int(config["sliding_window"])
    local_base = rope_theta(config, "sliding_attention") if "sliding_attention" in \
        _rope_params(config) else float(config.get("rope_local_base_freq", 10000.0))
    writer.add_sliding_window(window)
    writer.add_sliding_window_pattern(pattern)
    writer.add_rope_freq_base_swa(local_base)
    return {"attention.sliding_window": window, "attention.sliding_window_pattern": pattern,
            "rope.freq_base_swa": local_base}
