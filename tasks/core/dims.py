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
