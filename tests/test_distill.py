"""Distill stage on the tiny random Llama: a noised copy learns back toward its teacher."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import noisy_copy

from tasks.core.common import StageContext
from tasks.core.model_store import load_model, save_model
from tasks.core.recipe import DistillConfig
from tasks.distill.memory import keep_freed_memory
from tasks.distill.stage import distill_stage
from tasks.distill.teacher import VocabMismatchError, check_vocab, freeze
from tasks.distill.train import TrainPlan, lr_factor, train_loop

SEQ = 32


def tiny_cfg(**overrides) -> DistillConfig:
    base = dict(tokens=SEQ * 2 * 12, seq_len=SEQ, batch_size=2, lr=3e-3, warmup_steps=2,
                temperature=2.0, alpha=0.5, eval_blocks=2)
    return DistillConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def noised_ref(tiny_llama_ref, tmp_path_factory):
    """The tiny teacher with Gaussian noise on every weight: a stand-in for a damaged student."""
    return noisy_copy(tiny_llama_ref, tmp_path_factory.mktemp("noised") / "student",
                      seed=1, scale=0.7)


def test_plan_rounds_budget_up_to_whole_steps():
    plan = TrainPlan.from_config(DistillConfig(tokens=1000, seq_len=32, batch_size=4, grad_accum=2))
    assert plan.steps == math.ceil(1000 / (4 * 32 * 2)) == 4
    assert (plan.micro_batches, plan.blocks, plan.tokens) == (8, 32, 4 * 4 * 32 * 2)


def test_lr_schedule_warms_up_then_decays_to_floor():
    factors = [lr_factor(s, warmup=2, total=10, min_ratio=0.1) for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(factors[2:], factors[3:], strict=False))
    assert factors[-1] == pytest.approx(0.1)
    assert lr_factor(0, warmup=0, total=5, min_ratio=0.0) == 1.0


def test_loss_decreases_on_repeated_data(tiny_llama_ref, noised_ref):
    torch.manual_seed(0)
    teacher, _ = load_model(tiny_llama_ref)
    student, _ = load_model(noised_ref)
    freeze(teacher)
    blocks = torch.randint(0, 1000, (2, SEQ)).repeat(4, 1)  # the same 2 blocks, over and over
    curve = train_loop(student, teacher, blocks, tiny_cfg(), steps=16)
    first = sum(r["loss"] for r in curve[:3]) / 3
    last = sum(r["loss"] for r in curve[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    assert all(p.grad is None for p in teacher.parameters())
    assert curve[0]["lr"] == pytest.approx(3e-3 / 2)


def test_bf16_autocast_runs_and_keeps_fp32_weights(tiny_llama_ref, noised_ref):
    teacher, _ = load_model(tiny_llama_ref)
    student, _ = load_model(noised_ref)
    freeze(teacher)
    blocks = torch.randint(0, 1000, (2, SEQ))
    curve = train_loop(student, teacher, blocks, tiny_cfg(precision="bf16-autocast"), steps=2)
    assert all(math.isfinite(r["loss"]) for r in curve)
    assert all(p.dtype == torch.float32 for p in student.parameters())


def test_distill_stage_end_to_end(tiny_llama_ref, noised_ref, tmp_path):
    from transformers import AutoModelForCausalLM

    ctx = StageContext(out_dir=tmp_path / "kd", seed=3, teacher=tiny_llama_ref)
    # Pure KD: the random teacher is near-uniform, so CE on real text would pull the student
    # away from it and make held-out KL a test of the data, not of distillation.
    result = distill_stage(noised_ref, tiny_cfg(eval_every=4, alpha=1.0, temperature=1.0), ctx)
    m = result.metrics
    assert m["steps"] == 12 and m["tokens"] == 12 * 2 * SEQ
    assert m["heldout_kl_after"] < m["heldout_kl_before"]
    assert m["tokens_per_s"] > 0 and m["config"]["seq_len"] == SEQ

    curve = json.loads((ctx.out_dir / "loss_curve.json").read_text())
    assert [r["step"] for r in curve["steps"]] == list(range(1, 13))
    assert set(curve["steps"][0]) >= {"step", "tokens", "loss", "kl", "ce", "lr"}
    assert [h["step"] for h in curve["heldout"]] == [0, 4, 8, 12]
    assert (ctx.out_dir / "loss_curve.png").stat().st_size > 1000

    assert result.model.path == (ctx.out_dir / "model").resolve()
    reloaded = AutoModelForCausalLM.from_pretrained(str(result.model.path))
    assert reloaded.dtype == torch.float32
    original = AutoModelForCausalLM.from_pretrained(str(noised_ref.path))
    assert reloaded.config.to_dict()["hidden_size"] == original.config.hidden_size
    changed = any(not torch.equal(a, b) for a, b in
                  zip(reloaded.state_dict().values(), original.state_dict().values(), strict=True))
    assert changed


def test_vocab_mismatch_raises(tiny_llama_ref, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = load_model(tiny_llama_ref)
    small = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=16))
    ref = save_model(small, tok, tmp_path / "small-vocab")
    ctx = StageContext(out_dir=tmp_path / "kd", teacher=tiny_llama_ref)
    with pytest.raises(VocabMismatchError, match="same vocabulary"):
        distill_stage(ref, tiny_cfg(), ctx)


def test_tokenizer_mismatch_raises(tiny_llama_ref):
    import copy

    teacher, tok = load_model(tiny_llama_ref)
    other = copy.deepcopy(tok)
    other.add_tokens(["<pkdq-extra-token>"])
    with pytest.raises(VocabMismatchError, match="tokenizers differ"):
        check_vocab(teacher, tok, teacher, other)


def test_missing_teacher_raises(noised_ref, tmp_path):
    with pytest.raises(ValueError, match="no teacher"):
        distill_stage(noised_ref, tiny_cfg(), StageContext(out_dir=tmp_path))


def test_keep_freed_memory_nests_and_restores():
    import tasks.distill.memory as distill

    if distill._glibc() is None:
        pytest.skip("mallopt needs glibc")
    with keep_freed_memory():
        with keep_freed_memory():
            big = torch.ones(8 << 20)
        assert distill._KEEP_DEPTH == 1
        del big
    assert distill._KEEP_DEPTH == 0
