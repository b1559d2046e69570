"""Sparse (top-k + rest bucket) teacher and chunked LM-head loss against the dense formulas."""

from __future__ import annotations

import pytest
import torch

from tasks.distill.losses import get_divergence, kd_loss
from tasks.distill.sparse import (
    DenseTeacher,
    SparseTeacher,
    chunked_kd_loss,
    sparse_divergence,
    student_buckets,
    teacher_buckets,
)

B, L, H, V = 2, 5, 6, 11
NAMES = [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}),
         ("skew_kl", {"skew": 0.1}), ("skew_rkl", {"skew": 0.2})]


def _rand(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64) * 2


@pytest.mark.parametrize(("name", "params"), NAMES)
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_k_equals_vocab_gives_full_divergence_and_gradient(name, params, temp):
    s, t = _rand(B, L, V, seed=0), _rand(B, L, V, seed=1)
    teacher = SparseTeacher.from_logits(t, V, temp)
    x = s.clone().requires_grad_(True)
    y = s.clone().requires_grad_(True)
    sparse = sparse_divergence(name, x, teacher, **params)
    dense = get_divergence(name)(y, t, temp, **params)
    torch.testing.assert_close(sparse, dense)
    sparse.sum().backward()
    dense.sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, y.grad)


def test_topk_buckets_match_a_hand_collapsed_distribution():
    """Teacher: exact on its top-k, tail in one bucket; student: its mass on those ids + rest."""
    s, t, k, temp = _rand(B, L, V, seed=0), _rand(B, L, V, seed=1), 4, 1.5
    teacher = SparseTeacher.from_logits(t, k, temp)
    p_t, p_s = torch.softmax(t / temp, -1), torch.softmax(s / temp, -1)
    top_t = p_t.gather(-1, teacher.ids)
    top_s = p_s.gather(-1, teacher.ids)
    want_t = torch.cat([top_t, 1 - top_t.sum(-1, keepdim=True)], -1)
    want_s = torch.cat([top_s, 1 - top_s.sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(teacher_buckets(teacher).exp(), want_t)
    torch.testing.assert_close(student_buckets(s, teacher.ids, temp).exp(), want_s)
    kl = (want_t * (want_t.log() - want_s.log())).sum(-1)
    torch.testing.assert_close(sparse_divergence("forward_kl", s, teacher), kl)
    # Collapsing buckets never increases KL (data processing inequality).
    assert (kl <= get_divergence("forward_kl")(s, t, temp) + 1e-12).all()


def _head(seed: int = 2) -> torch.nn.Linear:
    head = torch.nn.Linear(H, V, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(_rand(V, H, seed=seed))
    return head


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
@pytest.mark.parametrize("sparse", [False, True])
def test_chunked_loss_equals_full_logits_loss_and_gradients(chunk, sparse):
    s_head, t_head = _head(2), _head(3)
    h_s, h_t = _rand(B, L, H, seed=4), _rand(B, L, H, seed=5)
    ids = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(6))
    temp, alpha = 2.0, 0.4
    x = h_s.clone().requires_grad_(True)
    teacher = (SparseTeacher.from_logits(t_head(h_t), V, temp) if sparse
               else DenseTeacher(h_t, t_head))
    out = chunked_kd_loss(x, s_head, ids, teacher, name="jsd", temperature=temp, alpha=alpha,
                          chunk=chunk, beta=0.5)
    out.loss.backward()
    grad_x, grad_w = x.grad.clone(), s_head.weight.grad.clone()
    s_head.weight.grad = None

    y = h_s.clone().requires_grad_(True)
    with torch.no_grad():
        t_logits = t_head(h_t)
    ref = kd_loss(s_head(y), t_logits, ids, name="jsd", temperature=temp, alpha=alpha, beta=0.5)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss)
    assert abs(out.kd - ref.kd) < 1e-9 and abs(out.ce - ref.ce) < 1e-9
    torch.testing.assert_close(grad_x, y.grad)
    torch.testing.assert_close(grad_w, s_head.weight.grad)


@pytest.mark.parametrize("temp", [1.0, 2.0, 1.5])
@pytest.mark.parametrize("k", [4, V])
def test_closed_form_forward_kl_gradient_equals_autograd(temp, k):
    """The written-out logit gradient (forward KL over buckets + CE) is autograd's, in fp64."""
    import tasks.distill.sparse as ks

    n = 9
    logits, t = _rand(n, V, seed=7), _rand(n, V, seed=8)
    teacher = SparseTeacher.from_logits(t, k, temp)
    targets = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(9))
    targets[[2, 8]] = -100  # rows without a next token: KD only
    coef = (0.3 * temp**2 / n, 0.7 / 7)
    want = ks._autograd_step(ks._chunk_fn(None, teacher, targets, "forward_kl", temp, {}),
                             coef)(logits)
    got = ks._closed_form_step(teacher, targets, temp, coef)(logits.clone())
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert ks.closed_form_ok("forward_kl", teacher, {})
    assert not ks.closed_form_ok("forward_kl", teacher, {"taid_lambda": 0.5})
    assert not ks.closed_form_ok("reverse_kl", teacher, {})


@pytest.mark.parametrize("chunk", [1, 3, 100])
@pytest.mark.parametrize("grad_rows", [2, 256])
def test_fused_closed_form_loss_equals_full_logits(chunk, grad_rows, monkeypatch):
    """forward KL from a k = V cache through the fused head: the full-logit kd_loss and its
    gradients, whether the weight gradient is one matmul or several (WEIGHT_GRAD_ROWS)."""
    import tasks.distill.sparse as ks

    monkeypatch.setattr(ks, "WEIGHT_GRAD_ROWS", grad_rows)
    s_head, t_head = _head(2), _head(3)
    h_s, h_t = _rand(B, L, H, seed=4), _rand(B, L, H, seed=5)
    ids = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(6))
    temp, alpha = 2.0, 0.4
    with torch.no_grad():
        t_logits = t_head(h_t)
    x = h_s.clone().requires_grad_(True)
    out = chunked_kd_loss(x, s_head, ids, SparseTeacher.from_logits(t_logits, V, temp),
                          temperature=temp, alpha=alpha, chunk=chunk)
    out.loss.backward()
    grad_x, grad_w = x.grad.clone(), s_head.weight.grad.clone()
    s_head.weight.grad = None
    y = h_s.clone().requires_grad_(True)
    ref = kd_loss(s_head(y), t_logits, ids, temperature=temp, alpha=alpha)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss)
    assert abs(out.kd - ref.kd) < 1e-9 and abs(out.ce - ref.ce) < 1e-9
    torch.testing.assert_close(grad_x, y.grad)
    torch.testing.assert_close(grad_w, s_head.weight.grad)


def test_fused_loss_second_backward_is_right_or_refused():
    """The fused head scales its stored gradients in place: a retained graph's second backward
    is exact for an unscaled loss and an error (never a silently wrong gradient) otherwise."""
    head = _head(2)
    x = _rand(B, L, H, seed=4).requires_grad_(True)
    ids = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(6))
    teacher = SparseTeacher.from_logits(_rand(B, L, V, seed=1), 4, 2.0)
    out = chunked_kd_loss(x, head, ids, teacher, chunk=3)
    out.loss.backward(retain_graph=True)
    once = x.grad.clone()
    out.loss.backward()
    torch.testing.assert_close(x.grad, 2 * once)
    out = chunked_kd_loss(x, head, ids, teacher, chunk=3)
    (out.loss * 0.5).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        (out.loss * 0.5).backward()
