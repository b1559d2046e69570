"""gguf-q4_k_m with llama.cpp's importance matrix: the real `llama-imatrix` and `llama-quantize`
(setup.sh builds them into .venv/bin: these tests never skip) on a run's recipe calibration
text; the file loads in llama.cpp with k-quant tensors, its perplexity agrees with pkdq's
loader, and the record says an imatrix was used, on how many tokens of which text.

The tiny Llama here has 256-wide rows (hidden 256, FFN 512): k-quant blocks are 256 wide, so
llama.cpp keeps its Q4_K/Q6_K choices instead of falling back to legacy types.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tasks.quantize import export_model

TOKENS = 1024  # WikiText-2 tokens scored on both sides (2 windows of 512)
CALIBRATION = {"source": "c4", "samples": 4, "seq_len": 128}  # 512 tokens, 4 windows


@pytest.fixture(scope="module")
def wide_llama(smollm2_ref, tmp_path_factory) -> Path:
    """A 2-layer random Llama with 256-wide rows, q/k scaled so attention is not uniform."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tasks.core.model_store import save_model

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_ref.path))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10.0)
            layer.self_attn.k_proj.weight.mul_(10.0)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("wide") / "model").path


@pytest.fixture(scope="module")
def run_folder(wide_llama, tmp_path_factory) -> Path:
    """A pkdq run folder whose recipe quantizes with `CALIBRATION`; its model is a stage's."""
    run = tmp_path_factory.mktemp("run") / "tiny-run"
    shutil.copytree(wide_llama, run / "02-distill" / "model")
    recipe = {"name": "tiny-run", "seed": 7,
              "stages": [{"quantize": {"calibration": CALIBRATION}}]}
    (run / "run.json").write_text(json.dumps({"recipe": recipe}))
    return run


def _kv(path: Path) -> dict:
    import gguf

    return {key: field.contents() for key, field in gguf.GGUFReader(str(path)).fields.items()
            if key.startswith("quantize.imatrix")}


def test_run_folder_export_uses_an_imatrix_from_the_recipe_calibration(run_folder, tmp_path):
    from tasks.core.llama_cpp import gguf_tensor_types, open_gguf

    record = export_model(run_folder, tmp_path / "e", "gguf-q4_k_m", verify_tokens=TOKENS,
                          threads=1)
    written = record["written"]
    matrix = written["imatrix"]
    assert matrix["used"] is True
    assert matrix["source"] == "recipe tiny-run quantize.calibration: builtin c4"
    assert matrix["seed"] == 7 and matrix["tokens_budget"] == 512
    # the text holds far more than 4 windows of 128: exactly the budget is run
    assert (matrix["chunks"], matrix["chunk_tokens"], matrix["tokens"]) == (4, 128, 512)
    assert matrix["tensors_with_statistics"] == 14  # 7 matrices per layer; output not collected
    assert "importance matrix from recipe tiny-run" in written["exact_grid_note"]
    gguf_file = tmp_path / "e" / "model.gguf"
    assert _kv(gguf_file)["quantize.imatrix.chunks_count"] == 4  # llama-quantize's own record
    types = gguf_tensor_types(gguf_file)
    assert set(types) == {"Q4_K", "Q6_K", "F32"} and types["Q4_K"] > types["Q6_K"]
    llm = open_gguf(gguf_file, n_ctx=64, threads=1)  # loads in llama.cpp
    assert llm.n_vocab() > 0
    llm.close()
    saved = json.loads((tmp_path / "e" / ".pkdq-export.json").read_text())
    assert saved["written"]["imatrix"]["tokens"] == 512
    check = record["verification"]
    assert "llama.cpp" in check["export_runtime"]
    # Q4_K_M re-quantizes the float weights: the same bound as without an imatrix
    assert abs(check["relative_difference"]) < 0.2, check


