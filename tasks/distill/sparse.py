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
Any divergence from `tasks.distill.losses.LOGP_DIVERGENCES` is then taken over these k+1
buckets; with k = vocab the rest buckets are empty and it equals the full-vocabulary divergence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tasks.distill.losses import LossParts, _finite, divergence_logp, kl_logp, upcast


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
    its LM head. Same value and gradient as `tasks.distill.losses.kd_loss` on full logits (dense
    teacher) or as the bucketed divergence (sparse teacher), without holding [B*L, V] logits for
    backward.
    """
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    targets = next_token_targets(input_ids).reshape(-1)
    flat_t = teacher.flat()
    n = flat_h.shape[0]
    chunk = max(1, min(chunk, n))
    n_ce = max(int((targets != -100).sum()), 1)
    if _fusable(head, flat_h):
        coef = (alpha * temperature**2 / n, (1 - alpha) / n_ce)
        closed = closed_form_ok(name, flat_t, params)
        steps = []
        for lo in range(0, n, chunk):
            sl = slice(lo, lo + chunk)
            if closed:
                steps.append(_closed_form_step(flat_t.rows(sl), targets[sl], temperature, coef))
            else:
                steps.append(_autograd_step(
                    _chunk_fn(None, flat_t.rows(sl), targets[sl], name, temperature, params),
                    coef))
        loss, kd, ce = _FusedHeadLoss.apply(flat_h, head.weight, steps, chunk, coef)
        kd_f, ce_f = float(kd), float(ce)
        return LossParts(loss=loss, kd=kd_f / n, ce=ce_f / n_ce)
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


# (KD sum, CE sum, d loss / d logits) of one chunk, given its logits (no graph).
ChunkStep = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _autograd_step(run: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                   coef: tuple[float, float]) -> ChunkStep:
    """Any divergence: its logit gradient taken by autograd through the chunk's loss graph."""

    def step(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            logits = logits.detach().requires_grad_(True)
            kd_c, ce_c = run(logits)
            (grad,) = torch.autograd.grad(coef[0] * kd_c + coef[1] * ce_c, logits)
        return kd_c.detach(), ce_c.detach(), grad

    return step


def closed_form_ok(name: str, teacher: Teacher, params: dict[str, float]) -> bool:
    """Whether `_closed_form_step` applies: forward KL against the top-k cached teacher (the
    logit-cache recipe), with a fixed target (TAID's target depends on the student)."""
    return (name == "forward_kl" and isinstance(teacher, SparseTeacher)
            and params.get("taid_lambda") is None)


def _closed_form_step(teacher: SparseTeacher, targets: torch.Tensor, temperature: float,
                      coef: tuple[float, float]) -> ChunkStep:
    """Bucketed forward KL + CE of one chunk with its logit gradient written out, no autograd.

    With z the logits, p = softmax(z / T) and q_b the teacher's bucket probabilities (top-k ids,
    then the rest), KL = sum_b q_b log(q_b / s_b) where s_b is the student's bucket mass, so

        d KL / d z_j = (Q p_j - q_b(j) p_j / s_b(j)) / T,     Q = sum_b q_b (1 up to rounding)

    which is (Q p_j - q_j) / T on a top-k id and p_j (Q - q_rest / s_rest) / T elsewhere; CE's is
    softmax(z) - onehot(target). Autograd through `sparse_divergence` + `cross_entropy` walks the
    [chunk, V] tensors ~30 times (two log-sum-exps, a scatter copy, their backwards, casts and
    sums); this walks them ~10 times, in place. Same numbers up to float rounding, except that a
    student rest mass under fp32's smallest normal (never seen on real logits) gives a zero
    instead of a tiny rest gradient.
    """
    log_t = _finite(teacher_buckets(teacher))
    q = log_t.exp()
    q_sum = q.sum(-1, keepdim=True)  # Q
    q_rest = q[:, -1:]
    valid = targets != -100
    tgt = targets.clamp_min(0).unsqueeze(-1)
    inv_t = 1.0 / temperature

    def step(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        ids = teacher.ids
        k_ce = valid.unsqueeze(-1).to(acc) * coef[1]  # CE weight per row: 0 without a target
        z_top = logits.gather(-1, ids).to(acc)
        z_tgt = logits.gather(-1, tgt).to(acc)
        m = logits.amax(-1, keepdim=True).to(acc)
        e = torch.sub(logits, m, out=torch.empty(logits.shape, dtype=acc))  # z - max, fp32
        if temperature != 1.0:
            e.mul_(inv_t)
        e.exp_()  # exp((z - max) / T)
        e_top = e.gather(-1, ids)
        if temperature == 1.0:
            e1 = None  # softmax(z) is softmax(z / T)
        elif temperature == 2.0:
            e1 = e.square()  # exp(z - max), one multiply instead of an exp
        else:
            e1 = e.pow(temperature)
        e.scatter_(-1, ids, 0.0)  # rest ids only: their sum is exact, not 1 - sum(top)
        rest_sum = e.sum(-1, keepdim=True)
        s_t = rest_sum + e_top.sum(-1, keepdim=True)
        lse_t = m * inv_t + s_t.log()
        s_rest = rest_sum / s_t
        log_s = torch.cat([z_top * inv_t - lse_t, s_rest.log()], -1)
        kd = kl_logp(log_t.to(acc), log_s).sum()
        ratio = torch.where(s_rest > 0, q_rest.to(acc) / s_rest.clamp_min(torch.finfo(acc).tiny),
                            torch.zeros((), dtype=acc))
        k_kd = coef[0] * inv_t
        p_top = e_top / s_t
        if e1 is None:
            s_1, p1_top = s_t, p_top
            e.mul_((k_kd * (q_sum.to(acc) - ratio) + k_ce) / s_t)  # KD + CE, rest ids
        else:
            s_1 = e1.sum(-1, keepdim=True)
            p1_top = None
            e.mul_(k_kd * (q_sum.to(acc) - ratio) / s_t)  # KD, rest ids (top ids are 0)
            e.addcmul_(e1, k_ce / s_1)  # CE softmax term, every id
        lse_1 = m + s_1.log()
        ce = ((lse_1 - z_tgt) * valid.unsqueeze(-1)).sum()
        top = k_kd * (q_sum.to(acc) * p_top - q[:, :-1].to(acc))
        if p1_top is not None:
            top = top + k_ce * p1_top
        e.scatter_add_(-1, ids, top)
        e.scatter_add_(-1, tgt, -k_ce)
        return kd, ce, e

    return step


def _fusable(head: torch.nn.Module, hidden: torch.Tensor) -> bool:
    """The fused path needs a plain bias-free Linear head (not a fake-quant or sharded one)
    and a backward to feed."""
    from torch.distributed.tensor import DTensor

    return (type(head) is torch.nn.Linear and head.bias is None
            and not isinstance(head.weight, DTensor) and torch.is_grad_enabled()
            and (hidden.requires_grad or head.weight.requires_grad))


WEIGHT_GRAD_ROWS = 256  # positions per head-weight-gradient matmul (see _FusedHeadLoss)
WEIGHT_GRAD_VOCAB = 8192  # vocabulary rows per such matmul: bounds its bf16 product buffer


class _FusedHeadLoss(torch.autograd.Function):
    """The chunked head + loss with its gradients taken chunk by chunk during the forward.

    Same value and gradients as the checkpointed chunks (same matmul precisions: under bf16
    autocast the head runs in bf16 and the weight gradient is summed in fp32), but the weight is
    cast once per step instead of once per chunk twice, and backward recomputes no chunk's
    logits (one head matmul per chunk less). The weight gradient [V, H] is one matmul per
    `WEIGHT_GRAD_ROWS` positions over their logit gradients kept in a [rows, V] buffer, added
    into the fp32 sum a `WEIGHT_GRAD_VOCAB` block at a time (a small bf16 product buffer instead
    of a [V, H] product and its fp32 copy): per 64-position chunk that product and its cast were
    as much memory traffic as the chunk's whole loss. Stored for backward: the
    gradients of the combined loss w.r.t. the hidden states ([n, H]) and the head weight.
    """

    @staticmethod
    def forward(ctx, hidden, weight, steps, chunk, coef):
        dtype = torch.get_autocast_dtype(hidden.device.type) \
            if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
        n, vocab = hidden.shape[0], weight.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.detach().to(dtype)
            d_hidden = torch.empty_like(hidden, dtype=hidden.dtype)
            d_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
            acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
            kd_sum = torch.zeros((), dtype=acc)
            ce_sum = torch.zeros((), dtype=acc)
            group = max(chunk, WEIGHT_GRAD_ROWS // chunk * chunk)
            grads = torch.empty((min(group, n), vocab), dtype=dtype, device=hidden.device)
            v_block = min(WEIGHT_GRAD_VOCAB, vocab)
            product = (torch.empty((v_block, weight.shape[1]), dtype=dtype, device=hidden.device)
                       if d_weight is not None and dtype != weight.dtype else None)
            logits = torch.empty((min(chunk, n), vocab), dtype=dtype, device=hidden.device)
            for g_lo in range(0, n, group):
                g_hi = min(g_lo + group, n)
                h_group = hidden[g_lo:g_hi].detach().to(dtype)
                for lo in range(g_lo, g_hi, chunk):
                    hi = min(lo + chunk, g_hi)
                    out = logits[: hi - lo]
                    torch.mm(h_group[lo - g_lo : hi - g_lo], w.T, out=out)
                    kd_c, ce_c, grad = steps[lo // chunk](out)
                    kd_sum += kd_c
                    ce_sum += ce_c
                    g = grads[lo - g_lo : hi - g_lo]
                    g.copy_(grad)
                    del grad
                    if d_hidden.dtype == dtype:
                        torch.mm(g, w, out=d_hidden[lo:hi])
                    else:
                        d_hidden[lo:hi] = g @ w
                if d_weight is not None:
                    g_all = grads[: g_hi - g_lo].T
                    if product is None:
                        d_weight.addmm_(g_all, h_group)
                    else:  # low-precision product, summed in fp32 a vocabulary block at a time
                        for v_lo in range(0, vocab, v_block):
                            v_hi = min(v_lo + v_block, vocab)
                            out = product[: v_hi - v_lo]
                            torch.mm(g_all[v_lo:v_hi], h_group, out=out)
                            d_weight[v_lo:v_hi].add_(out)
            del grads, product, logits, w
        ctx.save_for_backward(d_hidden, d_weight)
        loss = coef[0] * kd_sum + coef[1] * ce_sum
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return loss, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_loss, _kd, _ce):
        d_hidden, d_weight = ctx.saved_tensors
        # Scale the stored gradients in place (or not at all for the usual upstream 1) rather
        # than allocate scaled copies ([V, H] fp32 is 113 MB on SmolLM2) while every activation
        # of the step is still alive. A second backward through a retained graph would see
        # them changed: autograd's saved-tensor version check refuses that loudly.
        one = grad_loss.numel() == 1 and float(grad_loss) == 1.0
        d_h = None
        if ctx.needs_input_grad[0]:
            d_h = d_hidden if one else d_hidden.mul_(grad_loss)
        d_w = None
        if d_weight is not None:
            d_w = d_weight if one else d_weight.mul_(grad_loss)
        return d_h, d_w, None, None, None
