"""GGUF export: what transformers' GGUF loader reads back is the model that was exported.

Random init gives near-uniform attention, so a wrong q/k permutation would barely move the
logits of the tiny fixture; the models here have q/k scaled up (`_sharpen`) so attention is
peaked and such a bug shows in logits as well as in the per-tensor weight comparison. Each
export with verification takes ~25 s (transformers parses the 49k-token vocabulary 3 times).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.core.model_store import load_model, save_model
from tasks.quantize.gguf_export import GgufExportError, export_gguf, permute_qk

FP16_REL = 2.0**-11  # fp16 round-to-nearest: |error| <= 2^-11 * |value|


def _sharpen(model, factor: float = 10.0):
    """Scale q/k so attention scores are O(1) instead of ~0 (see the module docstring)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)
    return model


def _max_abs_weight(folder: Path) -> float:
    model, _ = load_model(folder)
    return max(t.abs().max().item() for t in model.state_dict().values())


def _fields(path: Path) -> dict:
    import gguf

    return {key: field.contents() for key, field in gguf.GGUFReader(str(path)).fields.items()}


@pytest.fixture(scope="module")
def sharp_ref(tiny_llama_ref, tmp_path_factory):
    model, tokenizer = load_model(tiny_llama_ref)
    return save_model(_sharpen(model), tokenizer, tmp_path_factory.mktemp("sharp") / "model")


