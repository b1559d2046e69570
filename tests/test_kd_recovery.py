"""Issue #5 on the tiny Llama: logit cache, chunked loss, state matching, resume, early stop."""

from __future__ import annotations

import pytest
import torch
from conftest import noisy_copy

from tasks.core.common import StageContext
from tasks.core.model_store import load_model
from tasks.core.recipe import DistillConfig
from tasks.distill.checkpoint import Checkpointer
from tasks.distill.engine import KDEngine
from tasks.distill.hidden import layer_map
from tasks.distill.logit_cache import LogitCache
from tasks.distill.stage import distill_stage
from tasks.distill.teacher import freeze
from tasks.distill.train import train_loop

SEQ = 32


def cfg(**overrides) -> DistillConfig:
    base = dict(tokens=SEQ * 2 * 6, seq_len=SEQ, batch_size=2, lr=3e-3, warmup_steps=1,
                temperature=2.0, alpha=0.5, eval_blocks=2)
    return DistillConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def student_ref(tiny_llama_ref, tmp_path_factory):
    """The tiny teacher with noise on every matrix: a stand-in for a pruned student."""
    return noisy_copy(tiny_llama_ref, tmp_path_factory.mktemp("student") / "student",
                      seed=1, scale=0.7)


@pytest.fixture()
def pair(tiny_llama_ref, student_ref):
    teacher, tok = load_model(tiny_llama_ref)
    student, _ = load_model(student_ref)
    freeze(teacher)
    return student, teacher, tok


def _blocks(n: int = 4) -> torch.Tensor:
    return torch.randint(0, 1000, (n, SEQ), generator=torch.Generator().manual_seed(0))


def test_layer_map():
    assert layer_map(30, 30, "uniform", 3) == [(10, 10), (20, 20), (30, 30)]
    assert layer_map(24, 32, "uniform", 4) == [(6, 8), (12, 16), (18, 24), (24, 32)]
    assert layer_map(8, 12, "last") == [(8, 12)]


def test_logit_cache_builds_once_and_matches_the_teacher(pair, tmp_path):
    _, teacher, tok = pair
    blocks = _blocks()
    cache = LogitCache.for_blocks("fp-a", tok, blocks, 16, 2.0, "fp32", root=tmp_path)
    assert cache.build(teacher, blocks, batch_size=3) == {"built": 1, "reused": 0}
    again = LogitCache.for_blocks("fp-a", tok, blocks, 16, 2.0, "fp32", root=tmp_path)
    assert again.folder == cache.folder and again.complete
    assert again.build(teacher, blocks) == {"built": 0, "reused": 1}
    # Any input of the key changes the folder.
    for teacher_fp, data, k, temp in (("fp-b", blocks, 16, 2.0), ("fp-a", blocks, 8, 2.0),
                                      ("fp-a", blocks + 1, 16, 2.0), ("fp-a", blocks, 16, 1.0)):
        other = LogitCache.for_blocks(teacher_fp, tok, data, k, temp, "fp32", tmp_path)
        assert other.folder != cache.folder
    got = again.get(torch.tensor([2, 0]))
    with torch.no_grad():
        logits = teacher(input_ids=blocks[[2, 0]]).logits
    top, ids = logits.topk(16, dim=-1)
    torch.testing.assert_close(got.logits, top)
    assert torch.equal(got.ids, ids)
    torch.testing.assert_close(got.lse, torch.logsumexp(logits / 2.0, -1))
    mass = (torch.softmax(logits / 2.0, -1).gather(-1, ids)).sum(-1)
    torch.testing.assert_close(got.log_rest.exp(), 1 - mass, atol=1e-5, rtol=1e-4)


def test_chunked_engine_equals_plain_step(pair):
    student, teacher, _ = pair
    ids = _blocks(2)
    plain = KDEngine(cfg(loss="reverse_kl"), 4).micro_step(student, teacher, ids)
    chunked = KDEngine(cfg(loss="reverse_kl", loss_chunk=13), 4).micro_step(student, teacher, ids)
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=1e-5, atol=1e-5)


def test_cached_chunked_bf16_training_learns(pair, tmp_path):
    student, teacher, tok = pair
    blocks = _blocks(2).repeat(3, 1)
    c = cfg(logit_cache=True, cache_topk=32, loss_chunk=16, precision="bf16-autocast",
            loss="skew_kl", alpha=1.0)
    cache = LogitCache.for_blocks("fp", tok, blocks, c.cache_topk, c.temperature, c.precision,
                                  root=tmp_path)
    cache.build(teacher, blocks)

    class NoTeacher(torch.nn.Module):
        def forward(self, *a, **k):
            raise AssertionError("the cached path must not run the teacher")

    curve = train_loop(student, NoTeacher(), blocks, c, steps=10,
                       engine=KDEngine(c, 10, cache=cache))
    assert curve[-1]["loss"] < 0.8 * curve[0]["loss"]


def test_hidden_and_attention_matching_train_projections(pair):
    student, teacher, _ = pair
    c = cfg(hidden_loss="mse", attention_match=True, hidden_layers="uniform",
            hidden_num_layers=2, loss_chunk=20)
    engine = KDEngine.for_models(c, 4, student, teacher)
    assert engine.matcher is not None and len(engine.matcher.hidden_proj) == 2
    before = [p.detach().clone() for p in engine.parameters()]
    curve = train_loop(student, teacher, _blocks(), c, steps=3, engine=engine)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in curve)
    assert any(not torch.equal(a, b) for a, b in zip(before, engine.parameters(), strict=True))


