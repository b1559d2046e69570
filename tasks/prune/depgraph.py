"""Pruning for decoder-only architectures outside the supported families, through torch-pruning.

Why a second path: `units.py` slices the Llama module layout (separate q/k/v/o, gate/up/down,
RMSNorm) and nothing else. Other decoder-only layouts (OPT's fc1/fc2, GPT-NeoX's
dense_h_to_4h, Phi's fc1/fc2 next to parallel attention, Phi-3's fused gate_up_proj) still have
an FFN whose neurons are rows of some projections and columns of another; torch-pruning's
dependency graph finds those couplings from the autograd graph of one forward, so this path
needs no per-architecture table. What it cuts:

- FFN neurons, the same number in every layer (an HF config holds one intermediate size).
  The group is rooted at the one nn.Linear per layer that reads the FFN neurons (fc2, down_proj,
  dense_4h_to_h) and torch-pruning finds the rest (fc1, gate and up, Phi-3's fused gate_up
  through its chunk, biases).
- Whole attention heads, where the config can say so: separate q/k/v/o nn.Linears, one K/V head
  per query head (MHA), and a model class that reads `head_dim` from the config; then
  num_attention_heads (and num_key_value_heads) drop and head_dim is written explicitly.
  Checked on the meta device before any weight moves: where transformers derives head_dim as
  hidden_size / num_attention_heads (OPT, StableLM, GPT-NeoX) fewer heads would mean wider heads.

Tracing is patched where torch-pruning cannot follow an architecture: every attention module
with separate q/k/v/o is traced through a stand-in `o(q(x) + k(x) + v(x))`. Head h owns the
same channels [h*head_dim, (h+1)*head_dim) of q, k, v and of o's input in the real attention,
and the stand-in keeps exactly that channel coupling, without the rotary slicing/concatenation
that made graph propagation loop forever (Phi, Llama: `rotate_half`). The real forward is
restored before anything is scored or cut.

Scores (higher = kept), the recipe's criterion per axis:
- activation (Minitron, as `importance.py`): FFN neuron = |input of the FFN's out-projection|,
  query head = L2 norm of its slice of the attention out-projection's input; mean over the
  sequence, L2 over calibration blocks.
- magnitude / magnitude_l2: torch-pruning's `GroupMagnitudeImportance` (p=1 / p=2, summed over
  the whole coupled group, no normaliser) -- pkdq's magnitude criteria over exactly the weights
  the group cuts (magnitude_l2 without the square root, same ranking).
- random. Taylor is refused on this path (it would need the gradient pass per architecture).

Every result is verified: the model transformers builds from the new config, holding the pruned
tensors, must give bit-identical logits on a probe, or the stage refuses in one line.
Depth and hidden width are refused here: the layer stack and the residual width are named
differently in every layout (and GPT-2-style Conv1D is not an nn.Linear torch-pruning traces).
"""

from __future__ import annotations

import contextlib
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from tasks.core.common import Progress
from tasks.core.recipe import PruneConfig
from tasks.prune.depgraph_anatomy import (
    PROBE_TOKENS,
    Block,
    DepAnatomy,
    meta_model,
)
from tasks.prune.importance import axis_generator
from tasks.prune.plan import PrunePlan
from tasks.prune.units import UnsupportedModelError

# ---------------------------------------------------------------------------- tracing


@contextlib.contextmanager
def _traced_attention(anatomy: DepAnatomy, arity: dict[int, int]) -> Iterator[None]:
    """Swap each separate-q/k/v/o attention's forward for `o(q(x) + k(x) + v(x))` (see the module
    docstring); `arity` is how many values the real forward returns."""
    saved = []
    for block in anatomy.blocks:
        attn = block.attn
        if attn is None:
            continue
        n_out = arity.get(id(attn.module), 2)
        groups = attn.q.out_features // attn.k.out_features

        def stand_in(_self, hidden_states=None, *args, _a=attn, _n=n_out, _g=groups, **kwargs):
            x = hidden_states if hidden_states is not None else args[0]
            k, v = _a.k(x), _a.v(x)
            if _g > 1:  # GQA: each K/V channel feeds its group's query channels (FFN-only runs)
                k, v = (t.repeat_interleave(_g, dim=-1) for t in (k, v))
            out = _a.o(_a.q(x) + k + v)
            return (out, *([None] * (_n - 1))) if _n > 1 else out

        saved.append((attn.module, attn.module.__dict__.get("forward")))
        attn.module.forward = types.MethodType(stand_in, attn.module)
    try:
        yield
    finally:
        for module, old in saved:
            if old is None:
                del module.forward
            else:
                module.forward = old


