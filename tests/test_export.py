"""`pkdq export` and loading everywhere: stock transformers loads every stage's folder, each
export format round-trips in its serving runtime (transformers, or llama.cpp through
llama-cpp-python, which setup.sh installs: these tests never skip), a GPTQ W4 g32 sym grid
becomes Q4_0 bit for bit, and bad requests are one line with exit 2.

The tiny random Llama has q/k scaled up (as in test_gguf_export) so attention is not uniform
and a wrong layout would move the perplexity.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.core.common import StageContext
from tasks.core.gptq_checkpoint import read_quantized_weights
from tasks.core.model_store import load_model, save_model
from tasks.core.recipe import QuantizeConfig, TextSample
from tasks.quantize import ExportError, export_model
from tasks.quantize.stage import quantize_stage

CALIB = TextSample(source="c4", samples=4, seq_len=64)
TOKENS = 1024  # WikiText-2 tokens scored on both sides (2 windows of 512)
PROMPT = "The harbour map showed the old coastline and the bridge built in 1887."


@pytest.fixture(scope="module")
def sharp_ref(tiny_llama_ref, tmp_path_factory):
    model, tokenizer = load_model(tiny_llama_ref)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10.0)
            layer.self_attn.k_proj.weight.mul_(10.0)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("sharp") / "model")


def _quantize(ref, tmp_path_factory, **kwargs):
    cfg = QuantizeConfig(group_size=32, sym=True, calibration=CALIB, **kwargs)
    out = tmp_path_factory.mktemp(f"q-{kwargs['method']}-{kwargs['bits']}")
    return quantize_stage(ref, cfg, StageContext(out_dir=out, seed=0, threads=1)).model.path


@pytest.fixture(scope="module")
def gptq_w4(sharp_ref, tmp_path_factory) -> Path:
    """GPTQ bits 4, sym, group 32: the Q4_0 grid."""
    return _quantize(sharp_ref, tmp_path_factory, method="gptq", bits=4)


@pytest.fixture(scope="module")
def gptq_w4_q4_0_grid(sharp_ref, tmp_path_factory) -> Path:
    """GPTQ on llama.cpp's Q4_0 scale rule: negative fp16 scales in a stock GPTQ layout."""
    return _quantize(sharp_ref, tmp_path_factory, method="gptq", bits=4, grid="q4_0")


@pytest.fixture(scope="module")
def rtn_w8(sharp_ref, tmp_path_factory) -> Path:
    """GPTQ-format bits 8, sym, group 32 (RTN codes): the Q8_0 grid."""
    return _quantize(sharp_ref, tmp_path_factory, method="rtn", bits=8)


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("which", ["sharp_ref", "gptq_w4", "gptq_w4_q4_0_grid"])
def test_stock_transformers_loads_every_stage_folder(which, request):
    """The code a user types, against pkdq's own loader (fp16 compute for GPTQ: the kernel)."""
    from transformers import AutoModelForCausalLM

    folder = request.getfixturevalue(which)
    folder = folder.path if hasattr(folder, "path") else folder
    ours, tokenizer = load_model(folder)
    stock = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ref, got = _logits(ours, tokenizer), _logits(stock, tokenizer)
    # GPTQ: stock transformers runs the kernel in fp16 (pkdq upcasts to fp32): fp16 rounding
    bound = 1e-4 if which == "sharp_ref" else 2e-2 * ref.abs().max().item() + 1e-3
    assert (ref - got).abs().max().item() <= bound
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean().item() >= 0.95


def test_gptq_w4_g32_sym_is_q4_0_bit_for_bit(gptq_w4, tmp_path):
    """Every quantized matrix read back from the GGUF (dequantized by gguf-py, q/k rows
    un-permuted) equals the GPTQ checkpoint's dequantized weight exactly; and llama.cpp's
    perplexity of it agrees with pkdq's loader on the same tokens."""
    import gguf

    from tasks.quantize.gguf_export import permute_qk

    record = export_model(gptq_w4, tmp_path / "e", "gguf-q4_0", verify_tokens=TOKENS, threads=1)
    written = record["written"]
    assert written["exact_grid"] is True and written["weight_error"]["max_abs"] == 0.0
    grid = read_quantized_weights(gptq_w4, bits=4)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "e" / "model.gguf")).tensors}
    for module, weight in grid.items():
        t = tensors[names.get_name(f"{module}.weight", try_suffixes=(".weight",))]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0, module
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        expected = weight.numpy()
        if "q_proj" in module:
            expected = permute_qk(expected, 4)
        elif "k_proj" in module:
            expected = permute_qk(expected, 2)
        assert np.array_equal(values, expected), module
    check = record["verification"]
    assert "llama.cpp" in check["export_runtime"]
    # llama.cpp multiplies Q4_0 weights with Q8_0-quantized activations: not bit-exact compute
    assert abs(check["relative_difference"]) < 0.01, check


