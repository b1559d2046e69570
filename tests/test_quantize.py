"""Quantize stage on the tiny Llama: GPTQ and RTN checkpoints load, stay close, sit on the grid.

Calibration is 4 blocks x 64 tokens and group size 32 so the whole file runs in about a minute.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tasks.core.common import StageContext
from tasks.core.gptq_checkpoint import (
    QuantizeError,
    load_quantized,
    pack_int32,
    read_quantized_weights,
    unpack_int32,
)
from tasks.core.model_folder import model_ref
from tasks.core.model_store import load_model, save_model
from tasks.core.recipe import QuantizeConfig, TextSample
from tasks.quantize.driver import float_source
from tasks.quantize.linears import check_awq_shapes, check_group_size, compact_names
from tasks.quantize.stage import quantize_stage

CALIB = TextSample(source="c4", samples=4, seq_len=64)
PROMPT = "The quick brown fox jumps over the lazy dog. " * 4


def _run(src, tmp_path_factory, **kwargs):
    cfg = QuantizeConfig(group_size=32, calibration=CALIB, **kwargs)
    out = tmp_path_factory.mktemp(f"q-{kwargs.get('method', 'gptq')}-{kwargs.get('bits', 4)}")
    return quantize_stage(src, cfg, StageContext(out_dir=out, seed=0, threads=1)), out


@pytest.fixture(scope="module")
def gptq_run(tiny_llama_ref, tmp_path_factory):
    return _run(tiny_llama_ref, tmp_path_factory, method="gptq")


@pytest.fixture(scope="module")
def rtn_run(tiny_llama_ref, tmp_path_factory):
    return _run(tiny_llama_ref, tmp_path_factory, method="rtn")


@pytest.fixture(scope="module")
def fp_logits(tiny_llama_ref):
    model, tokenizer = load_model(tiny_llama_ref)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return ids, model(ids).logits


def _kl_to_fp(result, fp_logits) -> tuple[float, float]:
    """(mean KL(fp || quantized) per token, max |logit diff|) of the folder load_model returns."""
    ids, ref = fp_logits
    model, _ = load_model(result.model)
    with torch.no_grad():
        got = model(ids).logits.float()
    ref_lp, got_lp = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (ref_lp.exp() * (ref_lp - got_lp)).sum(-1).mean().item()
    return kl, (got - ref).abs().max().item()


def _codes_vs_exact(folder: Path, fp_folder: Path, bits: int) -> torch.Tensor:
    """Stored code minus exact position w/scale + zero, for every quantized weight element."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    fp = load_file(str(fp_folder / "model.safetensors"))
    offsets = []
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for name in sorted(k[: -len(".qweight")] for k in f.keys() if k.endswith(".qweight")):
            q = unpack_int32(f.get_tensor(f"{name}.qweight"), bits, dim=0).t().float()
            zeros = (unpack_int32(f.get_tensor(f"{name}.qzeros"), bits, dim=1) + 1).float()
            g_idx = f.get_tensor(f"{name}.g_idx").long()
            scales = f.get_tensor(f"{name}.scales").float()[g_idx].t()
            exact = fp[f"{name}.weight"].float() / scales + zeros[g_idx].t()
            offsets.append((q - exact).flatten())
    return torch.cat(offsets)


@pytest.mark.parametrize("run", ["gptq_run", "rtn_run"])
def test_checkpoint_loads_and_stays_close(run, request, fp_logits):
    result, out = request.getfixturevalue(run)
    assert result.model.path == (out / "model").resolve()
    assert not any(p.name.endswith(".partial") for p in out.iterdir())
    assert any((out / "gptqmodel-logs").iterdir()), "GPTQModel's logs belong in the stage folder"
    # its per-module log holds wall times: inside the model it would change the fingerprint
    assert (out / "quant_log.csv").is_file() and not (result.model.path / "quant_log.csv").exists()
    qcfg = json.loads((result.model.path / "config.json").read_text())["quantization_config"]
    assert (qcfg["quant_method"], qcfg["bits"], qcfg["group_size"]) == ("gptq", 4, 32)
    kl, max_diff = _kl_to_fp(result, fp_logits)
    assert kl < 0.01, f"quantized logits drifted: KL {kl}"
    assert max_diff > 1e-4, "quantized logits identical to fp: nothing was quantized"