@pytest.fixture(scope="module")
def pruned_ref(smollm2_ref, tmp_path_factory):
    """Pruned-like shapes: FFN 96, 2 query heads / 1 KV head of head_dim 16 (so head_dim is not
    hidden / heads, as after query-head pruning), untied head (output.weight is written)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_ref.path))
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = _sharpen(LlamaForCausalLM(config))
    return save_model(model, tokenizer, tmp_path_factory.mktemp("pruned") / "model")


@pytest.fixture(scope="module")
def f16_export(sharp_ref, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "sharp-f16.gguf"
    return out, export_gguf(sharp_ref.path, out, "f16")


def test_permutation_is_what_transformers_reverses():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(4 * 16, 64)), rng.normal(size=(2 * 16, 64))
    reverse = LlamaTensorProcessor()._reverse_permute_weights
    assert not np.array_equal(permute_qk(q, 4), q)
    assert np.array_equal(reverse(permute_qk(q, 4), 4, 4), q)
    assert np.array_equal(reverse(permute_qk(k, 2), 4, 2), k)


def test_f16_round_trip_matches_the_source(f16_export, sharp_ref):
    out, m = f16_export
    check = m["verification"]
    assert m["bytes"] == out.stat().st_size and m["qtype"] == "f16"
    assert m["tensor_count"] == 20 and m["tensor_types"] == {"F16": 15, "F32": 5}
    assert (m["verified_loader"], m["llama_cpp_verified"]) == ("transformers-gguf", False)
    assert check["top1_agreement"] >= 0.99 and check["kl_nats"] < 1e-5
    assert check["max_abs_logit_diff"] < 5e-3  # measured 7e-4; 0.8 with a wrong permutation
    bound = _max_abs_weight(sharp_ref.path) * FP16_REL * 1.01
    assert check["max_abs_weight_diff"] <= bound
    assert m["weight_error"]["max_abs"] <= bound
    assert check["tokenizer_same_ids"] is True


def test_layout_and_metadata_follow_llama_cpp(f16_export, smollm2_ref):
    import gguf

    from tasks.core.model_store import builtin_ggufs_on_disk

    out, m = f16_export
    fields = _fields(out)
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    expected = {"llama.block_count": 2, "llama.embedding_length": 64,
                "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
                "llama.attention.head_count_kv": 2, "llama.attention.key_length": 16,
                "llama.rope.dimension_count": 16, "llama.vocab_size": 49152,
                "llama.context_length": 512}
    assert {k: fields[k] for k in expected} == expected
    reference = _fields(builtin_ggufs_on_disk()[0])
    tokenizer_keys = {k for k in reference if k.startswith("tokenizer.")}
    assert tokenizer_keys and all(fields[k] == reference[k] for k in tokenizer_keys)
    names = {t.name for t in gguf.GGUFReader(str(out)).tensors}
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert {"token_embd.weight", "output_norm.weight", "blk.1.attn_q.weight",
            "blk.1.ffn_gate.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"} <= names


def test_q8_0_round_trip_is_close(sharp_ref, tmp_path):
    m = export_gguf(sharp_ref.path, tmp_path / "q8.gguf", "q8_0")
    check = m["verification"]
    assert m["tensor_types"] == {"Q8_0": 15, "F32": 5}
    assert check["top1_agreement"] >= 0.9 and check["kl_nats"] < 1e-4
    assert check["max_abs_logit_diff"] < 0.1  # measured 0.018
    # Q8_0: per 32-block scale max|block|/127, rounding error <= half a step (+ fp16 scale)
    assert check["max_abs_weight_diff"] <= _max_abs_weight(sharp_ref.path) / 127 * 0.51
    assert "re-quantized" in m["grid_note"]


def test_a_wrong_qk_permutation_is_caught(sharp_ref, tmp_path, monkeypatch):
    """The check this file relies on: with the rotary permutation left out, reloading fails."""
    monkeypatch.setattr("tasks.quantize.gguf_export.permute_qk", lambda weight, heads: weight)
    check = export_gguf(sharp_ref.path, tmp_path / "bad.gguf", "f16")["verification"]
    assert check["max_abs_logit_diff"] > 0.1 and check["max_abs_weight_diff"] > 0.1
    assert check["top1_agreement"] < 0.95  # measured 0.82 (1.0 when permuted)
    assert "_proj" in check["worst_weight"]


def test_pruned_shapes_round_trip_through_the_cli(pruned_ref, tmp_path):
    from typer.testing import CliRunner

    from pkdq.cli import app

    out, metrics_file = tmp_path / "pruned.gguf", tmp_path / "m.json"
    result = CliRunner().invoke(app, ["export-gguf", str(pruned_ref.path), str(out),
                                      "--qtype", "f16", "--metrics", str(metrics_file)])
    assert result.exit_code == 0, result.output
    assert "top-1 agreement" in result.output
    m = json.loads(metrics_file.read_text())
    check = m["verification"]
    assert check["top1_agreement"] >= 0.99 and check["kl_nats"] < 1e-5
    assert check["max_abs_logit_diff"] < 5e-3
    assert check["max_abs_weight_diff"] <= _max_abs_weight(pruned_ref.path) * FP16_REL * 1.01
    fields = _fields(out)
    assert (fields["llama.feed_forward_length"], fields["llama.attention.head_count"],
            fields["llama.attention.head_count_kv"], fields["llama.attention.key_length"]) == \
        (96, 2, 1, 16)
    assert m["tensor_count"] == 21  # + output.weight: the head is not tied


def test_quantize_stage_exports_the_gptq_grid(tiny_llama_ref, tmp_path):
    """`pkdq quantize --gguf f16`: the GGUF holds the checkpoint's grid values (fp16-rounded)."""
    from typer.testing import CliRunner

    from pkdq.cli import app
    from tasks.core.gptq_checkpoint import read_quantized_weights

    out = tmp_path / "q"
    result = CliRunner().invoke(app, ["quantize", str(tiny_llama_ref.path), "--method", "rtn",
                                      "--group", "32", "--out", str(out), "--threads", "1",
                                      "--gguf", "f16"])
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())["gguf"]
    assert Path(m["file"]) == out / "model.gguf" and (out / "model.gguf").is_file()
    assert m["source"]["weights"].startswith("gptq W4 g32")
    check = m["verification"]  # against load_dequantized: the grid values themselves
    assert check["top1_agreement"] >= 0.99 and check["kl_nats"] < 1e-5
    assert check["max_abs_logit_diff"] < 5e-3
    grid = read_quantized_weights(out / "model", bits=4)
    largest = max(w.abs().max().item() for w in grid.values())
    assert check["max_abs_weight_diff"] <= max(largest, _embedding_max(out)) * FP16_REL * 1.01
    assert "pkdq: gguf f16" in result.output


def _embedding_max(stage: Path) -> float:
    from safetensors import safe_open

    with safe_open(str(stage / "model" / "model.safetensors"), "pt") as handle:
        return handle.get_tensor("model.embed_tokens.weight").float().abs().max().item()


