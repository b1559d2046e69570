"""RMSNorm layers that keep less for backward while the student trains (`lean_norm`).

An HF RMSNorm (`weight * (x * rsqrt(mean(x^2) + eps))`) written as plain tensor ops leaves
autograd two [B, L, H] fp32 tensors per norm: its input (for the pow and the product) and the
normalized input (for the weight's gradient). Here one autograd Function saves the input and the
per-position 1/rms only and recomputes the normalized input in backward (one multiply). Forward
values are bit-identical; gradients equal up to float summation order. On SmolLM2 (61 norms,
4 x 256 tokens) that is 137 MB less held from forward to backward, at no measurable cost.

Only norms that compute exactly that formula are swapped: each candidate's own forward is run
on a probe input first and compared bit for bit (Gemma's `(1 + weight)` norm, say, stays as is).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch


class _RMSNorm(torch.autograd.Function):
    """weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), saving x and 1/rms only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            xf = x.float() if x.dtype not in (torch.float32, torch.float64) else x
            rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            out = weight * (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            xf = x.float() if x.dtype not in (torch.float32, torch.float64) else x
            normed = xf * rstd
            grad_w = None
            if ctx.needs_input_grad[1]:
                grad_w = (grad_out * normed.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0)
                grad_w = grad_w.to(weight.dtype)
            grad_x = None
            if ctx.needs_input_grad[0]:
                g = (grad_out * weight).to(rstd.dtype)
                # d/dx of x * rstd: rstd * (g - normed * mean(g * normed))
                grad_x = (g - normed * (g * normed).mean(-1, keepdim=True)).mul_(rstd)
                grad_x = grad_x.to(x.dtype)
        return grad_x, grad_w, None


def _lean_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _candidates(model) -> list[torch.nn.Module]:
    """RMSNorm-like modules with a plain 1-D weight (sharded DTensor weights are left alone)."""
    from torch.distributed.tensor import DTensor

    return [m for m in model.modules()
            if type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None),
                                                                   torch.nn.Parameter)
            and not isinstance(m.weight, DTensor) and m.weight.dim() == 1
            and isinstance(getattr(m, "variance_epsilon", None), float)]


def _same_formula(module: torch.nn.Module) -> bool:
    """Whether this norm's own forward is exactly the formula `_RMSNorm` computes."""
    device = module.weight.device
    gen = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG alone
    probe = torch.randn(2, 3, module.weight.shape[0], dtype=module.weight.dtype, device=device,
                        generator=gen) * 3
    with torch.no_grad():
        want = module(probe)
        got = _RMSNorm.apply(probe, module.weight, module.variance_epsilon)
    return want.dtype == got.dtype and torch.equal(want, got)


@contextlib.contextmanager
def lean_norm(model, enabled: bool = True) -> Iterator[int]:
    """Swap the model's RMSNorm forwards for `_RMSNorm` while on; yields how many were swapped."""
    swapped: list[torch.nn.Module] = []
    if enabled:
        base = getattr(model, "module", model)
        for module in _candidates(base):
            if "forward" not in module.__dict__ and _same_formula(module):
                module.forward = types.MethodType(_lean_forward, module)
                swapped.append(module)
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward
