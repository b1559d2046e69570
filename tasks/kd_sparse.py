"""KD loss over sequence chunks, against a dense teacher or a sparse (top-k cached) one.

Why chunks: on a 49k vocabulary, [batch*seq, vocab] fp32 logits are ~200 MB per copy and a
naive KD step holds several (student logits, their softmax, the teacher's, the gradient). Here
the student's LM head and the loss run on `chunk` positions at a time inside
`torch.utils.checkpoint`, so only one chunk's logits exist at once; backward recomputes that
chunk's logits (one extra head matmul per chunk) instead of keeping all of them. With a plain
Linear head (the usual case) `_FusedHeadLoss` does better: each chunk's gradients w.r.t. its
hidden states and the head weight are taken right in the forward, so nothing is recomputed and
the weight is cast to the autocast dtype once per step, not twice per chunk.

Why buckets: a cached teacher keeps only its top-k logits and the log-sum-exp of the full
vocabulary (at the training temperature). Its distribution is exact on the k ids, and the
probability it puts everywhere else (the tail) is one "rest" bucket: 1 - sum(top-k probs). The
student is collapsed the same way: its probabilities on the same k ids plus its own rest mass.
Any divergence from `kd_losses.LOGP_DIVERGENCES` is then taken over these k+1 buckets; with
k = vocab the rest buckets are empty and it equals the full-vocabulary divergence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tasks.kd_losses import LossParts, divergence_logp, upcast


@dataclass
class SparseTeacher:
    """Top-k teacher logits per position plus the full-vocabulary log-sum-exp of logits/T."""

    ids: torch.Tensor  # [..., k] int64 token ids
    logits: torch.Tensor  # [..., k] raw teacher logits (temperature not applied)
    lse: torch.Tensor  # [...] logsumexp(z / T) over the whole vocabulary
    log_rest: torch.Tensor  # [...] log of the probability (at T) outside the top k
    temperature: float

    def _map(self, fn) -> SparseTeacher:
        return SparseTeacher(fn(self.ids), fn(self.logits), fn(self.lse), fn(self.log_rest),
                             self.temperature)

    def flat(self) -> SparseTeacher:
        k = self.ids.shape[-1]
        return SparseTeacher(self.ids.reshape(-1, k), self.logits.reshape(-1, k),
                             self.lse.reshape(-1), self.log_rest.reshape(-1), self.temperature)

    def rows(self, sl: slice) -> SparseTeacher:
        return self._map(lambda x: x[sl])

    def to_device(self, device: torch.device | str) -> SparseTeacher:
        return self._map(lambda x: x.to(device))

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int, temperature: float) -> SparseTeacher:
        """Keep the k largest logits (top-k is the same at every temperature), LSE and tail mass.

        The tail is summed exactly over the other ids here (where the full logits still exist)
        rather than derived later as 1 - sum(top-k): that difference loses all its digits when
        the tail is tiny, and at k = vocab it must be exactly empty.
        """
        z = upcast(logits)
        values, ids = z.topk(k, dim=-1)
        lse = torch.logsumexp(z / temperature, dim=-1)
        return cls(ids, values, lse, _log_rest(z / temperature, ids, lse.unsqueeze(-1)).squeeze(-1),
                   temperature)


def _log_rest(z: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """log of the softmax(z) mass outside `ids`, [..., 1].

    A log-sum-exp over z with the k ids overwritten by a huge negative: finite, so an empty rest
    (k = vocab) gives probability 0 and a zero gradient, never NaN (-inf would).
    """
    return torch.logsumexp(z.scatter(-1, ids, torch.finfo(z.dtype).min), -1, keepdim=True) - lse


def teacher_buckets(teacher: SparseTeacher) -> torch.Tensor:
    """[..., k+1] teacher log-probs: the k cached ids, then the rest bucket (tail mass)."""
    log_top = upcast(teacher.logits) / teacher.temperature - upcast(teacher.lse).unsqueeze(-1)
    return torch.cat([log_top, upcast(teacher.log_rest).unsqueeze(-1)], dim=-1)


def student_buckets(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """[..., k+1] student log-probs on the teacher's k ids, then its own mass on all other ids."""
    z = upcast(logits) / temperature
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    return torch.cat([z.gather(-1, ids) - lse, _log_rest(z, ids, lse)], dim=-1)


def sparse_divergence(name: str, student_logits: torch.Tensor, teacher: SparseTeacher,
                      **params: float) -> torch.Tensor:
    """Per-position divergence between the bucketed student and the cached teacher."""
    log_s = student_buckets(student_logits, teacher.ids, teacher.temperature)
    return divergence_logp(name, log_s, teacher_buckets(teacher), **params)


@dataclass
class DenseTeacher:
    """The live teacher's final hidden states and LM head: its logits are made chunk by chunk."""

    hidden: torch.Tensor  # [..., H_t]
    head: torch.nn.Module

    def flat(self) -> DenseTeacher:
        return DenseTeacher(self.hidden.reshape(-1, self.hidden.shape[-1]), self.head)

    def rows(self, sl: slice) -> DenseTeacher:
        return DenseTeacher(self.hidden[sl], self.head)


Teacher = SparseTeacher | DenseTeacher


def next_token_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """Labels per position: the next input token, -100 (ignored) at each row's last position."""
    targets = torch.full_like(input_ids, -100)
    targets[..., :-1] = input_ids[..., 1:]
    return targets