def test_gptq_metrics_describe_the_run(gptq_run, tiny_llama_ref):
    result, _ = gptq_run
    m = result.metrics
    assert (m["method"], m["bits"], m["group_size"], m["sym"]) == ("gptq", 4, 32, True)
    assert m["calibration"]["tokens"] == CALIB.samples * CALIB.seq_len
    assert m["quantized_layers"] == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert [s["name"] for s in m["skipped_layers"]] == ["lm_head"]
    assert m["bytes_on_disk"]["output_weights"] < m["bytes_on_disk"]["input_weights"]
    assert m["loaders_verified"]["gptqmodel"]["top1_agreement"] > 0.9
    assert m["versions"]["gptqmodel"] == "7.6.0"
    assert result.model.fingerprint == model_ref(result.model.path).fingerprint


def test_rtn_metrics_need_no_calibration(rtn_run):
    m = rtn_run[0].metrics
    assert (m["method"], m["calibration"], m["damp_percent"]) == ("rtn", None, None)
    assert m["quantized_layers"] == m["quantizer_log"]["modules_logged"] == 14


def test_rtn_codes_are_the_nearest_grid_points(rtn_run, gptq_run, tiny_llama_ref):
    """RTN: every code within half a step of w/scale + zero (slack: fp16 scale rounding at ties).

    GPTQ, by contrast, moves codes to compensate errors, so some land further away.
    """
    rtn = _codes_vs_exact(rtn_run[0].model.path, tiny_llama_ref.path, bits=4)
    assert rtn.abs().max().item() <= 0.5 + 1e-2
    gptq = _codes_vs_exact(gptq_run[0].model.path, tiny_llama_ref.path, bits=4)
    assert (gptq.abs() > 0.6).float().mean().item() > 0.01


def test_runtime_weights_are_exactly_scale_times_code_minus_zero(rtn_run):
    """The loaded kernel computes with exactly scale * (q - zero) as stored on disk."""
    path = rtn_run[0].model.path
    model = load_quantized(path)
    stored = read_quantized_weights(path, bits=4)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        module = model.get_submodule(name)
        with torch.no_grad():
            runtime = module(torch.eye(module.in_features)).t()
        torch.testing.assert_close(runtime, stored[name], rtol=0, atol=1e-7)


def test_bits8_gptq_is_closer_than_bits4(tiny_llama_ref, tmp_path_factory, gptq_run, fp_logits):
    result, _ = _run(tiny_llama_ref, tmp_path_factory, method="gptq", bits=8)
    qcfg = json.loads((result.model.path / "config.json").read_text())["quantization_config"]
    assert qcfg["bits"] == 8
    kl8, diff8 = _kl_to_fp(result, fp_logits)
    kl4, _ = _kl_to_fp(gptq_run[0], fp_logits)
    assert 0 < diff8 and kl8 < kl4


def test_error_names_fold_layer_indices_without_dropping_any():

    names = {f"model.layers.{i}.mlp.down_proj": 96 for i in (0, 1, 2, 3, 7)}
    names["model.layers.5.self_attn.o_proj"] = 80
    assert compact_names(names) == {"model.layers.[0-3,7].mlp.down_proj": 96,
                                     "model.layers.5.self_attn.o_proj": 80}


def _config_with_ffn(tiny_llama_ref, intermediate: int):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(tiny_llama_ref.path))
    config.intermediate_size = intermediate
    return config


def test_check_group_size_names_every_offending_layer(tiny_llama_ref):
    config = _config_with_ffn(tiny_llama_ref, 96)
    check_group_size(config, 32)
    with pytest.raises(ValueError) as err:
        check_group_size(config, 64)
    msg = str(err.value)
    assert "\n" not in msg
    assert "model.layers.[0,1].mlp.down_proj (in_features 96)" in msg
    assert "q_proj" not in msg
    assert "group sizes that would work: 32" in msg


def test_stage_refuses_bad_group_size_before_quantizing(tiny_llama_ref, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM(_config_with_ffn(tiny_llama_ref, 96))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_ref.path))
    src = save_model(model, tokenizer, tmp_path / "ffn96")
    cfg = QuantizeConfig(group_size=64, calibration=CALIB)
    with pytest.raises(ValueError, match=r"\.mlp\.down_proj \(in_features 96\)"):
        quantize_stage(src, cfg, StageContext(out_dir=tmp_path / "out"))
    assert not (tmp_path / "out" / "model").exists()


