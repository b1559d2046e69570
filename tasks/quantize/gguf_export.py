"""GGUF export of a Llama, Mistral, Qwen2, Qwen3 or Gemma 3 (text) model folder, for people who
run models with llama.cpp.

pkdq's stages write HF safetensors (float) or GPTQ checkpoints; llama.cpp reads GGUF only. This
writes one with gguf-py (the package llama.cpp's own converter uses), following what
`convert_hf_to_gguf.py` does for each architecture (`tasks.quantize.gguf_arch`: llama, qwen2,
qwen3, gemma3; any other is refused in one line pointing at that converter):

- tensor names come from gguf-py's TensorNameMap for the architecture, not a hand-kept table;
- Llama/Mistral q/k rows are permuted per head (`permute_qk`): HF Llama rotates (first half,
  second half) of each head, GGML's rope rotates adjacent pairs; transformers' GGUF loader
  undoes exactly this. Qwen and Gemma use NEOX rope in llama.cpp (HF's layout, no permutation);
- Gemma 3's RMSNorm weights get +1 (HF computes x * (1 + w)), its sliding-window pattern and
  local rope base are written per layer;
- head_dim is written as key/value length and rope dimension, so pruned models whose head_dim
  is not hidden/heads (query-head pruning) keep their real geometry;
- tokenizer.* metadata is copied from a reference GGUF whose vocabulary equals the model's, or
  built from tokenizer.json where llama.cpp names its pre-tokenizer exactly (Qwen2-style
  byte-level BPE: `gguf_tokenizer`); anything else without a reference is refused. Either way
  add_bos_token / bos_token_id set by the family's BOS convention (`tasks.core.conventions`:
  Gemma and Mistral sequences start with BOS, whatever the reference file said).

Weights: a GPTQ checkpoint whose grid GGUF can hold (bits 4 / 8, sym, group 32, no act-order:
`gguf_grid`) is written code for code as Q4_0 / Q8_0, bit-exact, with its other tensors in F16
(as the checkpoint stores them). Any other GPTQ checkpoint is exported from its dequantized grid
values (`load_dequantized`): Q8_0/Q4_0 are then a re-quantization onto llama.cpp's blocks, f16
keeps the grid values up to fp16 rounding of scale * (code - zero). q4_k_m is llama.cpp's own
quantizer run on the f16 file: with calibration text, `llama-imatrix` computes an importance
matrix on it and `llama-quantize --imatrix` uses it (`tasks.quantize.imatrix`); without,
`llama_model_quantize` through llama-cpp-python, no importance matrix. The file is checked by
loading it back (`tasks.quantize.gguf_verify`): Llama-layout files with transformers' GGUF
loader, the others in llama.cpp itself (transformers' loader does not undo Gemma's norm shift);
`pkdq export` runs every GGUF in llama.cpp.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.common import set_offline_env
from tasks.core.dims import Dims
from tasks.core.recipe import GGUF_EMBEDDING_TYPES
from tasks.quantize.gguf_arch import (
    ArchRefused,
    GgufArch,
    arch_of,
    rope_theta,
    write_arch_metadata,
)
from tasks.quantize.gguf_grid import (
    EXACT_GRIDS,
    ExactWeight,
    encode_exact,
    exact_weights,
    permute_rows,
)

QTYPES = ("f16", "q8_0", "q4_0", "q4_k_m")
LLAMA_QUANTIZED = {"q4_k_m": "Q4_K_M"}  # written by llama.cpp's own quantizer from the f16 file
BLOCK = 32  # Q8_0 and Q4_0 block width along each row (in_features)
LLAMA_CPP_NOTE = ("llama layout checked here with transformers' GGUF loader, other architectures "
                  "in llama.cpp (llama-cpp-python); `pkdq export` runs every GGUF in llama.cpp")
GRID_NOTE = ("GGUF Q8_0/Q4_0 are llama.cpp's own block grids (32 weights per block, one fp16 "
             "scale): a GPTQ checkpoint with bits 4 (Q4_0) or 8 (Q8_0), sym, group 32 and no "
             "act-order is written code for code (exact); any other is re-quantized from its "
             "dequantized values; f16 keeps those values up to fp16 rounding")
# llama-quantize stores the embedding/output of a Q4_0 model as Q6_K, which gguf-py cannot
# write; Q8_0 keeps them at least that fine. In a small model the (tied) embedding is a fifth of
# the weights (SmolLM2-135M: 28M of 134.5M), so its type decides whether 4-bit files reach a
# size target at all: `embedding` picks it (f16, q8_0, q5_1, q5_0, q4_0), the qtype's default
# otherwise.
DEFAULT_EMBEDDING = {"f16": "f16", "q8_0": "q8_0", "q4_0": "q8_0"}
_EMBEDDING_NAMES = ("token_embd.weight", "output.weight")


class GgufExportError(RuntimeError):
    """The model or request cannot be exported to GGUF; the message is one line saying why."""


@dataclass(frozen=True)
class LlamaShape(Dims):
    """The hyperparameters llama.cpp reads from `<arch>.*` keys, taken from the real tensors:
    the model's `Dims` plus what llama.cpp needs besides, and the architecture it is written as.
    """

    vocab: int
    context: int
    rope_theta: float
    rms_eps: float
    tied: bool
    spec: GgufArch
    config: dict[str, Any]


@dataclass(frozen=True)
class Encoded:
    """One tensor as written: bytes (or float array), its GGML type, and why it fell back."""

    name: str
    data: np.ndarray
    ggml_type: str
    fallback: str | None = None


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def check_qtype(qtype: str) -> None:
    if qtype not in QTYPES:
        raise GgufExportError(f"GGUF qtype {qtype!r} is not supported; use one of "
                              f"{', '.join(QTYPES)}")


def embedding_type(qtype: str, requested: str | None = None) -> str | None:
    """The type the embedding/output matrices are written in (None: llama.cpp's quantizer
    decides, for its k-quants); refuses a type gguf-py cannot write or a k-quant override."""
    if requested is None:
        return DEFAULT_EMBEDDING.get(qtype)
    if requested not in GGUF_EMBEDDING_TYPES:
        raise GgufExportError(f"GGUF embedding type {requested!r} is not supported; use one of "
                              f"{', '.join(GGUF_EMBEDDING_TYPES)}")
    if qtype in LLAMA_QUANTIZED:
        raise GgufExportError(f"{qtype}'s embedding type is llama.cpp's quantizer's choice; "
                              "drop the embedding type or export q4_0 / q8_0")
    return requested


def check_architecture(config: dict[str, Any], path: Path) -> GgufArch:
    """Refuse what llama.cpp's graph for this architecture cannot hold, before any weight is
    read; returns how the folder is written (`tasks.quantize.gguf_arch`)."""
    try:
        return arch_of(config, path)
    except ArchRefused as exc:
        raise GgufExportError(str(exc)) from exc


def llama_shape(model: Any, spec: GgufArch) -> LlamaShape:
    """Sizes from the loaded tensors (pruned models), cross-checked with the config."""
    config = model.config
    config_dict = config.to_dict()
    try:
        theta = rope_theta(config_dict)
    except ArchRefused as exc:
        raise GgufExportError(str(exc)) from exc
    layers = model.model.layers
    attn, mlp = layers[0].self_attn, layers[0].mlp
    heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    q_rows, k_rows = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
    if q_rows != heads * head_dim or k_rows != kv_heads * head_dim or head_dim % 2:
        raise GgufExportError(f"q/k shapes ({q_rows}, {k_rows} rows) do not match {heads} heads, "
                              f"{kv_heads} KV heads of head_dim {head_dim}")
    embed = model.get_input_embeddings().weight
    return LlamaShape(
        layers=len(layers), hidden=int(embed.shape[1]), ffn=int(mlp.gate_proj.weight.shape[0]),
        heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=int(embed.shape[0]),
        context=int(config.max_position_embeddings), rope_theta=theta,
        rms_eps=float(config.rms_norm_eps),
        tied=bool(getattr(config, "tie_word_embeddings", False)), spec=spec, config=config_dict,
    )


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def permute_qk(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: per head, interleave the two rotary halves of the rows.

    `heads` is the head count of this projection (query heads for q, KV heads for k).
    transformers' `LlamaTensorProcessor._reverse_permute_weights` is its inverse.
    """
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensors(model: Any, shape: LlamaShape) -> Iterator[tuple[str, str, np.ndarray]]:
    """(HF key, GGUF name, float32 array [out, in]) for every tensor llama.cpp's graph reads,
    transformed as llama.cpp's converter does (Llama q/k permutation, Gemma's norm + 1)."""
    import gguf

    spec = shape.spec
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[spec.gguf_arch], shape.layers)
    for key, tensor in model.state_dict().items():
        if shape.tied and key == "lm_head.weight":
            continue  # llama.cpp uses token_embd as the output when output.weight is absent
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GgufExportError(f"tensor {key} has no {spec.name} GGUF name")
        data = tensor.detach().float().cpu().numpy()
        if spec.norm_shift and key.endswith("norm.weight"):
            data = data + np.float32(spec.norm_shift)  # (1 + w) RMSNorm -> llama.cpp's w
        if spec.permute_qk and name.endswith(".attn_q.weight"):
            data = permute_qk(data, shape.heads)
        elif spec.permute_qk and name.endswith(".attn_k.weight"):
            data = permute_qk(data, shape.kv_heads)
        yield key, name, data


