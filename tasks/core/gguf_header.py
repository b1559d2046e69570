"""A GGUF file's sizes from its header alone: what `pkdq validate` knows before any conversion.

A built-in model is a GGUF that `model_store` converts to safetensors on first use (a minute and
half a GB). Checks before a run need only the model's dimensions, which the GGUF header holds as
`<arch>.*` metadata. gguf-py's `GGUFReader` parses every field into numpy arrays (5 s for
SmolLM2's 49k-token vocabulary on this CPU); this reader walks the header with `struct`, skips
the values it does not need and reads the tensor names (to tell a tied output head), in tens of
milliseconds and without numpy or torch. Spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
# value type -> struct format of one scalar (8: string, 9: array are read separately)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_COUNT = 1 << 24  # keys, tensors or array items: more means a corrupt header, not a model
# config.json key -> the `<arch>.` metadata key holding it (llama.cpp's names)
CONFIG_KEYS = {
    "num_hidden_layers": "block_count",
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "vocab_size": "vocab_size",
}


class GgufHeaderError(ValueError):
    """The file is not a GGUF this reader understands; the message is one line saying why."""


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GgufHeaderError(f"header ends early (at byte {self.pos})")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def count(self) -> int:
        n = self.unpack("<Q")
        if n > _MAX_COUNT:
            raise GgufHeaderError(f"count {n} at byte {self.pos - 8} is not plausible")
        return n

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise GgufHeaderError(f"header ends early (a {n}-byte string at byte {self.pos})")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise GgufHeaderError(f"header ends early (a {n}-byte string at byte {self.pos})")
        self.pos += n

    def value(self, vtype: int, keep: bool) -> Any:
        """One value of `vtype`; arrays come back as lists only when `keep` (else skipped)."""
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            if keep:
                return self.string()
            self.skip_string()
            return None
        if vtype == _ARRAY:
            item_type, n = self.unpack("<I"), self.count()
            if item_type in _SCALARS and not keep:  # fixed width: one jump
                self.pos += n * struct.calcsize(_SCALARS[item_type])
                if self.pos > len(self.buf):
                    raise GgufHeaderError(f"header ends early (an array at byte {self.pos})")
                return n
            items = [self.value(item_type, keep) for _ in range(n)]
            return items if keep else n
        raise GgufHeaderError(f"unknown value type {vtype} at byte {self.pos - 4}")


def read_header(path: Path, general: bool = False) -> tuple[dict[str, Any], list[str]]:
    """(metadata, tensor names). Arrays are kept only for `<arch>.*` keys (per-layer sizes);
    other arrays (the tokenizer's) appear as their length. `general`: keep the `general.*`
    values too (name, license, base model: what a model card carries from its source)."""
    with open(path, "rb") as handle:
        try:
            buf = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # an empty file cannot be mapped
            raise GgufHeaderError("the file is empty") from exc
    with buf:
        cur = _Cursor(buf)
        if bytes(buf[:4]) != MAGIC:
            raise GgufHeaderError("no GGUF magic at the start")
        cur.pos = 4
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise GgufHeaderError(f"GGUF version {version} (this reader knows 2 and 3)")
        n_tensors, n_kv = cur.count(), cur.count()
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.unpack("<I")
            keep = (key == "general.architecture" or (general and key.startswith("general."))
                    or not key.startswith(("tokenizer.", "general.")))
            meta[key] = cur.value(vtype, keep)
        names = []
        for _ in range(n_tensors):
            names.append(cur.string())
            n_dims = cur.unpack("<I")
            if n_dims > 8:
                raise GgufHeaderError(f"tensor {names[-1]} has {n_dims} dimensions")
            cur.pos += 8 * n_dims + 4 + 8  # dims, ggml type, data offset
    return meta, names


def _uniform(value: Any) -> Any:
    """A per-layer list with one value is that value; a list that varies has no single size."""
    if isinstance(value, list):
        return value[0] if value and all(v == value[0] for v in value) else None
    return value


def config_from_gguf(path: Path) -> dict[str, Any]:
    """The config.json sizes of a GGUF model (what `Dims.from_config` and the rules read).

    Keys the header lacks are left out (a missing `head_dim` means hidden / heads, as in HF);
    `tie_word_embeddings` is true when there is no separate `output.weight` tensor.
    """
    meta, names = read_header(path)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GgufHeaderError("no general.architecture key")
    config: dict[str, Any] = {"model_type": arch, "tie_word_embeddings": "output.weight" not in
                              names}
    for key, gguf_key in CONFIG_KEYS.items():
        value = _uniform(meta.get(f"{arch}.{gguf_key}"))
        if value is not None:
            config[key] = value
    if "vocab_size" not in config and isinstance(meta.get("tokenizer.ggml.tokens"), int):
        config["vocab_size"] = meta["tokenizer.ggml.tokens"]  # the array's length
    return config
