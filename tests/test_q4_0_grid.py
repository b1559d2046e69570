"""`quantize.grid: q4_0`: GPTQModel rounds to llama.cpp's own Q4_0 grid (signed-max scale, code 0
for the largest-magnitude weight), so RTN through GPTQModel is llama.cpp's Q4_0 quantizer code
for code, GPTQ's file exports exactly, and the patch never outlives the quantization."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pkdq.cli import app
from tasks.quantize.equalize import round_to_grid
from tasks.quantize.q4_0_grid import ZERO, round_q4_0, signed_max_scale


def _llama_cpp_q4_0(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes [rows, cols], fp16 scales [rows, cols // 32]) as gguf-py's Q4_0 quantizer (a port
    of llama.cpp's quantize_row_q4_0) writes them."""
    import gguf

    raw = gguf.quants.quantize(np.ascontiguousarray(weight, dtype=np.float32),
                               gguf.GGMLQuantizationType.Q4_0)
    rows = weight.shape[0]
    blocks = raw.reshape(rows, -1, 18)
    scales = blocks[..., :2].copy().view(np.float16)[..., 0]
    packed = blocks[..., 2:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, -1)
    return codes.astype(np.int16), scales


def _near_tie(weight: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Where x / d sits within 1e-3 of a rounding boundary (round-half-even vs llama.cpp's
    truncation of x * (1/d) + 8.5 may differ there, legitimately)."""
    ratio = weight.reshape(weight.shape[0], -1, 32) / scales.astype(np.float32)[..., None]
    return (np.abs(ratio - np.floor(ratio) - 0.5) < 1e-3).reshape(weight.shape)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), spread=st.floats(1e-3, 1e3),
       outlier=st.floats(-50.0, 50.0))
def test_round_q4_0_is_llama_cpps_q4_0(seed, spread, outlier):
    """Same codes as llama.cpp's quantizer (ties aside); steps of max/8 with the extreme exact."""
    weight = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed)) * spread
    weight[1, 5] = outlier * spread  # a block whose extreme may be positive or negative
    blocks = weight.reshape(-1, 32)
    scale = signed_max_scale(blocks)
    ours = torch.clamp(torch.round(blocks / scale) + ZERO, 0, 15).reshape(4, 64).numpy()
    codes, scales16 = _llama_cpp_q4_0(weight.numpy())
    assert np.allclose(scale.reshape(4, 2).numpy(), scales16.astype(np.float32), rtol=1e-3)
    differ = ours.astype(np.int16) != codes
    assert not (differ & ~_near_tie(weight.numpy(), scales16)).any()
    rounded = round_q4_0(blocks)
    assert torch.equal(round_to_grid(weight, 4, 32, True, rule="q4_0"), rounded.reshape(4, 64))
    # the extreme weight is exact; within -8..7.5 steps of the signed scale rounding is to the
    # nearest level; beyond 7.5 steps (the opposite sign only) it is clipped to the top level
    steps = blocks / scale
    assert torch.equal(rounded.gather(1, blocks.abs().argmax(1, keepdim=True)),
                       blocks.gather(1, blocks.abs().argmax(1, keepdim=True)))
    inside = steps <= 7.5
    bound = scale.abs() / 2 * (1 + 1e-5) + 1e-12
    assert bool(((rounded - blocks).abs() <= bound)[inside].all())
    assert torch.equal(rounded[~inside], (7 * scale).expand_as(blocks)[~inside])


def test_rtn_through_gptqmodel_is_llama_cpps_q4_0(tiny_llama_ref, tmp_path):
    """`pkdq quantize --method rtn --grid q4_0`: every stored code and fp16 scale is what
    llama.cpp's own Q4_0 quantizer gives the float weights (ties aside), negative scales
    included, and the GPTQModel patch is gone afterwards."""
    from gptqmodel.quantization.quantizer import Quantizer

    from tasks.core.model_store import load_model
    from tasks.quantize.gguf_grid import exact_weights

    find_params = Quantizer.find_params
    out = tmp_path / "rtn"
    result = CliRunner().invoke(app, ["quantize", str(tiny_llama_ref.path), "--method", "rtn",
                                      "--group", "32", "--grid", "q4_0", "--out", str(out),
                                      "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert Quantizer.find_params is find_params
    stored, problem = exact_weights(out / "model", "q4_0")
    assert problem is None and stored
    state = load_model(tiny_llama_ref.path)[0].state_dict()
    negative = 0
    for key, weight in stored.items():
        float_weight = state[key].float().numpy()
        codes, scales = _llama_cpp_q4_0(float_weight)
        assert np.allclose(weight.scales.astype(np.float32), scales.astype(np.float32),
                           rtol=1e-3, atol=0), key
        differ = weight.codes != codes
        assert not (differ & ~_near_tie(float_weight, scales)).any(), key
        assert differ.mean() < 1e-3, key
        negative += int((weight.scales < 0).sum())
    assert negative > 0  # the signed-max rule, not GPTQModel's positive min-max scale


def test_gptq_on_the_q4_0_grid_exports_exactly(tiny_llama_ref, tmp_path):
    """GPTQ with `--grid q4_0`: the GGUF holds the checkpoint code for code (llama.cpp reads
    what pkdq computes), and some scales are negative: the rule was applied inside GPTQ
    (GPTQModel's own min-max scales are never negative)."""
    from tasks.quantize.gguf_grid import exact_weights

    out = tmp_path / "gptq"
    result = CliRunner().invoke(app, [
        "quantize", str(tiny_llama_ref.path), "--group", "32", "--grid", "q4_0", "--samples",
        "4", "--seq-len", "64", "--out", str(out), "--threads", "1", "--gguf", "q4_0"])
    assert result.exit_code == 0, result.output
    gguf = json.loads((out / "metrics.json").read_text())["gguf"]
    assert gguf["exact_grid"] is True and gguf["weight_error"]["max_abs"] == 0, gguf
    stored, problem = exact_weights(out / "model", "q4_0")
    assert problem is None and stored
    assert all((w.scales < 0).any() and (w.scales > 0).any() for w in stored.values())


@pytest.mark.parametrize(("args", "named"), [
    (["--group", "64"], "group_size 64"),
    (["--group", "32", "--bits", "8"], "bits 8"),
    (["--group", "32", "--mse", "2.4"], "mse 2.4"),
    (["--group", "32", "--method", "awq"], "method 'awq'"),
])
def test_grid_q4_0_outside_its_grid_is_refused_in_one_line(args, named, tiny_llama_ref,
                                                           tmp_path):
    result = CliRunner().invoke(app, ["quantize", str(tiny_llama_ref.path), "--grid", "q4_0",
                                      *args, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "grid q4_0" in lines[0] and named in lines[0], result.output