def qk_permutation(name: str, shape: LlamaShape):
    """The row permutation `gguf_tensors` applies to tensor `name` (identity for most)."""
    if not shape.spec.permute_qk:
        return lambda rows: rows
    if name.endswith(".attn_q.weight"):
        return functools.partial(permute_qk, heads=shape.heads)
    if name.endswith(".attn_k.weight"):
        return functools.partial(permute_qk, heads=shape.kv_heads)
    return lambda rows: rows


def expected_tensor_names(shape: LlamaShape) -> set[str]:
    """What llama.cpp's loader requires for the architecture (dense model)."""
    names = {"token_embd.weight", "output_norm.weight"}
    names |= {f"blk.{i}.{part}" if part.endswith(".bias") else f"blk.{i}.{part}.weight"
              for i in range(shape.layers) for part in shape.spec.block}
    return names if shape.tied else names | {"output.weight"}


def _target_type(name: str, data: np.ndarray, qtype: str, embedding: str | None) -> str:
    if data.ndim == 1:
        return "F32"  # norms stay F32, as in llama.cpp's converter
    if embedding is not None and name in _EMBEDDING_NAMES:
        return embedding.upper()
    return qtype.upper()


def encode_tensor(name: str, data: np.ndarray, qtype: str,
                  embedding: str | None = None) -> Encoded:
    """Quantize one tensor with gguf-py (the embedding/output in `embedding` when given); rows
    not a multiple of 32 fall back to F16."""
    import gguf

    target = _target_type(name, data, qtype, embedding)
    fallback = None
    if target not in ("F32", "F16") and data.shape[-1] % BLOCK:
        fallback = f"{data.shape[-1]} columns is not a multiple of {BLOCK}: F16 (as llama.cpp)"
        target = "F16"
    ggml = gguf.GGMLQuantizationType[target]
    try:
        out = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), ggml)
    except NotImplementedError as exc:
        raise GgufExportError(f"gguf {metadata.version('gguf')} cannot quantize to {target}"
                              ) from exc
    return Encoded(name, out, target, fallback)


