"""Model anatomy for structured pruning: which weights make up one prunable unit on each axis.

A unit (an FFN neuron, a query head, a KV group, a hidden channel) owns a slice of several
tensors at once: an FFN neuron is a row of gate/up and a column of down. Both the weight-based
importance criteria (magnitude, Taylor) and the slicing read the same `Coupling` lists, so what is
scored is exactly what is cut.

Supported: decoder-only models with separate q/k/v/o and gate/up/down projections and RMSNorms
(Llama, SmolLM2, Mistral, Qwen2/Qwen2.5 with q/k/v biases, Qwen3 with per-head q/k norms that no
head cut touches, Gemma 3 text; `tasks.core.conventions.SUPPORTED_FAMILIES`, each tested in
tests/test_families.py). Other decoder-only architectures are pruned through torch-pruning's
dependency graph instead (`depgraph.py`, FFN and MHA heads only); what neither path can cut is
refused with one line naming those families.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tasks.core.conventions import supported_families_line

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


class UnsupportedModelError(ValueError):
    """One line: which model, what is missing, why pruning it is refused, and the families that
    are supported."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{message}; supported families: {supported_families_line()}")


@dataclass(frozen=True)
class Coupling:
    """`module.<attr>` is cut along `dim`; each unit owns `width` consecutive channels there."""

    module: nn.Module
    attr: str
    dim: int
    width: int = 1

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.attr)

    def channels(self, units: torch.Tensor) -> torch.Tensor:
        """Channel indices (along `dim`) owned by the given unit indices, in order."""
        offsets = torch.arange(self.width, device=units.device)
        return (units[:, None] * self.width + offsets[None, :]).reshape(-1)


def _linear(module: nn.Module, name: str, where: str) -> nn.Linear:
    child = getattr(module, name, None)
    if not isinstance(child, nn.Linear):
        raise UnsupportedModelError(
            f"{where}: no nn.Linear '{name}'; structured pruning needs separate "
            f"{', '.join(ATTN_PROJ)} and {', '.join(MLP_PROJ)} (fused or MoE blocks are refused)")
    return child


def _with_bias(linear: nn.Linear, dim: int, width: int) -> list[Coupling]:
    """The weight coupling, plus the bias when the cut is along the output dimension."""
    out = [Coupling(linear, "weight", dim, width)]
    if dim == 0 and linear.bias is not None:
        out.append(Coupling(linear, "bias", 0, width))
    return out


@dataclass
class Anatomy:
    """Handles on the parts of one decoder-only CausalLM that pruning touches."""

    model: nn.Module
    layers: nn.ModuleList
    embed: nn.Embedding
    final_norm: nn.Module
    lm_head: nn.Linear

    @classmethod
    def of(cls, model: nn.Module) -> Anatomy:
        name = type(model).__name__
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        embed = getattr(inner, "embed_tokens", None)
        norm = getattr(inner, "norm", None)
        head = getattr(model, "lm_head", None)
        if not isinstance(layers, nn.ModuleList) or embed is None or norm is None or head is None:
            raise UnsupportedModelError(
                f"{name}: expected model.layers, model.embed_tokens, model.norm and lm_head of a "
                "decoder-only CausalLM (multimodal wrappers and encoder-decoders are refused)")
        anatomy = cls(model, layers, embed, norm, head)
        for i, layer in enumerate(layers):
            where = f"{name} layer {i}"
            for proj in ATTN_PROJ:
                _linear(anatomy.attn(i), proj, where)
            for proj in MLP_PROJ:
                _linear(anatomy.mlp(i), proj, where)
            if not anatomy.layer_norms(layer):
                raise UnsupportedModelError(f"{where}: no RMSNorm over the hidden size found")
        return anatomy

    # ---------------------------------------------------------------- sizes (from the weights)
    @property
    def config(self):
        return self.model.config

    @property
    def head_dim(self) -> int:
        return int(self.attn(0).head_dim)

    @property
    def n_heads(self) -> int:
        return self.attn(0).q_proj.out_features // self.head_dim

    @property
    def n_kv(self) -> int:
        return self.attn(0).k_proj.out_features // self.head_dim

    @property
    def q_per_group(self) -> int:
        return self.n_heads // self.n_kv

    @property
    def ffn(self) -> int:
        return self.mlp(0).down_proj.in_features

    @property
    def hidden(self) -> int:
        return self.embed.weight.shape[1]

    @property
    def tied(self) -> bool:
        return self.lm_head.weight is self.embed.weight

    @property
    def norm_offset(self) -> float:
        """1.0 for Gemma-style norms that scale by (1 + weight), else 0.0."""
        return 1.0 if "Gemma" in type(self.final_norm).__name__ else 0.0

    def attn(self, i: int) -> nn.Module:
        return self.layers[i].self_attn

    def mlp(self, i: int) -> nn.Module:
        return self.layers[i].mlp

    def layer_norms(self, layer: nn.Module) -> list[nn.Module]:
        """Norms over the hidden size that are direct children of a block (not q_norm/k_norm)."""
        hidden = self.hidden
        return [child for child in layer.children()
                if "Norm" in type(child).__name__
                and getattr(child, "weight", None) is not None
                and child.weight.shape == (hidden,)]

    # ---------------------------------------------------------------- couplings per axis
    def ffn_units(self, i: int) -> list[Coupling]:
        """Neuron n: row n of gate and up, column n of down."""
        mlp = self.mlp(i)
        return [*_with_bias(mlp.gate_proj, 0, 1), *_with_bias(mlp.up_proj, 0, 1),
                *_with_bias(mlp.down_proj, 1, 1)]

    def query_head_units(self, i: int) -> list[Coupling]:
        """Query head h: head_dim rows of q, head_dim columns of o."""
        attn, hd = self.attn(i), self.head_dim
        return [*_with_bias(attn.q_proj, 0, hd), *_with_bias(attn.o_proj, 1, hd)]

    def kv_group_units(self, i: int) -> list[Coupling]:
        """KV group g: its K/V head and the q_per_group query heads that attend through it."""
        attn, hd, q = self.attn(i), self.head_dim, self.q_per_group
        return [*_with_bias(attn.q_proj, 0, hd * q), *_with_bias(attn.o_proj, 1, hd * q),
                *_with_bias(attn.k_proj, 0, hd), *_with_bias(attn.v_proj, 0, hd)]

    def hidden_units(self, norms: bool) -> list[Coupling]:
        """Hidden channel c: embedding column c, every projection that reads or writes c, and
        (for slicing, `norms=True`) every norm weight over c. Tied lm_head shares the embedding."""
        out = [Coupling(self.embed, "weight", 1)]
        if not self.tied:
            out.append(Coupling(self.lm_head, "weight", 1))
        for i, layer in enumerate(self.layers):
            attn, mlp = self.attn(i), self.mlp(i)
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                out.append(Coupling(linear, "weight", 1))
            out += [*_with_bias(attn.o_proj, 0, 1), *_with_bias(mlp.down_proj, 0, 1)]
            if norms:
                out += [Coupling(norm, "weight", 0) for norm in self.layer_norms(layer)]
        if norms:
            out.append(Coupling(self.final_norm, "weight", 0))
        return out


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
