"""Distributed KD on one machine: 2 CPU processes (gloo) under torchrun vs one process.

Same recipe, same global batch (4 rows: one process takes 4, two take 2 each), same seed: the
loss curves must agree up to floating-point noise. The tolerance is absolute on per-step losses
of order 1-10 nats and covers summation-order differences that AdamW carries over a few steps.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from tasks.common import StageContext
from tasks.distill import distill_stage
from tasks.launch import launch_distill
from tasks.model_store import load_model, save_model
from tasks.recipe import DistillConfig
from tasks.resources import StageResources

SEQ = 32
STEPS = 6
LOSS_TOL = 1e-4  # max |loss_2proc - loss_1proc| over steps (loss, kl, ce); measured ~1e-6


def kd_cfg() -> DistillConfig:
    return DistillConfig(tokens=SEQ * 4 * STEPS, seq_len=SEQ, batch_size=4, lr=1e-3,
                         warmup_steps=1, temperature=2.0, alpha=0.5, eval_blocks=2)


@pytest.fixture(scope="module")
def student_ref(tiny_llama_ref, tmp_path_factory):
    """The tiny teacher plus noise: a student with something to learn."""
    model, tok = load_model(tiny_llama_ref)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.add_(torch.randn(param.shape, generator=gen) * param.std() * 0.5)
    return save_model(model, tok, tmp_path_factory.mktemp("student") / "student")


@pytest.fixture(scope="module")
def single_run(student_ref, tiny_llama_ref, tmp_path_factory):
    ctx = StageContext(out_dir=tmp_path_factory.mktemp("kd1") / "02-distill", seed=3, threads=1,
                       teacher=tiny_llama_ref, stage_name="02-distill")
    result = distill_stage(student_ref, kd_cfg(), ctx)
    return result, json.loads((ctx.out_dir / "loss_curve.json").read_text())


def max_diff(a: list[dict], b: list[dict], keys=("loss", "kl", "ce")) -> float:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    return max(abs(x[k] - y[k]) for x, y in zip(a, b, strict=True) for k in keys)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(strategy, single_run, student_ref, tiny_llama_ref, tmp_path):
    one, curve1 = single_run
    ctx = StageContext(out_dir=tmp_path / "02-distill", seed=3, threads=2,
                       teacher=tiny_llama_ref, stage_name="02-distill")
    res = StageResources(nproc_per_node=2, strategy=strategy)
    start = time.perf_counter()
    two = launch_distill(student_ref, kd_cfg(), ctx, res)
    elapsed = time.perf_counter() - start
    curve2 = json.loads((ctx.out_dir / "loss_curve.json").read_text())

    assert two.metrics["world_size"] == 2 and two.metrics["strategy"] == strategy
    assert len(curve2["steps"]) == STEPS and curve2["steps"][-1]["tokens"] == STEPS * 4 * SEQ
    loss_diff = max_diff(curve1["steps"], curve2["steps"])
    held_diff = max_diff(curve1["heldout"], curve2["heldout"], keys=("kl",))
    grad_diff = max(abs(x["grad_norm"] - y["grad_norm"]) / x["grad_norm"]
                    for x, y in zip(curve1["steps"], curve2["steps"], strict=True))
    print(f"\n[{strategy}] 2 procs in {elapsed:.1f}s: max |loss diff| {loss_diff:.2e}, "
          f"held-out KL diff {held_diff:.2e}, grad-norm rel diff {grad_diff:.2e}")
    import shutil; shutil.copy(ctx.out_dir / "loss_curve.json", f"/tmp/pkdq8/c2-{strategy}.json"); shutil.copy(one.model.path.parent / "loss_curve.json", "/tmp/pkdq8/c1.json")
    assert loss_diff < LOSS_TOL, (loss_diff, curve1["steps"], curve2["steps"])
    assert held_diff < LOSS_TOL
    assert grad_diff < 1e-3
    assert curve1["steps"][-1]["loss"] < curve1["steps"][0]["loss"]  # it did learn

    # Rank 0 saved the trained student: the same weights as the one-process run, up to noise.
    w1, _ = load_model(one.model)
    w2, _ = load_model(two.model)
    weight_diff = max(float((a - b).abs().max()) for a, b in
                      zip(w1.state_dict().values(), w2.state_dict().values(), strict=True))
    assert weight_diff < 1e-4, weight_diff
    assert (ctx.out_dir / "loss_curve.png").is_file()
    assert (ctx.out_dir / "launch" / "command.txt").read_text().startswith("torchrun ")
    assert math.isfinite(two.metrics["heldout_kl_after"])
