"""Prune stage: structured pruning on depth, attention heads, FFN neurons and hidden width.

One-shot, as Minitron and LLM-Pruner do: every importance score is measured on the unpruned model
(calibration text from `<data>/train/`, never evaluation splits), then the axes are cut in the order
depth -> heads -> FFN -> hidden. The result is a smaller dense checkpoint with an updated
config.json that stock `AutoModelForCausalLM.from_pretrained` loads. Kept sizes come from
`tasks.prune.plan` (uniform across layers, rounded for quantization kernels, whole KV groups).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tasks.core.common import ModelRef, StageContext, StageResult
from tasks.core.conventions import SUPPORTED_FAMILIES, model_type, prefix_ids
from tasks.core.data_blocks import Blocks, training_blocks
from tasks.core.dims import Dims
from tasks.core.model_store import is_quantized, load_model, save_model
from tasks.core.recipe import PruneConfig
from tasks.prune.importance import (
    ActivationScores,
    accumulate_gradients,
    activation_scores,
    axis_generator,
    random_scores,
    release_gradients,
    skip_layer_ppl_increase,
    weight_scores,
)
from tasks.prune.plan import PrunePlan, plan_prune
from tasks.prune.slicing import (
    remove_layers,
    slice_ffn,
    slice_hidden,
    slice_kv_groups,
    slice_query_heads,
)
from tasks.prune.units import Anatomy, Coupling, count_params


@dataclass
class AxisScores:
    """Importance per axis (higher = keep). Per-layer lists are indexed by original layer."""

    depth: torch.Tensor | None = None
    heads: list[torch.Tensor] | None = None  # query-head scores, or KV-group scores
    ffn: list[torch.Tensor] | None = None
    hidden: torch.Tensor | None = None


def calibration_data(tokenizer, cfg: PruneConfig, ctx: StageContext, config=None) -> Blocks:
    """Seeded token blocks of training text (never an evaluation split) with their accounting:
    the bundled text, or the recipe's own data (`calibration.data`); each block opened by the
    family's prefix (BOS for Gemma: `tasks.core.conventions`) as the model sees text in use."""
    calib = cfg.calibration
    return training_blocks(tokenizer, calib.spec(), ctx.data, calib.seq_len, calib.samples,
                           ctx.seed, prefix=prefix_ids(tokenizer, config))


def calibration_blocks(tokenizer, cfg: PruneConfig, ctx: StageContext,
                       config=None) -> torch.Tensor:
    """`calibration_data`'s token blocks alone."""
    return calibration_data(tokenizer, cfg, ctx, config).ids


def _criteria(cfg: PruneConfig) -> dict[str, str]:
    return {axis: getattr(cfg, axis).criterion for axis in cfg.axes()}



def _unit_scores(criterion: str, n_layers: int, couplings: Callable[[int], list[Coupling]],
                 from_acts: Callable[[], list[torch.Tensor]], size: int,
                 gen: torch.Generator) -> list[torch.Tensor]:
    """Per-layer scores of one width axis under any unit criterion."""
    if criterion == "activation":
        return from_acts()
    if criterion == "random":
        return [random_scores(size, gen) for _ in range(n_layers)]
    return [weight_scores(couplings(i), criterion) for i in range(n_layers)]


@dataclass
class Measurements:
    """The calibration passes behind the data-driven criteria, each run at most once, lazily.

    Scorings that share one object (a benchmark trying every axis and criterion) share one
    activation pass, one gradient pass and one layer-skip sweep.
    """

    anatomy: Anatomy
    blocks: torch.Tensor | None
    taylor_samples: int = 8
    skip_samples: int = 8
    stage: str = "prune"
    _acts: ActivationScores | None = None
    _skip: torch.Tensor | None = None
    _gradients: bool = False

    def activations(self) -> ActivationScores:
        if self._acts is None:
            self._acts = activation_scores(self.anatomy, self.blocks, stage=self.stage)
        return self._acts

    def ensure_gradients(self) -> None:
        """Fill `.grad` for taylor; call `release()` when done (it holds a model's worth)."""
        if not self._gradients:
            accumulate_gradients(self.anatomy, self.blocks[:self.taylor_samples],
                                 stage=self.stage)
            self._gradients = True

    def release(self) -> None:
        release_gradients(self.anatomy)
        self._gradients = False

    def skip_increase(self) -> torch.Tensor:
        if self._skip is None:
            self._skip = skip_layer_ppl_increase(self.anatomy, self.blocks[:self.skip_samples],
                                                 stage=self.stage)
        return self._skip