def test_refusals_are_one_line(tiny_llama_ref, tmp_path, monkeypatch):
    import gguf
    from pydantic import ValidationError

    from tasks.core.recipe import QuantizeConfig

    def refused(**kwargs) -> str:
        args = {"model_path": tiny_llama_ref.path, "out_file": tmp_path / "x.gguf"} | kwargs
        with pytest.raises(GgufExportError) as info:
            export_gguf(**args, verify=False)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "f16, q8_0, q4_0" in refused(qtype="q5_k")
    other = tmp_path / "qwen"
    other.mkdir()
    config = json.loads((tiny_llama_ref.path / "config.json").read_text())
    config |= {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3"}
    (other / "config.json").write_text(json.dumps(config))
    assert "writes LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, " \
        "Gemma3ForCausalLM only" in refused(model_path=other)
    config |= {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
               "use_sliding_window": True, "sliding_window": 64}
    (other / "config.json").write_text(json.dumps(config))
    assert "qwen2 has no sliding window" in refused(model_path=other)

    fake = tmp_path / "other-vocab.gguf"
    writer = gguf.GGUFWriter(str(fake), "llama")
    writer.add_token_list(["a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "different tokenizer vocabulary" in refused(reference_gguf=fake)
    monkeypatch.setattr("tasks.core.model_store.builtin_ggufs_on_disk", lambda: [])
    assert "does not build GGUF tokenizers other than Qwen2-style" in refused()
    assert not (tmp_path / "x.gguf").exists()

    with pytest.raises(ValidationError):
        QuantizeConfig(gguf="q5_k")
    assert "gguf" not in QuantizeConfig().model_dump()  # stage keys unchanged when unused
    assert QuantizeConfig(gguf="q8_0").model_dump()["gguf"] == "q8_0"


def test_cli_refuses_a_bad_qtype_in_one_line(tiny_llama_ref, tmp_path):
    from typer.testing import CliRunner

    from pkdq.cli import app

    result = CliRunner().invoke(app, ["export-gguf", str(tiny_llama_ref.path),
                                      str(tmp_path / "x.gguf"), "--qtype", "q5_k"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: GGUF qtype 'q5_k'")
    assert len(result.output.strip().splitlines()) == 1


# ------------------------------------------------------------------ Qwen2, Qwen3, Gemma 3


@pytest.fixture(scope="module")
def family_ref(smollm2_ref, tmp_path_factory):
    """Tiny random models of the non-Llama families (tests/families.py), built on demand."""
    from families import build_family

    root, built = tmp_path_factory.mktemp("gguf-families"), {}

    def get(name: str):
        if name not in built:
            built[name] = build_family(name, smollm2_ref.path, root / name)
        return built[name]

    return get


def test_gemma_norm_shift_and_bos_are_what_make_llama_cpp_agree(family_ref, tmp_path,
                                                               monkeypatch):
    """The checks the family matrix relies on can fail: Gemma 3 written without the +1 on its
    RMSNorm weights, or without add_bos_token, disagrees with pkdq in llama.cpp."""
    from dataclasses import replace

    from tasks.quantize.gguf_arch import ARCHS

    ref = family_ref("gemma3").path
    good = export_gguf(ref, tmp_path / "good.gguf", "f16")["verification"]
    assert good["kl_nats"] < 1e-4 and good["tokenizer_same_ids"] is True  # measured 2e-6
    monkeypatch.setitem(ARCHS, "Gemma3ForCausalLM",
                        replace(ARCHS["Gemma3ForCausalLM"], norm_shift=0.0))
    unshifted = export_gguf(ref, tmp_path / "unshifted.gguf", "f16")["verification"]
    assert unshifted["max_abs_logit_diff"] > 0.5 and unshifted["kl_nats"] > 1e-3  # 1.8, 0.045
    monkeypatch.undo()
    monkeypatch.setattr("tasks.quantize.gguf_export.bos_metadata",
                        lambda tok, config: {"tokenizer.ggml.add_bos_token": False})
    no_bos = export_gguf(ref, tmp_path / "no-bos.gguf", "f16")
    assert no_bos["verification"]["tokenizer_same_ids"] is False


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma3"])
def test_gptq_w4_g32_sym_is_q4_0_bit_for_bit_in_other_families(family, family_ref, tmp_path):
    """`pkdq quantize --gguf q4_0` on Qwen2 / Qwen3 / Gemma 3: the GPTQ grid is written code for
    code (no q/k permutation in these architectures) and llama.cpp agrees with pkdq's loader."""
    import gguf
    from typer.testing import CliRunner

    from pkdq.cli import app
    from tasks.core.gptq_checkpoint import read_quantized_weights
    from tasks.quantize.gguf_arch import ARCHS

    out = tmp_path / "q"
    result = CliRunner().invoke(app, ["quantize", str(family_ref(family).path), "--method",
                                      "rtn", "--group", "32", "--out", str(out), "--threads", "1",
                                      "--gguf", "q4_0"])
    assert result.exit_code == 0, result.output
    assert "llama.cpp reload" in result.output
    m = json.loads((out / "metrics.json").read_text())["gguf"]
    assert m["exact_grid"] is True and m["verified_loader"] == "llama.cpp"
    arch = ARCHS[json.loads((out / "model" / "config.json").read_text())["architectures"][0]]
    layers = json.loads((out / "model" / "config.json").read_text())["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch], layers)
    tensors = {t.name: t for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    for module, weight in read_quantized_weights(out / "model", bits=4).items():
        t = tensors[names.get_name(f"{module}.weight", try_suffixes=(".weight",))]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0, module
        assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type), weight.numpy())
    check = m["verification"]
    # llama.cpp multiplies Q4_0 weights with Q8_0-quantized activations (not bit-exact compute);
    # measured KL 4e-7 (Qwen2) .. 4e-4 (Gemma 3, whose random post-norms amplify it)
    assert check["kl_nats"] < 5e-3 and check["tokenizer_same_ids"] is True, check


def _qwen_tokenizer_model(smollm2_ref, folder: Path):
    """A tiny Qwen2 whose tokenizer.json has Qwen2's pre-tokenizer (over SmolLM2's vocabulary:
    no Qwen tokenizer is available offline) and 32 embedding rows more than tokens, as real
    Qwen checkpoints pad their vocabulary."""
    from families import COMMON, family_tokenizer, randomise_small_tensors
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from tasks.quantize.gguf_tokenizer import QWEN2_REGEX

    src = folder.with_name(folder.name + "-tok")
    family_tokenizer("qwen2", smollm2_ref.path).save_pretrained(src)
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
         "use_regex": False}]}
    (src / "tokenizer.json").write_text(json.dumps(tj))
    tok = AutoTokenizer.from_pretrained(str(src))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(
        **COMMON, vocab_size=len(tok) + 32, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True))
    randomise_small_tensors(model)
    return save_model(model, tok, folder), tok


def test_qwen2_tokenizer_is_built_from_tokenizer_json(smollm2_ref, tmp_path, monkeypatch):
    """No reference GGUF: a Qwen2-style byte-level BPE tokenizer is written as llama.cpp's
    `gpt2` model with pre-tokenizer `qwen2`, padded to the embedding's rows; llama.cpp then
    tokenizes text exactly as the HF tokenizer does (a wrong pre-tokenizer name does not)."""
    import gguf

    from tasks.core.llama_cpp import open_gguf
    from tasks.quantize.gguf_tokenizer import KNOWN_PRE, QWEN2_REGEX

    ref, tok = _qwen_tokenizer_model(smollm2_ref, tmp_path / "qwen")
    monkeypatch.setattr("tasks.core.model_store.builtin_ggufs_on_disk", lambda: [])
    probe = "He said 12345 isn't\n\n  ok, THEY'LL see: 3.14159! x=(hello) $var .NET\n\n\n"

    def llama_cpp_ids(path: Path) -> list[int]:
        llm = open_gguf(path, n_ctx=64, threads=1)
        try:
            return llm.tokenize(probe.encode(), add_bos=False, special=False)
        finally:
            llm.close()

    m = export_gguf(ref.path, tmp_path / "q.gguf", "f16")
    assert m["reference_gguf"] is None and m["tokenizer_source"].startswith("built from")
    check = m["verification"]
    assert check["tokenizer_same_ids"] is True and check["kl_nats"] < 1e-4, check
    fields = _fields(tmp_path / "q.gguf")
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("gpt2", "qwen2")
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == len(tok) + 32 and tokens[-1] == f"[PAD{len(tok) + 31}]"
    assert fields["tokenizer.ggml.add_bos_token"] is False
    hf_ids = tok(probe, add_special_tokens=False)["input_ids"]
    assert llama_cpp_ids(tmp_path / "q.gguf") == hf_ids

    # GPT-2's pre-tokenizer (what SmolLM2's own tokenizer uses) splits this text differently
    monkeypatch.setitem(KNOWN_PRE, QWEN2_REGEX, "gpt-2")
    export_gguf(ref.path, tmp_path / "wrong.gguf", "f16", verify=False)
    assert gguf.GGUFReader(str(tmp_path / "wrong.gguf")).fields[
        "tokenizer.ggml.pre"].contents() == "gpt-2"
    assert llama_cpp_ids(tmp_path / "wrong.gguf") != hf_ids
