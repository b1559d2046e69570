"""Budget search: candidate shapes meet the target with the required multiples; impossible
targets are refused in one line at `pkdq validate`; the real Prefect search on the tiny Llama
scores every candidate, gives the top k a short KD (sharing the prune units), resumes without
recomputing, and `pkdq run` uses the winner as its prune stage."""

from __future__ import annotations

import subprocess
import sys

import pytest
from tiny_recipes import tiny_recipe_raw, write_recipe

from tasks.core.common import read_json
from tasks.core.recipe import PruneConfig, QuantizeConfig, load_recipe
from tasks.prune import enumerate_candidates, plan_prune, spread
from tasks.prune.space import base_shape

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64,
               tie_word_embeddings=True)
TINY_TARGET = {"params": 3_180_000, "tolerance": 0.002, "max_depth_cut": 0.5,
               "max_width_cut": 0.5, "axes": ["depth", "ffn", "heads"]}


@pytest.mark.parametrize("fraction", [0.75, 0.6])
def test_candidates_meet_the_target_within_bounds_and_multiples(fraction):
    from tasks.core.dims import Dims

    prune = PruneConfig(round_to=64, target={"params": fraction})
    quant = QuantizeConfig(group_size=64)
    found = enumerate_candidates(SMOLLM2, prune, quant)
    base = base_shape(SMOLLM2).params()
    assert len(found) > 10
    for cand in found:
        assert abs(cand.params / (fraction * base) - 1) <= 0.03
        plan = plan_prune(Dims.from_config(SMOLLM2), cand.prune)  # the prune stage accepts it
        after = plan.after
        assert after == cand.shape.dims
        assert after.ffn % 64 == 0 and after.hidden % 64 == 0
        assert after.hidden % after.heads == 0  # transformers refuses anything else
        assert plan.layers_removed <= 6  # max_depth_cut 0.2 of 30
        assert after.ffn >= 0.6 * 1536 and after.hidden >= 0.6 * 576
    picked = spread(found, 8)
    assert len(picked) == 8
    kinds = {tuple(k for k, v in c.cuts.items() if v) for c in picked}
    assert len(kinds) >= 3  # depth-only, width-only and mixed shapes, not 8 near-twins


def test_a_hidden_size_the_heads_do_not_divide_is_refused_by_the_plan():
    from tasks.core.dims import Dims
    from tasks.core.recipe import HiddenTarget

    with pytest.raises(ValueError, match="not a multiple of the 9 attention heads"):
        plan_prune(Dims.from_config(SMOLLM2), PruneConfig(hidden=HiddenTarget(size=512)))


def test_bytes_target_counts_the_quantized_layout():
    prune = PruneConfig(round_to=64, target={"bytes": "90MB"})
    found = enumerate_candidates(SMOLLM2, prune, QuantizeConfig(bits=4, group_size=64))
    assert found and all(abs(c.bytes / 90e6 - 1) <= 0.03 for c in found)
    eight = enumerate_candidates(SMOLLM2, prune, QuantizeConfig(bits=8, group_size=64))
    assert min(c.params for c in eight) < min(c.params for c in found)  # 8 bits: smaller shapes


