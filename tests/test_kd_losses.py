"""KD losses against textbook formulas on small tensors, including their gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tasks.distill.losses import (
    DIVERGENCES,
    forward_kl,
    get_divergence,
    kd_loss,
    next_token_ce,
    register_divergence,
)

B, L, V = 2, 5, 7


def _logits(seed: int, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, V, generator=gen, dtype=dtype) * 2.0


def _ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


def textbook_kl(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    """sum_v p_t(v) * log(p_t(v) / p_s(v)) with explicit exp/normalise, per position."""
    p_t = torch.exp(t / temp) / torch.exp(t / temp).sum(-1, keepdim=True)
    p_s = torch.exp(s / temp) / torch.exp(s / temp).sum(-1, keepdim=True)
    return (p_t * torch.log(p_t / p_s)).sum(-1)


def textbook_ce(s: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """-log softmax(s_i)[x_{i+1}] averaged over positions with a next token."""
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1] - 1):
            row = s[b, i]
            total += -(row[ids[b, i + 1]] - torch.log(torch.exp(row).sum()))
            count += 1
    return total / count


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.5])
def test_forward_kl_matches_textbook(temp):
    s, t = _logits(0), _logits(1)
    torch.testing.assert_close(forward_kl(s, t, temp), textbook_kl(s, t, temp))


def test_forward_kl_is_zero_for_identical_and_positive_otherwise():
    s = _logits(0)
    assert forward_kl(s, s.clone(), 2.0).abs().max() < 1e-12
    assert (forward_kl(s, _logits(1), 2.0) > 0).all()


def test_forward_kl_is_not_symmetric():
    """Forward KL is KL(teacher || student): swapping arguments must change the value."""
    s, t = _logits(0), _logits(1)
    assert not torch.allclose(forward_kl(s, t, 1.0), forward_kl(t, s, 1.0))


def test_teacher_zero_probabilities_give_finite_kl():
    s, t = _logits(0), _logits(1)
    t[..., 0] = -float("inf")
    out = forward_kl(s, t, 1.0)
    assert torch.isfinite(out).all()
    mask = torch.ones(V, dtype=torch.bool)
    mask[0] = False
    p_t = torch.softmax(t[..., mask], -1)
    log_p_s = torch.log_softmax(s, -1)[..., mask]
    torch.testing.assert_close(out, (p_t * (p_t.log() - log_p_s)).sum(-1))


def test_next_token_ce_matches_textbook_and_torch():
    s, ids = _logits(0), _ids()
    torch.testing.assert_close(next_token_ce(s, ids), textbook_ce(s, ids))
    ref = F.cross_entropy(s[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(next_token_ce(s, ids), ref)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temp", [1.0, 3.0])
def test_kd_loss_mixes_alpha_and_scales_by_t_squared(alpha, temp):
    s, t, ids = _logits(0), _logits(1), _ids()
    out = kd_loss(s, t, ids, temperature=temp, alpha=alpha)
    kl = textbook_kl(s, t, temp).mean()
    ce = textbook_ce(s, ids)
    torch.testing.assert_close(out.loss, alpha * temp**2 * kl + (1 - alpha) * ce)
    assert math.isclose(out.kd, float(kl), rel_tol=1e-9)
    assert math.isclose(out.ce, float(ce), rel_tol=1e-9)


def test_t_squared_keeps_kd_gradient_scale_stable():
    """With T^2, the KD gradient ~ (1/T)(p_s - p_t)*T^2/N; without it, it would shrink as 1/T."""
    s, t, ids = _logits(0), _logits(1), _ids()

    def kd_grad(temp: float) -> torch.Tensor:
        x = s.clone().requires_grad_(True)
        kd_loss(x, t, ids, temperature=temp, alpha=1.0).loss.backward()
        return x.grad

    # Exact gradient of T^2 * mean KL at temperature T: T * (p_s^T - p_t^T) / N.
    for temp in (1.0, 2.0, 5.0):
        n = B * L
        expected = temp * (torch.softmax(s / temp, -1) - torch.softmax(t / temp, -1)) / n
        torch.testing.assert_close(kd_grad(temp), expected)


def test_kd_loss_gradient_matches_manual_formula():
    """d loss / d z_s = alpha*T*(p_s^T - p_t^T)/N_kl + (1-alpha)*(softmax(z_s) - onehot)/N_ce."""
    s, t, ids = _logits(0), _logits(1), _ids()
    alpha, temp = 0.4, 2.5
    x = s.clone().requires_grad_(True)
    kd_loss(x, t, ids, temperature=temp, alpha=alpha).loss.backward()
    kd_part = alpha * temp * (torch.softmax(s / temp, -1) - torch.softmax(t / temp, -1)) / (B * L)
    ce_part = torch.zeros_like(s)
    onehot = F.one_hot(ids[:, 1:], V).to(s.dtype)
    ce_part[:, :-1] = (torch.softmax(s[:, :-1], -1) - onehot) / (B * (L - 1))
    torch.testing.assert_close(x.grad, kd_part + (1 - alpha) * ce_part)


def test_kd_loss_gradcheck_finite_differences():
    s, t, ids = _logits(0), _logits(1), _ids()
    x = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: kd_loss(z, t, ids, temperature=2.0, alpha=0.7).loss, (x,)
    )


def test_teacher_gets_no_gradient_dependency():
    """Only the student is trained: a teacher tensor with requires_grad=False stays untouched."""
    s, t, ids = _logits(0).requires_grad_(True), _logits(1), _ids()
    kd_loss(s, t, ids).loss.backward()
    assert t.grad is None and s.grad is not None


def test_mask_drops_positions():
    s, t, ids = _logits(0), _logits(1), _ids()
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 3:] = 0
    out = kd_loss(s, t, ids, temperature=2.0, alpha=0.5, mask=mask)
    kl = textbook_kl(s, t, 2.0)
    kl_mean = kl[mask.bool()].mean()
    keep = mask[:, 1:].bool()
    ce = F.cross_entropy(s[:, :-1][keep], ids[:, 1:][keep])
    torch.testing.assert_close(out.loss, 0.5 * 4.0 * kl_mean + 0.5 * ce)


def test_bf16_logits_are_upcast():
    s, t, ids = _logits(0, torch.float32), _logits(1, torch.float32), _ids()
    full = kd_loss(s, t, ids).loss
    half = kd_loss(s.bfloat16(), t.bfloat16(), ids).loss
    assert half.dtype == torch.float32
    assert abs(float(full) - float(half)) < 0.05 * float(full)


def test_registry_names_and_errors():
    assert get_divergence("forward_kl") is forward_kl
    with pytest.raises(ValueError, match="unknown KD loss 'nope'; known: forward_kl"):
        get_divergence("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register_divergence("forward_kl")(forward_kl)


def test_registered_divergence_is_used_by_kd_loss():
    name = "test_reverse_kl"

    @register_divergence(name)
    def reverse_kl(s, t, temp):
        return forward_kl(t, s, temp)

    try:
        s, t, ids = _logits(0), _logits(1), _ids()
        out = kd_loss(s, t, ids, name=name, temperature=1.0, alpha=1.0)
        torch.testing.assert_close(out.loss, textbook_kl(t, s, 1.0).mean())
    finally:
        DIVERGENCES.pop(name)


# --------------------------------------------------------------------------- issue #5 divergences


def _p(x: torch.Tensor, temp: float) -> torch.Tensor:
    return torch.exp(x / temp) / torch.exp(x / temp).sum(-1, keepdim=True)


def textbook(name: str, s: torch.Tensor, t: torch.Tensor, temp: float, beta: float = 0.5,
             skew: float = 0.1) -> torch.Tensor:
    """The papers' formulas with explicit probabilities, per position."""
    p_s, p_t = _p(s, temp), _p(t, temp)

    def kl(p, q):
        return (p * torch.log(p / q)).sum(-1)

    if name == "forward_kl":
        return kl(p_t, p_s)
    if name == "reverse_kl":
        return kl(p_s, p_t)
    if name == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    if name == "skew_kl":
        return kl(p_t, skew * p_t + (1 - skew) * p_s)
    if name == "skew_rkl":
        return kl(p_s, skew * p_s + (1 - skew) * p_t)
    raise AssertionError(name)


