"""llama.cpp, the runtime CPU users deploy GGUF models on, through llama-cpp-python.

One home for running a GGUF the way llama.cpp does, so exports are verified, and speed is
measured, in the runtime that will serve them rather than in transformers:

- `llama_cpp_perplexity`: token perplexity under pkdq's window convention (`core.perplexity`),
  from llama.cpp's own logits, so it compares number for number with pkdq's torch loader;
- `llama_cpp_speed`: prefill and greedy decode tokens/s and peak RSS, in a fresh process (peak
  RSS of this one would include torch and whatever else ran before);
- `quantize_gguf`: llama.cpp's own quantizer (`llama_model_quantize`), for the k-quants gguf-py
  cannot write;
- `compute_imatrix` / `quantize_with_imatrix`: llama.cpp's `llama-imatrix` and `llama-quantize`
  executables (setup.sh builds them from the llama.cpp that llama-cpp-python vendors, so they
  match its version): the binding cannot pass an importance matrix (`imatrix` in the quantize
  params is a C++ map pointer ctypes cannot build) and ships no imatrix tool.

Importing this module imports neither torch nor llama_cpp; the functions import llama_cpp.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.peak_memory import peak_rss_bytes
from tasks.core.perplexity import perplexity

PIN = "llama-cpp-python==0.3.36"


class LlamaCppError(RuntimeError):
    """llama.cpp could not load or run a GGUF; one line says why."""


def _llama_cpp():
    try:
        import llama_cpp
    except Exception as exc:  # noqa: BLE001 - any import failure means the runtime is absent
        raise LlamaCppError(f"llama.cpp runtime missing: {PIN} failed to import "
                            f"({type(exc).__name__}: {exc}); run ./setup.sh") from exc
    return llama_cpp


def llama_cpp_version() -> str:
    return str(_llama_cpp().__version__)


def open_gguf(gguf_path: Path, n_ctx: int, threads: int, logits_all: bool = False,
              n_batch: int = 512):
    """A `llama_cpp.Llama` on CPU, quiet, with `threads` for both prefill and decode."""
    llama_cpp = _llama_cpp()
    path = Path(gguf_path)
    if not path.is_file():
        raise LlamaCppError(f"{path}: no such GGUF file")
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch,
                               n_ubatch=n_batch, n_threads=threads, n_threads_batch=threads,
                               logits_all=logits_all, n_gpu_layers=0, verbose=False)
    except Exception as exc:  # noqa: BLE001 - llama.cpp reports load failures as ValueError
        raise LlamaCppError(f"llama.cpp could not load {path}: {exc}") from exc


def llama_cpp_perplexity(gguf_path: Path, text: str | None = None, ids: list[int] | None = None,
                         max_length: int = 512, tokens: int | None = None,
                         threads: int = 2) -> dict[str, Any]:
    """Token perplexity of `ids` (or of `text`, tokenised by the GGUF's own tokenizer, no BOS)
    in llama.cpp, over non-overlapping windows of `max_length` (the evaluate stage's slice).

    Pass the ids pkdq's tokenizer produced to compare with pkdq's loader on the same tokens.
    """
    if (text is None) == (ids is None):
        raise ValueError("pass exactly one of text or ids")
    llm = open_gguf(gguf_path, n_ctx=max_length, threads=threads, logits_all=True,
                    n_batch=max_length)
    if ids is None:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    ids = list(ids)[:tokens] if tokens else list(ids)

    def logits_of(window: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(window)
        return np.array(llm.scores[:len(window)], dtype=np.float32)

    start = time.perf_counter()
    out = perplexity(logits_of, ids, max_length)
    out |= {"runtime": f"llama.cpp (llama-cpp-python {llama_cpp_version()})",
            "threads": threads, "wall_s": time.perf_counter() - start}
    llm.close()
    return out


def _last_logits(llm, vocab: int) -> np.ndarray:
    """The last evaluated token's logits (without logits_all, `Llama.scores` is not filled)."""
    return np.ctypeslib.as_array(_llama_cpp().llama_get_logits(llm.ctx), shape=(vocab,))


def _speed_here(gguf_path: Path, prompt_tokens: int, decode_tokens: int, threads: int,
                repeats: int) -> dict[str, Any]:
    """Runs in the measuring process: median prefill and decode rates over `repeats`."""
    # VmHWM, not ru_maxrss: Linux carries the parent's RSS at fork into a child's ru_maxrss
    # across exec, so a child of a process holding torch and a model "peaked" at the parent's
    # size (2.5 GB reported for a 270 MB GGUF) before it loaded anything
    baseline_kb = peak_rss_bytes() / 1024
    llm = open_gguf(gguf_path, n_ctx=prompt_tokens + decode_tokens, threads=threads)
    vocab = llm.n_vocab()
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(100, vocab, size=prompt_tokens)]
    prefill, decode = [], []
    for _ in range(repeats + 1):  # the first pass warms caches and is not counted
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        mid = time.perf_counter()
        for _ in range(decode_tokens):  # greedy: the most likely next token, one at a time
            llm.eval([int(np.argmax(_last_logits(llm, vocab)))])
        end = time.perf_counter()
        prefill.append(prompt_tokens / (mid - start))
        decode.append(decode_tokens / (end - mid))
    llm.close()
    peak_kb = peak_rss_bytes() / 1024
    return {"prefill_tok_s": float(np.median(prefill[1:])),
            "decode_tok_s": float(np.median(decode[1:])),
            "peak_rss_mb": peak_kb / 1024, "process_before_load_mb": baseline_kb / 1024,
            "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens, "threads": threads,
            "repeats": repeats, "file_mb": Path(gguf_path).stat().st_size / 1e6,
            "runtime": f"llama.cpp (llama-cpp-python {llama_cpp_version()})"}


def llama_cpp_speed(gguf_path: Path, prompt_tokens: int = 512, decode_tokens: int = 64,
                    threads: int = 2, repeats: int = 3, timeout_s: float = 900) -> dict[str, Any]:
    """Prefill and greedy-decode tokens/s (medians of `repeats`) and peak RSS in llama.cpp.

    Runs in a fresh Python process that imports only numpy and llama_cpp, so `peak_rss_mb` is
    the model's serving footprint plus a small interpreter (`process_before_load_mb`). The
    prompt is fixed random token ids (seed 0): rates do not depend on which tokens they are.
    """
    args = json.dumps([str(gguf_path), prompt_tokens, decode_tokens, threads, repeats])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-m", "tasks.core.llama_cpp", args],
                          capture_output=True, text=True, timeout=timeout_s, env=env,
                          cwd=str(Path(__file__).resolve().parents[2]))
    if done.returncode != 0:
        tail = " ".join(done.stderr.split())[-300:]
        raise LlamaCppError(f"llama.cpp speed run on {gguf_path} failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


_FTYPES = {"Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
           "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
           "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K"}


def quantize_gguf(src: Path, dest: Path, ftype: str = "Q4_K_M", threads: int = 2) -> Path:
    """llama.cpp's own quantizer (what `llama-quantize` runs) from an f16/f32 GGUF."""
    llama_cpp = _llama_cpp()
    if ftype not in _FTYPES:
        raise LlamaCppError(f"llama.cpp quantize type {ftype!r} is not offered; use one of "
                            f"{', '.join(_FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _FTYPES[ftype])
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), params)
    if status != 0 or not Path(dest).is_file():
        raise LlamaCppError(f"llama.cpp could not quantize {src} to {ftype} (status {status})")
    return Path(dest)


