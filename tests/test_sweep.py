"""`pkdq sweep`: grid parsing refuses bad options in one line; the real Prefect flow on the tiny
Llama shares the prune unit between variants, selects on held-out KL, reruns the winner at the
full budget, writes a runnable winner recipe, and a second run recomputes nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from tiny_recipes import tiny_recipe_raw, write_recipe

from tasks.core.common import read_json
from tasks.core.recipe import RecipeError, load_recipe, parse_recipe
from tasks.sweep import expand, parse_grid, rank, scaled_tokens, sweep_plan


def _recipe(tmp_path, model_path, quantize: bool = False):
    raw = tiny_recipe_raw(model_path, "tiny-sweep")
    if not quantize:
        raw["stages"] = raw["stages"][:2]
    return write_recipe(tmp_path, raw)


def test_grid_values_parse_like_a_user_types_them():
    axes = parse_grid(["distill.lr=1e-4,3e-4", "distill.loss=forward_kl,jsd", "seed=1,2"])
    assert [a.key for a in axes] == ["distill.lr", "distill.loss", "seed"]
    assert axes[0].values == (1e-4, 3e-4) and axes[1].values == ("forward_kl", "jsd")
    assert axes[2].values == (1, 2)


@pytest.mark.parametrize("spec, words", [
    ("distill.lr", "KEY=V1,V2"),
    ("=1,2", "KEY=V1,V2"),
    ("distill..lr=1", "dotted key"),
    ("distill.lr=1e-4,1e-4", "listed twice"),
])
def test_malformed_grid_options_are_refused(spec, words):
    with pytest.raises(RecipeError, match=words):
        parse_grid([spec])


def test_every_variant_is_validated_as_a_recipe(tmp_path, tiny_llama_ref):
    recipe = load_recipe(str(_recipe(tmp_path, tiny_llama_ref.path)))
    variants = expand(recipe, parse_grid(["distill.lr=1e-3,2e-3", "prune.ffn.ratio=0.25,0.5"]),
                      "r.yaml")
    assert len(variants) == 4
    assert {(v.recipe.stage_list()[1][1].lr, v.recipe.stage_list()[0][1].ffn.ratio)
            for v in variants} == {(1e-3, 0.25), (1e-3, 0.5), (2e-3, 0.25), (2e-3, 0.5)}
    with pytest.raises(RecipeError, match=r"distill\.lrr: unknown key"):
        expand(recipe, parse_grid(["distill.lrr=1"]), "r.yaml")
    with pytest.raises(RecipeError, match=r"distill\.lr: .*less than 1"):
        expand(recipe, parse_grid(["distill.lr=5"]), "r.yaml")
    with pytest.raises(RecipeError, match="no quantize stage"):
        expand(recipe, parse_grid(["quantize.bits=8"]), "r.yaml")


def test_screening_scales_kd_tokens_to_whole_steps(tmp_path, tiny_llama_ref):
    recipe = load_recipe(str(_recipe(tmp_path, tiny_llama_ref.path)))  # 256 tokens, 64 a step
    assert scaled_tokens(recipe, 0.5).stage_list()[1][1].tokens == 128
    assert scaled_tokens(recipe, 0.01).stage_list()[1][1].tokens == 64  # never below one step
    no_kd = parse_recipe({**recipe.model_dump(mode="json"),
                          "stages": recipe.model_dump(mode="json")["stages"][:1]})
    with pytest.raises(RecipeError, match="no distill stage"):
        sweep_plan(no_kd, parse_grid(["seed=1,2"]), fraction=0.5)


def test_rank_breaks_ties_in_grid_order():
    rows = [{"score": {"kl": 0.5}}, {"score": {"kl": 0.2}}, {"score": {"kl": 0.2}}]
    assert [r["rank"] for r in rank(rows, "kl")] == [3, 1, 2]


def _pkdq(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pkdq", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.mark.parametrize("grid, words", [
    ("distill.lrr=1e-3", "unknown key"),
    ("quantize.bits=8", "no quantize stage"),
    ("distill.lr", "KEY=V1,V2"),
])
def test_cli_refuses_a_bad_grid_in_one_line(tmp_path, tiny_llama_ref, grid, words):
    recipe = _recipe(tmp_path, tiny_llama_ref.path)
    done = _pkdq("sweep", str(recipe), "--grid", grid, "--runs-dir", str(tmp_path / "runs"),
                 cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], done.stderr
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def swept(tiny_llama_ref, tmp_path_factory):
    from flows.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("sweep")
    recipe = _recipe(tmp, tiny_llama_ref.path)
    run_dir = tmp / "runs" / "tiny-sweep"
    plan = sweep_plan(load_recipe(str(recipe)), parse_grid(["distill.lr=1e-3,3e-2"]),
                      fraction=0.5)
    report = run_sweep(str(recipe), str(run_dir), plan.to_json())
    return recipe, run_dir, report, plan


def test_variants_share_the_prune_unit_and_the_winner_runs_in_full(swept):
    _, run_dir, report, _ = swept
    units = sorted(p.name for p in (run_dir / "units").iterdir())
    assert sum(u.endswith("-prune") for u in units) == 1  # one prune for three KD units
    assert sum(u.endswith("-kd") for u in units) == 3
    data = read_json(run_dir / "results.json")
    screen = [r for r in data["rows"] if r["phase"] == "screen"]
    full = [r for r in data["rows"] if r["phase"] == "full"]
    assert len(screen) == 2 and len(full) == 1
    assert [r["kd_tokens"] for r in screen] == [128, 128] and full[0]["kd_tokens"] == 256
    best = min(screen, key=lambda r: r["score"]["kl"])
    assert best["rank"] == 1 and data["winner"] == best["label"]
    assert full[0]["settings"] == best["settings"]
    for row in data["rows"]:  # scores are real held-out numbers, one per distinct final model
        assert row["score"]["kl"] >= 0 and row["score"]["tokens"] > 0
    assert screen[0]["score"] != screen[1]["score"]
    assert "Winner" in (run_dir / "sweep.md").read_text()
    assert (run_dir / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert read_json(run_dir / "sweep.json")["status"] == "finished"


def test_winner_recipe_is_runnable_at_the_full_budget(swept):
    _, run_dir, _, _ = swept
    raw = yaml.safe_load((run_dir / "winner.yaml").read_text())
    winner = parse_recipe(raw, "winner.yaml")
    data = read_json(run_dir / "results.json")
    lr = float(data["winner"].split("=")[1])
    assert winner.stage_list()[1][1].lr == lr and winner.stage_list()[1][1].tokens == 256


def test_rerun_recomputes_nothing(swept):
    from flows.sweep import run_sweep

    recipe, run_dir, _, plan = swept
    records = {p: p.stat().st_mtime_ns for p in run_dir.glob("units/*/stage.json")}
    scores = read_json(run_dir / "results.json")["rows"]
    run_sweep(str(recipe), str(run_dir), plan.to_json())
    assert {p: p.stat().st_mtime_ns for p in run_dir.glob("units/*/stage.json")} == records
    assert read_json(run_dir / "results.json")["rows"] == scores


def test_heldout_score_follows_the_user_data_content(tmp_path, tiny_llama_ref):
    """Two sweeps over the same path must not share a score once the file's text changed."""
    from tasks.core.recipe import DistillConfig
    from tasks.sweep.units import score_unit

    text = tmp_path / "train.txt"
    words = " ".join(f"word{i % 97}" for i in range(4000))
    text.write_text("\n\n".join([words] * 4))
    cfg = DistillConfig(tokens=256, seq_len=32, batch_size=2, eval_blocks=2,
                        data={"kind": "text", "paths": [str(text)], "heldout": 0.25})
    recipe = load_recipe(str(_recipe(tmp_path, tiny_llama_ref.path)))
    first, reused = score_unit(tmp_path / "u", tiny_llama_ref, tiny_llama_ref, cfg, recipe)
    assert not reused and first["kl"] < 1e-6  # a model against itself
    _, reused = score_unit(tmp_path / "u", tiny_llama_ref, tiny_llama_ref, cfg, recipe)
    assert reused
    text.write_text("\n\n".join([words.replace("word1", "other")] * 4))
    changed, reused = score_unit(tmp_path / "u", tiny_llama_ref, tiny_llama_ref, cfg, recipe)
    assert not reused and changed["ppl"] != first["ppl"]
