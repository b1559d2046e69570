"""The recipe validator: typed recipes, one-line errors naming file, key path and what's allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pkdq.cli import app
from tasks.core.recipe import RecipeError, list_recipes, load_recipe, parse_recipe

BROKEN = Path(__file__).parent / "recipes"
runner = CliRunner()


def test_every_shipped_recipe_validates():
    names = [name for name, _ in list_recipes()]
    assert "smollm2-ffn25-kd-w4" in names
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name


@pytest.mark.parametrize(
    ("file", "expected"),
    [
        ("unknown-key.yaml",
         "stages[0].prune.ffn.critrion: unknown key; allowed keys: ratio, size"),
        ("bad-order.yaml", "P-KD-Q rule"),
        ("bad-ratio.yaml", "stages[0].prune.ffn.ratio: Input should be less than 1 (got 1.5)"),
    ],
)
def test_cli_validate_rejects_broken_recipes_in_one_line(file, expected):
    result = runner.invoke(app, ["validate", str(BROKEN / file)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert expected in lines[0]
    assert file in lines[0]


def test_cli_validate_accepts_named_recipe():
    result = runner.invoke(app, ["validate", "smollm2-ffn25-kd-w4"])
    assert result.exit_code == 0, result.output
    assert "prune -> distill -> quantize" in result.output


def _minimal(**overrides):
    raw = {"name": "t", "stages": [{"prune": {"ffn": {"ratio": 0.25}}}]}
    raw.update(overrides)
    return raw


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (_minimal(colour="red"), "colour: unknown key; allowed keys: name, description, model"),
        (_minimal(seed="abc"), "seed: Input should be a valid integer"),
        (_minimal(stages=[{"shrink": {}}]), "unknown stage 'shrink'; allowed: prune, distill"),
        (_minimal(stages=[{"prune": {"ffn": {"ratio": 0.2, "size": 64}}}]), "exactly one of"),
        (_minimal(stages=[{"prune": {"ffn": {"ratio": 0.2}}}, {"distill": {"lr": -1}}]),
         "stages[1].distill.lr: Input should be greater than 0"),
        (_minimal(stages=[{"distill": {"tokens": 10}}]), "distill without a prune stage"),
        (_minimal(stages=[{"prune": {"ffn": {"ratio": 0.2}}}, {"quantize": {"bits": 3}}]),
         "stages[1].quantize.bits: Input should be 4 or 8"),
        (_minimal(stages=[{"quantize": {}}, {"distill": {}}]), "P-KD-Q rule"),
        (_minimal(evaluate={"tasks": ["not a task name"]}), "evaluate.tasks[0]"),
    ],
)
def test_parse_errors_name_key_path(raw, fragment):
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw, "my.yaml")
    message = str(info.value)
    assert message.startswith("my.yaml: ")
    assert "\n" not in message
    assert fragment in message


def test_invalid_yaml_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nstages: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(path))


def test_unknown_named_recipe_lists_known_ones():
    with pytest.raises(RecipeError, match="named recipes: .*smollm2-ffn25-kd-w4"):
        load_recipe("no-such-recipe")


def test_recipe_round_trips_through_yaml(tmp_path):
    recipe = load_recipe("smollm2-ffn25-kd-w4")
    path = tmp_path / "copy.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    assert load_recipe(str(path)) == recipe


# Files that are not recipes, values no run survives ------------------------------------------


@pytest.mark.parametrize(("data", "fragment"), [
    (b"name: x\nmodel: caf\xe9\n", "not UTF-8 text (byte 0xe9 at offset 18); save the recipe as "
                                   "UTF-8"),
    (bytes(range(256)), "not UTF-8 text (byte 0x80 at offset 128)"),
    (b"", "a recipe is a YAML mapping"),
    (b"name: [" * 5000, "not valid YAML"),
    (b"name: x\x00\n", "not valid YAML"),
    (b"name: !!python/object/apply:os.system [echo hi]\n", "not valid YAML"),
    (b"x: " + b"y" * (1 << 20), "bytes; a recipe is a short YAML file"),
])
def test_unreadable_files_are_one_line(tmp_path, data, fragment):
    path = tmp_path / "bad.yaml"
    path.write_bytes(data)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), result.output
    assert fragment in lines[0]


@pytest.mark.parametrize(("raw", "fragment"), [
    (_minimal(seed=-1), "seed: Input should be greater than or equal to 0"),
    (_minimal(seed=2**32), "seed: Input should be less than or equal to 4294967295"),
    (_minimal(stages=[{"prune": {"ffn": {"ratio": 0.2}}}, {"distill": {"tokens": 10**22}}]),
     "stages[1].distill.tokens: Input should be less than or equal to 100000000000"),
    (_minimal(stages=[{"prune": {"ffn": {"ratio": 0.2}}}, {"distill": {"lr": float("nan")}}]),
     "stages[1].distill.lr: Input should be a finite number"),
    (_minimal(stages=[{"prune": {"ffn": {"ratio": 0.2}}},
                      {"distill": {"temperature": float("inf")}}]),
     "stages[1].distill.temperature: Input should be a finite number"),
    (_minimal(stages=[{"prune": {"ffn": {"ratio": 0.2}}}, {"distill": {"batch_size": 10**6}}]),
     "stages[1].distill.batch_size: Input should be less than or equal to 4096"),
    (_minimal(name="n" * 101), "name: String should have at most 100 characters"),
    (_minimal(model=""), "model: String should have at least 1 character"),
    (_minimal(description="d" * 10_001), "(got 'dddddddd"),
])
def test_out_of_range_values_are_refused(raw, fragment):
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw, "my.yaml")
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert len(str(info.value)) < 400  # the offending value is shown cut short


@pytest.mark.parametrize("name", ["../tests/recipes/bad-order", "recipes/../x", "a/b", "-x"])
def test_named_recipes_are_names_not_paths(name):
    with pytest.raises(RecipeError, match="not found; named recipes"):
        load_recipe(name)


def test_cli_validate_refuses_a_model_it_cannot_find(tmp_path):
    path = tmp_path / "gone.yaml"
    path.write_text(yaml.safe_dump(_minimal(model="/nonexistent/pkdq-model")))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {path}: model '/nonexistent/pkdq-model' not found offline: looked for a "
        "built-in name (smollm2-135m, gemma3-270m), a local folder with config.json, a .gguf "
        "file, and an HF id in the local HF cache (HF_HOME); pkdq never downloads"]


def test_validate_stays_torch_free():
    """validate resolves the model, data and prune targets offline without importing torch,
    numpy or transformers: it is the check people run in a loop while editing a recipe."""
    import subprocess
    import sys

    from tasks.core.common import REPO_ROOT

    code = ("import sys\nfrom typer.testing import CliRunner\nfrom pkdq.cli import app\n"
            "result = CliRunner().invoke(app, ['validate', 'smollm2-ffn25-kd-w4'])\n"
            "assert result.exit_code == 0, result.output\n"
            "print(sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules))")
    # The first validate of a recipe measures its contamination (numpy hashes the n-grams) and
    # caches the result by content; every later one, the loop people run, reads the cache.
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_llama_cpp_speed_is_its_own_unit_and_off_unless_asked():
    """`evaluate.speed.llama_cpp`: on in the default and llama.cpp recipes, off by default; it
    never enters the evaluation's key or an unset dump (finished evaluations stay reusable)."""
    from tasks.core.recipe import EvalConfig

    for name in ("smollm2-ffn25-kd-w4", "smollm2-ffn25-kd-w4-llamacpp"):
        speed = load_recipe(name).evaluate.speed
        assert speed.llama_cpp_on() and speed.llama_cpp.types == ["f16", "q4_0"]
    plain, timed = EvalConfig(), EvalConfig(speed={"llama_cpp": {"types": ["q4_k_m"]}})
    assert "llama_cpp" not in plain.model_dump(mode="json")["speed"]
    assert plain.unit_config() == timed.unit_config() == plain.model_dump(mode="json")
    assert not plain.speed.llama_cpp_on()
    assert not EvalConfig(speed={"llama_cpp": {"enabled": False}}).speed.llama_cpp_on()
    assert timed.speed.prompt_within(256) == 192 and timed.speed.prompt_within(None) == 512
    for types, fragment in ((["f16", "f16"], "types must be unique"),
                            (["q3_k"], "evaluate.speed.llama_cpp.types[0]: Input should be")):
        with pytest.raises(RecipeError) as info:
            parse_recipe(_minimal(evaluate={"speed": {"llama_cpp": {"types": types}}}), "my.yaml")
        assert fragment in str(info.value) and "\n" not in str(info.value)