def test_gptq_w8_g32_sym_is_q8_0_exactly(rtn_w8, tmp_path):
    record = export_model(rtn_w8, tmp_path / "e", "gguf-q8_0", verify=False)
    assert record["written"]["exact_grid"] is True
    assert record["written"]["weight_error"]["max_abs"] == 0.0
    # the 14 GPTQ matrices code for code, and the (tied) embedding in its default Q8_0
    assert record["written"]["tensor_types"]["Q8_0"] == 15
    assert record["written"]["embedding_type"] == "q8_0"


@pytest.mark.parametrize(("embedding", "ggml"), [(None, "Q8_0"), ("q5_1", "Q5_1"), ("q4_0", "Q4_0"),
                                                ("f16", "F16")])
def test_the_embedding_type_is_chosen_and_the_grid_stays_exact(embedding, ggml, gptq_w4,
                                                                tmp_path):
    """`--embedding`: the tied embedding is written in the type asked (Q8_0 by default), every
    GPTQ matrix is still Q4_0 code for code, and the embedding's own rounding is reported apart
    (zero only for f16, which holds the checkpoint's fp16 values)."""
    import gguf

    record = export_model(gptq_w4, tmp_path / "e", "gguf-q4_0", verify=False,
                          embedding=embedding)
    written = record["written"]
    assert written["exact_grid"] is True and written["weight_error"]["max_abs"] == 0.0
    assert written["embedding_type"] == (embedding or "q8_0")
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "e" / "model.gguf")).tensors}
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType[ggml]
    assert "output.weight" not in tensors  # tied: llama.cpp reads the embedding for both
    assert (written["embedding_error"]["max_abs"] == 0.0) == (embedding == "f16")
    assert written["tensor_types"]["Q4_0"] == 14 + (embedding == "q4_0")
    # the embedding's rounding shrinks with its bits (5-bit blocks with a minimum: under half of
    # Q4_0's error, as on the real model in bench/results/embedding_types.md)
    bound = {"q4_0": 0.15, "q5_1": 0.06, "q8_0": 0.01, None: 0.01, "f16": 0.0}[embedding]
    assert written["embedding_error"]["relative_rms"] <= bound


def test_gguf_weights_in_torch_are_the_checkpoints_weights(gptq_w4, tmp_path):
    """The evaluation's GGUF reader gives back exactly the GPTQ model (an exact Q4_0 grid, an
    F16 embedding): logits equal to the checkpoint's, so a GGUF row's scores are the file's."""
    from tasks.evaluate.gguf_weights import load_gguf_weights

    export_model(gptq_w4, tmp_path / "e", "gguf-q4_0", verify=False, threads=1,
                 embedding="f16")
    model, tokenizer = load_model(gptq_w4)
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    shipped = load_gguf_weights(tmp_path / "e" / "model.gguf", gptq_w4)
    with torch.no_grad():
        want, got = model(ids).logits, shipped(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


def test_the_quantize_stage_writes_the_recipes_embedding_type(sharp_ref, tmp_path):
    """`quantize: {gguf: q4_0, gguf_embedding: q4_0}` reaches the stage's model.gguf."""
    import gguf

    cfg = QuantizeConfig(method="rtn", bits=4, group_size=32, sym=True, calibration=CALIB,
                         gguf="q4_0", gguf_embedding="q4_0")
    result = quantize_stage(sharp_ref, cfg, StageContext(out_dir=tmp_path, seed=0, threads=1))
    assert result.metrics["gguf"]["embedding_type"] == "q4_0"
    assert result.metrics["gguf"]["exact_grid"] is True
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "model.gguf")).tensors}
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0


@pytest.mark.parametrize(("fmt", "embedding", "says"), [
    ("hf", "q8_0", "embedding type is for the gguf formats, not hf"),
    ("gguf-q4_0", "q6_k", "embedding type 'q6_k' is not supported"),
    ("gguf-q4_k_m", "q8_0", "llama.cpp's quantizer's choice"),
])
def test_a_wrong_embedding_type_is_refused_before_any_weight(fmt, embedding, says, gptq_w4,
                                                             tmp_path):
    with pytest.raises(ExportError, match=says):
        export_model(gptq_w4, tmp_path / "e", fmt, verify=False, embedding=embedding)
    assert not (tmp_path / "e").exists()