NEW = [("reverse_kl", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.9}),
       ("skew_kl", {"skew": 0.1}), ("skew_kl", {"skew": 0.4}), ("skew_rkl", {"skew": 0.1})]


@pytest.mark.parametrize(("name", "params"), NEW)
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_new_divergences_match_textbook_value_and_gradient(name, params, temp):
    s, t = _logits(0), _logits(1)
    x = s.clone().requires_grad_(True)
    y = s.clone().requires_grad_(True)
    ours = get_divergence(name)(x, t, temp, **params)
    ref = textbook(name, y, t, temp, **params)
    torch.testing.assert_close(ours, ref)
    weights = torch.rand(B, L, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize(("name", "params"), NEW)
def test_new_divergences_gradcheck_and_zero_at_match(name, params):
    s, t, ids = _logits(0), _logits(1), _ids()
    x = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: kd_loss(z, t, ids, name=name, temperature=1.5, alpha=0.6, **params).loss, (x,))
    assert get_divergence(name)(s, s.clone(), 2.0, **params).abs().max() < 1e-12


def test_reverse_kl_gradient_matches_closed_form():
    """d KL(p_s||p_t)/dz_s = p_s * (log p_s - log p_t - KL) at T = 1 (per position)."""
    s, t = _logits(0), _logits(1)
    x = s.clone().requires_grad_(True)
    get_divergence("reverse_kl")(x, t, 1.0).sum().backward()
    p_s, p_t = _p(s, 1.0), _p(t, 1.0)
    rkl = (p_s * (p_s.log() - p_t.log())).sum(-1, keepdim=True)
    torch.testing.assert_close(x.grad, p_s * (p_s.log() - p_t.log() - rkl))


