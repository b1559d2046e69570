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


def test_one_layer_in_q8_0_is_the_float_input_and_the_rest_stays_exact(tiny_llama_ref, tmp_path):
    """`--q8-layers 1`: one decoder layer's seven linears are Q8_0 of the float input, the other
    layer's are the GPTQ grid code for code (Q4_0), transformers' GGUF reader gives the mix's
    logits, and the choice is the layer whose Q8_0 won back more held-out KL."""
    import gguf

    from tasks.core.gptq_checkpoint import read_quantized_weights
    from tasks.core.model_store import load_model

    out = tmp_path / "q"
    result = _quantize(tiny_llama_ref.path, out, "--q8-layers", "1")
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())["gguf"]
    plan = m["q8_layers"]
    assert len(plan["layers"]) == 1 and m["q8_0_layers"] == plan["layers"]
    chosen = plan["layers"][0]
    assert sorted(row["layer"] for row in plan["scores"]) == [0, 1]
    assert plan["scores"][0]["layer"] == chosen
    assert plan["scores"][0]["gain"] >= plan["scores"][1]["gain"]
    assert plan["heldout"]["source"] == "wikipedia held-out"
    assert f"q8_0 layers [{chosen}]" in result.output

    tensors = _tensors(out / "model.gguf")
    for name, tensor in tensors.items():
        if name.startswith("blk.") and len(tensor.shape) == 2:
            want = "Q8_0" if int(name.split(".")[1]) == chosen else "Q4_0"
            assert tensor.tensor_type == gguf.GGMLQuantizationType[want], name
    grid = read_quantized_weights(out / "model", bits=4)
    float_state = load_model(tiny_llama_ref.path)[0].state_dict()
    for layer in (0, 1):  # the MLP rows are not permuted: compare them with their sources as-is
        for module, part in (("down_proj", "ffn_down"), ("gate_proj", "ffn_gate"),
                             ("up_proj", "ffn_up")):
            key = f"model.layers.{layer}.mlp.{module}"
            got = _decoded(tensors[f"blk.{layer}.{part}.weight"])
            want = (ggml_round_trip(float_state[f"{key}.weight"]) if layer == chosen
                    else grid[key]).numpy()
            assert np.array_equal(got.reshape(want.shape), want), key
    check = m["verification"]  # transformers' GGUF reader against the mix itself
    assert check["top1_agreement"] >= 0.99 and check["kl_nats"] < 1e-4, check


def test_a_budget_buys_the_layers_that_fit(tiny_llama_ref, tmp_path):
    """`--q8-budget-mb` with room for one layer and a half: one layer, and the file grows by
    exactly the bytes the plan counted over the 4-bit file; the label names the mix; llama.cpp
    runs the mixed file."""
    from tasks.core.llama_cpp import gguf_type_label, llama_cpp_perplexity

    per_layer = 36_864 // 32 * 16  # 36,864 weights a layer, 16 bytes more per 32 in Q8_0
    probe = _quantize(tiny_llama_ref.path, tmp_path / "probe" / "q", "--q8-budget-mb", "0.001")
    assert probe.exit_code == 0, probe.output  # nothing fits: the 4-bit file, its size known
    m = json.loads((tmp_path / "probe" / "q" / "metrics.json").read_text())["gguf"]
    base = m["q8_layers"]["limit"]["four_bit_bytes"]
    assert m["q8_layers"]["layers"] == [] and m["bytes"] == base
    assert "no layer fits" in probe.output

    out = tmp_path / "one" / "q"  # named as the probe's folder: the same GGUF name key
    budget = (base + per_layer * 3 // 2) / 1e6
    result = _quantize(tiny_llama_ref.path, out, "--q8-budget-mb", f"{budget}")
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())["gguf"]
    assert m["q8_layers"]["extra_bytes"] == {"0": per_layer, "1": per_layer}
    assert m["q8_layers"]["limit"]["four_bit_bytes"] == base
    assert len(m["q8_layers"]["layers"]) == 1 and m["bytes"] == base + per_layer
    label = gguf_type_label(out / "model.gguf")[3]
    assert label == f"q4_0, layers {m['q8_layers']['layers'][0]} q8_0, embedding q8_0", label
    ids = torch.randint(0, 1000, (300,)).tolist()
    llama = llama_cpp_perplexity(out / "model.gguf", ids=ids, max_length=128, threads=1)
    assert np.isfinite(llama["token_perplexity"])


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
    assert extra_bytes(state) == {0: 64 * 64 // 32 * 16, 1: 64 * 96 // 32 * 16}


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


def test_prefix_replay_scores_every_layer_as_full_forwards_do(tiny_llama_ref):
    """`rank_layers` replays the layers before the swapped one from the base pass; each KL equals
    the one a full forward of the same mixed model gives, and the model is left as it was."""
    import copy

    from transformers import AutoModelForCausalLM

    from tasks.core.model_store import load_model
    from tasks.quantize.mixed_layers import decoder_layers, rank_layers

    config = load_model(tiny_llama_ref.path)[0].config
    config.num_hidden_layers = 4  # layers 2 and 3 replay more than one layer
    torch.manual_seed(0)
    float_model = AutoModelForCausalLM.from_config(config).eval()
    quantized = copy.deepcopy(float_model)
    state = quantized.state_dict()
    keys = layer_weight_keys(state)
    with torch.no_grad():  # a coarse grid: every layer loses something
        for layer_keys in keys.values():
            for key in layer_keys:
                weight = state[key]
                step = weight.abs().amax() / 3
                weight.copy_(torch.round(weight / step) * step)
    before = {k: v.clone() for k, v in state.items()}
    ids = torch.randint(0, float_model.config.vocab_size, (3, 24),
                        generator=torch.Generator().manual_seed(3))
    base, scores = rank_layers(quantized, float_model, ids, batch=2)

    def full_kl() -> float:
        with torch.no_grad():
            ref = torch.log_softmax(float_model(ids).logits.float(), -1)
            got = torch.log_softmax(quantized(ids).logits.float(), -1)
        return float((ref.exp() * (ref - got)).sum(-1).mean())

    assert base == pytest.approx(full_kl(), rel=1e-5)
    float_state = float_model.state_dict()
    by_layer = {row["layer"]: row["kl"] for row in scores}
    assert set(by_layer) == set(keys) == set(decoder_layers(quantized))
    for layer, layer_keys in keys.items():
        with torch.no_grad():
            for key in layer_keys:
                state[key].copy_(ggml_round_trip(float_state[key]))
        assert by_layer[layer] == pytest.approx(full_kl(), rel=1e-5), layer
        with torch.no_grad():
            for key in layer_keys:
                state[key].copy_(before[key])
    assert all(torch.equal(state[k], before[k]) for k in state)
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(quantized).values())
    assert len({row["kl"] for row in scores}) > 1  # the layers really differ