def test_load_quantized_refuses_a_float_folder(tiny_llama_ref):
    with pytest.raises(QuantizeError, match="not a GPTQ or AWQ checkpoint"):
        load_quantized(tiny_llama_ref.path)


def test_stale_gguf_marker_is_dropped_and_real_quantized_input_refused(
    tiny_llama_ref, gptq_run, tmp_path
):
    """GGUF-converted folders keep `quantization_config: gguf` over dense weights."""
    src = tmp_path / "from-gguf"
    shutil.copytree(tiny_llama_ref.path, src)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    (src / "config.json").write_text(json.dumps(config))
    view = float_source(src, tmp_path / "view")
    assert "quantization_config" not in json.loads((view / "config.json").read_text())
    assert (view / "model.safetensors").resolve() == (src / "model.safetensors").resolve()
    with pytest.raises(QuantizeError, match="already quantized"):
        float_source(gptq_run[0].model.path, tmp_path / "view2")


def test_unpack_int32_reads_low_bits_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.int64)  # one word, 4-bit
    word = sum(int(c) << (4 * i) for i, c in enumerate(codes[0]))
    packed = torch.tensor([[word - (1 << 32) if word >= 1 << 31 else word]], dtype=torch.int32)
    assert unpack_int32(packed, 4, dim=1).tolist() == codes.tolist()
    assert unpack_int32(packed.t(), 4, dim=0).t().tolist() == codes.tolist()


