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

import math
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
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
    **_: float,
) -> torch.Tensor:
    """KL(p_t^T || p_s^T) per position: mean-seeking, the classic Hinton KD term.

    Computed from log-probabilities in >= fp32 (`log_target=True`, with -inf clamped) so teacher
    tokens of probability zero (masked logits) contribute exactly zero instead of NaN, and bf16
    logits are not summed in bf16 over a 50k vocabulary.
    """
    log_s = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
    log_t = F.log_softmax(upcast(teacher_logits) / temperature, dim=-1)
    if _.get("taid_lambda") is not None:
        return divergence_logp("forward_kl", log_s, log_t, **_)
    log_t = log_t.clamp_min(torch.finfo(log_t.dtype).min)  # -inf (masked token) -> p_t = 0 term
    return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)


# --------------------------------------------------------------------------- log-prob forms
# Every divergence below is written once on log-probabilities over the last dim, so the same
# function serves the full vocabulary (log_softmax of logits) and the sparse cached teacher
# (top-k buckets plus one "rest" bucket, see `tasks.distill.sparse`).


def _finite(logp: torch.Tensor) -> torch.Tensor:
    """-inf -> the dtype's most negative finite value: p = 0 terms then give 0, never NaN."""
    return logp.clamp_min(torch.finfo(logp.dtype).min)