TOOL_ENV = {"llama-imatrix": "PKDQ_LLAMA_IMATRIX", "llama-quantize": "PKDQ_LLAMA_QUANTIZE"}


def llama_tool(name: str) -> Path:
    """The llama.cpp executable `name`: $PKDQ_LLAMA_IMATRIX / $PKDQ_LLAMA_QUANTIZE if set, else
    beside this interpreter (.venv/bin, where setup.sh puts them). Never from PATH: a llama.cpp
    of another version may write or read a different imatrix format."""
    env = TOOL_ENV[name]
    path = Path(os.environ[env]) if os.environ.get(env) else Path(sys.executable).parent / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise LlamaCppError(f"llama.cpp's {name} not found at {path}: run ./setup.sh (it builds "
                            f"{name} from {PIN}'s llama.cpp), or set {env}")
    return path


def _run_tool(name: str, args: list[str], timeout_s: float) -> str:
    """Run a llama.cpp tool; its output (both streams) is returned, a failure is one line."""
    tool = llama_tool(name)
    try:
        done = subprocess.run([str(tool), *args], capture_output=True, text=True,
                              timeout=timeout_s, errors="replace")
    except subprocess.TimeoutExpired as exc:
        raise LlamaCppError(f"{name} did not finish within {timeout_s:.0f} s") from exc
    output = done.stdout + done.stderr
    if done.returncode != 0:
        tail = " ".join(output.split())[-300:]
        raise LlamaCppError(f"{name} failed (exit {done.returncode}): {tail}")
    return output


