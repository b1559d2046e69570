"""One KD micro-step, with the options that make KD recovery fast and flexible on a CPU.

`tasks.distill.train.train_loop` owns the loop (optimizer, accumulation, clipping, logging); this
object owns what happens inside one micro-batch:

- the divergence (`cfg.loss`) with its parameters (jsd beta, skew alpha) and schedules: alpha
  constant or linear (`alpha` -> `alpha_end`), or TAID (the target moves from the student to the
  teacher as lambda goes `taid_start` -> 1);
- where the teacher's distribution comes from: a live forward every step, or the top-k logit
  cache (`tasks.distill.logit_cache`), in which case the teacher does not run at all (unless
  intermediate states are matched, which need its hidden states);
- chunked LM head + loss (`tasks.distill.sparse.chunked_kd_loss`) so the full [B, L, V] logits are
  never held for backward;
- optional hidden-state / attention-output matching with learned projections
(`tasks.distill.hidden`).

With none of these options it computes exactly the plain `kd_loss` step.
"""

from __future__ import annotations

import contextlib

import torch

from tasks.core.recipe import DistillConfig
from tasks.distill.hidden import StateMatcher, capture_attention
from tasks.distill.losses import LossParts, kd_loss
from tasks.distill.sparse import DenseTeacher, chunked_kd_loss
from tasks.distill.step import compute_context, micro_step


def _base(model):
    return getattr(model, "module", model)


def _decoder(model):
    """The model's decoder stack without its LM head, or None where it cannot be run alone.

    The chunked loss applies the head itself, so running the full model (even with
    `logits_to_keep=1`) would cast the head weight ([V, H], 54 MB in bf16 on SmolLM2) for one
    useless position and keep that copy saved for a backward that never reaches it. Only for a
    plain model: DDP's hooks live on its wrapper's forward, FSDP2's root (embeddings, head) on
    the model's own.
    """
    from torch.distributed.fsdp import FSDPModule

    if _base(model) is not model or isinstance(model, FSDPModule):
        return None
    body = getattr(model, "base_model", model)
    return body if body is not model else None


class KDEngine:
    """Loss schedule + teacher source + state matching for one distillation run."""

    def __init__(self, cfg: DistillConfig, steps: int, cache=None,
                 matcher: StateMatcher | None = None) -> None:
        self.cfg, self.steps, self.cache, self.matcher = cfg, steps, cache, matcher
        self.step = 1

    @classmethod
    def for_models(cls, cfg: DistillConfig, steps: int, student, teacher, cache=None
                   ) -> KDEngine:
        """Build the state matcher from the two configs when the recipe asks for one."""
        matcher = None
        if cfg.hidden_loss != "none" or cfg.attention_match:
            matcher = StateMatcher(_base(student).config, _base(teacher).config,
                                   loss=cfg.hidden_loss if cfg.hidden_loss != "none" else "mse",
                                   layers=cfg.hidden_layers, n_layers=cfg.hidden_num_layers,
                                   attention=cfg.attention_match,
                                   match_hidden=cfg.hidden_loss != "none")
        return cls(cfg, steps, cache, matcher)

    # ------------------------------------------------------------------ schedules

    def set_step(self, step: int) -> None:
        """1-based optimizer step the next micro-batches belong to (drives the schedules)."""
        self.step = step

    def _progress(self) -> float:
        return (self.step - 1) / max(self.steps - 1, 1)

    def alpha(self) -> float:
        cfg = self.cfg
        if cfg.alpha_schedule == "linear":
            end = cfg.alpha if cfg.alpha_end is None else cfg.alpha_end
            return cfg.alpha + (end - cfg.alpha) * self._progress()
        return cfg.alpha

    def loss_params(self) -> dict[str, float]:
        cfg, params = self.cfg, {}
        if cfg.loss == "jsd":
            params["beta"] = cfg.jsd_beta
        if cfg.loss in ("skew_kl", "skew_rkl"):
            params["skew"] = cfg.skew_alpha
        if cfg.alpha_schedule == "taid":
            params["taid_lambda"] = cfg.taid_start + (1 - cfg.taid_start) * self._progress()
        return params

    # ------------------------------------------------------------------ trainable extras

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.matcher.parameters()) if self.matcher is not None else []

    def state_dict(self) -> dict:
        return self.matcher.state_dict() if self.matcher is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.matcher is not None:
            self.matcher.load_state_dict(state)

    # ------------------------------------------------------------------ the step

    @property
    def chunked(self) -> bool:
        return self.cfg.loss_chunk > 0 or self.cache is not None

    def micro_step(self, student, teacher, ids: torch.Tensor, rows: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> LossParts:
        """Loss parts for one micro-batch; `rows` are the block indices (for the logit cache);
        `mask` marks the tokens the loss trains on (chat data; the chunked paths take none:
        the recipe refuses chat masks with loss_chunk or logit_cache)."""
        cfg, matcher = self.cfg, self.matcher
        if mask is not None and self.chunked:
            raise ValueError("distill: a loss mask (chat data) needs loss_chunk: 0 and "
                             "logit_cache: false")
        if matcher is None and not self.chunked:  # the plain step, kept in one place
            return micro_step(student, teacher, ids, cfg, alpha=self.alpha(), targets=mask,
                              **self.loss_params())
        need_teacher = self.cache is None or matcher is not None
        want_states = self.chunked or (matcher is not None and matcher.match_hidden)
        keep = 1 if self.chunked else 0  # chunked: the head runs per chunk, not here
        attn = matcher is not None and matcher.attention
        s_cap = capture_attention(student, matcher.student_layers()) if attn \
            else contextlib.nullcontext({})
        t_cap = capture_attention(teacher, matcher.teacher_layers()) if attn \
            else contextlib.nullcontext({})
        params = self.loss_params()
        with compute_context(cfg.precision, ids.device.type):
            t_out = None
            if need_teacher:
                with torch.no_grad(), t_cap as t_attn:
                    t_out = teacher(input_ids=ids, use_cache=False,
                                    output_hidden_states=want_states, logits_to_keep=keep)
            body = _decoder(student) if self.chunked else None
            with s_cap as s_attn:
                if body is not None:  # hidden_states[-1] below: the final (post-norm) state
                    s_out = body(input_ids=ids, use_cache=False, output_hidden_states=True)
                else:
                    s_out = student(input_ids=ids, use_cache=False,
                                    output_hidden_states=want_states, logits_to_keep=keep)
            if self.chunked:
                if self.cache is not None:
                    target = self.cache.get(rows.cpu()).to_device(ids.device)
                else:
                    target = DenseTeacher(t_out.hidden_states[-1],
                                          _base(teacher).get_output_embeddings())
                parts = chunked_kd_loss(
                    s_out.hidden_states[-1], _base(student).get_output_embeddings(), ids, target,
                    name=cfg.loss, temperature=cfg.temperature, alpha=self.alpha(),
                    chunk=cfg.loss_chunk or ids.numel(), **params)
            else:
                parts = kd_loss(s_out.logits, t_out.logits, ids, name=cfg.loss,
                                temperature=cfg.temperature, alpha=self.alpha(), targets=mask,
                                **params)
            if matcher is not None:
                state = matcher(s_out.hidden_states, t_out.hidden_states if want_states else None,
                                s_attn, t_attn)
                parts = LossParts(parts.loss + cfg.hidden_weight * state, parts.kd, parts.ce)
        return parts
