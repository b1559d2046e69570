"""The rule check before a run: each rule fires when it should and stays silent otherwise.

Everything runs on config dicts (SmolLM2-135M's sizes) and parsed recipes: no model, no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from pkdq.cli import app
from tasks.core.recipe import Recipe, parse_recipe
from tasks.rules import RuleWarning, approx_params, rule_warnings

SMOLLM2 = {
    "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "num_hidden_layers": 30, "vocab_size": 49152, "tie_word_embeddings": True,
}
# Every width a multiple of 128, no GQA sharing (12 KV groups of one head): heads prune freely.
WIDE = {**SMOLLM2, "hidden_size": 768, "intermediate_size": 2048, "num_attention_heads": 12,
        "num_key_value_heads": 12}
UNRESOLVABLE = "/nonexistent/pkdq-model"
DISTILL = {"distill": {"tokens": 1024}}


def recipe(prune: dict[str, Any] | None = None, group: int = 64, **extra: Any) -> Recipe:
    stages: list[dict[str, Any]] = []
    if prune is not None:
        stages += [{"prune": {"round_to": 64, **prune}}, DISTILL]
    stages.append({"quantize": {"group_size": group}})
    return parse_recipe({"name": "t", "model": UNRESOLVABLE, "stages": stages, **extra})


def codes(found: list[RuleWarning]) -> list[str]:
    return [w.code for w in found]


def only(found: list[RuleWarning], code: str) -> RuleWarning:
    hits = [w for w in found if w.code == code]
    assert len(hits) == 1, codes(found)
    return hits[0]


def test_param_estimate_matches_smollm2():
    from tasks.core.dims import Dims

    assert approx_params(Dims.from_config(SMOLLM2), 49152, tied=True) == 134_515_008


# prune-over-50 ------------------------------------------------------------------------------


def test_ffn_ratio_over_half_fires_with_kept_sizes_and_citation():
    w = only(rule_warnings(recipe({"ffn": {"ratio": 0.6}}), model_config=SMOLLM2),
             "prune-over-50")
    assert "58% of FFN neurons (1536 -> 640)" in w.message  # 614.4 rounded to round_to 64
    assert "2407.14679" in w.source and w.level == "warning"
    assert "\n" not in w.message


@pytest.mark.parametrize("prune", [{"ffn": {"ratio": 0.25}}, {"ffn": {"ratio": 0.5}},
                                   {"depth": {"remove": 6}}, {"heads": {"size": 2}}])
def test_prune_up_to_half_is_silent(prune):
    assert "prune-over-50" not in codes(rule_warnings(recipe(prune), model_config=SMOLLM2))


@pytest.mark.parametrize("prune, expected", [
    ({"ffn": {"size": 512}}, "67% of FFN neurons (1536 -> 512)"),  # a size implies the ratio
    ({"depth": {"remove": 16}}, "53% of layers (30 -> 14)"),
    ({"depth": {"ratio": 0.6}}, "60% of layers (30 -> 12)"),
    ({"heads": {"size": 1}}, "67% of query heads (9 -> 3)"),  # 1 of 3 KV groups
    ({"hidden": {"ratio": 0.6}}, "56% of hidden channels (576 -> 256)"),
])
def test_every_axis_over_half_fires(prune, expected):
    w = only(rule_warnings(recipe(prune), model_config=SMOLLM2), "prune-over-50")
    assert expected in w.message


def test_over_half_of_parameters_fires_when_no_axis_does():
    halves = {"ffn": {"ratio": 0.5}, "hidden": {"ratio": 0.5}, "round_to": 32}  # 768, 288
    found = rule_warnings(recipe(halves, group=32), model_config=SMOLLM2)
    w = only(found, "prune-over-50")
    assert "of the parameters (134.5M -> " in w.message
    assert "FFN neurons" not in w.message and "hidden channels" not in w.message


def test_without_a_config_only_ratios_are_judged_and_shape_rules_skip_silently():
    found = rule_warnings(recipe({"ffn": {"ratio": 0.6}, "round_to": 128}, group=128))
    assert codes(found) == ["prune-over-50"]
    assert "60% of FFN neurons (ratio 0.6)" in found[0].message
    assert rule_warnings(recipe({"ffn": {"size": 128}})) == []


def test_a_target_the_model_cannot_meet_is_reported():
    found = rule_warnings(recipe({"heads": {"ratio": 0.5}}), model_config=SMOLLM2)
    w = only(found, "prune-target-invalid")
    assert "valid sizes" in w.message  # the prune plan's own message: 1.5 of 3 KV groups


# order rules --------------------------------------------------------------------------------


def test_production_order_is_silent():
    found = rule_warnings(recipe({"ffn": {"ratio": 0.25}}), model_config=SMOLLM2)
    assert not {"quantize-before-distill", "quantize-before-prune",
                "distill-without-prune"} & set(codes(found))


def test_quantize_before_distill_fires():
    r = recipe({"ffn": {"ratio": 0.25}})
    found = rule_warnings(r, ["prune", "quantize", "distill"])
    w = only(found, "quantize-before-distill")
    assert "2511.19495" in w.source
    assert "quantize-before-prune" not in codes(found)
    assert "distill-without-prune" not in codes(found)  # KD recovers from P (and Q)


def test_quantize_first_fires_both_order_rules():
    found = rule_warnings(recipe({"ffn": {"ratio": 0.25}}), ["quantize", "distill", "prune"])
    assert {"quantize-before-distill", "quantize-before-prune"} <= set(codes(found))
    assert "distill-without-prune" not in codes(found)  # QAT-KD recovers from quantization


def test_distill_first_is_self_distillation():
    found = rule_warnings(recipe({"ffn": {"ratio": 0.25}}), ["distill", "prune", "quantize"])
    assert only(found, "distill-without-prune").level == "info"


def test_order_must_be_a_permutation_of_the_stages():
    with pytest.raises(ValueError, match="once each"):
        rule_warnings(recipe({"ffn": {"ratio": 0.25}}), ["prune", "quantize"])


# group-size-divides, marlin-128 -------------------------------------------------------------


def test_group_128_on_hidden_576_fires_naming_layers_and_working_sizes():
    found = rule_warnings(recipe({"ffn": {"ratio": 0.25}, "round_to": 128}, group=128),
                          model_config=SMOLLM2)
    w = only(found, "group-size-divides")
    assert "group_size 128 does not divide in_features after pruning" in w.message
    assert "q/k/v/gate/up_proj in_features 576 (hidden size)" in w.message
    assert "o_proj in_features 576 (9 heads x 64)" in w.message
    assert "down_proj" not in w.message  # 1536 * 0.75 = 1152 = 9 x 128
    assert "group sizes that would work: 32, 64" in w.message


def test_group_64_on_smollm2_is_silent():
    found = rule_warnings(recipe({"ffn": {"ratio": 0.25}}), model_config=SMOLLM2)
    assert "group-size-divides" not in codes(found)


def test_pruned_heads_that_split_a_group_fire_on_o_proj_only():
    found = rule_warnings(recipe({"heads": {"size": 7}, "round_to": 128}, group=128),
                          model_config=WIDE)
    w = only(found, "group-size-divides")
    assert "o_proj in_features 448 (7 heads x 64)" in w.message
    assert "q/k/v/gate/up_proj" not in w.message and "down_proj" not in w.message


def test_quantize_before_prune_checks_both_quantization_passes():
    found = rule_warnings(recipe({"ffn": {"ratio": 0.25}, "round_to": 128}, group=128),
                          ["quantize", "distill", "prune"], model_config=SMOLLM2)
    messages = [w.message for w in found if w.code == "group-size-divides"]
    assert len(messages) == 2
    assert "before pruning" in messages[0] and "re-quantized after pruning" in messages[1]


def test_group_size_is_checked_without_a_prune_stage():
    r = parse_recipe({"name": "t", "model": UNRESOLVABLE,
                      "stages": [{"quantize": {"group_size": 128}}]})
    w = only(rule_warnings(r, model_config=SMOLLM2), "group-size-divides")
    assert "in_features of the model" in w.message


def test_marlin_note_is_info_and_silent_on_128_multiples():
    note = only(rule_warnings(recipe({"ffn": {"ratio": 0.25}}), model_config=SMOLLM2),
                "marlin-128")
    assert note.level == "info" and "q/k/v/gate/up_proj (576)" in note.message
    wide = recipe({"ffn": {"ratio": 0.25}, "round_to": 128}, group=128)
    assert rule_warnings(wide, model_config=WIDE) == []


def test_config_is_read_from_the_model_folder_when_not_given(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
    r = parse_recipe({"name": "t", "model": str(tmp_path),
                      "stages": [{"prune": {"ffn": {"size": 512}, "round_to": 64}}, DISTILL,
                                 {"quantize": {"group_size": 64}}]})
    assert "prune-over-50" in codes(rule_warnings(r))


# CLI ----------------------------------------------------------------------------------------


@pytest.fixture
def ffn60_file(tmp_path: Path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(SMOLLM2))
    raw = {"name": "ffn60", "model": str(tmp_path / "model"),
           "stages": [{"prune": {"ffn": {"ratio": 0.6}, "round_to": 64}}, DISTILL,
                      {"quantize": {"group_size": 64}}]}
    path = tmp_path / "ffn60.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cli_validate_prints_warnings_and_exits_0(ffn60_file):
    result = CliRunner().invoke(app, ["validate", str(ffn60_file)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: ffn60: prune -> distill -> quantize")
    lines = result.stderr.splitlines()
    assert any(line.startswith("warning [prune-over-50]: one-shot prune removes 58% of FFN "
                               "neurons") and line.endswith("arXiv:2407.14679)")
               for line in lines), result.stderr
    assert any(line.startswith("info [marlin-128]: ") for line in lines)


def test_cli_validate_strict_exits_1_on_warnings_but_not_on_info(ffn60_file, tmp_path):
    assert CliRunner().invoke(app, ["validate", "--strict", str(ffn60_file)]).exit_code == 1
    raw = yaml.safe_load(ffn60_file.read_text())
    raw["stages"][0]["prune"]["ffn"]["ratio"] = 0.25  # leaves only the marlin-128 info line
    mild = tmp_path / "ffn25.yaml"
    mild.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["validate", "--strict", str(mild)])
    assert result.exit_code == 0, result.output
    assert "info [marlin-128]" in result.stderr
