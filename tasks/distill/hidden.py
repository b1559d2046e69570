"""Intermediate-state matching for KD: hidden states and attention outputs, via learned projections.

Logit KD tells the student *what* to predict; matching intermediate states (FitNets, Minitron's
"hidden-state distillation") also tells it *how*, which helps most right after pruning, when the
student's layers are the teacher's layers with pieces cut out. Each matched pair maps a student
layer to a teacher layer (`layer_map`), and a learned linear projection takes the student state to
the teacher's width (identity-initialised when the widths agree, so at step 0 the loss measures
the pruning damage itself). Projections train with the student and are dropped at save time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from tasks.distill.losses import hidden_cosine, hidden_mse


def layer_map(n_student: int, n_teacher: int, mode: str = "uniform", n: int = 4
              ) -> list[tuple[int, int]]:
    """Pairs of 1-based layer outputs (student, teacher) to match.

    uniform: `n` student layers spread evenly, each paired with the teacher layer at the same
    relative depth (the last pair is always the two final layers); last: the final layers only.
    """
    if mode == "last":
        return [(n_student, n_teacher)]
    if mode != "uniform":
        raise ValueError(f"unknown layer map '{mode}'; known: uniform, last")
    n = max(1, min(n, n_student))
    pairs = [(round(j * n_student / n), round(j * n_teacher / n)) for j in range(1, n + 1)]
    return list(dict.fromkeys(pairs))


def _projection(d_student: int, d_teacher: int) -> nn.Linear:
    proj = nn.Linear(d_student, d_teacher, bias=False)
    if d_student == d_teacher:
        with torch.no_grad():
            proj.weight.copy_(torch.eye(d_student))
    return proj


class StateMatcher(nn.Module):
    """Projections plus the loss over the mapped layers (hidden states, optionally attention)."""

    def __init__(self, student_config, teacher_config, *, loss: str = "mse",
                 layers: str = "uniform", n_layers: int = 4, attention: bool = False,
                 match_hidden: bool = True) -> None:
        super().__init__()
        if loss not in ("mse", "cosine"):
            raise ValueError(f"unknown hidden-state loss '{loss}'; known: mse, cosine")
        self.loss_name, self.attention, self.match_hidden = loss, attention, match_hidden
        self.pairs = layer_map(student_config.num_hidden_layers,
                               teacher_config.num_hidden_layers, layers, n_layers)
        d_s, d_t = student_config.hidden_size, teacher_config.hidden_size
        self.hidden_proj = nn.ModuleList(_projection(d_s, d_t) for _ in self.pairs)
        self.attn_proj = nn.ModuleList(_projection(d_s, d_t) for _ in self.pairs) if attention \
            else nn.ModuleList()

    def _distance(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        fn = hidden_mse if self.loss_name == "mse" else hidden_cosine
        return fn(student.float(), teacher.float())

    def forward(self, s_hidden, t_hidden, s_attn: dict[int, torch.Tensor] | None = None,
                t_attn: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Mean distance over matched pairs (hidden_states tuples index layer outputs 1..L)."""
        terms = []
        for i, (ls, lt) in enumerate(self.pairs):
            if self.match_hidden:
                proj = self.hidden_proj[i]
                terms.append(self._distance(proj(s_hidden[ls].to(proj.weight.dtype)),
                                            t_hidden[lt].detach()))
            if self.attention and s_attn is not None and t_attn is not None:
                proj = self.attn_proj[i]
                terms.append(self._distance(proj(s_attn[ls - 1].to(proj.weight.dtype)),
                                            t_attn[lt - 1].detach()))
        return torch.stack(terms).mean()

    def student_layers(self) -> list[int]:
        return [ls - 1 for ls, _ in self.pairs]

    def teacher_layers(self) -> list[int]:
        return [lt - 1 for _, lt in self.pairs]


@contextlib.contextmanager
def capture_attention(model, layers: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the self-attention output (after o_proj) of the given 0-based decoder layers."""
    base = getattr(model, "module", model)
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for index in layers:
        attn = base.model.layers[index].self_attn

        def hook(_module, _inputs, output, index=index):
            outputs[index] = output[0] if isinstance(output, tuple) else output

        handles.append(attn.register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
