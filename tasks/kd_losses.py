"""Knowledge-distillation losses as pure functions of logits, so they can be tested by formula.

A KD loss here has two parts: a *divergence* between teacher and student distributions (softened
by a temperature T) and the ordinary next-token cross-entropy on the data. They are mixed as

    loss = alpha * T^2 * D(p_t^T, p_s^T) + (1 - alpha) * CE

The T^2 factor (Hinton et al., 2015) keeps the divergence's gradient magnitude roughly independent
of T, so changing T does not silently rescale the learning rate of the KD term.

Divergences live in a registry keyed by the recipe's `loss` name; a new one (reverse KL, JSD,
skew KL, top-k cached teacher) is one function plus `@register_divergence("name")`. Every
divergence takes `(student_logits, teacher_logits, temperature)` with shape `[..., vocab]` and
returns the per-position divergence `[...]`; masking and averaging are done once, in `kd_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Divergence = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
DIVERGENCES: dict[str, Divergence] = {}


def register_divergence(name: str) -> Callable[[Divergence], Divergence]:
    """Add a divergence to the registry under the name recipes use."""

    def wrap(fn: Divergence) -> Divergence:
        if name in DIVERGENCES:
            raise ValueError(f"KD divergence '{name}' is registered twice")
        DIVERGENCES[name] = fn
        return fn

    return wrap


def get_divergence(name: str) -> Divergence:
    """Look a divergence up by name, with a one-line error listing the known ones."""
    try:
        return DIVERGENCES[name]
    except KeyError:
        known = ", ".join(sorted(DIVERGENCES))
        raise ValueError(f"unknown KD loss '{name}'; known: {known}") from None


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """At least fp32 for softmax sums (bf16 under autocast); fp64 stays fp64 for gradchecks."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


@register_divergence("forward_kl")
def forward_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(p_t^T || p_s^T) per position: mean-seeking, the classic Hinton KD term.

    Computed from log-probabilities in >= fp32 (`log_target=True`, with -inf clamped) so teacher
    tokens of probability zero (masked logits) contribute exactly zero instead of NaN, and bf16
    logits are not summed in bf16 over a 50k vocabulary.
    """
    log_s = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
    log_t = F.log_softmax(upcast(teacher_logits) / temperature, dim=-1)
    log_t = log_t.clamp_min(torch.finfo(log_t.dtype).min)  # -inf (masked token) -> p_t = 0 term
    return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)


def next_token_ce(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy of predicting token i+1 from position i (labels are the input shifted).

    `mask` (same shape as `input_ids`, 1 = real token) drops targets that are padding.
    """
    pred = upcast(logits[..., :-1, :])
    target = input_ids[..., 1:]
    per_token = F.cross_entropy(
        pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none"
    )
    return masked_mean(per_token, None if mask is None else mask[..., 1:].reshape(-1))


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over positions where mask is 1 (all positions without a mask)."""
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype).reshape(values.shape)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


@dataclass
class LossParts:
    """The total loss to backpropagate plus its parts, detached for logging."""

    loss: torch.Tensor
    kd: float
    ce: float


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    name: str = "forward_kl",
    temperature: float = 2.0,
    alpha: float = 0.5,
    mask: torch.Tensor | None = None,
) -> LossParts:
    """alpha * T^2 * D(teacher, student) + (1 - alpha) * next-token CE, token-averaged.

    The divergence is averaged over every position (the last one has no label but still has a
    teacher distribution to match); CE over the positions that have a next token. Both parts are
    always computed, even at alpha 0 or 1, because both are worth logging and cost one softmax
    next to a full forward/backward pass.
    """
    per_pos = get_divergence(name)(student_logits, teacher_logits, temperature)
    kd = masked_mean(per_pos, mask)
    ce = next_token_ce(student_logits, input_ids, mask)
    loss = alpha * temperature**2 * kd + (1 - alpha) * ce
    return LossParts(loss=loss, kd=float(kd.detach()), ce=float(ce.detach()))
