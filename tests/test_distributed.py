"""Distributed KD on one machine: 2 CPU processes (gloo) under torchrun vs one process.

Same recipe, same global batch (4 rows: one process takes 4, two take 2 each), same seed: the
loss curves must agree up to floating-point noise: LOSS_TOL, absolute, on per-step losses of about
5 nats (fp32 summation order differs between a batch of 4 and two of 2; AdamW carries it on).
"""

from __future__ import annotations

import json
import math
import time

import pytest
from conftest import noisy_copy

from tasks.core.common import StageContext
from tasks.core.model_store import load_model
from tasks.core.recipe import DistillConfig
from tasks.core.resources import StageResources
from tasks.distill.launch import launch_distill
from tasks.distill.stage import distill_stage

SEQ = 32
STEPS = 6
LOSS_TOL = 1e-5  # max |loss_2proc - loss_1proc| over steps (loss, kl, ce); measured 9.5e-7


def kd_cfg() -> DistillConfig:
    return DistillConfig(tokens=SEQ * 4 * STEPS, seq_len=SEQ, batch_size=4, lr=1e-3,
                         warmup_steps=1, temperature=2.0, alpha=0.5, eval_blocks=2)


@pytest.fixture(scope="module")
def student_ref(tiny_llama_ref, tmp_path_factory):
    """The tiny teacher plus noise: a student with something to learn."""
    return noisy_copy(tiny_llama_ref, tmp_path_factory.mktemp("student") / "student",
                      seed=1, scale=0.5)


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


# --------------------------------------------------------------------------- resources, commands


def test_machine_check_names_what_is_missing(monkeypatch):
    import tasks.core.resources as resources

    monkeypatch.setattr(resources, "usable_cpus", lambda: 2)
    monkeypatch.setattr(resources, "cuda_devices", lambda: (0, "this torch build has no CUDA"))
    assert resources.missing("distill", StageResources(nproc_per_node=2)) is None
    cpu = resources.missing("distill", StageResources(nproc_per_node=8))
    assert cpu == ("resources.distill: 8 CPU processes need 8 CPU cores; this machine has 2")
    gpu = resources.missing("distill", StageResources(nproc_per_node=2, device="cuda"))
    assert "need 2 CUDA device(s); this machine has 0" in gpu and "\n" not in gpu
    with pytest.raises(resources.ResourceError, match="CUDA"):
        resources.check_machine(resources.Resources(distill=StageResources(device="cuda")))


def test_refused_before_launch(monkeypatch, tmp_path, tiny_llama_ref):
    import tasks.core.resources as resources

    monkeypatch.setattr(resources, "usable_cpus", lambda: 2)
    ctx = StageContext(out_dir=tmp_path / "kd", teacher=tiny_llama_ref)
    with pytest.raises(resources.ResourceError, match="need 64 CPU cores"):
        launch_distill(tiny_llama_ref, kd_cfg(), ctx, StageResources(nproc_per_node=64))
    assert not (tmp_path / "kd").exists()


def test_torchrun_command_single_and_multi_node(tmp_path):
    from tasks.distill.launch import torchrun_command

    one = torchrun_command(StageResources(nproc_per_node=4, device="cuda", strategy="fsdp"),
                           ["--x"], tmp_path, "run-1")
    assert one[1:3] == ["-m", "torch.distributed.run"]
    assert one[one.index("--nproc-per-node") + 1] == "4"
    assert one[one.index("--rdzv-conf") + 1] == "store_type=file"  # no TCP rendezvous server
    assert one[one.index("--local-addr") + 1] == "127.0.0.1"
    assert one[-3:] == ["-m", "tasks.distill.worker", "--x"]
    many = torchrun_command(StageResources(nproc_per_node=8, nnodes=2, device="cuda",
                                           rdzv_endpoint="10.0.0.1:29400"), [], tmp_path, "r")
    assert many[many.index("--rdzv-endpoint") + 1] == "10.0.0.1:29400"
    assert "--local-addr" not in many and "--rdzv-conf" not in many


def test_recipe_resources_validated(tmp_path):
    from tasks.core.recipe import RecipeError, parse_recipe
    from tasks.distill.launch import distill_runner
    from tasks.pipeline import stage_runner

    base = {"name": "r", "model": "m", "stages": [
        {"prune": {"ffn": {"ratio": 0.5}}}, {"distill": {"batch_size": 4}}]}
    default = parse_recipe(base)
    assert not default.resources.distill.launched
    assert stage_runner("distill", default.resources) is distill_stage

    two = parse_recipe({**base, "resources": {"distill": {"nproc_per_node": 2}}})
    assert two.resources.distill.world_size == 2
    assert stage_runner("distill", two.resources) is not distill_stage
    assert distill_runner(two.resources.distill).__name__ == "run"

    with pytest.raises(RecipeError, match=r"batch_size: 4 does not split over .* 3 processes"):
        parse_recipe({**base, "resources": {"distill": {"nproc_per_node": 3}}})
    with pytest.raises(RecipeError, match="resources.distill.gpus: unknown key; allowed keys: "
                                          "nproc_per_node"):
        parse_recipe({**base, "resources": {"distill": {"gpus": 2}}})
    with pytest.raises(RecipeError, match="resources.prune: unknown key; allowed keys: distill"):
        parse_recipe({**base, "resources": {"prune": {}}})
    with pytest.raises(RecipeError, match="rdzv_endpoint"):
        parse_recipe({**base, "resources": {"distill": {"nnodes": 2}}})


def test_cli_refuses_run_the_machine_cannot_host(tmp_path):
    import subprocess
    import sys

    import yaml

    from tasks.core.common import REPO_ROOT

    recipe = tmp_path / "big.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "big", "model": "smollm2-135m",
        "stages": [{"prune": {"ffn": {"ratio": 0.5}}}, {"distill": {"batch_size": 512}}],
        "resources": {"distill": {"nproc_per_node": 512}}}))
    done = subprocess.run([sys.executable, "-m", "pkdq", "run", str(recipe), "--runs-dir",
                           str(tmp_path / "runs")], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: resources.distill: 512 CPU processes need 512 CPU cores; this machine has "
        f"{len(__import__('os').sched_getaffinity(0))}"]
    assert not (tmp_path / "runs").exists()