def _decoded(enc: Encoded) -> np.ndarray:
    import gguf

    if enc.ggml_type in ("F32", "F16"):
        return enc.data.astype(np.float32)
    return gguf.quants.dequantize(enc.data, gguf.GGMLQuantizationType[enc.ggml_type])


class _ErrorStats:
    """Stored-vs-source error over the matrices: what GGUF's rounding costs, in one place."""

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.sq_err = 0.0
        self.sq_ref = 0.0

    def add(self, source: np.ndarray, enc: Encoded) -> None:
        if source.ndim < 2:
            return
        diff = _decoded(enc).astype(np.float64) - source
        self.max_abs = max(self.max_abs, float(np.abs(diff).max()))
        self.sq_err += float((diff * diff).sum())
        self.sq_ref += float((source.astype(np.float64) ** 2).sum())

    def summary(self) -> dict[str, float]:
        rel = (self.sq_err / self.sq_ref) ** 0.5 if self.sq_ref else 0.0
        return {"max_abs": self.max_abs, "relative_rms": rel}


# --------------------------------------------------------------------------------------------
# Tokenizer metadata
# --------------------------------------------------------------------------------------------


def _vocab(tokenizer: Any) -> list[str]:
    return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def _reference_tokens(path: Path) -> list[str] | None:
    for key, value, _, _ in tokenizer_fields(path):
        if key == "tokenizer.ggml.tokens":
            return [token.decode("utf-8", errors="replace") for token in value]
    return None


