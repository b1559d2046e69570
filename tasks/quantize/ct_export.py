"""A pkdq GPTQ folder as a compressed-tensors `pack-quantized` checkpoint, on the same grid.

compressed-tensors pack-quantized (W4A16 / W8A16) is the format vLLM serves natively and stock
transformers loads (through the `compressed-tensors` package). pkdq's quantize stage writes GPTQ
v1 folders; this rewrites their integer codes and fp16 scales into that layout with
no requantization, so the export holds exactly the values `load_dequantized` gives:

- codes: GPTQ stores unsigned q in [0, 2^b) packed along inputs; compressed-tensors stores the
  signed q - 2^(b-1), packed by its own `pack_to_int32` along inputs (`weight_packed` [out, ...]);
- scales: GPTQ `scales` [groups, out] become `weight_scale` [out, groups], same fp16 values;
- zero points: a symmetric GPTQ grid's zeros are all 2^(b-1) (v1 `qzeros` hold zero - 1), which
  is compressed-tensors' symmetric grid (no zero point stored); checked per module;
- `quantization_config`: built with compressed-tensors' own QuantizationConfig / Scheme / Args
  (strategy group, or channel for GPTQ group_size -1), `ignore` naming every Linear GPTQ left in
  float (lm_head at least).

Refused in one line: act-order (desc_act) checkpoints (pkdq's dequantized loader does not read
them, so there is no reference to hold the export to) and asymmetric grids. compressed-tensors
packs asymmetric zero points along outputs (what llm-compressor writes and vLLM reads), but
0.20.1's compressor, run on transformers' meta-device model at load, leaves them unpacked, so
transformers 5.23 refuses such a checkpoint (size mismatch on weight_zero_point).

Every module is decompressed back with the library's PackedQuantizationCompressor and compared
with pkdq's own dequantization before the folder is sealed; the maximum difference is recorded
(0.0: the grid round-trips exactly).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from tasks.core.gptq_checkpoint import dequantize, read_parts, scale_zero, unpack_int32
from tasks.core.model_folder import copy_side_files, seal_folder
from tasks.quantize.errors import ExportError

CT_PIN = "compressed-tensors==0.20.1"  # pyproject.toml's pin: what the writer was checked with
FORMAT = "pack-quantized"  # compressed-tensors' name for int weights packed into int32 words


def check_ct_source(quant: dict[str, Any], src: Path) -> None:
    """Refusals readable from config.json alone: the GPTQ grid compressed-tensors can hold."""
    if not quant:
        raise ExportError(f"format compressed-tensors needs a GPTQ checkpoint; {src} is a float "
                          "model (quantize it first: pkdq quantize --method gptq)")
    if quant.get("desc_act"):
        raise ExportError(f"format compressed-tensors: {src} was quantized with desc_act "
                          "(act-order); pkdq exports act-order grids only as gptq (quantize "
                          "with desc_act false for compressed-tensors)")
    if not quant.get("sym", True):
        raise ExportError(f"format compressed-tensors: {src} has an asymmetric grid (sym false), "
                          "whose packed zero points transformers 5.23 with compressed-tensors "
                          "0.20.1 cannot load; quantize with sym true, or export as gptq")
    bits = quant.get("bits")
    if bits not in (2, 4, 8):
        raise ExportError(f"format compressed-tensors: {src} has bits {bits}; pkdq exports "
                          "GPTQ bits 2, 4 or 8")


def _library() -> SimpleNamespace:
    """compressed-tensors' pieces (imported only here), or one line naming the pin to install."""
    try:
        import compressed_tensors
        from compressed_tensors import quantization
        from compressed_tensors.base import COMPRESSION_VERSION_NAME
        from compressed_tensors.compressors.pack_quantized.base import (
            PackedQuantizationCompressor,
        )
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError as exc:
        raise ExportError(f"format compressed-tensors needs {CT_PIN} (./setup.sh installs it): "
                          f"{exc}") from exc
    return SimpleNamespace(version=compressed_tensors.__version__,
                           version_key=COMPRESSION_VERSION_NAME, q=quantization,
                           compressor=PackedQuantizationCompressor, pack=pack_to_int32)


