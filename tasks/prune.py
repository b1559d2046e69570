"""Prune stage: structured FFN-neuron pruning by importance, giving a smaller dense checkpoint.

Importance is measured on calibration text from `<data>/train/` (never evaluation splits). The kept
size is the same in every layer (HF configs hold one `intermediate_size`) and is rounded to a
multiple that quantization kernels need, so the quantize stage's group size divides it.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from tasks.common import ModelRef, Progress, StageContext, StageResult
from tasks.model_store import load_model, save_model
from tasks.recipe import FfnTarget, PruneConfig
from tasks.textdata import load_train_texts, token_blocks


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama-style CausalLM (model.model.layers)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no model.layers; only decoder-only "
                         "Llama-style models are supported")
    return layers


def kept_ffn_size(total: int, target: FfnTarget, round_to: int) -> int:
    """Neurons kept per layer: the target, rounded to the nearest multiple of `round_to`."""
    wanted = target.size if target.size is not None else total * (1.0 - target.ratio)
    if wanted > total:
        raise ValueError(f"prune.ffn.size {target.size} exceeds the model's FFN size {total}")
    kept = int(round(wanted / round_to)) * round_to
    kept = max(round_to, min(kept, total - total % round_to if total >= round_to else total))
    return kept


@torch.no_grad()
def ffn_activation_importance(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4,
                              stage: str = "prune") -> list[torch.Tensor]:
    """Mean |activation| of each FFN neuron (the down-projection input) over calibration tokens."""
    layers = decoder_layers(model)
    sums = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]
    count = [0]

    def hook_for(index: int):
        def hook(_module, inputs):
            act = inputs[0].detach().abs().to(torch.float64)
            sums[index] += act.reshape(-1, act.shape[-1]).sum(dim=0)
        return hook

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook_for(i))
               for i, layer in enumerate(layers)]
    progress = Progress(stage, total=len(blocks), unit="calibration block")
    try:
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start:start + batch_size]
            model(input_ids=batch)
            count[0] += batch.numel()
            progress.update(start + len(batch), tokens=batch.numel())
    finally:
        for handle in handles:
            handle.remove()
    return [s / max(count[0], 1) for s in sums]


def ffn_magnitude_importance(model: nn.Module) -> list[torch.Tensor]:
    """L1 norm of each neuron's weights (gate row + up row + down column)."""
    scores = []
    for layer in decoder_layers(model):
        mlp = layer.mlp
        score = (mlp.gate_proj.weight.abs().sum(1) + mlp.up_proj.weight.abs().sum(1)
                 + mlp.down_proj.weight.abs().sum(0))
        scores.append(score.detach().to(torch.float64))
    return scores


def ffn_random_importance(model: nn.Module, seed: int) -> list[torch.Tensor]:
    """Random scores: the control that shows what an importance criterion is worth."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(layer.mlp.down_proj.in_features, generator=gen, dtype=torch.float64)
            for layer in decoder_layers(model)]


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep `index` along `dim` of a Linear's weight (0 = outputs, 1 = inputs), in place."""
    weight = linear.weight.data.index_select(dim, index).clone()
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data.index_select(0, index).clone())
        linear.out_features = weight.shape[0]
    else:
        linear.in_features = weight.shape[1]


def slice_ffn(model: nn.Module, keep: list[torch.Tensor]) -> None:
    """Remove FFN neurons: gate/up rows and down columns together, then update the config."""
    layers = decoder_layers(model)
    for layer, index in zip(layers, keep, strict=True):
        index = torch.sort(index).values
        _slice_linear(layer.mlp.gate_proj, index, 0)
        _slice_linear(layer.mlp.up_proj, index, 0)
        _slice_linear(layer.mlp.down_proj, index, 1)
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = len(index)
    model.config.intermediate_size = int(len(keep[0]))


def select_top(scores: list[torch.Tensor], kept: int) -> list[torch.Tensor]:
    return [torch.topk(score, kept).indices for score in scores]


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def ffn_scores(model: nn.Module, tokenizer, cfg: PruneConfig, ctx: StageContext) -> list[torch.Tensor]:
    criterion = cfg.ffn.criterion
    if criterion == "magnitude":
        return ffn_magnitude_importance(model)
    if criterion == "random":
        return ffn_random_importance(model, ctx.seed)
    calib = cfg.calibration
    texts = load_train_texts(ctx.data, calib.source)
    blocks = token_blocks(tokenizer, texts, calib.seq_len, calib.samples, seed=ctx.seed)
    return ffn_activation_importance(model, blocks, stage=ctx.stage_name or "prune")


def prune_stage(model_ref: ModelRef, cfg: PruneConfig, ctx: StageContext) -> StageResult:
    """Score FFN neurons, keep the most important, save a dense checkpoint stock transformers loads."""
    torch.manual_seed(ctx.seed)
    torch.set_num_threads(ctx.threads)
    start = time.perf_counter()
    model, tokenizer = load_model(model_ref)
    params_before = count_params(model)
    total = model.config.intermediate_size
    kept = kept_ffn_size(total, cfg.ffn, cfg.round_to)
    scores = ffn_scores(model, tokenizer, cfg, ctx)
    slice_ffn(model, select_top(scores, kept))
    out = save_model(model, tokenizer, ctx.out_dir / "model")
    params_after = count_params(model)
    metrics = {
        "axis": "ffn",
        "criterion": cfg.ffn.criterion,
        "ffn_size_before": total,
        "ffn_size_after": kept,
        "ffn_removed_fraction": 1 - kept / total,
        "round_to": cfg.round_to,
        "calibration": cfg.calibration.model_dump() if cfg.ffn.criterion == "activation" else None,
        "params_before": params_before,
        "params_after": params_after,
        "wall_s": time.perf_counter() - start,
    }
    return StageResult(out, metrics)
