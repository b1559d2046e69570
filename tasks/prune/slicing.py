"""Cut units out of a live model in place, so it saves as a plain dense HF checkpoint.

Why direct slicing and not torch-pruning: with torch-pruning 1.6.1 and transformers 5.23, building
its dependency graph on a Llama hangs in rotary `rotate_half` unless `apply_rotary_pos_emb` is
bypassed while tracing; it only drops query heads inside a KV group, never whole KV groups (and on
SmolLM2-135M removing whole groups 3 -> 2 raised 8k-token WikiText perplexity 36 -> 75, while
dropping one query head per group raised it to 524); and `embed_tokens` must be ignored to keep
the hidden size, so Minitron's width axis is out of reach. Slicing the known HF module layout is
a few dozen lines, exact, and keeps every config field under our control.

Every function updates the modules' cached sizes and `model.config` together, and writes
`head_dim` explicitly, so `AutoModelForCausalLM.from_pretrained` rebuilds the same shapes and the
same arithmetic (logits identical after a save/load round trip).
"""

from __future__ import annotations

import torch
from torch import nn

from tasks.prune.units import Anatomy, Coupling


def _cut(coupling: Coupling, units: torch.Tensor) -> None:
    """Keep `units` of one coupled tensor: new Parameter, module sizes updated."""
    module, old = coupling.module, coupling.tensor
    index = coupling.channels(units).to(old.device)
    data = old.data.index_select(coupling.dim, index).clone()
    setattr(module, coupling.attr, nn.Parameter(data, requires_grad=old.requires_grad))
    if isinstance(module, nn.Linear) and coupling.attr == "weight":
        module.out_features, module.in_features = data.shape
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = data.shape


def cut_units(couplings: list[Coupling], units: torch.Tensor) -> None:
    """Cut the same unit indices out of every coupled tensor (indices sorted, order kept)."""
    units = torch.sort(units.to(torch.long)).values
    done: set[tuple[int, str]] = set()
    for coupling in couplings:
        key = (id(coupling.module), coupling.attr)
        if key not in done:  # a tensor listed twice (tied weights) is cut once
            done.add(key)
            _cut(coupling, units)


def _set_head_dim(anatomy: Anatomy) -> None:
    """Write head_dim into the config: Llama derives it from hidden/heads when absent."""
    anatomy.config.head_dim = anatomy.head_dim


def slice_ffn(anatomy: Anatomy, keep: list[torch.Tensor]) -> None:
    """Keep neurons `keep[i]` in layer i (same count everywhere: one intermediate_size)."""
    sizes = {len(k) for k in keep}
    if len(sizes) != 1:
        raise ValueError(f"every layer must keep the same FFN size, got {sorted(sizes)}")
    for i, units in enumerate(keep):
        cut_units(anatomy.ffn_units(i), units)
        mlp = anatomy.mlp(i)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(units)
    anatomy.config.intermediate_size = sizes.pop()
    _set_head_dim(anatomy)


def slice_query_heads(anatomy: Anatomy, keep: list[torch.Tensor]) -> None:
    """Keep query heads `keep[i]` in layer i; every KV group must keep the same number of them.

    HF attention maps query head h to KV head h // (heads / kv_heads), so groups stay contiguous
    and equal-sized; anything else would silently re-pair queries with the wrong K/V.
    """
    q, n_kv = anatomy.q_per_group, anatomy.n_kv
    kept_per_group = None
    for i, units in enumerate(keep):
        per_group = torch.bincount(units // q, minlength=n_kv)
        if not torch.all(per_group == per_group[0]) or int(per_group[0]) == 0:
            raise ValueError(f"layer {i}: query heads kept per KV group {per_group.tolist()} are "
                             "uneven; every group must keep the same number (at least 1)")
        kept_per_group = int(per_group[0])
        cut_units(anatomy.query_head_units(i), units)
    _finish_heads(anatomy, kept_per_group * n_kv, n_kv)


def slice_kv_groups(anatomy: Anatomy, keep: list[torch.Tensor]) -> None:
    """Keep whole KV groups `keep[i]` in layer i: the K/V head and all its query heads."""
    q = anatomy.q_per_group
    for i, units in enumerate(keep):
        cut_units(anatomy.kv_group_units(i), units)
    n_kv = len(keep[0])
    _finish_heads(anatomy, n_kv * q, n_kv)


def _finish_heads(anatomy: Anatomy, heads: int, kv_heads: int) -> None:
    for i in range(len(anatomy.layers)):
        anatomy.attn(i).num_key_value_groups = heads // kv_heads
    anatomy.config.num_attention_heads = heads
    anatomy.config.num_key_value_heads = kv_heads
    _set_head_dim(anatomy)


def remove_layers(anatomy: Anatomy, keep: list[int]) -> None:
    """Keep decoder layers `keep` (in order) and renumber them.

    The KV cache is indexed by each attention module's `layer_idx`, and some families (Gemma 3)
    look up a per-layer attention type in `config.layer_types`; both must follow the kept layers
    or generation would read another layer's cache or use the wrong mask.
    """
    keep = sorted(keep)
    config = anatomy.config
    kept = [anatomy.layers[i] for i in keep]
    for new_index, layer in enumerate(kept):
        for module in (layer, layer.self_attn):
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    anatomy.model.model.layers = nn.ModuleList(kept)
    anatomy.layers = anatomy.model.model.layers
    types = getattr(config, "layer_types", None)
    if types:
        config.layer_types = [types[i] for i in keep]
    config.num_hidden_layers = len(keep)
    _set_head_dim(anatomy)


def slice_hidden(anatomy: Anatomy, keep: torch.Tensor) -> None:
    """Keep hidden channels `keep` everywhere: embedding, norms, every projection (Minitron).

    Models that scale embeddings by sqrt(hidden_size) (Gemma) recompute that scale from the new
    config on reload; the embedding is rescaled so the first residual stream is unchanged, and with
    tied weights the final norm absorbs the same factor so the logits are unchanged too.
    """
    _set_head_dim(anatomy)  # before hidden_size changes: Llama may derive it from hidden/heads
    tied = anatomy.tied
    cut_units(anatomy.hidden_units(norms=True), keep)
    new_hidden = len(keep)
    if tied:
        anatomy.lm_head.weight = anatomy.embed.weight
    embed = anatomy.embed
    if hasattr(embed, "embed_scale"):
        old_scale = float(embed.embed_scale)
        new_scale = new_hidden ** 0.5
        factor = old_scale / new_scale
        embed.weight.data.mul_(factor)
        embed.scalar_embed_scale = new_scale
        embed.embed_scale = torch.tensor(new_scale, device=embed.weight.device)
        if tied:
            norm, offset = anatomy.final_norm.weight, anatomy.norm_offset
            norm.data.copy_((norm.data + offset) / factor - offset)
    for layer in anatomy.layers:
        if hasattr(layer, "hidden_size"):
            layer.hidden_size = new_hidden
    anatomy.config.hidden_size = new_hidden
