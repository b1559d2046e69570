"""GGUF tokenizer metadata built from a model folder's tokenizer.json, where that can be faithful.

llama.cpp does not store a pre-tokenizer regex in the file: `tokenizer.ggml.pre` names one it
has compiled in (its converter picks the name by hashing the HF tokenizer's output on a probe
text). A name is only right when the folder's regex is the one llama.cpp implements under it, so
this builds the tokenizer only for byte-level BPE whose pre-tokenizer is exactly a regex in
`KNOWN_PRE` (Qwen2/Qwen2.5/Qwen3's); anything else needs a reference GGUF with the same
vocabulary (`gguf_export.find_reference_gguf`). Tokens, types and padding follow the converter's
`get_vocab_base` (ids the tokenizer lacks, up to the embedding's rows, become `[PAD<i>]`
user-defined tokens), merges and special ids come from gguf-py's own `SpecialVocab`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Split regex in tokenizer.json -> llama.cpp pre-tokenizer name (llama-vocab.cpp quotes the
# original regex beside its own spelling of it).
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
KNOWN_PRE = {QWEN2_REGEX: "qwen2"}


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's name for this byte-level BPE pre-tokenizer, or None when not known exactly."""
    if (tokenizer_json.get("model") or {}).get("type") != "BPE":
        return None
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds != ["Split", "ByteLevel"] or parts[1].get("use_regex") \
            or parts[1].get("add_prefix_space") or parts[0].get("behavior") != "Isolated" \
            or parts[0].get("invert"):
        return None
    return KNOWN_PRE.get((parts[0].get("pattern") or {}).get("Regex"))


def _looks_special(token: str) -> bool:
    """The converter's `does_token_look_special`: <...>, <|...|> and the like are control."""
    return (token.startswith("<|") and token.endswith("|>")) or \
        (token.startswith("<") and token.endswith(">") and len(token) > 2)


def built_tokenizer_fields(model_path: Path, tokenizer: Any,
                           vocab_rows: int) -> list[tuple[str, Any, Any, Any]] | None:
    """tokenizer.* (key, value, type, item type) built from `model_path`'s tokenizer.json, or
    None when its pre-tokenizer is not one llama.cpp implements by a known name."""
    import gguf

    path = Path(model_path) / "tokenizer.json"
    if not path.is_file():
        return None
    pre = pre_tokenizer_name(json.loads(path.read_text(encoding="utf-8")))
    if pre is None:
        return None
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_rows):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.USER_DEFINED)
        elif token in added:
            special = decoder[i].special or _looks_special(token)
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    probe = gguf.GGUFWriter(None, "llama")  # collects key-values only; never written
    probe.add_tokenizer_model("gpt2")
    probe.add_tokenizer_pre(pre)
    probe.add_token_list(tokens)
    probe.add_token_types(types)
    gguf.SpecialVocab(Path(model_path), load_merges=True, n_vocab=vocab_rows).add_to_gguf(
        probe, quiet=True)
    return [(key, v.value, v.type, v.sub_type) for key, v in probe.kv_data[0].items()
            if key.startswith("tokenizer.")]  # not the probe's general.architecture