def test_other_grids_are_requantized_and_say_so(gptq_w4, tmp_path):
    record = export_model(gptq_w4, tmp_path / "e", "gguf-q8_0", verify=False)
    assert record["written"]["exact_grid"] is False
    assert "bits 4 (needs 8)" in record["written"]["exact_grid_note"]


@pytest.mark.parametrize("fmt", ["hf", "hf-bf16", "gptq", "gguf-f16", "gguf-q4_k_m"])
def test_each_format_round_trips_in_its_runtime(fmt, gptq_w4, tmp_path):
    record = export_model(gptq_w4, tmp_path / fmt, fmt, verify_tokens=TOKENS, threads=1)
    check = record["verification"]
    runtime = "llama.cpp" if fmt.startswith("gguf") else "transformers"
    assert runtime in check["export_runtime"]
    # hf is the grid values in fp32 (exact); bf16 / fp16 compute and Q4_K_M re-quantize
    bound = {"hf": 1e-4, "gguf-q4_k_m": 0.2}.get(fmt, 0.01)
    assert abs(check["relative_difference"]) < bound, check
    saved = json.loads((tmp_path / fmt / ".pkdq-export.json").read_text())
    assert saved["format"] == fmt
    if fmt == "gguf-q4_k_m":  # tiny rows (64) are not 256-wide k-blocks: llama.cpp falls back
        assert "F16" not in record["written"]["tensor_types"]


def test_a_run_folder_exports_its_final_model(gptq_w4, sharp_ref, tmp_path):
    run = tmp_path / "run"
    (run / "01-prune").mkdir(parents=True)
    shutil.copytree(sharp_ref.path, run / "01-prune" / "model")
    shutil.copytree(gptq_w4, run / "03-quantize" / "model")
    (run / "run.json").write_text("{}")
    record = export_model(run, tmp_path / "e", "gptq", verify=False)
    assert record["source"] == str(run / "03-quantize" / "model")


def test_llama_cpp_speed_reports_rates_and_memory(gptq_w4, tmp_path):
    from tasks.core.llama_cpp import llama_cpp_speed

    export_model(gptq_w4, tmp_path / "e", "gguf-q4_0", verify=False)
    speed = llama_cpp_speed(tmp_path / "e" / "model.gguf", prompt_tokens=64, decode_tokens=8,
                            threads=1, repeats=1)
    assert speed["prefill_tok_s"] > 0 and speed["decode_tok_s"] > 0
    assert speed["peak_rss_mb"] >= speed["process_before_load_mb"] > 0


def _cli(*args: str):
    from typer.testing import CliRunner

    from pkdq.cli import app

    return CliRunner().invoke(app, ["export", *args])


