"""Which linears a quantizer touches and whether their real shapes suit the config.

Shapes come from a meta-device build of the config (no memory, any architecture) and, for a
folder, from its safetensors headers, so a pruned model whose weights disagree with a uniform
config is checked on its real sizes. The torch-free rules (allowed group sizes, Marlin tiles)
live in `tasks.quantize.shapes`, which `pkdq validate` uses without importing torch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from tasks.core.common import set_offline_env
from tasks.core.recipe import QuantizeConfig
from tasks.quantize.shapes import (
    MARLIN_K_MULTIPLE,
    MARLIN_N_MULTIPLE,
    group_size_hint,
    marlin_k_note,
)

_LAYER_INDEX = re.compile(r"\.\d+\.")


def load_config(model_path_or_config: Any):
    """A transformers config from a folder, a config object, or a plain dict."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model_path_or_config, PretrainedConfig):
        return model_path_or_config
    if isinstance(model_path_or_config, dict):
        data = dict(model_path_or_config)
        return AutoConfig.for_model(data.pop("model_type"), **data)
    set_offline_env()
    return AutoConfig.from_pretrained(str(model_path_or_config))


def _safetensors_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Shapes from safetensors headers: a (pruned) checkpoint's true sizes, no weights read."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def quantizable_linears(model_path_or_config: Any) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} of the linears GPTQ quantizes.

    Those are the nn.Linear modules inside the repeated decoder blocks (names with a `.N.` index);
    lm_head and embeddings stay in floating point, as GPTQModel does with `lm_head=False`. The
    module list comes from a meta-device build of the config (no memory, any architecture);
    sizes come from the checkpoint's safetensors headers when a folder is given, so a pruned
    model whose weights disagree with a uniform config is still checked on its real shapes.
    """
    from transformers import AutoModelForCausalLM

    config = load_config(model_path_or_config)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    linears = {
        name: (module.in_features, module.out_features)
        for name, module in skeleton.named_modules()
        if isinstance(module, torch.nn.Linear) and _LAYER_INDEX.search(f".{name}.")
    }
    if isinstance(model_path_or_config, (str, Path)) and Path(model_path_or_config).is_dir():
        shapes = _safetensors_shapes(Path(model_path_or_config))
        for name in linears:
            shape = shapes.get(f"{name}.weight")
            if shape is not None and len(shape) == 2:
                linears[name] = (shape[1], shape[0])
    return linears


def _index_ranges(indices: list[int]) -> str:
    """[0, 1, 2, 3, 7] -> "0-3,7": every index stays named, runs of 3+ shortened."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs)


def compact_names(sizes: dict[str, int]) -> dict[str, int]:
    """Fold `model.layers.N.x` names sharing a size into `model.layers.[0-29].x`.

    A 30-layer model would otherwise give a 9 kB error line; this one still names every layer.
    """
    groups: dict[tuple[str, int], list[int]] = {}
    singles: dict[str, int] = {}
    for name, size in sizes.items():
        match = re.search(r"\.(\d+)\.", name)
        if not match:
            singles[name] = size
            continue
        template = name[: match.start()] + ".{}." + name[match.end():]
        groups.setdefault((template, size), []).append(int(match.group(1)))
    out = dict(singles)
    for (template, size), indices in groups.items():
        label = str(indices[0]) if len(indices) == 1 else f"[{_index_ranges(indices)}]"
        out[template.format(label)] = size
    return out


def check_group_size(model_path_or_config: Any, group_size: int) -> None:
    """Refuse a group size that does not divide every quantized layer's in_features.

    GPTQ scales are per (group of input columns); a partial trailing group is not representable
    in the checkpoint format that kernels expect, and pruned models may have odd widths. The
    error names every offending layer so the user can pick a group size or a prune `round_to`.
    """
    linears = quantizable_linears(model_path_or_config)
    if not linears:
        raise ValueError("no quantizable linear layers found (expected decoder-block nn.Linear)")
    bad = {name: dims[0] for name, dims in linears.items() if dims[0] % group_size}
    if not bad:
        return
    listed = ", ".join(f"{name} (in_features {n})" for name, n in compact_names(bad).items())
    hint = group_size_hint(dims[0] for dims in linears.values())
    raise ValueError(f"group_size {group_size} does not divide in_features of {len(bad)} "
                     f"layer(s): {listed}; {hint}")


AWQ_OUT_MULTIPLE = 64  # GPTQModel's AWQ clip search walks output rows in batches of 64 (or 256)


def check_awq_shapes(model_path_or_config: Any) -> None:
    """Refuse AWQ on layers whose out_features GPTQModel's AWQ cannot process (it asserts)."""
    bad = {name: dims[1] for name, dims in quantizable_linears(model_path_or_config).items()
           if dims[1] % AWQ_OUT_MULTIPLE}
    if bad:
        listed = ", ".join(f"{n} (out_features {v})" for n, v in compact_names(bad).items())
        raise ValueError(f"awq needs out_features divisible by {AWQ_OUT_MULTIPLE} (GPTQModel 7.6 "
                         f"clip search); offending: {listed}; use gptq or rtn")


def serving_notes(model_path_or_config: Any, cfg: QuantizeConfig) -> dict[str, Any]:
    """Which vLLM loader the checkpoint targets and what would stop its fast kernel.

    vLLM needs CUDA and cannot be installed on this CPU machine, so nothing here is verified
    with vLLM; these are the documented layout constraints, checked against the real shapes.
    Marlin (gptq_marlin / awq_marlin) wants in_features % 128 and out_features % 64; SmolLM2's
    hidden size 576 fails the first, so vLLM would fall back to its slower non-Marlin kernel.
    """
    linears = quantizable_linears(model_path_or_config)
    warnings: list[str] = []
    bad_k = {n: d[0] for n, d in linears.items() if d[0] % MARLIN_K_MULTIPLE}
    bad_n = {n: d[1] for n, d in linears.items() if d[1] % MARLIN_N_MULTIPLE}
    if bad_k:
        warnings.append(marlin_k_note(compact_names(bad_k)))
    if bad_n:
        names = ", ".join(f"{n} ({v})" for n, v in compact_names(bad_n).items())
        warnings.append(f"vLLM Marlin kernels need out_features divisible by "
                        f"{MARLIN_N_MULTIPLE}; not: {names}")
    if cfg.method == "awq" and cfg.bits != 4:
        warnings.append("vLLM's AWQ kernels are 4-bit only; an 8-bit AWQ checkpoint loads here "
                        "(GPTQModel) but not in vLLM")
    if cfg.method != "awq" and not cfg.sym:
        warnings.append("asymmetric GPTQ: vLLM's gptq_marlin wants sym=True")
    loader = "awq / awq_marlin" if cfg.method == "awq" else "gptq / gptq_marlin"
    return {
        "vllm_quantization": loader,
        "vllm_verified": "no: vLLM needs CUDA and cannot be installed on this CPU-only machine",
        "warnings": warnings,
    }
