"""Shared fixtures: a tiny random Llama built from a config (fast), and the real SmolLM2 (slow)."""

from __future__ import annotations

import os
import tempfile

import pytest

from tasks.core.common import set_offline_env

set_offline_env()
# Prefect state per test session: cache records must not leak between test runs.
_PREFECT_HOME = tempfile.mkdtemp(prefix="pkdq-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = os.path.join(_PREFECT_HOME, "storage")
# As pkdq.env sets for the CLI: a fresh database's first API start can pass the 20 s default
# on a loaded machine (in-process flows in tests/test_compare.py start it).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


@pytest.fixture(scope="session")
def smollm2_ref():
    """The embedded default, converted once to safetensors under the pkdq cache."""
    from tasks.core.model_store import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama_ref(tmp_path_factory, smollm2_ref):
    """A 2-layer random Llama with GQA (4 query / 2 KV heads) and SmolLM2's real tokenizer.

    Sizes are multiples of 32 so pruning rounding and quantization group sizes apply as on real
    models.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tasks.core.model_store import save_model

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_ref.path))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("tiny") / "tiny-llama")


def noisy_copy(ref, out_dir, seed: int, scale: float):
    """The model at `ref` with Gaussian noise (scale x each matrix's std) on every matrix, saved
    to `out_dir`: a stand-in for a damaged (pruned) student that KD has something to recover."""
    import torch

    from tasks.core.model_store import load_model, save_model

    model, tok = load_model(ref)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.add_(torch.randn(param.shape, generator=gen) * param.std() * scale)
    return save_model(model, tok, out_dir)


# The longest files, longest first (measured: `--durations` in CI's log). With two workers taking
# whole files (`--dist loadfile`), starting these first keeps one worker from finishing alone
# with a five-minute file left; every other file keeps its collected order after them. xdist
# keeps this order only with `--no-loadscope-reorder` (pyproject's addopts): by default it
# queues files by their number of tests, whatever the collection order.
LONGEST_FIRST = ("test_families.py", "test_kill_anywhere.py", "test_compare.py",
                 "test_gguf_export.py", "test_pool.py", "test_export.py", "test_imatrix.py",
                 "test_gguf_mixed.py", "test_equalize.py", "test_q4_0_grid.py",
                 "test_flow.py", "test_search.py",
                 "test_sweep.py", "test_evaluate.py", "test_quantize.py",
                 "test_llama_cpp_speed.py", "test_model_card.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside each file is kept