def chunked_kd_loss(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    input_ids: torch.Tensor,
    teacher: Teacher,
    *,
    name: str = "forward_kl",
    temperature: float = 2.0,
    alpha: float = 0.5,
    chunk: int = 256,
    **params: float,
) -> LossParts:
    """alpha * T^2 * mean divergence + (1 - alpha) * next-token CE, one position chunk at a time.

    `hidden` is the student's final (post-norm) hidden state [B, L, H] with its graph; `head`
    its LM head. Same value and gradient as `kd_losses.kd_loss` on full logits (dense teacher)
    or as the bucketed divergence (sparse teacher), without holding [B*L, V] logits for backward.
    """
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    targets = next_token_targets(input_ids).reshape(-1)
    flat_t = teacher.flat()
    n = flat_h.shape[0]
    chunk = max(1, min(chunk, n))
    n_ce = max(int((targets != -100).sum()), 1)
    if _fusable(head, flat_h):
        coef = (alpha * temperature**2 / n, (1 - alpha) / n_ce)
        parts = [_chunk_fn(None, flat_t.rows(slice(lo, lo + chunk)),
                           targets[lo : lo + chunk], name, temperature, params)
                 for lo in range(0, n, chunk)]
        loss, kd, ce = _FusedHeadLoss.apply(flat_h, head.weight, parts, chunk, coef)
        return LossParts(loss=loss, kd=float(kd) / n, ce=float(ce) / n_ce)
    kd_sum: torch.Tensor | float = 0.0
    ce_sum: torch.Tensor | float = 0.0
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        part = _chunk_fn(head, flat_t.rows(sl), targets[sl], name, temperature, params)
        if torch.is_grad_enabled() and flat_h.requires_grad:
            kd_c, ce_c = checkpoint(part, flat_h[sl], use_reentrant=False)
        else:
            kd_c, ce_c = part(flat_h[sl])
        kd_sum = kd_sum + kd_c
        ce_sum = ce_sum + ce_c
    kd = kd_sum / n
    ce = ce_sum / n_ce
    loss = alpha * temperature**2 * kd + (1 - alpha) * ce
    return LossParts(loss=loss, kd=float(kd.detach()), ce=float(ce.detach()))


def _chunk_fn(head: torch.nn.Module, teacher: Teacher, targets: torch.Tensor, name: str,
              temperature: float, params: dict[str, float]
              ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The (KD sum, CE sum) of one chunk as a function of its hidden states (for checkpoint)."""

    def run(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(h) if head is not None else h  # head=None: h are the logits already
        if isinstance(teacher, SparseTeacher):
            per_pos = sparse_divergence(name, logits, teacher, **params)
        else:
            with torch.no_grad():
                t_logits = teacher.head(teacher.hidden)
            log_s = F.log_softmax(upcast(logits) / temperature, dim=-1)
            log_t = F.log_softmax(upcast(t_logits) / temperature, dim=-1)
            per_pos = divergence_logp(name, log_s, log_t, **params)
        ce = F.cross_entropy(upcast(logits), targets, ignore_index=-100, reduction="sum")
        return upcast(per_pos).sum(), upcast(ce)

    return run


def _fusable(head: torch.nn.Module, hidden: torch.Tensor) -> bool:
    """The fused path needs a plain bias-free Linear head (not a fake-quant or sharded one)
    and a backward to feed."""
    from torch.distributed.tensor import DTensor

    return (type(head) is torch.nn.Linear and head.bias is None
            and not isinstance(head.weight, DTensor) and torch.is_grad_enabled()
            and (hidden.requires_grad or head.weight.requires_grad))


class _FusedHeadLoss(torch.autograd.Function):
    """The chunked head + loss with its gradients taken chunk by chunk during the forward.

    Same value and gradients as the checkpointed chunks (same matmul precisions: under bf16
    autocast the head runs in bf16 and each chunk's weight gradient is added to an fp32 sum), but
    the weight is cast once per step instead of once per chunk twice, backward does not recompute
    any chunk's logits (one head matmul per chunk less), and the per-chunk weight-gradient casts
    and accumulations of autograd are one in-place fp32 add each. Stored for backward: the
    gradients of the combined loss w.r.t. the hidden states ([n, H]) and the head weight.
    """

    @staticmethod
    def forward(ctx, hidden, weight, parts, chunk, coef):
        dtype = torch.get_autocast_dtype(hidden.device.type) \
            if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.detach().to(dtype)
            d_hidden = torch.empty_like(hidden, dtype=hidden.dtype)
            d_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
            acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
            kd_sum = torch.zeros((), dtype=acc)
            ce_sum = torch.zeros((), dtype=acc)
            for i, run in enumerate(parts):
                sl = slice(i * chunk, (i + 1) * chunk)
                h = hidden[sl].detach().to(dtype)
                with torch.enable_grad():
                    logits = (h @ w.T).requires_grad_(True)
                    kd_c, ce_c = run(logits)
                    (grad,) = torch.autograd.grad(coef[0] * kd_c + coef[1] * ce_c, logits)
                kd_sum += kd_c.detach()
                ce_sum += ce_c.detach()
                grad = grad.to(dtype)
                d_hidden[sl] = grad @ w
                if d_weight is not None:
                    d_weight += (grad.T @ h).to(d_weight.dtype)
        ctx.save_for_backward(d_hidden, d_weight)
        loss = coef[0] * kd_sum + coef[1] * ce_sum
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return loss, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_loss, _kd, _ce):
        d_hidden, d_weight = ctx.saved_tensors
        return (d_hidden * grad_loss if ctx.needs_input_grad[0] else None,
                d_weight * grad_loss if d_weight is not None else None, None, None, None)