# --------------------------------------------------------------------------------------------
# AWQ, quantization-aware KD, speed, CLI (issue #9)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def awq_tiny_ref(tiny_llama_ref, tmp_path_factory):
    """The tiny Llama with head_dim 32: every out_features a multiple of 64, as AWQ needs."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(str(tiny_llama_ref.path))
    config.head_dim = 32
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_ref.path))
    return save_model(LlamaForCausalLM(config), tokenizer,
                      tmp_path_factory.mktemp("awq-tiny") / "model")


def test_awq_runs_loads_and_states_serving_limits(awq_tiny_ref, tmp_path_factory):
    result, _ = _run(awq_tiny_ref, tmp_path_factory, method="awq")
    qcfg = json.loads((result.model.path / "config.json").read_text())["quantization_config"]
    assert (qcfg["quant_method"], qcfg["bits"], qcfg["group_size"]) == ("awq", 4, 32)
    m = result.metrics
    assert (m["method"], m["sym"], m["quantized_layers"]) == ("awq", False, 14)
    assert m["loaders_verified"]["gptqmodel"]["top1_agreement"] > 0.9
    assert m["serving"]["vllm_verified"].startswith("no")
    assert any("divisible by 128" in w for w in m["serving"]["warnings"])  # in_features 64
    model, _ = load_model(result.model)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_awq_refuses_out_features_it_cannot_process(tiny_llama_ref):

    with pytest.raises(ValueError, match=r"k_proj \(out_features 32\)"):
        check_awq_shapes(tiny_llama_ref.path)  # 2 KV heads x head_dim 16


def test_pack_int32_inverts_unpack():

    for bits in (4, 8):
        codes = torch.randint(0, 2**bits, (64, 6))
        packed = pack_int32(codes, bits, dim=0)
        assert packed.dtype == torch.int32 and packed.shape == (64 * bits // 32, 6)
        assert torch.equal(unpack_int32(packed, bits, dim=0), codes)


def test_qat_distill_keeps_weights_on_the_grid_and_packs(rtn_run, tiny_llama_ref, tmp_path):
    """P-Q-KD: KD on a quantized student moves codes but never leaves the stored grid."""
    from tasks.core.recipe import DistillConfig
    from tasks.distill.stage import distill_stage

    src = rtn_run[0].model
    cfg = DistillConfig(tokens=32 * 2 * 4, seq_len=32, batch_size=2, lr=3e-2, warmup_steps=1,
                        eval_blocks=1)
    ctx = StageContext(out_dir=tmp_path / "kd", seed=0, threads=1, teacher=tiny_llama_ref)
    result = distill_stage(src, cfg, ctx)
    m = result.metrics
    assert m["quantization_aware"] and m["qat_codes_changed"] > 0
    before = json.loads((src.path / "config.json").read_text())["quantization_config"]
    after = json.loads((result.model.path / "config.json").read_text())["quantization_config"]
    assert after == before
    from safetensors.torch import load_file

    old, new = load_file(str(src.path / "model.safetensors")), \
        load_file(str(result.model.path / "model.safetensors"))
    for key in old:  # the grid is frozen: scales, zeros and g_idx are byte-identical
        if key.endswith((".scales", ".qzeros", ".g_idx")):
            assert torch.equal(old[key], new[key]), key
    weights = read_quantized_weights(result.model.path, bits=4)
    grid = read_quantized_weights(src.path, bits=4)  # same scales: recover them per element
    for name, w in weights.items():
        scales = new[f"{name}.scales"].float()[new[f"{name}.g_idx"].long()].t()
        zeros = (unpack_int32(new[f"{name}.qzeros"], 4, dim=1) + 1).float()
        zeros = zeros[new[f"{name}.g_idx"].long()].t()
        requant = scales * (torch.clamp(torch.round(w / scales + zeros), 0, 15) - zeros)
        assert torch.equal(requant, w), f"{name} left the grid"
    assert any(not torch.equal(weights[n], grid[n]) for n in weights), "KD changed nothing"
    model, _ = load_model(result.model)  # loads through GPTQModel like any GPTQ checkpoint
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_qat_refuses_awq_checkpoints(tmp_path):
    from tasks.distill.qat import load_qat_student

    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "quantization_config": {"quant_method": "awq", "bits": 4}}))
    with pytest.raises(QuantizeError, match="GPTQ-format"):
        load_qat_student(tmp_path)


def test_speed_profile_returns_sane_numbers(rtn_run, tiny_llama_ref):
    from tasks.evaluate.speed import profile_in_subprocess, profile_model, speed_notes

    # fp32 in a fresh process (the honest-RSS path); the quantized one in-process (its
    # GPTQModel import and kernel warm-up are already paid by this test session)
    rows = {"fp32": profile_in_subprocess(tiny_llama_ref.path, prefill_tokens=32,
                                          decode_tokens=4, repeats=1),
            "rtn": profile_model(rtn_run[0].model.path, prefill_tokens=32, decode_tokens=4,
                                 repeats=1)}
    for row in rows.values():
        assert 0 < row["prefill_s"] < 30 and row["decode_tokens_per_s"] > 0
        assert row["weights_bytes"] > 0
    # RSS growth means something only in a fresh process: in this one the allocator may serve
    # the quantized model from pages freed by earlier tests (it measured 0 on a fresh clone)
    assert rows["fp32"]["rss_load_bytes"] > 0
    assert isinstance(rows["rtn"]["rss_load_bytes"], int)
    assert rows["rtn"]["weights_bytes"] < rows["fp32"]["weights_bytes"]
    slow = dict(rows["rtn"], prefill_s=1e9)
    assert "not faster at prefill" in speed_notes({"fp32": rows["fp32"], "rtn": slow})[0]


def test_timed_passes_stop_repeating_once_their_budget_is_spent(tiny_llama_ref):
    """Without a budget every repeat runs; with one already spent after the first pass, one
    runs and the record says so (the report names such a row)."""
    from tasks.core.model_store import load_model
    from tasks.evaluate.speed import measure_latency
    from tasks.report.deploy_speed import _torch_repeats_cut

    model = load_model(tiny_llama_ref.path)[0]
    full = measure_latency(model, 16, 2, repeats=3)
    assert (full["repeats"], full["repeats_asked"], full["budget_s"]) == (3, 3, None)
    cut = measure_latency(model, 16, 2, repeats=3, budget_s=1e-9)
    assert (cut["repeats"], cut["repeats_asked"]) == (1, 3) and cut["decode_tokens_per_s"] > 0
    roomy = measure_latency(model, 16, 2, repeats=3, budget_s=3600)
    assert roomy["repeats"] == 3
    stages = [{"stage": "01-prune", "eval": {"speed": full}},
              {"stage": "02-quantize", "eval": {"speed": cut}}]
    assert "fewer passes for 02-quantize (1 of 3)" in _torch_repeats_cut(stages)
    assert _torch_repeats_cut(stages[:1]) == ""


def test_cli_quantize_outside_a_recipe(tiny_llama_ref, tmp_path):
    from typer.testing import CliRunner

    from pkdq.cli import app

    out = tmp_path / "q"
    args = ["quantize", str(tiny_llama_ref.path), "--method", "rtn", "--group", "32",
            "--out", str(out), "--threads", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["method"], metrics["group_size"]) == ("rtn", 32)
    bad = CliRunner().invoke(app, args[:-4] + ["--group", "128", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "does not divide" in bad.output