def kl_logp(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum p (log p - log q) from log-probabilities (0 log 0 = 0)."""
    log_p, log_q = _finite(log_p), _finite(log_q)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(w p + (1 - w) q), computed in log space so small probabilities keep their digits."""
    return _finite(torch.logaddexp(_finite(log_p) + math.log(weight_p),
                                   _finite(log_q) + math.log1p(-weight_p)))


def reverse_kl_logp(log_s: torch.Tensor, log_t: torch.Tensor, **_: float) -> torch.Tensor:
    """KL(p_s || p_t): mode-seeking (MiniLLM); the student is not pushed onto the teacher's tail."""
    return kl_logp(log_s, log_t)


def forward_kl_logp(log_s: torch.Tensor, log_t: torch.Tensor, **_: float) -> torch.Tensor:
    return kl_logp(log_t, log_s)


def jsd_logp(log_s: torch.Tensor, log_t: torch.Tensor, beta: float = 0.5, **_: float
             ) -> torch.Tensor:
    """Generalised JSD (GKD): beta KL(p_t || m) + (1-beta) KL(p_s || m), m = beta p_t + (1-beta) p_s

    Bounded (unlike either KL) and interpolates between forward- and reverse-KL behaviour.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
    log_m = _log_mix(log_t, log_s, beta)
    return beta * kl_logp(log_t, log_m) + (1 - beta) * kl_logp(log_s, log_m)


def skew_kl_logp(log_s: torch.Tensor, log_t: torch.Tensor, skew: float = 0.1, **_: float
                 ) -> torch.Tensor:
    """Skew KL (DistiLLM): KL(p_t || skew p_t + (1-skew) p_s); finite where p_s -> 0."""
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew alpha must be in [0, 1), got {skew}")
    return kl_logp(log_t, _log_mix(log_t, log_s, skew) if skew > 0 else log_s)


def skew_rkl_logp(log_s: torch.Tensor, log_t: torch.Tensor, skew: float = 0.1, **_: float
                  ) -> torch.Tensor:
    """Skew reverse KL (DistiLLM): KL(p_s || skew p_s + (1-skew) p_t)."""
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew alpha must be in [0, 1), got {skew}")
    return kl_logp(log_s, _log_mix(log_s, log_t, skew) if skew > 0 else log_t)


LOGP_DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl_logp,
    "reverse_kl": reverse_kl_logp,
    "jsd": jsd_logp,
    "skew_kl": skew_kl_logp,
    "skew_rkl": skew_rkl_logp,
}


def taid_target(log_s: torch.Tensor, log_t: torch.Tensor, lam: float) -> torch.Tensor:
    """TAID's intermediate teacher: log_softmax((1-lam) stopgrad(log p_s) + lam log p_t).

    lam grows from a start value to 1 over training, so the target moves from near the student
    to the teacher (Shing et al., 2025; linear schedule here, not the paper's adaptive one).
    """
    mixed = (1 - lam) * _finite(log_s.detach()) + lam * _finite(log_t)
    return torch.log_softmax(mixed, dim=-1)


def divergence_logp(name: str, log_s: torch.Tensor, log_t: torch.Tensor,
                    taid_lambda: float | None = None, **params: float) -> torch.Tensor:
    """Per-position divergence `name` on log-probabilities, optionally toward TAID's target."""
    if name not in LOGP_DIVERGENCES:
        raise ValueError(f"unknown KD loss '{name}'; known: {', '.join(sorted(LOGP_DIVERGENCES))}")
    if taid_lambda is not None:
        log_t = taid_target(log_s, log_t, taid_lambda)
    return LOGP_DIVERGENCES[name](log_s, log_t, **params)


def _dense(name: str) -> Divergence:
    def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   temperature: float = 1.0, **params: float) -> torch.Tensor:
        log_s = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
        log_t = F.log_softmax(upcast(teacher_logits) / temperature, dim=-1)
        return divergence_logp(name, log_s, log_t, **params)

    divergence.__name__ = name
    divergence.__doc__ = LOGP_DIVERGENCES[name].__doc__
    return divergence


reverse_kl = register_divergence("reverse_kl")(_dense("reverse_kl"))
jsd = register_divergence("jsd")(_dense("jsd"))
skew_kl = register_divergence("skew_kl")(_dense("skew_kl"))
skew_rkl = register_divergence("skew_rkl")(_dense("skew_rkl"))


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
    targets: torch.Tensor | None = None,
    **params: float,
) -> LossParts:
    """alpha * T^2 * D(teacher, student) + (1 - alpha) * next-token CE, token-averaged.

    The divergence is averaged over every position (the last one has no label but still has a
    teacher distribution to match); CE over the positions that have a next token. Both parts are
    always computed, even at alpha 0 or 1, because both are worth logging and cost one softmax
    next to a full forward/backward pass. `params` go to the divergence (jsd `beta`, skew KL
    `skew`, `taid_lambda`).

    `targets` (same shape as `input_ids`, 1 = a token to learn, e.g. an assistant token of a
    chat) restricts both parts to the predictions of those tokens: CE where the next token is a
    target, the divergence at the positions that predict one. None leaves the path untouched.
    """
    per_pos = get_divergence(name)(student_logits, teacher_logits, temperature, **params)
    if targets is not None:
        predicts = torch.zeros_like(targets)
        predicts[..., :-1] = targets[..., 1:]
        kd = masked_mean(per_pos, predicts)
        ce = next_token_ce(student_logits, input_ids, targets)
        loss = alpha * temperature**2 * kd + (1 - alpha) * ce
        return LossParts(loss=loss, kd=float(kd.detach()), ce=float(ce.detach()))
    kd = masked_mean(per_pos, mask)
    ce = next_token_ce(student_logits, input_ids, mask)
    loss = alpha * temperature**2 * kd + (1 - alpha) * ce
    return LossParts(loss=loss, kd=float(kd.detach()), ce=float(ce.detach()))


# --------------------------------------------------------------------------- state matching


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Relative MSE: mean_pos ||s - t||^2 / mean_pos ||t||^2.

    Normalised by the teacher's mean squared norm because residual streams of different layers
    (and models) differ in scale by orders of magnitude; this keeps one `hidden_weight` meaningful
    across layers, and 1.0 means "as far off as predicting zeros".
    """
    err = (student - teacher).pow(2).sum(-1).mean()
    return err / teacher.pow(2).sum(-1).mean().clamp_min(1e-12)


def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over positions of 1 - cos(s, t): direction only, blind to scale."""
    return (1 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)).mean()
