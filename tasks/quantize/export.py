"""`pkdq export`: a pkdq model folder (or a run's final model) in the format a runtime serves,
verified in that runtime.

- hf, hf-bf16: dense safetensors (fp32 / bf16); a GPTQ source gives its grid values.
  Verified in transformers.
- gptq: the GPTQ checkpoint as is (stock transformers loads it: optimum + gptqmodel).
  Verified in transformers.
- compressed-tensors: a GPTQ checkpoint's grid (codes, fp16 scales, zeros) rewritten without
  requantization as compressed-tensors `pack-quantized` (W4A16 / W8A16), the int format vLLM
  serves natively; transformers loads it through the compressed-tensors package (`ct_export`).
  Verified in transformers.
- gguf-f16, gguf-q8_0, gguf-q4_0: GGUF via gguf-py; a GPTQ grid the GGUF type can hold
  (bits 4 / 8, sym, group 32) is written exactly. Verified in llama.cpp.
- gguf-q4_k_m: the f16 GGUF quantized by llama.cpp's own quantizer, with an importance matrix
  (`llama-imatrix`, `tasks.quantize.imatrix`) on the run's recipe calibration text when the
  source is a run folder (or a stage model in one), or on `calibration` when named; without
  one otherwise or when `imatrix=False`. The record says which, on how many tokens of what.
  Verified in llama.cpp.

Verification scores the same WikiText-2 test slice (pkdq's window convention) with pkdq's own
loader on the source and with the serving runtime on the export, and states both perplexities.
Refusals are one line (`ExportError`) and happen before any weight is read.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from tasks.core.common import GGUF_FILE
from tasks.core.model_folder import FINGERPRINT_FILE, is_sealed
from tasks.quantize.errors import ExportError

FORMATS = ("hf", "hf-bf16", "gptq", "compressed-tensors", "gguf-f16", "gguf-q8_0", "gguf-q4_0",
           "gguf-q4_k_m")
EXPORT_FORMATS = FORMATS
RECORD = ".pkdq-export.json"  # a dot file: not part of the sealed folder's content
VERIFY_TOKENS = 2048  # WikiText-2 test tokens scored on both sides (4 windows of 512)


# --------------------------------------------------------------------------------------------
# Checks (torch-free)
# --------------------------------------------------------------------------------------------


def final_model(run_or_model: Path) -> Path:
    """The model folder itself, or for a run folder (run.json inside) its last stage's model."""
    path = Path(run_or_model)
    if (path / "config.json").is_file():
        return path
    if (path / "run.json").is_file():
        stages = sorted(p for p in path.glob("[0-9][0-9]-*/model") if (p / "config.json").is_file())
        if not stages:
            raise ExportError(f"run folder {path} has no finished stage model to export")
        return stages[-1]
    raise ExportError(f"{path} is neither a model folder (config.json) nor a pkdq run folder "
                      "(run.json)")


