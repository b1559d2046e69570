"""The model dimensions that compression changes: one definition, read from config.json.

Pruning plans in them, the recipe rules predict quantized shapes from them and the GGUF export
writes them as llama.cpp's hyperparameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Dims:
    """The sizes pruning changes, read from a model or its config.json."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def q_per_group(self) -> int:
        return self.heads // self.kv_heads

    @classmethod
    def from_config(cls, config: Any) -> Dims:
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        return cls(layers=int(get("num_hidden_layers")), hidden=hidden,
                   ffn=int(get("intermediate_size")), heads=heads,
                   kv_heads=int(get("num_key_value_heads") or heads),
                   head_dim=int(get("head_dim") or hidden // heads))

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def approx_params(dims: Dims, vocab: int, tied: bool) -> int:
    """Parameters of a Llama-family decoder: projections, norms and embeddings (no biases).

    Exact for SmolLM2-135M (134,515,008); Gemma's q/k norms add a few thousand, which moves
    neither a >50% threshold nor a budget search's tolerance. One formula for the rules and the
    search, so a budget means the same number in `pkdq validate` and in the candidate table.
    """
    attention = dims.hidden * dims.head_dim * 2 * (dims.heads + dims.kv_heads)
    mlp = 3 * dims.hidden * dims.ffn
    per_layer = attention + mlp + 2 * dims.hidden
    return dims.layers * per_layer + vocab * dims.hidden * (1 if tied else 2) + dims.hidden