def _float_linears(src: Path) -> set[str]:
    """Names of every nn.Linear of the architecture, from a meta-device build (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(str(src))
    del hf_config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def _module_grid(name: str, parts: dict[str, torch.Tensor], bits: int, group_size: int,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [out, in] unsigned, scales [out, groups] fp16) of one module, refusing a g_idx
    that is not the plain group order (act-order) and zeros that are not the symmetric 2^(b-1)."""
    codes = unpack_int32(parts["qweight"], bits, dim=0).t().contiguous()  # [out, in]
    _, zeros = scale_zero(parts, bits)
    columns = codes.shape[1]
    size = columns if group_size == -1 else group_size
    plain = torch.arange(columns, dtype=torch.int64) // size
    if not torch.equal(parts["g_idx"].long(), plain):
        raise ExportError(f"format compressed-tensors: {name}.g_idx is not the plain group "
                          f"order (i // {size}); act-order grids export only as gptq")
    if not bool((zeros == 2 ** (bits - 1)).all()):
        raise ExportError(f"format compressed-tensors: {name} has zero points other than "
                          f"{2 ** (bits - 1)} (an asymmetric grid); quantize with sym true, or "
                          "export as gptq")
    return codes, parts["scales"].t().contiguous()


def write_compressed_tensors(src: Path, tmp: Path) -> dict[str, Any]:
    """Write GPTQ folder `src` as a sealed compressed-tensors pack-quantized folder at `tmp`;
    returns what was written (bits, group, symmetric, ignored linears, the round-trip error)."""
    ct = _library()
    q = ct.q
    config = json.loads((src / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    check_ct_source(quant, src)
    bits, group_size = int(quant["bits"]), int(quant.get("group_size", -1))
    plain, quant_parts = read_parts(src)
    grids = {name: _module_grid(name, parts, bits, group_size)
             for name, parts in quant_parts.items()}
    linears = _float_linears(src)
    odd = sorted(set(grids) - linears)
    if odd:
        raise ExportError(f"format compressed-tensors: {src} quantizes {odd[0]}, which is not "
                          "an nn.Linear of the architecture")
    group = group_size != -1
    weights = q.QuantizationArgs(
        num_bits=bits, type=q.QuantizationType.INT, symmetric=True,
        strategy=q.QuantizationStrategy.GROUP if group else q.QuantizationStrategy.CHANNEL,
        group_size=group_size if group else None)
    scheme = q.QuantizationScheme(targets=["Linear"], weights=weights, format=FORMAT)
    ignore = sorted(linears - set(grids))
    qconfig = q.QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore,
                                   format=FORMAT,
                                   quantization_status=q.QuantizationStatus.COMPRESSED)
    offset = 2 ** (bits - 1)
    tensors = dict(plain)
    max_abs = 0.0
    for name, (codes, scales) in grids.items():
        module = {"weight_packed": ct.pack((codes - offset).to(torch.int8), bits),
                  "weight_scale": scales,
                  "weight_shape": torch.tensor(list(codes.shape), dtype=torch.int64)}
        tensors |= {f"{name}.{key}": value for key, value in module.items()}
        # the library's own decompression (fp32 scales: the grid values exactly) vs pkdq's
        back = ct.compressor.decompress(module | {"weight_scale": scales.float()}, scheme)["weight"]
        max_abs = max(max_abs, (back - dequantize(quant_parts[name], bits)).abs().max().item())
    stage = tmp.with_name(tmp.name + ".copy")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()},
              str(stage / "model.safetensors"), metadata={"format": "pt"})
    # config.json is rewritten below; GPTQModel's quantize_config.json describes the old layout
    copy_side_files(src, stage, skip=("config.json", "quantize_config.json"))
    config["quantization_config"] = qconfig.model_dump() | {ct.version_key: ct.version}
    (stage / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    seal_folder(stage, tmp)
    return {"quantization": {"format": FORMAT, "bits": bits,
                             "group_size": group_size, "symmetric": True,
                             "ignore": ignore, "modules": len(grids)},
            "compressed_tensors": ct.version,
            "exact_grid": max_abs == 0.0, "weight_error": {"max_abs": max_abs}}