def check_export(run_or_model: Path, dest: Path, fmt: str, overwrite: bool = False,
                 embedding: str | None = None) -> Path:
    """Every refusal that needs no weights; returns the model folder to export."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if embedding is not None and not fmt.startswith("gguf-"):
        raise ExportError(f"an embedding type is for the gguf formats, not {fmt}")
    src = final_model(run_or_model)
    if not is_sealed(src):
        raise ExportError(f"{src} is not a pkdq output (no {FINGERPRINT_FILE}); export takes "
                          "folders pkdq wrote (a run's stage model or `pkdq quantize` output)")
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not overwrite:
        raise ExportError(f"export folder {dest} exists and is not empty; pass --overwrite to "
                          "replace it")
    if dest.resolve() == src.resolve() or src.resolve() in dest.resolve().parents:
        raise ExportError(f"export folder {dest} is inside the source model {src}")
    config = json.loads((src / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method") if quant.get("quant_method") != "gguf" else None
    if fmt == "gptq" and method != "gptq":
        raise ExportError(f"format gptq needs a GPTQ checkpoint; {src} is "
                          f"{method or 'a float model'} (quantize it first: pkdq quantize)")
    if method not in (None, "gptq"):
        raise ExportError(f"export reads float or GPTQ-format models; {src} is {method}")
    if fmt == "compressed-tensors":
        from tasks.quantize.ct_export import check_ct_source

        check_ct_source(quant, src)
    if fmt.startswith("gguf-"):
        from tasks.quantize.gguf_export import GgufExportError, check_architecture, embedding_type

        try:
            embedding_type(fmt.removeprefix("gguf-"), embedding)
            check_architecture(config, src)
        except GgufExportError as exc:
            raise ExportError(f"format {fmt}: {exc}") from exc
    return src


IMATRIX_FORMATS = ("gguf-q4_k_m",)  # llama.cpp's k-quants: the ones an importance matrix steers


def plan_imatrix(run_or_model: Path, fmt: str, imatrix: bool = True,
                 calibration: str | None = None) -> tuple[Any, str | None]:
    """(the `Calibration` the importance matrix is computed on, or None; why none), torch-free,
    with the llama.cpp executables checked, so a refusal comes before any weight is read."""
    from tasks.core.recipe import QuantizeConfig, Recipe
    from tasks.quantize import imatrix as im

    if calibration is not None and fmt not in IMATRIX_FORMATS:
        raise ExportError(f"--calibration is the importance-matrix text of "
                          f"{', '.join(IMATRIX_FORMATS)}, not of {fmt}")
    if calibration is not None and not imatrix:
        raise ExportError("--calibration names importance-matrix text; --no-imatrix turns the "
                          "matrix off: pass one of them")
    if fmt not in IMATRIX_FORMATS:
        return None, None
    if not imatrix:
        return None, "--no-imatrix"
    run = im.run_folder_of(run_or_model)
    if run is None and calibration is None:
        return None, ("no calibration text: export a pkdq run folder (its recipe's calibration) "
                      "or pass --calibration")
    cal = im.recipe_calibration(run) if run is not None else None
    if calibration is not None:
        default = QuantizeConfig().calibration
        cal = im.named_calibration(
            calibration, cal.tokens if cal else default.samples * default.seq_len,
            cal.chunk_tokens if cal else default.seq_len,
            cal.seed if cal else Recipe.model_fields["seed"].default)
    im.check_tools()
    return cal, None


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


def _source_model(src: Path):
    """(float model, tokenizer): GPTQ folders give exactly their grid values."""
    from tasks.core.model_store import is_quantized, load_model

    if is_quantized(src):
        from tasks.core.gptq_checkpoint import load_dequantized

        return load_dequantized(src)
    return load_model(src)


def _write_dense(src: Path, tmp: Path, dtype_name: str) -> dict[str, Any]:
    import torch

    from tasks.core.model_store import save_model

    model, tokenizer = _source_model(src)
    model.to(getattr(torch, dtype_name))
    model.config.dtype = getattr(torch, dtype_name)
    save_model(model, tokenizer, tmp)
    return {"dtype": dtype_name}


def _write_gptq(src: Path, tmp: Path) -> dict[str, Any]:
    from tasks.core.model_folder import seal_folder

    stage = tmp.with_name(tmp.name + ".copy")
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(src, stage)
    seal_folder(stage, tmp)
    quant = json.loads((src / "config.json").read_text())["quantization_config"]
    return {"quantization": {k: quant.get(k) for k in ("bits", "group_size", "sym", "desc_act")}}


def _write_gguf(src: Path, tmp: Path, qtype: str, reference: Path | None,
                calibration: Any = None, threads: int = 2,
                embedding: str | None = None) -> dict[str, Any]:
    from tasks.quantize.gguf_export import export_gguf

    tmp.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json"):
        if (src / name).is_file():  # what a model card and HF tools read beside the GGUF
            shutil.copy2(src / name, tmp / name)
    return export_gguf(src, tmp / GGUF_FILE, qtype, reference, verify=False,
                       calibration=calibration, threads=threads, embedding=embedding)


# --------------------------------------------------------------------------------------------
# Verification in the serving runtime
# --------------------------------------------------------------------------------------------


def _torch_perplexity(model: Any, ids: list[int], max_length: int) -> dict[str, Any]:
    import torch

    from tasks.core.perplexity import perplexity

    def logits_of(window: list[int]):
        with torch.inference_mode():
            x = torch.tensor([window], device=model.device)
            return model(input_ids=x).logits[0].float().cpu().numpy()

    return perplexity(logits_of, ids, max_length)


def verify_export(src: Path, dest: Path, fmt: str, tokens: int = VERIFY_TOKENS,
                  max_length: int = 512, threads: int = 2) -> dict[str, Any]:
    """Perplexity of the source with pkdq's loader and of the export in its serving runtime,
    on the same WikiText-2 test token ids."""
    from tasks.core.common import data_dir
    from tasks.core.model_store import load_model
    from tasks.core.perplexity import wikitext_ids

    model, tokenizer = load_model(src)
    limit = int(getattr(model.config, "max_position_embeddings", max_length) or max_length)
    max_length = min(max_length, limit)
    ids = wikitext_ids(tokenizer, data_dir(), tokens)
    ref = _torch_perplexity(model, ids, max_length)
    del model
    if fmt.startswith("gguf-"):
        from tasks.core.llama_cpp import llama_cpp_perplexity

        got = llama_cpp_perplexity(dest / GGUF_FILE, ids=ids, max_length=max_length,
                                   threads=threads)
        runtime = got["runtime"]
    else:
        from transformers import AutoModelForCausalLM

        stock = AutoModelForCausalLM.from_pretrained(str(dest)).eval()  # what a user types
        got = _torch_perplexity(stock, ids, max_length)
        runtime = f"transformers AutoModelForCausalLM.from_pretrained ({stock.dtype})"
        del stock
    a, b = ref["token_perplexity"], got["token_perplexity"]
    return {"slice": f"WikiText-2 test, first {len(ids)} tokens, windows of {max_length}",
            "pkdq_loader_perplexity": a, "export_perplexity": b, "export_runtime": runtime,
            "relative_difference": (b - a) / a}


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def export_model(run_or_model: Path, dest: Path, fmt: str, overwrite: bool = False,
                 verify: bool = True, reference_gguf: Path | None = None,
                 verify_tokens: int = VERIFY_TOKENS, threads: int = 2, imatrix: bool = True,
                 calibration: str | None = None, embedding: str | None = None
                 ) -> dict[str, Any]:
    """Write `run_or_model` (a pkdq model folder or a run's final model) to folder `dest` as
    `fmt`, verify it in its serving runtime, and return (and store as dest/export.json) what
    was done. The folder appears under its name only when complete. `imatrix` and
    `calibration` steer gguf-q4_k_m's importance matrix (`plan_imatrix`); `embedding` is a
    GGUF's embedding/output type (`gguf_export.embedding_type`)."""
    from tasks.core.common import write_json_atomic

    src = check_export(run_or_model, dest, fmt, overwrite, embedding)
    cal, no_imatrix = plan_imatrix(run_or_model, fmt, imatrix, calibration)
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    try:
        if fmt in ("hf", "hf-bf16"):
            written = _write_dense(src, tmp, "float32" if fmt == "hf" else "bfloat16")
        elif fmt == "gptq":
            written = _write_gptq(src, tmp)
        elif fmt == "compressed-tensors":
            from tasks.quantize.ct_export import write_compressed_tensors

            written = write_compressed_tensors(src, tmp)
        else:
            written = _write_gguf(src, tmp, fmt.removeprefix("gguf-"), reference_gguf, cal,
                                  threads, embedding)
            if no_imatrix:
                written["imatrix"] = {"used": False, "why": no_imatrix}
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp.with_name(tmp.name + ".copy"), ignore_errors=True)
    if fmt.startswith("gguf-"):
        written["file"] = str(dest / GGUF_FILE)
    record: dict[str, Any] = {
        "source": str(src), "dest": str(dest), "format": fmt, "written": written,
        "bytes": sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()),
        "write_s": time.perf_counter() - start,
    }
    if verify:
        record["verification"] = verify_export(src, dest, fmt, verify_tokens, threads=threads)
    write_json_atomic(dest / RECORD, record)
    return record