def test_bad_requests_are_one_line_exit_2(sharp_ref, gptq_w4, tmp_path):
    def refused(*args: str) -> str:
        result = _cli(*args)
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        return result.output

    src = str(gptq_w4)
    assert "unknown export format" in refused(src, "--to", str(tmp_path / "a"), "--format", "onnx")
    assert "use one of f16, q8_0, q5_1, q5_0, q4_0" in refused(
        src, "--to", str(tmp_path / "a"), "--format", "gguf-q4_0", "--embedding", "q2_k")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert "--overwrite" in refused(src, "--to", str(busy), "--format", "gptq")
    plain = tmp_path / "plain"
    shutil.copytree(sharp_ref.path, plain, ignore=shutil.ignore_patterns(".pkdq-*"))
    assert "not a pkdq output" in refused(str(plain), "--to", str(tmp_path / "b"),
                                          "--format", "hf")
    assert "needs a GPTQ checkpoint" in refused(str(sharp_ref.path), "--to",
                                                str(tmp_path / "c"), "--format", "gptq")
    phi3 = tmp_path / "phi3"
    shutil.copytree(sharp_ref.path, phi3)
    config = json.loads((phi3 / "config.json").read_text())
    config |= {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3"}
    (phi3 / "config.json").write_text(json.dumps(config))
    assert "convert_hf_to_gguf" in refused(str(phi3), "--to", str(tmp_path / "d"),
                                           "--format", "gguf-q4_0")
    assert not (tmp_path / "a").exists() and (busy / "x").is_file()
    with pytest.raises(ExportError):
        export_model(gptq_w4, busy, "gptq")


def test_cli_export_overwrites_when_asked(gptq_w4, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "old").write_text("x")
    result = _cli(str(gptq_w4), "--to", str(busy), "--format", "gguf-q4_0", "--overwrite",
                  "--no-verify", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert "bit-exact" in result.output and not (busy / "old").exists()


def test_rules_offer_the_exact_gptq_settings_for_a_q4_0_gguf():
    from tasks.core.recipe import QuantizeConfig
    from tasks.rules import _gguf_grid_rule

    (hint,) = _gguf_grid_rule(QuantizeConfig(gguf="q4_0"))  # default group_size 64
    assert hint.code == "gguf-exact-grid" and "group_size 32" in hint.message
    assert _gguf_grid_rule(QuantizeConfig(gguf="q4_0", group_size=32)) == []
    assert _gguf_grid_rule(QuantizeConfig(gguf="q4_k_m")) == []


def test_perplexity_convention_matches_torch_cross_entropy():
    """core.perplexity (numpy, float64) scores windows as the evaluate stage does in torch."""
    import torch.nn.functional as F

    from tasks.core.perplexity import perplexity

    gen = torch.Generator().manual_seed(0)
    vocab, ids = 50, torch.randint(0, 50, (300,), generator=gen).tolist()
    table = torch.randn(vocab, vocab, generator=gen) * 3

    def logits_of(window):
        return table[torch.tensor(window)].numpy()

    got = perplexity(logits_of, ids, 128)
    total = sum(float(F.cross_entropy(table[torch.tensor(w[:-1])].double(), torch.tensor(w[1:]),
                                      reduction="sum"))
                for w in (ids[s:s + 128] for s in range(0, 300, 128)) if len(w) >= 2)
    assert got["predicted_tokens"] == 300 - 3
    assert got["nll"] == pytest.approx(total, rel=1e-12)


@pytest.mark.parametrize(("which", "bits"), [("gptq_w4", 4), ("gptq_w4_q4_0_grid", 4),
                                             ("rtn_w8", 8)])
def test_compressed_tensors_holds_the_gptq_grid_and_stock_transformers_loads_it(which, bits,
                                                                                 request, tmp_path):
    """pack-quantized on the GPTQ grid: stock transformers (compressed-tensors decompressing on
    CPU) holds exactly pkdq's dequantized weights, gives its logits, and the same perplexity."""
    from transformers import AutoModelForCausalLM

    from tasks.core.gptq_checkpoint import load_dequantized

    src = request.getfixturevalue(which)
    record = export_model(src, tmp_path / "ct", "compressed-tensors", verify_tokens=TOKENS,
                          threads=1)
    written = record["written"]
    assert written["exact_grid"] is True and written["weight_error"]["max_abs"] == 0.0
    quant = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "pack-quantized"
    (group,) = quant["config_groups"].values()
    weights = group["weights"]
    assert (weights["num_bits"], weights["type"], weights["strategy"], weights["group_size"]) \
        == (bits, "int", "group", 32)
    assert weights["symmetric"] is True and quant["ignore"] == ["lm_head"]
    assert not (tmp_path / "ct" / "quantize_config.json").exists()  # GPTQModel's, not this layout
    stock = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32).eval()
    ours, tokenizer = load_dequantized(src)
    ref, got = _logits(ours, tokenizer), _logits(stock, tokenizer)
    assert (ref - got).abs().max().item() <= 1e-4 * ref.abs().max().item()
    grid = read_quantized_weights(src, bits=bits)  # decompressed by the first forward, fp32 scales
    assert len(grid) == 14
    for module, weight in grid.items():
        assert torch.equal(stock.get_submodule(module).weight, weight), module
    check = record["verification"]
    assert "transformers" in check["export_runtime"]
    # pkdq's loader computes in fp32; the export loads in its config dtype (fp16) by default
    assert abs(check["relative_difference"]) < 0.01, check


def test_compressed_tensors_refuses_float_act_order_and_asymmetric_sources(sharp_ref, gptq_w4,
                                                                             tmp_path):
    def refused(src: Path, name: str) -> str:
        result = _cli(str(src), "--to", str(tmp_path / name), "--format", "compressed-tensors")
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert not (tmp_path / name).exists()
        return result.output

    def edited(name: str, **quant) -> Path:
        folder = tmp_path / name
        shutil.copytree(gptq_w4, folder)
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] |= quant
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    line = refused(sharp_ref.path, "a")
    assert "needs a GPTQ checkpoint" in line and "--method gptq" in line
    assert "desc_act" in refused(edited("act", desc_act=True), "b")
    assert "asymmetric" in refused(edited("asym", sym=False), "c")