def compute_imatrix(gguf_path: Path, text_file: Path, out: Path, chunk_tokens: int = 512,
                    chunks: int = 16, threads: int = 2,
                    timeout_s: float = 3600) -> dict[str, Any]:
    """llama.cpp's importance matrix of `gguf_path` (f16/f32) over `text_file`: at most `chunks`
    windows of `chunk_tokens` tokens (llama.cpp's tokenizer, the file's own BOS convention).

    Returns what llama-imatrix recorded in the file it wrote (chunks, chunk size, tokens): the
    text may hold fewer chunks than asked, and the record says what was really used.
    """
    import gguf

    if chunks < 1 or chunk_tokens < 8:
        raise LlamaCppError(f"imatrix needs chunks >= 1 and chunk_tokens >= 8 ({chunks}, "
                            f"{chunk_tokens})")
    start = time.perf_counter()
    _run_tool("llama-imatrix", ["-m", str(gguf_path), "-f", str(text_file), "-o", str(out),
                                "-c", str(chunk_tokens), "-b", str(chunk_tokens),
                                "--chunks", str(chunks), "-t", str(threads), "--no-ppl",
                                "-ngl", "0"], timeout_s)
    if not Path(out).is_file():
        raise LlamaCppError(f"llama-imatrix wrote no {out}")
    written = gguf.GGUFReader(str(out))
    count = int(written.fields["imatrix.chunk_count"].contents())
    size = int(written.fields["imatrix.chunk_size"].contents())
    entries = sum(1 for tensor in written.tensors if tensor.name.endswith(".in_sum2"))
    return {"chunks": count, "chunk_tokens": size, "tokens": count * size,
            "tensors_with_statistics": entries, "wall_s": time.perf_counter() - start,
            "tool": f"llama-imatrix ({PIN}'s llama.cpp)"}


def quantize_with_imatrix(src: Path, dest: Path, imatrix: Path, ftype: str = "Q4_K_M",
                          threads: int = 2, timeout_s: float = 3600) -> Path:
    """`llama-quantize --imatrix` from an f16/f32 GGUF: the k-quant rounding weighs each input
    column by how much activation energy it carries on the calibration text."""
    if ftype not in _FTYPES:
        raise LlamaCppError(f"llama.cpp quantize type {ftype!r} is not offered; use one of "
                            f"{', '.join(_FTYPES)}")
    _run_tool("llama-quantize", ["--imatrix", str(imatrix), str(src), str(dest), ftype,
                                 str(threads)], timeout_s)
    if not Path(dest).is_file():
        raise LlamaCppError(f"llama-quantize wrote no {dest}")
    return Path(dest)


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """{GGML type name: tensor count} of a GGUF file, read with gguf-py."""
    from collections import Counter

    import gguf

    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors))


def gguf_main_types(path: Path) -> tuple[dict[str, int], str, str]:
    """({GGML type: tensor count}, the commonest non-F32 type, the token embedding's type) of a
    GGUF, lower-case types: how a shipped file is labelled ("q4_0, embedding q4_0") and judged."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    counts = dict(Counter(t.tensor_type.name for t in tensors))
    embedding = next((t.tensor_type.name for t in tensors if t.name == "token_embd.weight"), "?")
    main = max((t for t in counts if t != "F32"), key=counts.get, default=embedding)
    return counts, main.lower(), embedding.lower()


def gguf_type_label(path: Path) -> tuple[dict[str, int], str, str, str]:
    """`gguf_main_types` plus a label for the file: "q4_0, embedding q5_1", or with decoder
    layers held in another type (a mixed 4/8-bit file) "q4_0, layers 28, 29 q8_0, embedding
    q5_1"."""
    import gguf

    types, main, embedding = gguf_main_types(path)
    reader = gguf.GGUFReader(str(path))
    block_types = {t.tensor_type.name.lower() for t in reader.tensors if t.name.startswith("blk.")}
    field = reader.fields.get("general.file_type")
    if field is not None:  # the type the writer declared wins over a count (a mix of 2 layers)
        try:
            declared = gguf.LlamaFileType(int(field.contents())).name.lower()
        except ValueError:  # a file type newer than this gguf package
            declared = main
        main = d if (d := declared.removeprefix("mostly_")) in block_types else main
    other: dict[str, set[int]] = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name.lower()
        if tensor.name.startswith("blk.") and kind not in (main, "f32"):
            other.setdefault(kind, set()).add(int(tensor.name.split(".")[1]))
    mixed = "".join(f", layers {', '.join(map(str, sorted(layers)))} {kind}"
                    for kind, layers in sorted(other.items()))
    return types, main, embedding, f"{main}{mixed}, embedding {embedding}"


if __name__ == "__main__":  # the measuring process of `llama_cpp_speed`
    print(json.dumps(_speed_here(*json.loads(sys.argv[1]))))
