"""The teacher side of KD: load the pair, check they share a vocabulary, keep or offload it.

Which model teaches is decided by the run's plan (`tasks.pipeline`); this module only loads the
model it is given and keeps its memory cost as small as the step allows.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

from tasks.core.common import ModelRef
from tasks.core.model_store import is_quantized, load_model
from tasks.core.recipe import DistillConfig
from tasks.distill.distributed import Runtime
from tasks.distill.memory import release_free_heap


class VocabMismatchError(ValueError):
    """Teacher and student do not share a vocabulary, so their logits cannot be compared."""


def vocab_size(model) -> int:
    """Rows of the output projection: the logit dimension KD compares position by position."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def check_vocab(teacher, teacher_tok, student, student_tok) -> None:
    """Refuse KD between models whose logits index different tokens (one-line error)."""
    t_size, s_size = vocab_size(teacher), vocab_size(student)
    if t_size != s_size:
        raise VocabMismatchError(
            f"distill: teacher has {t_size} output tokens, student {s_size}; KD compares logits "
            "token by token, so both models need the same vocabulary"
        )
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise VocabMismatchError(
            f"distill: teacher and student tokenizers differ ({len(teacher_tok)} vs "
            f"{len(student_tok)} tokens, or the same size with different ids); KD needs one "
            "shared tokenizer"
        )


def freeze(model) -> None:
    """Teacher: eval mode (no dropout) and no gradients, so it costs no optimizer memory."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)


def load_pair(student_ref: ModelRef, teacher_ref: ModelRef | None):
    """Load (student, tokenizer, teacher), refusing what KD here cannot handle."""
    if teacher_ref is None:
        raise ValueError("distill: no teacher; the flow must pass the model before pruning "
                         "as ctx.teacher")
    teacher, teacher_tok = load_model(teacher_ref)
    if is_quantized(student_ref.path):  # Q before KD: quantization-aware KD on the frozen grid
        from tasks.distill.qat import load_qat_student

        student, student_tok = load_qat_student(student_ref.path)
    else:
        student, student_tok = load_model(student_ref)
    check_vocab(teacher, teacher_tok, student, student_tok)
    freeze(teacher)
    return student, student_tok, teacher


def teacher_idle(cfg: DistillConfig, rt: Runtime) -> bool:
    """Whether the training step never runs the teacher, so it may leave memory while training:
    the logit cache serves its distribution and no hidden/attention state is matched."""
    return (cfg.teacher_offload and cfg.logit_cache and cfg.hidden_loss == "none"
            and not cfg.attention_match and rt.world == 1)


class TeacherHolder:
    """The frozen teacher, kept resident or (offload) dropped after each use and reloaded.

    With the logit cache the teacher only scores held-out KL (before, every `eval_every`, after),
    so keeping its fp32 weights through training costs their whole size in peak memory for
    nothing; a reload from its folder costs a second or two per eval.
    """

    def __init__(self, teacher, ref: ModelRef, offload: bool) -> None:
        self._teacher, self.ref, self.offload = teacher, ref, offload
        self.reloads = 0

    def resident(self):
        """The teacher for the training step (None when offloaded: the step never calls it)."""
        self._drop()
        return self._teacher

    def _drop(self) -> None:
        if self.offload and self._teacher is not None:
            self._teacher = None
            gc.collect()  # a model may sit in reference cycles: free its weights now

    @contextlib.contextmanager
    def loaded(self) -> Iterator[Any]:
        if self._teacher is None:
            release_free_heap()
            self._teacher, _ = load_model(self.ref)
            freeze(self._teacher)
            self.reloads += 1
        try:
            yield self._teacher
        finally:
            self._drop()
