"""`quantize.equalize`: scales folded into the float model leave every family computing the same,
the search optimises the grid GPTQModel really rounds to, never makes a group worse, and the
quantize stage quantizes (and takes its Q8_0 layers from) the scaled model."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pkdq.cli import app
from tasks.quantize.equalize import EqualizeError, equalize, round_to_grid, scale_groups
from tests.families import FAMILIES, build_family


def _ids(vocab: int, rows: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_scales_leave_every_family_computing_the_same(family, smollm2_ref, tmp_path):
    """Random scales in every group of every layer: the logits do not move (Gemma's norms
    multiply by 1 + weight and its MLP reads pre_feedforward_layernorm; a wrong fold shows)."""
    from tasks.core.model_store import load_model

    model, _ = load_model(build_family(family, smollm2_ref.path, tmp_path / family))
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        before = model(ids).logits
        gen = torch.Generator().manual_seed(1)
        for layer in scale_groups(model):
            for group in layer:
                group.fold(torch.rand(group.linears[0].in_features, generator=gen) * 4 + 0.25)
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4), float((before - after).abs().max())


def test_an_architecture_without_the_layout_is_refused_in_one_line():
    class Config:
        model_type = "gpt2"

    class Model:
        config = Config()

    with pytest.raises(EqualizeError, match=r"^quantize.equalize: gpt2 is not supported \("):
        scale_groups(Model())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([4, 8]), sym=st.booleans(),
       spread=st.floats(0.01, 100.0))
def test_the_grid_has_two_to_the_bits_levels_per_group_and_rounds_to_the_nearest(
        seed, bits, sym, spread):
    weight = torch.randn(3, 64, generator=torch.Generator().manual_seed(seed)) * spread
    got = round_to_grid(weight, bits, 32, sym).reshape(-1, 32)
    blocks = weight.reshape(-1, 32)
    top = 2 ** bits - 1
    for block, rounded in zip(blocks, got, strict=True):
        if sym:
            step = 2 * block.abs().max() / top
            low, high = -(top + 1) / 2 * step, (top - 1) / 2 * step
        else:
            low, high = min(float(block.min()), 0.0), max(float(block.max()), 0.0)
            step = (high - low) / top
        assert len(torch.unique(rounded)) <= top + 1
        inside = (block >= low - 1e-6) & (block <= high + 1e-6)
        assert float((rounded - block)[inside].abs().max()) <= step * 0.5 + 1e-5 * spread


def test_the_search_rounds_to_the_grid_gptqmodel_writes(tiny_llama_ref, tmp_path):
    """GPTQModel's RTN on the tiny model holds, weight for weight, what `round_to_grid` gives
    (up to its fp16 scales): the search optimises the quantizer's real grid."""
    from tasks.core.gptq_checkpoint import read_quantized_weights
    from tasks.core.model_store import load_model

    out = tmp_path / "rtn"
    result = CliRunner().invoke(app, ["quantize", str(tiny_llama_ref.path), "--method", "rtn",
                                      "--group", "32", "--out", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    grid = read_quantized_weights(out / "model", bits=4)
    state = load_model(tiny_llama_ref.path)[0].state_dict()
    for key, stored in grid.items():
        want = round_to_grid(state[f"{key}.weight"], 4, 32, True)
        step = 2 * state[f"{key}.weight"].reshape(-1, 32).abs().amax(-1) / 15
        off = (stored.float() - want).reshape(-1, 32).abs() / step[:, None]
        assert float(off.max()) < 0.01, key


def test_equalize_keeps_the_function_and_wins_on_an_outlier_channel(tiny_llama_ref):
    """An input channel 30x louder than the rest (its weights 30x smaller, so the model is the
    same): the search finds a scale, the rounding error drops, the logits stay put."""
    from tasks.core.model_store import load_model

    model, _ = load_model(tiny_llama_ref)
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.input_layernorm.weight[3] *= 30
        for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            linear.weight[:, 3] /= 30
    ids = _ids(model.config.vocab_size, rows=4, length=64, seed=2)
    with torch.no_grad():
        before = model(ids).logits
    record = equalize(model, ids, bits=4, group_size=32, sym=True)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)
    assert [row["layer"] for row in record["layers"]] == [0, 1]
    first = record["layers"][0]["qkv"]
    assert first["alpha"] > 0 and first["error_ratio"] < 0.9, first
    for row in record["layers"]:
        for name in ("qkv", "gate_up", "down"):
            assert row[name]["error_ratio"] <= 1.0, (row, name)
    assert record["tokens"] == ids.numel()


def test_the_stage_quantizes_the_scaled_model_and_leaves_no_copy(tiny_llama_ref, tmp_path):
    """`pkdq quantize --equalize` with a mixed GGUF: the record is in the metrics, the folded
    norms are in the quantized folder, the scaled copy is gone, llama.cpp's file is written."""
    from safetensors.torch import load_file

    out = tmp_path / "eq"
    result = CliRunner().invoke(app, [
        "quantize", str(tiny_llama_ref.path), "--method", "rtn", "--group", "32", "--equalize",
        "--samples", "2", "--seq-len", "64", "--out", str(out), "--threads", "1",
        "--gguf", "q4_0", "--q8-layers", "1"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["layer"] for row in metrics["equalize"]["layers"]] == [0, 1]
    assert metrics["equalize"]["tokens"] == 2 * 64
    assert metrics["gguf"]["q8_0_layers"] and (out / "model.gguf").stat().st_size > 0
    assert not (out / "equalized").exists()
    source = load_file(str(tiny_llama_ref.path / "model.safetensors"))
    stored = load_file(str(out / "model" / "model.safetensors"))
    key = "model.layers.0.input_layernorm.weight"
    moved = metrics["equalize"]["layers"][0]["qkv"]["alpha"] > 0
    assert moved == (not torch.allclose(source[key].float(), stored[key].float(), atol=1e-3))


def test_equalize_with_awq_is_refused_in_one_line(tiny_llama_ref, tmp_path):
    result = CliRunner().invoke(app, ["quantize", str(tiny_llama_ref.path), "--method", "awq",
                                      "--equalize", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "awq searches its own scales" in lines[0], result.output


def test_gptq_clipping_search_keeps_the_q4_0_file_exact(tiny_llama_ref, tmp_path):
    """`--mse 2.4`: GPTQModel searches each group's range but keeps the zero point, so the GPTQ
    grid is still Q4_0 code for code, and the search changed the stored scales."""
    from tasks.core.gptq_checkpoint import read_quantized_weights

    runs = {}
    for mse in ("0", "2.4"):
        out = tmp_path / f"mse{mse}"
        result = CliRunner().invoke(app, [
            "quantize", str(tiny_llama_ref.path), "--group", "32", "--mse", mse, "--samples",
            "4", "--seq-len", "64", "--out", str(out), "--threads", "1", "--gguf", "q4_0"])
        assert result.exit_code == 0, result.output
        gguf = json.loads((out / "metrics.json").read_text())["gguf"]
        assert gguf["exact_grid"] is True and gguf["weight_error"]["max_abs"] == 0, gguf
        runs[mse] = read_quantized_weights(out / "model", bits=4)
    assert any(not torch.equal(runs["0"][key], runs["2.4"][key]) for key in runs["0"])


def test_clipping_search_outside_gptq_is_refused_in_one_line(tiny_llama_ref, tmp_path):
    result = CliRunner().invoke(app, ["quantize", str(tiny_llama_ref.path), "--method", "rtn",
                                      "--mse", "2.4", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "mse is GPTQ's clipping search" in lines[0], result.output