def test_gguf_q8_layers_needs_q4_0_and_one_target_and_stays_out_of_unset_dumps():
    """`quantize.gguf_q8_layers` mixes Q8_0 layers into a q4_0 file only, takes a budget or a
    count (not both, not neither), each refusal one line; unset, it never enters the stage's
    dump (finished quantize stages keep their keys)."""
    from tasks.core.recipe import QuantizeConfig

    assert "gguf_q8_layers" not in QuantizeConfig(gguf="q4_0").model_dump(mode="json")
    cfg = QuantizeConfig(gguf="q4_0", gguf_q8_layers={"budget_mb": 80.7})
    assert cfg.model_dump(mode="json")["gguf_q8_layers"]["budget_mb"] == 80.7
    stages = [{"prune": {"ffn": {"ratio": 0.2}}}, {"distill": {}}]
    for quantize, fragment in (
            ({"gguf": "q8_0", "gguf_q8_layers": {"count": 2}}, "set gguf: q4_0"),
            ({"gguf_q8_layers": {"count": 2}}, "set gguf: q4_0"),
            ({"gguf": "q4_0", "gguf_q8_layers": {"count": 2, "budget_mb": 80}},
             "exactly one of budget_mb"),
            ({"gguf": "q4_0", "gguf_q8_layers": {}}, "exactly one of budget_mb"),
            ({"gguf": "q4_0", "gguf_q8_layers": {"budget_mb": -1}}, "greater than 0")):
        with pytest.raises(RecipeError) as info:
            parse_recipe(_minimal(stages=[*stages, {"quantize": quantize}]), "my.yaml")
        assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_gguf_embedding_needs_a_gguf_it_can_set_and_stays_out_of_unset_dumps():
    """`quantize.gguf_embedding` is refused in one line without a gguf it applies to, and an
    unset one never enters the quantize stage's dump (finished stages keep their keys)."""
    from tasks.core.recipe import QuantizeConfig

    assert "gguf_embedding" not in QuantizeConfig(gguf="q4_0").model_dump(mode="json")
    assert QuantizeConfig(gguf="q4_0", gguf_embedding="q4_0").model_dump()["gguf_embedding"] \
        == "q4_0"
    stages = [{"prune": {"ffn": {"ratio": 0.2}}}, {"distill": {}}]
    for quantize in ({"gguf_embedding": "q4_0"}, {"gguf": "q4_k_m", "gguf_embedding": "q8_0"}):
        with pytest.raises(RecipeError) as info:
            parse_recipe(_minimal(stages=[*stages, {"quantize": quantize}]), "my.yaml")
        assert "gguf_embedding applies to gguf f16, q8_0 or q4_0" in str(info.value)
        assert "\n" not in str(info.value)
