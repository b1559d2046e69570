"""Mixed 4/8-bit GGUF (`quantize.gguf_q8_layers`): the chosen layers are Q8_0 of the float
input, every other linear keeps the GPTQ grid code for code, the bytes are what the plan said,
and llama.cpp runs the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pkdq.cli import app
from tasks.quantize.mixed_layers import (
    extra_bytes,
    ggml_round_trip,
    layer_weight_keys,
    layers_within,
)


def _quantize(model: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["quantize", str(model), "--method", "rtn", "--group", "32",
                                    "--out", str(out), "--threads", "1", "--gguf", "q4_0",
                                    *extra])


def _tensors(path: Path) -> dict:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _decoded(tensor) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)


@pytest.fixture(scope="module")
def four_bit(tiny_llama_ref, tmp_path_factory):
    """The tiny Llama as RTN W4 sym g32 with a plain q4_0 GGUF: the reference every mixed file
    is compared with."""
    out = tmp_path_factory.mktemp("four-bit") / "q"
    result = _quantize(tiny_llama_ref.path, out)
    assert result.exit_code == 0, result.output
    return out


def test_one_layer_in_q8_0_is_the_float_input_and_the_rest_stays_exact(tiny_llama_ref, four_bit,
                                                                        tmp_path):
    """`--q8-layers 1`: one decoder layer's seven linears are Q8_0 of the float input, the other
    layer's are the plain file's Q4_0 blocks byte for byte, the file grows by exactly the bytes
    the plan counted, transformers' GGUF reader gives the mix's logits, and the choice is the
    layer whose Q8_0 won back more held-out KL."""
    import gguf

    from tasks.core.model_store import load_model

    out = tmp_path / "q"
    result = _quantize(tiny_llama_ref.path, out, "--q8-layers", "1")
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())["gguf"]
    plan = m["q8_layers"]
    assert len(plan["layers"]) == 1 and m["q8_0_layers"] == plan["layers"]
    chosen = plan["layers"][0]
    assert [row["layer"] for row in plan["scores"]] and len(plan["scores"]) == 2
    assert plan["scores"][0]["layer"] == chosen
    assert plan["scores"][0]["gain"] >= plan["scores"][1]["gain"]
    assert plan["heldout"]["source"] == "wikipedia held-out"
    assert f"q8_0 layers [{chosen}]" in result.output

    mixed, plain = _tensors(out / "model.gguf"), _tensors(four_bit / "model.gguf")
    float_model, _ = load_model(tiny_llama_ref.path)
    state = float_model.state_dict()
    for name, tensor in mixed.items():
        layer = int(name.split(".")[1]) if name.startswith("blk.") else None
        if layer == chosen and len(tensor.shape) == 2:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0, name
        else:  # the embedding, norms and the other layer: exactly the plain file's
            assert tensor.tensor_type == plain[name].tensor_type, name
            assert np.array_equal(tensor.data, plain[name].data), name
    down = mixed[f"blk.{chosen}.ffn_down.weight"]  # not permuted: compare with the float input
    want = ggml_round_trip(state[f"model.layers.{chosen}.mlp.down_proj.weight"]).numpy()
    assert np.array_equal(_decoded(down).reshape(want.shape), want)
    assert m["bytes"] - (four_bit / "model.gguf").stat().st_size == \
        plan["extra_bytes"][str(chosen)]
    check = m["verification"]  # transformers' GGUF reader against the mix itself
    assert check["top1_agreement"] >= 0.99 and check["kl_nats"] < 1e-4, check


def test_a_budget_buys_the_layers_that_fit(tiny_llama_ref, four_bit, tmp_path):
    """`--q8-budget-mb`: room for one layer gives one, room for none gives the 4-bit file, and
    the label names the mix; llama.cpp runs the mixed file to the same perplexity as its
    weights in torch, within its own 8-bit activation arithmetic."""
    from tasks.core.llama_cpp import gguf_type_label, llama_cpp_perplexity

    base = (four_bit / "model.gguf").stat().st_size
    one = tmp_path / "one" / "q"  # a folder named as the fixture's: the same GGUF name key
    result = _quantize(tiny_llama_ref.path, one, "--q8-budget-mb", f"{(base + 25_000) / 1e6}")
    assert result.exit_code == 0, result.output
    m = json.loads((one / "metrics.json").read_text())["gguf"]
    extra = m["q8_layers"]["extra_bytes"]
    assert extra == {"0": 36_864 // 32 * 16, "1": 36_864 // 32 * 16}  # 36,864 weights a layer
    assert len(m["q8_layers"]["layers"]) == 1 and m["bytes"] == base + extra["0"]
    assert m["q8_layers"]["limit"]["four_bit_bytes"] == base
    label = gguf_type_label(one / "model.gguf")[3]
    assert label == f"q4_0, layers {m['q8_layers']['layers'][0]} q8_0, embedding q8_0", label
    ids = torch.randint(0, 1000, (300,)).tolist()
    llama = llama_cpp_perplexity(one / "model.gguf", ids=ids, max_length=128, threads=1)
    assert np.isfinite(llama["token_perplexity"])

    none = tmp_path / "none" / "q"
    result = _quantize(tiny_llama_ref.path, none, "--q8-budget-mb", f"{(base + 100) / 1e6}")
    assert result.exit_code == 0, result.output
    m = json.loads((none / "metrics.json").read_text())["gguf"]
    assert m["q8_layers"]["layers"] == [] and m["bytes"] == base
    assert gguf_type_label(none / "model.gguf")[3] == "q4_0, embedding q8_0"


@pytest.mark.parametrize("args, fragment", [
    (["--q8-layers", "1", "--q8-budget-mb", "5"], "exactly one of budget_mb"),
    (["--q8-layers", "0"], "greater than or equal to 1"),
])
def test_bad_q8_options_are_one_line(tiny_llama_ref, tmp_path, args, fragment):
    result = _quantize(tiny_llama_ref.path, tmp_path / "q", *args)
    assert result.exit_code == 2 and fragment in result.output, result.output
    assert "Traceback" not in result.output


def test_layer_keys_and_bytes_follow_the_tensors():
    """Per-layer keys are the 2-D weights under `layers.N.`; a Q8_0 layer costs 16 bytes more
    per 32 weights, except rows not a multiple of 32 (F16 either way)."""
    state = {"model.embed_tokens.weight": torch.zeros(10, 64),
             "model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64),
             "model.layers.0.input_layernorm.weight": torch.zeros(64),
             "model.layers.1.mlp.down_proj.weight": torch.zeros(64, 96),
             "model.layers.1.mlp.up_proj.weight": torch.zeros(96, 40)}
    assert layer_weight_keys(state) == {
        0: ["model.layers.0.self_attn.q_proj.weight"],
        1: ["model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.up_proj.weight"]}
    assert extra_bytes(state, 0) == 64 * 64 // 32 * 16
    assert extra_bytes(state, 1) == 64 * 96 // 32 * 16


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5_000), min_size=1, max_size=12), st.integers(-1_000, 30_000))
def test_layers_within_is_greedy_down_the_ranking(sizes, room):
    """What is chosen fits, keeps the ranking's order, and every layer left out did not fit in
    the room left when its turn came."""
    ranked = list(range(len(sizes)))
    extra = dict(enumerate(sizes))
    chosen = layers_within(ranked, extra, 0, room)
    assert sum(extra[i] for i in chosen) <= max(room, 0)
    assert chosen == sorted(chosen)
    left = room
    for layer in ranked:
        if layer in chosen:
            left -= extra[layer]
        else:
            assert extra[layer] == 0 or extra[layer] > left