def _arity(anatomy: DepAnatomy, ids: torch.Tensor) -> tuple[dict[int, int], torch.Tensor]:
    """How many values each attention forward returns, and the probe's logits (one real pass)."""
    arity: dict[int, int] = {}

    def hook(module, _args, output):
        arity[id(module)] = len(output) if isinstance(output, tuple) else 1

    handles = [b.attn.module.register_forward_hook(hook) for b in anatomy.blocks if b.attn]
    try:
        with torch.no_grad():
            logits = anatomy.model(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return arity, logits


def build_graph(anatomy: DepAnatomy, ids: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of the model (attention traced through the stand-in)."""
    arity, _ = _arity(anatomy, ids)
    model = anatomy.model
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        with _traced_attention(anatomy, arity), torch.enable_grad(), warnings.catch_warnings():
            # custom norms' bare weights: torch-pruning warns it would cut them; `_owner`
            # refuses any group that reaches one
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            return tp.DependencyGraph().build_dependency(
                model, example_inputs={"input_ids": ids, "use_cache": False},
                output_transform=lambda out: out.logits)
    except Exception as exc:  # torch-pruning's tracer raises anything on an unknown graph
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UnsupportedModelError(f"{anatomy.name}: torch-pruning could not trace it "
                                    f"({type(exc).__name__}: {first})") from exc
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


# ---------------------------------------------------------------------------- groups and scores


def _owner(graph: tp.DependencyGraph, block: Block, group: tp.Group, what: str,
           allowed: set[int]) -> None:
    """Refuse a group that reaches modules outside the ones this unit may own (a hidden-size
    norm, another layer): cutting it would change widths the config holds fixed."""
    for dep, _idxs in group:
        module = dep.target.module
        if isinstance(module, nn.Parameter):  # a bare weight (a custom norm): hidden-sized
            raise UnsupportedModelError(
                f"{block.prefix}: torch-pruning couples the {what} to a bare parameter of shape "
                f"{tuple(module.shape)}; refusing a cut the config cannot express")
        if isinstance(module, nn.Module) and not type(module).__module__.startswith(
                "torch_pruning") and id(module) not in allowed:
            name = graph._module2name.get(module, type(module).__name__)
            raise UnsupportedModelError(
                f"{block.prefix}: torch-pruning couples the {what} to {name}, outside the "
                "block's own projections; refusing a cut the config cannot express")


def ffn_group(graph: tp.DependencyGraph, block: Block, idxs: list[int]) -> tp.Group:
    group = graph.get_pruning_group(block.ffn_out, tp.prune_linear_in_channels, idxs=idxs)
    skip = {id(m) for m in block.attn.module.modules()} if block.attn else set()
    allowed = {id(m) for m in block.layer.modules() if id(m) not in skip}
    _owner(graph, block, group, "FFN neurons", allowed)
    return group


def head_group(graph: tp.DependencyGraph, block: Block, head_dim: int,
               heads: list[int]) -> tp.Group:
    idxs = [h * head_dim + j for h in heads for j in range(head_dim)]
    attn = block.attn
    group = graph.get_pruning_group(attn.q, tp.prune_linear_out_channels, idxs=idxs)
    _owner(graph, block, group, "attention heads",
           {id(attn.q), id(attn.k), id(attn.v), id(attn.o)})
    touched = {id(dep.target.module) for dep, _ in group}
    if not {id(attn.k), id(attn.v), id(attn.o)} <= touched:
        raise UnsupportedModelError(f"{block.prefix}: torch-pruning did not couple q's heads to "
                                    "k, v and the output projection; refusing to cut heads")
    return group




def _unit_scores(criterion: str, activation: Callable[[], torch.Tensor], size: int,
                 generator: torch.Generator,
                 magnitude: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """One layer's scores for one axis (heads or FFN neurons) under a unit criterion."""
    if criterion == "activation":
        return activation()
    if criterion == "random":
        return torch.rand(size, generator=generator, dtype=torch.float64)
    return magnitude(criterion)

@torch.no_grad()
def activation_scores(anatomy: DepAnatomy, blocks: torch.Tensor, heads: bool,
                      stage: str, batch_size: int = 4) -> tuple[list, list]:
    """Minitron's per-unit activation (mean |x| over the sequence, L2 over blocks) at the FFN's
    out-projection input and, per head, at the attention out-projection's input."""
    n, hd = len(anatomy.blocks), anatomy.head_dim
    ffn = [torch.zeros(anatomy.ffn, dtype=torch.float64) for _ in range(n)]
    head = [torch.zeros(anatomy.heads, dtype=torch.float64) for _ in range(n)]

    def add(store: torch.Tensor, x: torch.Tensor) -> None:
        store += x.detach().to(torch.float64).mean(dim=1).pow(2).sum(dim=0)

    handles = []
    for i, block in enumerate(anatomy.blocks):
        handles.append(block.ffn_out.register_forward_pre_hook(
            lambda _m, args, i=i: add(ffn[i], args[0].abs())))
        if heads:
            handles.append(block.attn.o.register_forward_pre_hook(
                lambda _m, args, i=i: add(head[i], args[0].unflatten(-1, (-1, hd)).norm(dim=-1))))
    progress = Progress(stage, total=len(blocks), unit="calibration block")
    try:
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start:start + batch_size]
            anatomy.model(input_ids=batch, use_cache=False)
            progress.update(start + len(batch), tokens=batch.numel())
    finally:
        for h in handles:
            h.remove()
    return [s.sqrt() for s in ffn], [s.sqrt() for s in head]


def _magnitude(group: tp.Group, criterion: str) -> torch.Tensor:
    p = 1 if criterion == "magnitude" else 2
    scorer = tp.importance.GroupMagnitudeImportance(p=p, group_reduction="sum", normalizer=None)
    return scorer(group).detach().to(torch.float64)


def _lowest(scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the units to remove: all but the `keep` highest scores, sorted."""
    kept = set(torch.topk(scores, keep).indices.tolist())
    return [i for i in range(len(scores)) if i not in kept]


# ---------------------------------------------------------------------------- the cut


def prune_with_depgraph(anatomy: DepAnatomy, plan: PrunePlan, cfg: PruneConfig,
                        blocks: torch.Tensor | None, seed: int,
                        stage: str = "prune") -> dict[str, Any]:
    """Score on the unpruned model, cut heads then FFN through torch-pruning's groups, update
    the config, verify a stock rebuild; returns what was removed (for metrics)."""
    model = anatomy.model
    ids = torch.arange(PROBE_TOKENS)[None, :] % int(model.config.vocab_size)
    graph = build_graph(anatomy, ids)
    acts = (activation_scores(anatomy, blocks, cfg.heads is not None, stage)
            if cfg.needs_calibration() else None)
    removed: dict[str, Any] = {"method": "torch-pruning dependency graph "
                                         f"{tp.__version__}"}
    head_cuts, ffn_cuts = [], []
    hd, after = anatomy.head_dim, plan.after
    gens = {axis: axis_generator(seed, axis) for axis in ("heads", "ffn")}
    for i, block in enumerate(anatomy.blocks):  # score everything before cutting anything
        if cfg.heads is not None:
            scores = _unit_scores(
                cfg.heads.criterion, lambda i=i: acts[1][i], anatomy.heads, gens["heads"],
                lambda c, b=block: _magnitude(head_group(graph, b, hd, list(range(
                    anatomy.heads))), c).view(-1, hd).sum(dim=1))
            head_cuts.append(_lowest(scores, after.heads))
        if cfg.ffn is not None:
            scores = _unit_scores(
                cfg.ffn.criterion, lambda i=i: acts[0][i], anatomy.ffn, gens["ffn"],
                lambda c, b=block: _magnitude(ffn_group(graph, b, list(range(anatomy.ffn))), c))
            ffn_cuts.append(_lowest(scores, after.ffn))
    config = model.config
    if head_cuts:
        for block, cut in zip(anatomy.blocks, head_cuts, strict=True):
            head_group(graph, block, hd, cut).prune()
        config.num_attention_heads = after.heads
        if hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = after.heads
        config.head_dim = hd
        removed["heads_removed"] = head_cuts
    if ffn_cuts:
        for block, cut in zip(anatomy.blocks, ffn_cuts, strict=True):
            ffn_group(graph, block, cut).prune()
        setattr(config, anatomy.ffn_key, after.ffn)
    verify_rebuild(model, ids)
    return removed


@torch.no_grad()
def verify_rebuild(model: nn.Module, ids: torch.Tensor) -> None:
    """The model transformers builds from the new config, holding the pruned tensors (shared,
    not copied), must match every shape and give identical logits; else refuse in one line."""
    name = type(model).__name__
    rebuilt = meta_model(model.config)
    try:
        rebuilt.load_state_dict(model.state_dict(), strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise UnsupportedModelError(f"{name}: transformers rebuilds the pruned config with other "
                                    f"shapes ({detail})") from exc
    for key, buffer in model.named_buffers():
        owner, _, attr = key.rpartition(".")
        target = rebuilt.get_submodule(owner)
        if getattr(target, attr).is_meta:
            target._buffers[attr] = buffer
    for ((module, attr), _meta), (_live_key, live) in zip(
            tensor_attributes(rebuilt), tensor_attributes(model), strict=True):
        setattr(module, attr, live)
    rebuilt.eval()
    want = model(input_ids=ids, use_cache=False).logits
    got = rebuilt(input_ids=ids, use_cache=False).logits
    if not torch.equal(want, got):
        diff = (want - got).abs().max().item()
        raise UnsupportedModelError(f"{name}: transformers' rebuild of the pruned model differs "
                                    f"from it (max |logit diff| {diff:.3g})")


def tensor_attributes(model: nn.Module) -> list[tuple[tuple[nn.Module, str], torch.Tensor]]:
    """Plain tensor attributes of modules (rotary `original_inv_freq`), which neither the
    state dict nor the buffers carry: the rebuild borrows the live model's."""
    out = []
    for module in model.modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not attr.startswith("_"):
                out.append(((module, attr), value))
    return out

