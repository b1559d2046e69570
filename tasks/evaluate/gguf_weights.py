"""A GGUF's own weights as a torch model, so the file a user ships is scored on the benchmarks.

llama.cpp has no lm-eval backend here, and its perplexity alone would leave the benchmark rows
of a GGUF unmeasured. transformers reads a GGUF and dequantizes every block (Q4_0, Q8_0, F16)
back to float, undoing llama.cpp's Q/K row order. What that model computes is what the file
holds, weight for weight, embedding included (a Q4_0 embedding is the size lever of a small
model and is not in the GPTQ folder at all); only llama.cpp's own arithmetic (8-bit activations
in its matmuls) is left out, and the llama.cpp perplexity next to it measures that.

The run folder's config is kept (tokenizer conventions, tied head, rope settings): the GGUF's
weights are loaded into the architecture the folder describes, so only the weights differ from
the quantize stage's own scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class GgufWeightsError(ValueError):
    """The GGUF does not fit the folder's architecture (a shape or a tensor is missing)."""


def load_gguf_weights(gguf_file: Path, folder: Path) -> Any:
    """The model `folder` describes, in fp32, with every weight read from `gguf_file`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tasks.core.common import set_offline_env

    set_offline_env()
    gguf_file = Path(gguf_file)
    from_gguf = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(str(folder))
    config.__dict__.pop("quantization_config", None)  # the GPTQ folder's: weights here are dense
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = from_gguf.state_dict()
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise GgufWeightsError(f"{gguf_file.name} lacks {len(missing)} of the folder's tensors, "
                               f"first {missing[0]}")
    for key, tensor in wanted.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise GgufWeightsError(f"{gguf_file.name}: {key} is {tuple(state[key].shape)}, the "
                                   f"folder's config says {tuple(tensor.shape)}")
    model.load_state_dict({k: state[k] for k in wanted}, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    del from_gguf
    return model.eval()
