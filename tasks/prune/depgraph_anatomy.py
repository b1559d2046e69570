"""The anatomy of a decoder-only model outside the supported families, and the refusals made
before any weight moves (`depgraph.py` cuts it).

Why apart from the cut: finding the layers, the FFN width key and the attention projections, and
deciding what the config can express (an FFN size; fewer heads only where the class reads
`head_dim` from the config), needs neither torch-pruning nor calibration text, so the stage
refuses bad input here in one line before loading data or tracing anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tasks.core.dims import Dims
from tasks.core.recipe import PruneConfig
from tasks.prune.plan import PrunePlan, plan_prune
from tasks.prune.units import UnsupportedModelError

# config keys that hold the FFN width, in the order architectures use them
FFN_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")
ATTN_NAMES = ("self_attn", "attention", "attn", "self_attention")
QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
OUT_NAMES = ("o_proj", "out_proj", "dense")
CRITERIA = ("activation", "magnitude", "magnitude_l2", "random")
PROBE_TOKENS = 12


def config_value(config: Any, key: str) -> Any:
    return getattr(config, key, None)


@dataclass
class Attention:
    """An attention block with separate q/k/v/o nn.Linears (None when fused or absent)."""

    module: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear


@dataclass
class Block:
    prefix: str  # qualified name of the decoder layer
    layer: nn.Module
    ffn_out: nn.Linear  # the one projection that reads the FFN neurons
    attn: Attention | None


def _attention(layer: nn.Module) -> Attention | None:
    for name in ATTN_NAMES:
        module = getattr(layer, name, None)
        if module is None:
            continue
        for q, k, v in QKV_NAMES:
            parts = [getattr(module, n, None) for n in (q, k, v)]
            out = next((getattr(module, n) for n in OUT_NAMES
                        if isinstance(getattr(module, n, None), nn.Linear)), None)
            if all(isinstance(p, nn.Linear) for p in parts) and out is not None:
                return Attention(module, *parts, out)
    return None


@dataclass
class DepAnatomy:
    """The parts of an arbitrary decoder-only CausalLM that this path reads and cuts."""

    model: nn.Module
    blocks: list[Block]
    ffn_key: str
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int

    @property
    def name(self) -> str:
        return type(self.model).__name__

    def dims(self) -> Dims:
        return Dims(layers=len(self.blocks), hidden=self.hidden, ffn=self.ffn, heads=self.heads,
                    kv_heads=self.kv_heads, head_dim=self.head_dim)

    @classmethod
    def of(cls, model: nn.Module) -> DepAnatomy:
        config, name = model.config, type(model).__name__
        if config_value(config, "is_encoder_decoder"):
            raise UnsupportedModelError(f"{name}: an encoder-decoder; pruning takes decoder-only "
                                        "CausalLMs")
        ffn_key = next((k for k in FFN_KEYS if hasattr(config, k)), None)
        hidden = config_value(config, "hidden_size")
        heads = config_value(config, "num_attention_heads")
        n_layers = config_value(config, "num_hidden_layers")
        if ffn_key is None or not (hidden and heads and n_layers):
            raise UnsupportedModelError(
                f"{name}: config.json names no FFN width ({', '.join(FFN_KEYS)}) or lacks "
                "hidden_size / num_attention_heads / num_hidden_layers")
        # GPT-2-style n_inner: None means 4 * hidden
        ffn = config_value(config, ffn_key) or 4 * hidden
        layers = next((m for m in model.modules()
                       if isinstance(m, nn.ModuleList) and len(m) == n_layers), None)
        if layers is None:
            raise UnsupportedModelError(f"{name}: no list of {n_layers} decoder layers found")
        prefix = next(n for n, m in model.named_modules() if m is layers)
        blocks = [_block(f"{prefix}.{i}", layer, ffn, f"{name} layer {i}")
                  for i, layer in enumerate(layers)]
        head_dim = config_value(config, "head_dim") or hidden // heads
        kv = config_value(config, "num_key_value_heads") or heads
        return cls(model, blocks, ffn_key, int(ffn), int(heads), int(kv), int(head_dim),
                   int(hidden))


def _block(prefix: str, layer: nn.Module, ffn: int, where: str) -> Block:
    attn = _attention(layer)
    skip = {id(m) for m in attn.module.modules()} if attn else set()
    readers = [m for m in layer.modules()
               if isinstance(m, nn.Linear) and m.in_features == ffn and id(m) not in skip]
    if len(readers) != 1:
        kinds = sorted({type(m).__name__ for m in layer.modules() if hasattr(m, "weight")})
        raise UnsupportedModelError(
            f"{where}: {len(readers)} nn.Linear read the {ffn} FFN neurons (need exactly one; "
            f"layer holds {', '.join(kinds)}), so torch-pruning's graph has no FFN group to cut "
            "(GPT-2-style Conv1D and MoE experts are refused)")
    return Block(prefix, layer, readers[0], attn)


# ---------------------------------------------------------------------------- refusals up front


def check_config(model: nn.Module, cfg: PruneConfig) -> tuple[DepAnatomy, PrunePlan]:
    """The anatomy and kept sizes, or one line saying which axis this path cannot cut and why.
    Runs before calibration, so a refusal costs no forward pass."""
    anatomy = DepAnatomy.of(model)
    name = anatomy.name
    for axis in ("depth", "hidden"):
        if getattr(cfg, axis) is not None:
            raise UnsupportedModelError(
                f"{name}: prune.{axis} is cut only for the supported families (outside them "
                "pkdq prunes ffn and, where the config can express it, heads)")
    if cfg.target is not None:
        raise UnsupportedModelError(f"{name}: prune.target (the budget search) plans Llama-"
                                    "layout shapes only; give prune.ffn / prune.heads")
    for axis in cfg.axes():
        criterion = getattr(cfg, axis).criterion
        if criterion not in CRITERIA:
            raise UnsupportedModelError(
                f"{name}: prune.{axis}.criterion {criterion} is not offered outside the "
                f"supported families (use {', '.join(CRITERIA)})")
    if cfg.heads is not None:
        _check_heads(anatomy)
    plan = plan_prune(anatomy.dims(), cfg)
    if cfg.heads is not None:
        _check_head_config(anatomy, plan.after.heads)
    return anatomy, plan


def _check_heads(anatomy: DepAnatomy) -> None:
    name = anatomy.name
    if any(b.attn is None for b in anatomy.blocks):
        raise UnsupportedModelError(
            f"{name}: prune.heads needs separate q/k/v/o projections; this attention fuses "
            "them, so whole heads cannot be cut cleanly")
    if anatomy.kv_heads != anatomy.heads:
        raise UnsupportedModelError(
            f"{name}: prune.heads outside the supported families cuts whole MHA heads; this "
            f"model shares {anatomy.kv_heads} K/V heads among {anatomy.heads} query heads")


def _check_head_config(anatomy: DepAnatomy, kept: int) -> None:
    """Build the pruned config on the meta device: its q projection must have `kept` heads of
    the old head_dim, or the config cannot say what the cut model is."""
    want = kept * anatomy.head_dim
    probe = config_with(anatomy.model.config, num_attention_heads=kept,
                         num_key_value_heads=kept, head_dim=anatomy.head_dim)
    try:
        attn = _attention(blocks_like(meta_model(probe), anatomy)[0])
        got = attn.q.out_features if attn else "no"
    except Exception as exc:  # the model class's own check (OPT: embed_dim % num_heads)
        got = f"an error: {str(exc).splitlines()[0]}"
    if got != want:
        raise UnsupportedModelError(
            f"{anatomy.name}: prune.heads refused: transformers derives head_dim as hidden_size "
            f"/ num_attention_heads for this class (a config with {kept} heads builds {got} "
            f"q outputs, not {want}), so the config cannot express fewer heads")


def config_with(config: Any, **values: Any) -> Any:
    out = config.__class__.from_dict(config.to_dict())
    for key, value in values.items():
        if key != "num_key_value_heads" or hasattr(config, key):
            setattr(out, key, value)
    return out


def meta_model(config: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def blocks_like(model: nn.Module, anatomy: DepAnatomy) -> list[nn.Module]:
    first = anatomy.blocks[0].prefix.rsplit(".", 1)[0]
    return list(model.get_submodule(first))