def test_imatrix_changes_the_rounding_and_no_imatrix_stays_available(run_folder, tmp_path):
    """Same f16 source, same type choices: the importance matrix moves the 4-bit codes."""
    import gguf
    import numpy as np

    on = export_model(run_folder, tmp_path / "on", "gguf-q4_k_m", verify=False, threads=1)
    off = export_model(run_folder, tmp_path / "off", "gguf-q4_k_m", verify=False, threads=1,
                       imatrix=False)
    assert off["written"]["imatrix"] == {"used": False, "why": "--no-imatrix"}
    assert "no importance matrix" in off["written"]["exact_grid_note"]
    assert _kv(tmp_path / "off" / "model.gguf") == {}
    assert on["written"]["tensor_types"] == off["written"]["tensor_types"]

    def q4k(folder: str) -> dict[str, np.ndarray]:
        reader = gguf.GGUFReader(str(tmp_path / folder / "model.gguf"))
        return {t.name: np.array(t.data) for t in reader.tensors
                if t.tensor_type == gguf.GGMLQuantizationType.Q4_K}

    a, b = q4k("on"), q4k("off")
    assert a.keys() == b.keys() and a
    assert sum(not np.array_equal(a[n], b[n]) for n in a) == len(a)


def test_a_model_folder_needs_calibration_text_for_an_imatrix(wide_llama, tmp_path):
    record = export_model(wide_llama, tmp_path / "none", "gguf-q4_k_m", verify=False, threads=1)
    assert record["written"]["imatrix"]["used"] is False
    assert "--calibration" in record["written"]["imatrix"]["why"]
    text = tmp_path / "calib.txt"
    text.write_text("The river rose over the old stone bridge in the spring. " * 400)
    named = export_model(wide_llama, tmp_path / "text", "gguf-q4_k_m", verify=False, threads=1,
                         calibration=str(text))
    matrix = named["written"]["imatrix"]
    assert matrix["used"] and matrix["source"] == f"text file {text}"
    assert 0 < matrix["tokens"] <= 16 * 512 and matrix["tokens"] % 512 == 0


def _cli(*args: str):
    from typer.testing import CliRunner

    from pkdq.cli import app

    return CliRunner().invoke(app, ["export", *args])


def test_missing_binary_and_bad_requests_are_one_line_exit_2(run_folder, tmp_path,
                                                             monkeypatch):
    def refused(*args: str) -> str:
        result = _cli(str(run_folder), "--to", str(tmp_path / "x"), *args)
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert not (tmp_path / "x").exists()
        return result.output

    assert "not of gguf-q4_0" in refused("--format", "gguf-q4_0", "--calibration", "c4")
    assert "--no-imatrix" in refused("--format", "gguf-q4_k_m", "--calibration", "c4",
                                     "--no-imatrix")
    assert "neither a built-in" in refused("--format", "gguf-q4_k_m", "--calibration",
                                           str(tmp_path / "nope.txt"))
    monkeypatch.setenv("PKDQ_LLAMA_IMATRIX", str(tmp_path / "gone" / "llama-imatrix"))
    line = refused("--format", "gguf-q4_k_m")
    assert "llama-imatrix not found" in line and "./setup.sh" in line
    # without an imatrix the binding's quantizer needs no executable
    result = _cli(str(run_folder), "--to", str(tmp_path / "y"), "--format", "gguf-q4_k_m",
                  "--no-imatrix", "--no-verify", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert "no imatrix (--no-imatrix)" in result.output


def test_a_quantize_stage_with_gguf_q4_k_m_uses_its_calibration(wide_llama, tmp_path):
    """Recipe path: `quantize: {gguf: q4_k_m}` writes model.gguf with an importance matrix
    computed on the stage's own calibration text (the text GPTQ calibrated on)."""
    from tasks.core.common import StageContext
    from tasks.core.model_folder import model_ref
    from tasks.core.recipe import QuantizeConfig, TextSample
    from tasks.quantize.stage import quantize_stage

    cfg = QuantizeConfig(group_size=32, calibration=TextSample(**CALIBRATION), gguf="q4_k_m")
    result = quantize_stage(model_ref(wide_llama), cfg,
                            StageContext(out_dir=tmp_path, seed=3, threads=1))
    metrics = result.metrics["gguf"]
    matrix = metrics["imatrix"]
    assert matrix["used"] and matrix["source"] == "quantize.calibration: builtin c4"
    assert (matrix["tokens"], matrix["seed"]) == (512, 3)
    assert _kv(tmp_path / "model.gguf")["quantize.imatrix.chunks_count"] == 4
    assert set(metrics["tensor_types"]) == {"Q4_K", "Q6_K", "F32"}
