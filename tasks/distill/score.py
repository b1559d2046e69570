"""Held-out score of any finished model against a teacher: what sweeps select on.

Selection must never look at an evaluation split (that would tune on the test), so every
candidate is scored on the training-side held-out slice KD itself monitors, at T=1 in fp32, with
one scoring config for all candidates (a candidate's own `seq_len` must not change its ruler).
"""

from __future__ import annotations

from typing import Any

import torch

from tasks.core.common import ModelRef, StageContext, set_offline_env
from tasks.core.model_store import load_model
from tasks.core.recipe import DistillConfig
from tasks.distill.heldout import heldout_blocks, heldout_metrics


def heldout_score(model: ModelRef, teacher: ModelRef, cfg: DistillConfig,
                  ctx: StageContext) -> dict[str, Any]:
    """{kl, ppl, teacher_ppl, tokens} of `model` against `teacher` on the held-out slice.

    `cfg` gives the block length, block count and batch size; quantized folders are scored as
    pkdq evaluates them (quantized weights, fp32 activations).
    """
    set_offline_env()
    torch.set_num_threads(ctx.threads)
    torch.manual_seed(ctx.seed)
    student, tokenizer = load_model(model)
    reference, _ = load_model(teacher)
    held = heldout_blocks(tokenizer, cfg, ctx, reference.config)  # the family's BOS, as KD
    mask = held.mask if held.mask is not None and cfg.masked() else None
    row = heldout_metrics(student, reference, held.ids, cfg.batch_size, chunk=cfg.loss_chunk,
                          mask=mask)
    return {**row, "seq_len": cfg.seq_len, "blocks": int(held.ids.shape[0])}