def find_reference_gguf(model_path: Path, tokenizer: Any,
                        reference: Path | None = None) -> Path | None:
    """A GGUF whose tokenizer.ggml.tokens equal the model's vocabulary, id for id; None when
    there is none but the folder's tokenizer.json can be written faithfully by itself
    (`gguf_tokenizer`: byte-level BPE with Qwen2's pre-tokenizer).

    Looks at `reference` if given (then only there), else .gguf files in the model folder, then
    the built-in models' GGUFs already on disk (SmolLM2's for SmolLM2 and its pruned variants,
    Gemma 3's for Gemma 3).
    """
    from tasks.core.model_store import builtin_ggufs_on_disk
    from tasks.quantize.gguf_tokenizer import pre_tokenizer_name

    vocab = _vocab(tokenizer)
    if reference is not None:
        if not Path(reference).is_file():
            raise GgufExportError(f"reference GGUF {reference} does not exist")
        if _reference_tokens(Path(reference)) != vocab:
            raise GgufExportError(f"reference GGUF {reference} has a different tokenizer "
                                  f"vocabulary than {model_path}")
        return Path(reference)
    candidates = sorted(Path(model_path).glob("*.gguf")) + builtin_ggufs_on_disk()
    for candidate in candidates:
        if _reference_tokens(candidate) == vocab:
            return candidate
    tokenizer_json = Path(model_path) / "tokenizer.json"
    if tokenizer_json.is_file() and pre_tokenizer_name(
            json.loads(tokenizer_json.read_text(encoding="utf-8"))):
        return None
    raise GgufExportError(f"no GGUF with the tokenizer of {model_path} found (looked in the "
                          "folder and the built-in models' GGUFs); pass a reference GGUF with "
                          "the same vocabulary (pkdq does not build GGUF tokenizers other than "
                          "Qwen2-style byte-level BPE)")