def test_alpha_schedules():
    lin = KDEngine(cfg(alpha_schedule="linear", alpha=0.2, alpha_end=1.0), 5)
    alphas = []
    for step in range(1, 6):
        lin.set_step(step)
        alphas.append(lin.alpha())
    assert alphas == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    taid = KDEngine(cfg(alpha_schedule="taid", taid_start=0.5), 3)
    taid.set_step(1)
    assert taid.loss_params()["taid_lambda"] == pytest.approx(0.5)
    taid.set_step(3)
    assert taid.loss_params()["taid_lambda"] == pytest.approx(1.0)


def test_resume_after_interrupt_equals_uninterrupted(tiny_llama_ref, student_ref, tmp_path):
    c = cfg(checkpoint_every=2, hidden_loss="cosine", hidden_layers="last")
    blocks, steps = _blocks(), 6

    def run(folder, stop_after: int | None = None):
        teacher, _ = load_model(tiny_llama_ref)
        freeze(teacher)
        student, _ = load_model(student_ref)
        engine = KDEngine.for_models(c, steps, student, teacher)
        ckpt = Checkpointer(folder, c.checkpoint_every, "fp")
        if stop_after is not None:
            real_save = ckpt.save

            def save_then_die(step, *args):
                real_save(step, *args)
                if step == stop_after:
                    raise KeyboardInterrupt

            ckpt.save = save_then_die
        curve = train_loop(student, teacher, blocks, c, steps, engine=engine, checkpoints=ckpt)
        return student, engine, curve, ckpt

    full, full_engine, full_curve, _ = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop_after=4)
    resumed, res_engine, res_curve, ckpt = run(tmp_path / "b")
    assert ckpt.resumed_from == 4
    assert [r["step"] for r in res_curve] == list(range(1, steps + 1))
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(full_engine.parameters(), res_engine.parameters(), strict=True):
        assert torch.equal(a, b)
    assert Checkpointer(tmp_path / "b", 2, "other-run").load(resumed, None, None, None) is None


def test_early_stop_keeps_best_model(student_ref, tiny_llama_ref, tmp_path):
    from transformers import AutoModelForCausalLM

    ctx = StageContext(out_dir=tmp_path / "kd", seed=3, teacher=tiny_llama_ref)
    # lr so large that training only hurts: the best held-out model is the untrained one.
    c = cfg(eval_every=1, early_stop_patience=2, lr=0.5, warmup_steps=0, alpha=1.0,
            checkpoint_every=1)
    m = distill_stage(student_ref, c, ctx).metrics
    assert m["early_stopped"] and m["best_step"] == 0 and m["steps_run"] == 2
    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path / "kd" / "model"))
    original = AutoModelForCausalLM.from_pretrained(str(student_ref.path))
    for a, b in zip(saved.state_dict().values(), original.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert m["heldout_kl_after"] == m["heldout_kl_before"]
    assert not (tmp_path / "kd" / "checkpoint" / "state.pt").exists()


def test_stage_with_cache_reuses_it(student_ref, tiny_llama_ref, tmp_path, monkeypatch):
    monkeypatch.setenv("PKDQ_CACHE_DIR", str(tmp_path / "cache"))
    c = cfg(logit_cache=True, cache_topk=8, loss_chunk=32, loss="jsd", alpha=1.0,
            temperature=1.0)
    first = distill_stage(student_ref, c, StageContext(out_dir=tmp_path / "a", seed=3,
                                                       teacher=tiny_llama_ref)).metrics
    second = distill_stage(student_ref, c, StageContext(out_dir=tmp_path / "b", seed=3,
                                                        teacher=tiny_llama_ref)).metrics
    assert not first["logit_cache_reused"] and second["logit_cache_reused"]
    assert first["logit_cache_dir"] == second["logit_cache_dir"]
    assert second["heldout_kl_after"] < second["heldout_kl_before"]


def test_early_stop_needs_eval_every():
    with pytest.raises(ValueError, match="eval_every"):
        DistillConfig(early_stop_patience=2)


def test_stage_resumes_mid_stage(student_ref, tiny_llama_ref, tmp_path, monkeypatch):
    import json

    c = cfg(checkpoint_every=2, eval_every=2)
    real_save = Checkpointer.save

    def save_then_die(self, step, *args):
        real_save(self, step, *args)
        if step == 4:
            raise KeyboardInterrupt

    ctx = StageContext(out_dir=tmp_path / "kd", seed=3, teacher=tiny_llama_ref)
    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        distill_stage(student_ref, c, ctx)
    monkeypatch.setattr(Checkpointer, "save", real_save)
    m = distill_stage(student_ref, c, ctx).metrics
    assert m["resumed_from_step"] == 4 and m["steps_run"] == 6
    curve = json.loads((tmp_path / "kd" / "loss_curve.json").read_text())
    assert [h["step"] for h in curve["heldout"]] == [0, 2, 4, 6]
    assert [r["step"] for r in curve["steps"]] == list(range(1, 7))
