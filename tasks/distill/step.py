"""One KD micro-step and the precision it computes in: the unit every training path shares.

`KDEngine` (the fast paths), the logit cache (teacher scoring) and the plain loop all run their
forwards under `compute_context`, so a precision setting means the same thing everywhere.
"""

from __future__ import annotations

import contextlib

import torch

from tasks.core.recipe import DistillConfig
from tasks.distill.losses import kd_loss


def compute_context(precision: str, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """bf16 autocast on the inputs' device type (weights stay fp32) or nothing."""
    if precision == "bf16-autocast":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def micro_step(student, teacher, ids: torch.Tensor, cfg: DistillConfig,
               alpha: float | None = None, targets: torch.Tensor | None = None,
               **params: float):
    """Forward both models on one micro-batch and return the loss parts (graph on the student).

    `alpha` (scheduled) and `params` (jsd beta, skew, taid_lambda) come from `KDEngine`;
    `targets` (chat data) marks the tokens the loss trains on.
    """
    with compute_context(cfg.precision, ids.device.type):
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, use_cache=False).logits
        s_logits = student(input_ids=ids, use_cache=False).logits
    return kd_loss(s_logits, t_logits, ids, name=cfg.loss, temperature=cfg.temperature,
                   alpha=cfg.alpha if alpha is None else alpha, targets=targets, **params)