def tokenizer_fields(reference: Path) -> list[tuple[str, Any, Any, Any]]:
    """(key, value, type, array item type) of every tokenizer.* key, strings as raw bytes.

    Cached per file and size: parsing a 49k-token vocabulary with GGUFReader takes seconds,
    and the reference lookup and the writer both need it.
    """
    path = Path(reference).resolve()
    return _tokenizer_fields(str(path), path.stat().st_size, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _tokenizer_fields(path: str, _size: int, _mtime: int) -> list[tuple[str, Any, Any, Any]]:
    import gguf

    out = []
    for key, field in gguf.GGUFReader(path).fields.items():
        if not key.startswith("tokenizer."):
            continue
        main, sub = field.types[0], field.types[-1] if len(field.types) > 1 else None
        if main == gguf.GGUFValueType.ARRAY and sub == gguf.GGUFValueType.STRING:
            value: Any = [bytes(field.parts[i]) for i in field.data]
        elif main == gguf.GGUFValueType.STRING:
            value = bytes(field.parts[-1])
        else:
            value = field.contents()
        out.append((key, value, main, sub))
    return out


# --------------------------------------------------------------------------------------------
# Source model + writer
# --------------------------------------------------------------------------------------------


def load_source(model_path: Path) -> tuple[Any, Any, str]:
    """(float model, tokenizer, what the weights are): GPTQ folders give their grid values."""
    from tasks.core.model_store import is_quantized, load_model, read_config

    quant = read_config(model_path).get("quantization_config") or {}
    if is_quantized(model_path):
        if quant.get("quant_method") != "gptq":
            raise GgufExportError(f"GGUF export reads float or GPTQ-format checkpoints; "
                                  f"{model_path} is {quant.get('quant_method')}")
        from tasks.core.gptq_checkpoint import load_dequantized

        model, tokenizer = load_dequantized(model_path)
        return model, tokenizer, (f"gptq W{quant.get('bits')} g{quant.get('group_size')} "
                                  "dequantized grid values")
    model, tokenizer = load_model(model_path)
    return model, tokenizer, "float weights"


BOS_KEYS = ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.bos_token_id")


def bos_metadata(tokenizer: Any, config: dict[str, Any]) -> dict[str, Any]:
    """tokenizer.ggml.add_bos_token (and the BOS id when it is added), from the family's
    convention rather than the reference file: llama.cpp's tokenizer puts BOS first exactly when
    add_bos_token is true, and a Gemma model fed no <bos> is a different model."""
    from tasks.core.conventions import needs_bos

    if needs_bos(tokenizer, config):
        return {BOS_KEYS[0]: True, BOS_KEYS[1]: int(tokenizer.bos_token_id)}
    return {BOS_KEYS[0]: False}


def _write_metadata(writer: Any, shape: LlamaShape, qtype: str, name: str,
                    fields: list[tuple[str, Any, Any, Any]],
                    bos: dict[str, Any]) -> dict[str, Any]:
    import gguf

    writer.add_name(name)
    file_type = "F16" if qtype in LLAMA_QUANTIZED else qtype.upper()
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{file_type}"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    arch = {  # `<arch>.<key>`: (value, the writer method that types it as llama.cpp expects)
        "context_length": (shape.context, writer.add_context_length),
        "embedding_length": (shape.hidden, writer.add_embedding_length),
        "block_count": (shape.layers, writer.add_block_count),
        "feed_forward_length": (shape.ffn, writer.add_feed_forward_length),
        "attention.head_count": (shape.heads, writer.add_head_count),
        "attention.head_count_kv": (shape.kv_heads, writer.add_head_count_kv),
        "attention.key_length": (shape.head_dim, writer.add_key_length),
        "attention.value_length": (shape.head_dim, writer.add_value_length),
        "rope.dimension_count": (shape.head_dim, writer.add_rope_dimension_count),
        "rope.freq_base": (shape.rope_theta, writer.add_rope_freq_base),
        "attention.layer_norm_rms_epsilon": (shape.rms_eps, writer.add_layer_norm_rms_eps),
        "vocab_size": (shape.vocab, writer.add_vocab_size),
    }
    for value, add in arch.values():
        add(value)
    try:
        extra = write_arch_metadata(writer, shape.spec, shape.config, shape.layers)
    except ArchRefused as exc:
        raise GgufExportError(str(exc)) from exc
    for key, value, vtype, sub in fields:
        if key in BOS_KEYS and (key in bos or key == BOS_KEYS[0]):
            continue
        writer.add_key_value(key, value, vtype, sub_type=sub)
    writer.add_add_bos_token(bos[BOS_KEYS[0]])
    if BOS_KEYS[1] in bos:
        writer.add_bos_token_id(bos[BOS_KEYS[1]])
    prefix = shape.spec.name
    return {f"{prefix}.{key}": value for key, value in
            [*((k, v) for k, (v, _) in arch.items()), *extra.items()]}


