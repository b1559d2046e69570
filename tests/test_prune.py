"""Prune stage on a tiny random Llama: sizes, slicing exactness, reload in stock transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tasks.common import StageContext
from tasks.model_store import load_model
from tasks.prune import (
    decoder_layers,
    ffn_activation_importance,
    kept_ffn_size,
    prune_stage,
    select_top,
    slice_ffn,
)
from tasks.recipe import FfnTarget, PruneConfig, TextSample


@pytest.mark.parametrize(
    ("total", "target", "round_to", "kept"),
    [
        (1536, FfnTarget(ratio=0.25), 32, 1152),
        (1536, FfnTarget(ratio=0.5), 32, 768),
        (1536, FfnTarget(ratio=0.3), 32, 1088),  # 1075.2 -> nearest multiple of 32
        (1536, FfnTarget(size=1000), 64, 1024),
        (128, FfnTarget(ratio=0.99), 32, 32),  # never below one multiple
    ],
)
def test_kept_size_rounds_to_multiple(total, target, round_to, kept):
    assert kept_ffn_size(total, target, round_to) == kept


def test_size_larger_than_model_is_refused():
    with pytest.raises(ValueError, match="exceeds"):
        kept_ffn_size(128, FfnTarget(size=256), 32)


def test_slicing_keeps_exactly_the_function_of_kept_neurons(tiny_llama_ref):
    """Zeroing the dropped neurons in the full model must equal the sliced model's output."""
    model, _ = load_model(tiny_llama_ref)
    ids = torch.randint(0, 1000, (2, 16))
    keep = [torch.arange(0, 128, 2), torch.arange(64, 128)]
    masked, _ = load_model(tiny_llama_ref)
    for layer, index in zip(decoder_layers(masked), keep, strict=True):
        mask = torch.zeros(128, dtype=torch.bool)
        mask[index] = True
        layer.mlp.down_proj.weight.data[:, ~mask] = 0
    slice_ffn(model, keep)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, masked(ids).logits, atol=1e-5)
    assert model.config.intermediate_size == 64


def test_activation_importance_is_mean_abs_down_input(tiny_llama_ref):
    model, _ = load_model(tiny_llama_ref)
    ids = torch.randint(0, 1000, (3, 8))
    captured = []
    handle = decoder_layers(model)[0].mlp.down_proj.register_forward_pre_hook(
        lambda _m, inp: captured.append(inp[0].detach().clone()))
    scores = ffn_activation_importance(model, ids, batch_size=2)
    handle.remove()
    expected = torch.cat([c.reshape(-1, 128) for c in captured]).abs().mean(0)
    assert torch.allclose(scores[0].float(), expected, atol=1e-6)
    top = select_top(scores, 32)[0]
    assert set(top.tolist()) == set(torch.topk(expected, 32).indices.tolist())


@pytest.mark.parametrize("criterion", ["activation", "magnitude", "random"])
def test_prune_stage_saves_a_dense_checkpoint_that_reloads(tiny_llama_ref, tmp_path, criterion):
    cfg = PruneConfig(ffn=FfnTarget(ratio=0.5, criterion=criterion), round_to=32,
                      calibration=TextSample(samples=4, seq_len=32))
    result = prune_stage(tiny_llama_ref, cfg, StageContext(out_dir=tmp_path, seed=0))
    assert result.metrics["ffn_size_after"] == 64
    assert result.metrics["params_after"] < result.metrics["params_before"]
    reloaded = AutoModelForCausalLM.from_pretrained(str(result.model.path))
    assert reloaded.config.intermediate_size == 64
    assert reloaded.model.layers[0].mlp.gate_proj.weight.shape == (64, 64)
    assert reloaded.model.layers[1].mlp.down_proj.weight.shape == (64, 64)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    out = reloaded.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)