def _validate(recipe):
    return subprocess.run([sys.executable, "-m", "pkdq", "validate", str(recipe)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("target, words", [
    ({"params": 0.3}, "out of reach: the deepest cuts allowed (max_depth_cut 0.2"),
    ({"params": 0.3, "axes": ["ffn"]}, "axes ffn"),
    ({"params": 2.0e9}, "not below the baseline"),
    ({**TINY_TARGET, "params": 3_175_000, "tolerance": 0.0001}, "tolerance: 0.0001 is too tight"),
])
def test_impossible_targets_are_one_line_at_validate(tmp_path, tiny_llama_ref, target, words):
    raw = tiny_recipe_raw(tiny_llama_ref.path, "tiny-target")
    raw["stages"][0]["prune"] = {"target": target, "round_to": 32,
                                 "calibration": {"samples": 4, "seq_len": 32}}
    done = _validate(write_recipe(tmp_path, raw))
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "prune.target" in lines[0], done.stderr


def test_target_and_axes_together_are_refused(tmp_path, tiny_llama_ref):
    raw = tiny_recipe_raw(tiny_llama_ref.path, "tiny-both")
    raw["stages"][0]["prune"]["target"] = {"params": 0.9}
    done = _validate(write_recipe(tmp_path, raw))
    assert done.returncode == 2 and "not both" in done.stderr


def _search_raw(model_path, name="tiny-search"):
    raw = tiny_recipe_raw(model_path, name)
    raw["stages"][0]["prune"] = {"target": TINY_TARGET, "round_to": 32,
                                 "calibration": {"samples": 4, "seq_len": 32},
                                 "search": {"candidates": 3, "top_k": 2, "tokens": 64}}
    raw["stages"] = raw["stages"][:2]
    raw["evaluate"] = {"tasks": ["arc_easy"], "samples": 2, "batch_size": 4,
                       "wikitext": {"tokens": 256, "max_length": 64, "pages": 0},
                       "speed": {"enabled": False}}
    return raw


@pytest.fixture(scope="module")
def searched(tiny_llama_ref, tmp_path_factory):
    from flows.search import run_search

    tmp = tmp_path_factory.mktemp("search")
    recipe = write_recipe(tmp, _search_raw(tiny_llama_ref.path))
    run_dir = tmp / "runs" / "tiny-search"
    report = run_search(str(recipe), str(run_dir))
    return recipe, run_dir, report


def test_every_candidate_scored_and_finalists_short_kd(searched):
    _, run_dir, report = searched
    data = read_json(run_dir / "results.json")
    rows = data["rows"]
    assert len(rows) == 3
    assert all(r["proxy_kl"] > 0 for r in rows)
    finalists = [r for r in rows if r["short_kl"] is not None]
    assert sorted(r["proxy_rank"] for r in finalists) == [1, 2]  # the top k by the proxy
    winner = rows[data["winner"]]
    assert winner["short_kl"] == min(r["short_kl"] for r in finalists)
    units = [p.name for p in (run_dir / "units").iterdir()]
    assert sum(u.endswith("-prune") for u in units) == 3  # finalists reuse their proxy's prune
    assert sum(u.endswith("-kd") for u in units) == 2
    assert "Spearman" in (run_dir / "search.md").read_text()
    assert (run_dir / "search.png").read_bytes()[:4] == b"\x89PNG"
    assert load_recipe  # the winning recipe parses with a concrete prune stage
    from tasks.core.recipe import parse_recipe

    concrete = parse_recipe(data["recipe"])
    assert concrete.stage_list()[0][1].target is None
    assert concrete.stage_list()[0][1].model_dump(mode="json") == winner["prune"]


def test_search_resumes_without_recomputing(searched):
    from flows.search import run_search

    recipe, run_dir, _ = searched
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.glob("units/*/*.done")}
    stamps.update({p: p.stat().st_mtime_ns for p in run_dir.glob("units/*/stage.json")})
    before = read_json(run_dir / "results.json")["rows"]
    run_search(str(recipe), str(run_dir))
    after = {p: p.stat().st_mtime_ns for p in run_dir.glob("units/*/*.done")}
    after.update({p: p.stat().st_mtime_ns for p in run_dir.glob("units/*/stage.json")})
    assert after == stamps
    assert read_json(run_dir / "results.json")["rows"] == before


def test_run_with_a_target_prunes_to_the_searched_shape(tmp_path, tiny_llama_ref):
    from flows.compress import compress_flow

    recipe = write_recipe(tmp_path, _search_raw(tiny_llama_ref.path, "tiny-search-run"))
    run_dir = tmp_path / "runs" / "tiny-search-run"
    report = compress_flow(str(recipe), str(run_dir))
    info = read_json(run_dir / "run.json")
    result = read_json(run_dir / "search" / "results.json")
    winner = result["rows"][result["winner"]]
    assert info["search"]["winner"] == winner["label"]
    frozen = info["recipe"]["stages"][0]["prune"]
    assert frozen == winner["prune"]
    assert "Shape search" in open(report).read()


@pytest.mark.parametrize(("quantized", "head"), [(True, "bytes after quantize (MB)"),
                                                 (False, "bytes, fp32 folder (MB)")])
def test_the_table_says_which_bytes_it_counts(quantized, head):
    """A recipe without a quantize stage ships the fp32 folder: its column must not claim
    quantized bytes."""
    from tasks.search.report import render_markdown

    row = {"label": "ffn 1024", "params": 100_000_000, "bytes": 400_000_000, "proxy_kl": 1.5,
           "proxy_rank": 1, "short_kl": None, "short_rank": None}
    data = {"plan": {"target": {"params": 0.75, "tolerance": 0.03, "max_depth_cut": 0.2,
                                "max_width_cut": 0.4, "axes": ["ffn"]},
                     "enumerated": 1, "scored": 1, "top_k": 1, "short_kd_tokens": 0,
                     "quantized": quantized},
            "rows": [row], "winner": 0, "reason": "the only one", "spearman": None,
            "wall_s": 1.0}
    text = render_markdown(data)
    assert f"| {head} |" in text and "| ffn 1024 **(winner)** | 100.0 | 400.0 |" in text