def score_axes(cfg: PruneConfig, measured: Measurements, seed: int) -> AxisScores:
    """Score every axis the config prunes, all on the unpruned model."""
    anatomy = measured.anatomy
    n = len(anatomy.layers)
    if "taylor" in _criteria(cfg).values():
        measured.ensure_gradients()
    out = AxisScores()
    if cfg.heads:
        kv = cfg.heads.mode == "kv_groups"
        out.heads = _unit_scores(
            cfg.heads.criterion, n, anatomy.kv_group_units if kv else anatomy.query_head_units,
            lambda: (measured.activations().kv_groups(anatomy.q_per_group) if kv
                     else measured.activations().query_heads),
            anatomy.n_kv if kv else anatomy.n_heads, axis_generator(seed, "heads"))
    if cfg.ffn:
        out.ffn = _unit_scores(cfg.ffn.criterion, n, anatomy.ffn_units,
                               lambda: measured.activations().ffn, anatomy.ffn,
                               axis_generator(seed, "ffn"))
    if cfg.hidden:
        out.hidden = _unit_scores(cfg.hidden.criterion, 1,
                                  lambda _i: anatomy.hidden_units(norms=False),
                                  lambda: [measured.activations().hidden], anatomy.hidden,
                                  axis_generator(seed, "hidden"))[0]
    if cfg.depth:
        criterion = cfg.depth.criterion
        if criterion == "block_influence":
            out.depth = measured.activations().block_influence
        elif criterion == "ppl_skip":
            out.depth = measured.skip_increase()
        else:
            out.depth = random_scores(n, axis_generator(seed, "depth"))
    return out


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, sorted by index."""
    return torch.sort(torch.topk(scores, k).indices).values


def top_within_groups(scores: torch.Tensor, group: int, k: int) -> torch.Tensor:
    """The k best query heads inside every KV group of `group` heads (global head indices)."""
    grouped = scores.view(-1, group)
    picks = torch.topk(grouped, k, dim=1).indices + torch.arange(len(grouped))[:, None] * group
    return torch.sort(picks.reshape(-1)).values


def apply_plan(anatomy: Anatomy, plan: PrunePlan, scores: AxisScores) -> dict[str, Any]:
    """Cut depth, heads, FFN, hidden in that order; returns what was removed (for metrics)."""
    before, after = plan.before, plan.after
    removed: dict[str, Any] = {}
    layer_ids = list(range(before.layers))
    if scores.depth is not None:
        layer_ids = top(scores.depth, after.layers).tolist()
        removed["removed_layers"] = sorted(set(range(before.layers)) - set(layer_ids))
        remove_layers(anatomy, layer_ids)
    if scores.heads is not None:
        per_layer = [scores.heads[i] for i in layer_ids]
        if plan.heads_mode == "kv_groups":
            keep = [top(s, after.kv_heads) for s in per_layer]
            slice_kv_groups(anatomy, keep)
        else:
            keep = [top_within_groups(s, before.q_per_group, after.q_per_group)
                    for s in per_layer]
            slice_query_heads(anatomy, keep)
        removed["heads_kept"] = [k.tolist() for k in keep]
    if scores.ffn is not None:
        slice_ffn(anatomy, [top(scores.ffn[i], after.ffn) for i in layer_ids])
    if scores.hidden is not None:
        keep_hidden = top(scores.hidden, after.hidden)
        slice_hidden(anatomy, keep_hidden)
        removed["hidden_channels_removed"] = before.hidden - len(keep_hidden)
    return removed


def prune_model(model, tokenizer, cfg: PruneConfig, ctx: StageContext) -> dict[str, Any]:
    """Prune a live model in place; returns metrics. Refuses unsupported models in one line.

    The one dispatch point: the supported families are sliced here (`slicing.py`), any other
    decoder-only architecture goes through torch-pruning's dependency graph (`depgraph.py`:
    FFN and, where the config can say so, whole heads) or is refused in one line.
    """
    outside = _outside_families(model.config)
    if outside:
        from tasks.prune.depgraph_anatomy import check_config  # refusals before any data loads

        dep_anatomy, plan = check_config(model, cfg)
    else:
        anatomy = Anatomy.of(model)
        plan = plan_prune(Dims.from_config(model.config), cfg)
    criteria = _criteria(cfg)
    calibration = (calibration_data(tokenizer, cfg, ctx, model.config)
                   if cfg.needs_calibration() else None)
    blocks = calibration.ids if calibration is not None else None
    params_before = count_params(model)
    if outside:
        from tasks.prune.depgraph import prune_with_depgraph

        removed = prune_with_depgraph(dep_anatomy, plan, cfg, blocks, ctx.seed,
                                      ctx.stage_name or "prune")
    else:
        measured = Measurements(anatomy, blocks, cfg.taylor_samples, cfg.skip_samples,
                                ctx.stage_name or "prune")
        try:
            scores = score_axes(cfg, measured, ctx.seed)
        finally:
            measured.release()
        removed = apply_plan(anatomy, plan, scores)
    return {
        "axes": cfg.axes(),
        "criteria": criteria,
        "plan": plan.to_json(),
        **removed,
        "round_to": cfg.round_to,
        "calibration": cfg.calibration.model_dump() if cfg.needs_calibration() else None,
        "data": calibration.stats if calibration is not None else None,
        "params_before": params_before,
        "params_after": count_params(model),
    }


def _outside_families(config) -> bool:
    """A model_type outside `SUPPORTED_FAMILIES` (then `depgraph.py` prunes it)."""
    return model_type(config) not in SUPPORTED_FAMILIES


def prune_stage(model_ref: ModelRef, cfg: PruneConfig, ctx: StageContext) -> StageResult:
    """Score, cut and save a dense checkpoint stock transformers loads."""
    torch.manual_seed(ctx.seed)
    torch.set_num_threads(ctx.threads)
    start = time.perf_counter()
    quantized_input = is_quantized(model_ref.path)
    if quantized_input:  # an ordering with Q before P: cut the grid weights as plain floats
        from tasks.core.gptq_checkpoint import load_dequantized

        model, tokenizer = load_dequantized(model_ref.path)
    else:
        model, tokenizer = load_model(model_ref)
    metrics = prune_model(model, tokenizer, cfg, ctx)
    metrics["input_quantized"] = quantized_input
    out = save_model(model, tokenizer, ctx.out_dir / "model")
    metrics["wall_s"] = time.perf_counter() - start
    return StageResult(out, metrics)