def test_jsd_is_bounded_and_skew_zero_is_plain_kl():
    s, t = _logits(0) * 20, _logits(1) * 20  # nearly one-hot, disjoint modes
    assert (get_divergence("jsd")(s, t, 1.0, beta=0.5) <= math.log(2) + 1e-9).all()
    torch.testing.assert_close(get_divergence("skew_kl")(s, t, 1.0, skew=0.0), forward_kl(s, t))
    torch.testing.assert_close(get_divergence("skew_rkl")(s, t, 1.0, skew=0.0),
                               forward_kl(t, s))


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_taid_target_interpolates_and_stops_gradient(lam):
    """TAID: target q = softmax((1-lam) sg(log p_s) + lam log p_t); KL(q || p_s)."""
    s, t = _logits(0), _logits(1)
    x = s.clone().requires_grad_(True)
    ours = get_divergence("forward_kl")(x, t, 1.0, taid_lambda=lam)
    log_ps, log_pt = torch.log(_p(s, 1.0)), torch.log(_p(t, 1.0))
    q = _p((1 - lam) * log_ps + lam * log_pt, 1.0)
    y = s.clone().requires_grad_(True)
    ref = (q * (q.log() - torch.log(_p(y, 1.0)))).sum(-1)
    torch.testing.assert_close(ours, ref)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, y.grad)
    if lam == 0.0:
        assert ours.abs().max() < 1e-12  # target = the student itself


def test_hidden_state_losses_match_formulas():
    from tasks.distill.losses import hidden_cosine, hidden_mse

    gen = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64)
    mse = ((s - t) ** 2).sum(-1).mean() / (t**2).sum(-1).mean()
    torch.testing.assert_close(hidden_mse(s, t), mse)
    cos = (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))
    torch.testing.assert_close(hidden_cosine(s, t), (1 - cos).mean())
    assert torch.autograd.gradcheck(lambda z: hidden_mse(z, t) + hidden_cosine(z, t), (s,))
