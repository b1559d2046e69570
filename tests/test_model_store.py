"""Model store: every kind of spec resolves offline to a fingerprinted folder."""

from __future__ import annotations

import shutil

import pytest

from tasks.core.model_folder import fingerprint_folder, model_ref
from tasks.core.model_store import (
    ModelNotFoundError,
    _builtin_gguf,
    is_quantized,
    resolve_model,
)


def test_builtin_resolves_to_plain_safetensors_folder(smollm2_ref):
    assert (smollm2_ref.path / "model.safetensors").is_file()
    assert (smollm2_ref.path / "tokenizer.json").is_file() or (
        smollm2_ref.path / "tokenizer_config.json").is_file()
    assert not is_quantized(smollm2_ref.path)
    assert len(smollm2_ref.fingerprint) == 16


def test_gguf_path_reuses_the_same_conversion(smollm2_ref):
    gguf = _builtin_gguf("smollm2-135m")
    assert resolve_model(str(gguf)) == smollm2_ref


def test_local_folder_fingerprint_follows_content(tiny_llama_ref, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_ref.path, copy)
    (copy / ".pkdq-fingerprint").unlink()
    ref = resolve_model(str(copy))
    assert ref.fingerprint == tiny_llama_ref.fingerprint == fingerprint_folder(copy)
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("64", "65", 1))
    assert model_ref(copy).fingerprint != tiny_llama_ref.fingerprint


def test_hf_id_found_in_local_cache_only(tiny_llama_ref, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_llama_ref.path, snapshot)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    ref = resolve_model("acme/tiny")
    assert ref.path == snapshot.resolve()
    with pytest.raises(ModelNotFoundError, match="acme/other.*never downloads"):
        resolve_model("acme/other")


def test_save_drops_stale_gguf_tag_but_keeps_nothing_else(tiny_llama_ref, tmp_path):
    from tasks.core.model_store import load_model, read_config, save_model

    model, tok = load_model(tiny_llama_ref)
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    saved = save_model(model, tok, tmp_path / "m")
    assert "quantization_config" not in read_config(saved.path)
    assert not is_quantized(saved.path)
