"""Check a written GGUF by loading it back: with transformers' GGUF loader, or in llama.cpp.

`verify_gguf` (llama layout): transformers reads the `llama.*` keys into a config, dequantizes
every tensor with gguf-py and reverses the q/k permutation. Same logits as the source model (up
to the chosen qtype's rounding) means the names, shapes, permutation and hyperparameters were
written the way GGUF readers expect; the tokenizer rebuilt from the copied tokenizer.* keys must
also encode a text to the same ids.

`verify_in_llama_cpp` (every architecture; the only check for Qwen2/Qwen3/Gemma 3, whose
conventions transformers' loader does not all undo): llama.cpp's logits on the ids pkdq feeds
the model (the family's BOS included) against pkdq's torch loader, and llama.cpp's own
tokenization of the text (BOS by the file's add_bos_token) against those ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tasks.core.common import one_line

# Fixed plain prose (not evaluation data): enough tokens for a top-1 agreement figure.
VERIFY_TEXT = (
    "The library opened early on Saturday, and the first visitors went straight to the map "
    "room. A student compared two old charts of the harbour, noting where the coastline had "
    "moved, while a retired engineer asked about the bridge that was built in 1887 and rebuilt "
    "after the flood. By noon the reading tables were full, and the staff brought more chairs."
)


class GgufVerifyError(RuntimeError):
    """The written GGUF did not load or gave non-finite logits; one line says why."""


def load_gguf_model(gguf_file: Path) -> Any:
    """transformers model from a GGUF file, dequantized to fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    gguf_file = Path(gguf_file)
    return AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                dtype=torch.float32).eval()


def load_gguf_tokenizer(gguf_file: Path) -> Any:
    from transformers import AutoTokenizer

    gguf_file = Path(gguf_file)
    return AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)


def compare_logits(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """Max |logit diff|, top-1 agreement and mean KL(ref || got) in nats per position."""
    if not torch.isfinite(got).all():
        raise GgufVerifyError("the GGUF model produced non-finite logits")
    ref_lp, got_lp = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (ref_lp.exp() * (ref_lp - got_lp)).sum(-1).mean().item()
    return {
        "max_abs_logit_diff": (ref - got).abs().max().item(),
        "top1_agreement": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
        "kl_nats": kl,
    }


@torch.no_grad()
def compare_weights(source: Any, loaded: Any) -> dict[str, Any]:
    """Largest |weight diff| between same-named tensors, and where.

    The sharpest check of the q/k permutation: a wrong one leaves logits of a near-random model
    almost unchanged (attention is near uniform) but moves every q/k row.
    """
    got = loaded.state_dict()
    worst, where = 0.0, ""
    for name, tensor in source.state_dict().items():
        if name not in got or got[name].shape != tensor.shape:
            raise GgufVerifyError(f"the GGUF model has no tensor {name} of shape "
                                  f"{tuple(tensor.shape)}")
        diff = (got[name].float() - tensor.float()).abs().max().item()
        if diff >= worst:
            worst, where = diff, name
    return {"max_abs_weight_diff": worst, "worst_weight": where}


@torch.no_grad()
def verify_gguf(gguf_file: Path, source_model: Any, tokenizer: Any,
                text: str = VERIFY_TEXT) -> dict[str, Any]:
    """Logits of the reloaded GGUF vs `source_model` on `text`, plus a tokenizer round trip."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    ref = source_model(ids).logits.float()
    try:
        loaded = load_gguf_model(gguf_file)
    except Exception as exc:  # noqa: BLE001 - any loader failure is the finding itself
        raise GgufVerifyError(f"transformers could not load {gguf_file}: "
                              f"{one_line(exc, with_type=False)}") from exc
    got = loaded(ids).logits.float()
    weights = compare_weights(source_model, loaded)
    del loaded
    try:
        gguf_ids = load_gguf_tokenizer(gguf_file)(text)["input_ids"]
        same_ids: bool | str = gguf_ids == ids[0].tolist()
    except Exception as exc:  # noqa: BLE001 - recorded: the weights check stands on its own
        same_ids = f"not checked: {one_line(exc, limit=200)}"
    return {"tokens": int(ids.shape[1]), **compare_logits(ref, got), **weights,
            "tokenizer_same_ids": same_ids}


@torch.no_grad()
def verify_in_llama_cpp(gguf_file: Path, source_model: Any, tokenizer: Any,
                        text: str = VERIFY_TEXT) -> dict[str, Any]:
    """Logits of `gguf_file` in llama.cpp vs `source_model` in torch, on the token ids pkdq's
    convention gives `text` (`tasks.core.conventions.encode_text`), plus whether llama.cpp's
    tokenizer produces those same ids by itself."""
    import numpy as np

    from tasks.core.conventions import encode_text
    from tasks.core.llama_cpp import LlamaCppError, open_gguf

    ids = encode_text(tokenizer, text, source_model.config)
    ref = source_model(torch.tensor([ids])).logits[0].float()
    try:
        llm = open_gguf(gguf_file, n_ctx=len(ids), threads=1, logits_all=True, n_batch=len(ids))
    except LlamaCppError as exc:
        raise GgufVerifyError(str(exc)) from exc
    try:
        llm.eval(ids)
        got = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
        own_ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    finally:
        llm.close()
    return {"tokens": len(ids), "runtime": "llama.cpp", **compare_logits(ref, got),
            "tokenizer_same_ids": own_ids == ids}