def _write_file(tmp: Path, model: Any, shape: LlamaShape, qtype: str, name: str,
                fields: list[tuple[str, Any, Any, Any]], bos: dict[str, Any],
                exact: dict[str, ExactWeight] | None = None,
                embedding: str | None = None,
                q8_keys: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Write the GGUF into `tmp`; returns what was written (types, fallbacks, error).

    With `exact` (HF key -> codes and scales), those matrices are written block for block and
    every other matrix as F16 (the checkpoint stores them in fp16, so nothing is rounded) but
    the embedding/output, which are written in `embedding`. `q8_keys` (mixed 4/8-bit) are
    written in Q8_0 whatever `qtype` says.
    """
    import gguf

    writer = gguf.GGUFWriter(str(tmp), shape.spec.name)
    arch = _write_metadata(writer, shape, qtype, name, fields, bos)
    types: Counter[str] = Counter()
    fallbacks: dict[str, str] = {}
    errors, embedding_errors = _ErrorStats(), _ErrorStats()  # the embedding's type is its own
    written: set[str] = set()
    for key, tensor_name, data in gguf_tensors(model, shape):
        if exact is not None and key in exact:
            weight = permute_rows(exact[key], qk_permutation(tensor_name, shape))
            enc = Encoded(tensor_name, encode_exact(weight, qtype), qtype.upper())
        elif key in q8_keys:
            enc = encode_tensor(tensor_name, data, "q8_0")
        else:
            enc = encode_tensor(tensor_name, data, "f16" if exact is not None else qtype,
                                embedding)
        (embedding_errors if tensor_name in _EMBEDDING_NAMES else errors).add(data, enc)
        raw = None if enc.ggml_type in ("F32", "F16") else gguf.GGMLQuantizationType[enc.ggml_type]
        writer.add_tensor(tensor_name, enc.data, raw_dtype=raw)
        types[enc.ggml_type] += 1
        written.add(tensor_name)
        if enc.fallback:
            fallbacks[tensor_name] = enc.fallback
    missing = expected_tensor_names(shape) - written
    if missing:
        raise GgufExportError(f"GGUF would lack tensors llama.cpp needs: {sorted(missing)[:4]}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"gguf_architecture": shape.spec.name, "architecture": arch,
            "tensor_count": len(written), "tensor_types": dict(types), "fallbacks": fallbacks,
            "weight_error": errors.summary(), "embedding_error": embedding_errors.summary()}


def preflight(model_path: Path, qtype: str, reference_gguf: Path | None = None) -> Path | None:
    """Every refusal that needs no weights (qtype, architecture, tokenizer reference), so a
    stage can fail before hours of quantization; returns the reference GGUF to copy from (None:
    the tokenizer is built from the folder's tokenizer.json)."""
    set_offline_env()
    from transformers import AutoTokenizer

    check_qtype(qtype)
    model_path = Path(model_path)
    check_architecture(json.loads((model_path / "config.json").read_text()), model_path)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    return find_reference_gguf(model_path, tokenizer, reference_gguf)


def _exact_plan(model_path: Path, qtype: str, calibration: Any = None
                ) -> tuple[dict[str, ExactWeight] | None, str]:
    """The exact codes/scales when the GPTQ grid fits `qtype`, and one line saying what happened.
    """
    from tasks.core.model_store import is_quantized

    quantized = is_quantized(model_path)
    of = "the GPTQ grid values" if quantized else "the float weights"
    if qtype in LLAMA_QUANTIZED:
        matrix = ("no importance matrix" if calibration is None else
                  f"importance matrix from {calibration.source}")
        return None, (f"llama.cpp's own {LLAMA_QUANTIZED[qtype]} quantizer ({matrix}) on {of} "
                      "in f16")
    if qtype not in EXACT_GRIDS:
        return None, f"{of} in {qtype}"
    if not quantized:
        return None, f"{of} quantized to {qtype.upper()} by gguf-py"
    exact, problem = exact_weights(model_path, qtype)
    if exact is None:
        return None, (f"re-quantized onto {qtype.upper()} blocks ({problem}); GPTQ bits "
                      f"{EXACT_GRIDS[qtype][0]}, sym, group_size 32, desc_act false exports "
                      "exactly")
    return exact, (f"GPTQ grid written code for code as {qtype.upper()} (bit-exact); the "
                   "embedding/output in the embedding type, other matrices F16 as stored in the "
                   "checkpoint")


def _mix_in_q8(model: Any, qtype: str, layers: Sequence[int], source: Path | None
               ) -> set[str]:
    """Put the float weights of `layers`' linears (from `source`) into `model`, in place, and
    return their keys: the writer stores them in Q8_0, and the verification then compares the
    file with the very mix it holds."""
    if not layers:
        return set()
    if qtype != "q4_0" or source is None:
        raise GgufExportError("Q8_0 layers mix into a q4_0 export of a model quantized from a "
                              "float folder; give q4_0 and the float source")
    import torch

    from tasks.core.model_store import load_model
    from tasks.quantize.mixed_layers import mixed_keys

    state = model.state_dict()
    try:
        keys = mixed_keys(state, layers)
    except ValueError as exc:
        raise GgufExportError(str(exc)) from exc
    float_model, _ = load_model(Path(source))
    float_state = float_model.state_dict()
    with torch.no_grad():
        for key in keys:
            if tuple(float_state[key].shape) != tuple(state[key].shape):
                raise GgufExportError(f"{source} is not the float model of this checkpoint: "
                                      f"{key} is {tuple(float_state[key].shape)}")
            state[key].copy_(float_state[key])
    return keys


def _llama_quantize(f16_file: Path, out_file: Path, qtype: str, shape: LlamaShape,
                    calibration: Any = None, threads: int = 2) -> dict[str, Any]:
    """Run llama.cpp's own quantizer on the f16 file (with an importance matrix computed on
    `calibration`, a `tasks.quantize.imatrix.Calibration`, when given); the tensor types it
    chose and the imatrix record."""
    from tasks.core.llama_cpp import LlamaCppError, gguf_tensor_types, quantize_gguf

    ftype = LLAMA_QUANTIZED[qtype]
    if calibration is not None:
        from tasks.quantize.imatrix import imatrix_quantize

        imatrix = imatrix_quantize(f16_file, out_file, ftype, calibration, shape.context, threads)
        quantizer = f"llama.cpp llama-quantize {ftype} --imatrix (llama-imatrix on the f16 file)"
    else:
        try:
            quantize_gguf(f16_file, out_file, ftype, threads)
        except LlamaCppError as exc:
            raise GgufExportError(str(exc)) from exc
        imatrix = {"used": False}
        quantizer = f"llama.cpp llama_model_quantize {ftype} (no importance matrix)"
    return {"tensor_types": gguf_tensor_types(out_file), "quantizer": quantizer,
            "imatrix": imatrix, "weight_error_of": "the f16 file llama.cpp quantized"}


def export_gguf(model_path: Path, out_file: Path, qtype: str = "q8_0",
                reference_gguf: Path | None = None, verify: bool = True,
                calibration: Any = None, threads: int = 2,
                embedding: str | None = None, q8_layers: Sequence[int] = (),
                q8_source: Path | None = None) -> dict[str, Any]:
    """Write `model_path` (Llama, Mistral, Qwen2, Qwen3 or Gemma 3; float or GPTQ) as a GGUF
    llama.cpp can load; return metrics. `calibration` (`tasks.quantize.imatrix.Calibration`,
    q4_k_m only) gives llama.cpp's quantizer an importance matrix computed on that text.
    `embedding` is the embedding/output matrices' type (`embedding_type`). `q8_layers` (q4_0
    only) are decoder layers whose linears are written in Q8_0 from the float model at
    `q8_source` (the model `model_path` was quantized from): a mixed 4/8-bit file
    (`tasks.quantize.mixed_layers` chooses them); the file is verified against that mix.

    The file appears under its name only when complete (written as .partial, then renamed).
    `verify` loads it back (transformers for the llama layout, llama.cpp for the others) and
    compares logits with the source model on the same token ids.
    """
    model_path, out_file = Path(model_path), Path(out_file)
    reference = preflight(model_path, qtype, reference_gguf)
    embed_type = embedding_type(qtype, embedding)
    spec = check_architecture(json.loads((model_path / "config.json").read_text()), model_path)
    model, tokenizer, source = load_source(model_path)
    shape = llama_shape(model, spec)
    bos = bos_metadata(tokenizer, shape.config)
    if reference is not None and len(tokenizer) != shape.vocab:
        raise GgufExportError(f"embedding has {shape.vocab} rows but the tokenizer has "
                              f"{len(tokenizer)} tokens; GGUF needs them equal")
    if reference is None:
        from tasks.quantize.gguf_tokenizer import built_tokenizer_fields

        if len(tokenizer) > shape.vocab:
            raise GgufExportError(f"the tokenizer has {len(tokenizer)} tokens, more than the "
                                  f"embedding's {shape.vocab} rows")
        fields = built_tokenizer_fields(model_path, tokenizer, shape.vocab) or []
        tokenizer_source = f"built from {model_path / 'tokenizer.json'} (padded to {shape.vocab})"
    else:
        fields = tokenizer_fields(reference)
        tokenizer_source = f"copied from {reference}"
    print(f"[gguf] {qtype} export of {model_path} -> {out_file}", file=sys.stderr, flush=True)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".partial")
    name = f"pkdq {model_path.parent.name}/{model_path.name}"
    if calibration is not None and qtype not in LLAMA_QUANTIZED:
        raise GgufExportError(f"an importance matrix is for llama.cpp's k-quants "
                              f"({', '.join(LLAMA_QUANTIZED)}), not {qtype}")
    exact, exact_note = _exact_plan(model_path, qtype, calibration)
    q8_keys = _mix_in_q8(model, qtype, q8_layers, q8_source)
    if q8_keys:
        exact = {k: v for k, v in exact.items() if k not in q8_keys} if exact else exact
        exact_note += (f"; decoder layers {', '.join(map(str, sorted(q8_layers)))} in Q8_0 "
                       f"from the float weights of {q8_source}")
    write_type = "f16" if qtype in LLAMA_QUANTIZED else qtype
    try:
        written = _write_file(tmp, model, shape, write_type, name, fields, bos, exact,
                              embed_type, frozenset(q8_keys))
        if qtype in LLAMA_QUANTIZED:
            written |= _llama_quantize(tmp, out_file, qtype, shape, calibration, threads)
        else:
            os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    metrics: dict[str, Any] = {
        "file": str(out_file), "bytes": out_file.stat().st_size, "qtype": qtype,
        "source": {"path": str(model_path), "weights": source},
        "reference_gguf": str(reference) if reference else None,
        "tokenizer_source": tokenizer_source, "tokenizer_bos": bos, **written,
        "exact_grid": exact is not None, "exact_grid_note": exact_note,
        "q8_0_layers": sorted(q8_layers),
        "embedding_type": embed_type or "llama.cpp's choice",
        "grid_note": GRID_NOTE,
        "llama_cpp_verified": False, "llama_cpp_note": LLAMA_CPP_NOTE,
        "versions": {d: metadata.version(d) for d in ("gguf", "transformers")},
    }
    if verify and spec.gguf_arch == "LLAMA":
        from tasks.quantize.gguf_verify import verify_gguf

        metrics["verified_loader"] = "transformers-gguf"
        metrics["verification"] = verify_gguf(out_file, model, tokenizer)
    elif verify:
        from tasks.quantize.gguf_verify import verify_in_llama_cpp

        metrics["verified_loader"] = "llama.cpp"
        metrics["verification"] = verify_in_llama_cpp(out_file, model, tokenizer)
        metrics["llama_cpp_verified"] = True
    return metrics
