"""Mixed 4/8-bit GGUF export: score every layer, choose those that fit, write the file.

The measurement and the choice are `tasks.quantize.mixed_layers`; this wires them to the writer
(`gguf_export`), which needs the 4-bit file's own size before a budget becomes a layer count.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.quantize.mixed_layers import (
    Q8Plan,
    extra_bytes,
    ggml_round_trip,
    layers_within,
    rank_layers,
)

if TYPE_CHECKING:
    from tasks.core.common import StageContext
    from tasks.core.recipe import QuantizeConfig


def _scored_models(final: Path, src: Path, embedding: str | None) -> tuple[Any, Any, Any]:
    """(the 4-bit model as the file holds it, the float input, tokenizer): the GPTQ grid values
    with the embedding rounded to the file's embedding type."""
    import torch

    from tasks.core.gptq_checkpoint import load_dequantized
    from tasks.core.model_store import load_model

    quantized, tokenizer = load_dequantized(final)
    if embedding not in (None, "f16"):
        with torch.no_grad():
            weight = quantized.get_input_embeddings().weight
            weight.copy_(ggml_round_trip(weight, embedding))
    float_model, _ = load_model(src)
    return quantized, float_model, tokenizer


def export_mixed(final: Path, src: Path, out_file: Path, cfg: QuantizeConfig,
                 ctx: StageContext, reference: Path | None) -> dict[str, Any]:
    """Score every layer, choose those that fit (`cfg.gguf_q8_layers`), write the mixed file;
    the export's metrics with the plan under "q8_layers"."""
    from tasks.core.conventions import prefix_ids
    from tasks.core.data_blocks import heldout_blocks
    from tasks.core.text_sources import DataError
    from tasks.quantize.gguf_export import GgufExportError, embedding_type, export_gguf

    spec = cfg.gguf_q8_layers
    assert spec is not None
    started = time.perf_counter()
    embedding = embedding_type(cfg.gguf, cfg.gguf_embedding)
    quantized, float_model, tokenizer = _scored_models(final, src, embedding)
    try:
        blocks = heldout_blocks(tokenizer, cfg.calibration.spec(), ctx.data, spec.seq_len,
                                spec.blocks, ctx.seed, prefix=prefix_ids(tokenizer,
                                                                         quantized.config))
    except DataError as exc:
        raise GgufExportError(f"gguf_q8_layers scores layers on the calibration data's "
                              f"held-out slice: {exc}") from exc
    base_kl, scores = rank_layers(quantized, float_model, blocks.ids)
    state = quantized.state_dict()
    extra = extra_bytes(state)
    del quantized, float_model, state
    ranked = [row["layer"] for row in scores]
    budget = None if spec.budget_mb is None else int(spec.budget_mb * 1e6)
    limit: dict[str, Any] = {"count": spec.count}
    if budget is None:
        layers = ranked[:spec.count]
    else:
        scratch = out_file.with_name(out_file.name + ".four-bit.partial")
        try:
            base = export_gguf(final, scratch, cfg.gguf, reference, verify=False,
                               threads=ctx.threads, embedding=cfg.gguf_embedding)["bytes"]
        finally:
            scratch.unlink(missing_ok=True)
        layers = layers_within(ranked, extra, base, budget)
        limit = {"budget_mb": spec.budget_mb, "four_bit_bytes": base}
        if not layers:
            print(f"[quantize] gguf_q8_layers: the 4-bit file is {base / 1e6:.1f} MB; no layer "
                  f"fits under {spec.budget_mb} MB, all stay Q4_0", file=sys.stderr, flush=True)
    plan = Q8Plan(layers=layers, base_kl=base_kl, scores=scores, extra_bytes=extra,
                  heldout={"blocks": int(blocks.ids.shape[0]),
                           "seq_len": int(blocks.ids.shape[1]), **blocks.stats},
                  wall_s=time.perf_counter() - started, limit=limit)
    while True:
        metrics = export_gguf(final, out_file, cfg.gguf, reference, threads=ctx.threads,
                              embedding=cfg.gguf_embedding, q8_layers=plan.layers,
                              q8_source=src)
        if budget is None or metrics["bytes"] <= budget or not plan.layers:
            break
        plan.layers = plan.layers[:-1]  # tensor alignment padding pushed it over: one fewer
    print(f"[quantize] gguf: layers {plan.layers or 'none'} in Q8_0, {metrics['bytes'] / 1e6:.1f}"
          " MB", file=sys.stderr, flush=True)
    return metrics | {"q8_layers": plan.record()}
