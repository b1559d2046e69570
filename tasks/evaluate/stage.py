"""Evaluate stage: lm-eval benchmarks on seeded doc subsets, WikiText-2 perplexity, size, speed.

Every stage of a run is scored on the same docs (a seeded sample of doc ids per task, stored in
the metrics and reusable through `doc_ids=`), so stage-vs-baseline differences are paired and
their error bars shrink accordingly. Benchmarks run through lm-eval's own `simple_evaluate` with
the task YAMLs in `tasks/evaluate/lm_eval_tasks/` (stock prompts, offline files) and, by default,
pkdq's
lm-eval backend (`tasks.evaluate.backend`: HFLM's scores for a fraction of the compute; `backend:
hf`
runs stock HFLM). WikiText-2 is scored twice: a fast direct token perplexity over a fixed slice
(what the report compares) and lm-eval's stock rolling-window word perplexity on a few seeded
articles (comparable with published numbers). Size, peak memory and CPU generation speed are
measured the same way for every stage.
"""

from __future__ import annotations

import builtins
import copy
import logging
import math
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.core.common import (
    EVAL_JSON,
    GGUF_FILE,
    GGUF_SAMPLES_JSON,
    SAMPLES_JSON,
    SERVED_SAMPLES_JSON,
    data_dir,
    set_offline_env,
    write_json_atomic,
)
from tasks.core.model_folder import model_bytes
from tasks.core.perplexity import text_prefix_ids, windows
from tasks.core.recipe import EvalConfig, SpeedEval
from tasks.evaluate.lm_eval_tasks import TASKS_DIR

# The score retention is computed on: length-normalised accuracy where lm-eval reports it for
# multi-token answer options of unequal length, plain accuracy otherwise.
PRIMARY_METRIC: dict[str, str] = {
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "piqa": "acc_norm",
    "winogrande": "acc",
    "lambada_openai": "acc",
    "boolq": "acc",
}
PER_DOC_METRICS = ("acc", "acc_norm", "exact_match", "chrf")
# Primary metric of tasks not listed above, by lm-eval output type (first one reported wins).
PRIMARY_BY_TYPE: dict[str, tuple[str, ...]] = {
    "multiple_choice": ("acc_norm", "acc"),
    "generate_until": ("chrf", "exact_match"),
}

# lm-eval messages that are expected here and only add noise at WARNING level.
_QUIET = ("Custom kwargs can be passed", "`pretrained` model kwarg is not of type `str`",
          "Passed an already-initialized model through `pretrained`")
_NOISY_LOGGERS = ("lm_eval.api.task", "lm_eval.models.huggingface")


def _log(msg: str, start: float) -> None:
    print(f"[evaluate] {msg} | elapsed {time.perf_counter() - start:,.1f}s", file=sys.stderr,
          flush=True)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _QUIET)


def quiet_lm_eval() -> None:
    """lm-eval at WARNING, minus the warnings every offline custom task triggers.

    Logger filters only see records created by that very logger, hence the named children.
    """
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())


# --------------------------------------------------------------------------- doc selection


def task_size(task: str, data: Path | None = None, manager: Any = None) -> int:
    """Number of eval docs of a task: pkdq's built-ins read their files (no model, well under a
    second); any other task is built by lm-eval through `manager` and its eval docs counted."""
    from tasks.evaluate.lm_eval_tasks.utils import TASK_FILES, load_docs

    if task in TASK_FILES:
        return len(load_docs(task, data))
    with builtin_print():
        built = manager.load([task])["tasks"][task]
    return len(list(built.eval_docs))


def sample_doc_ids(task: str, n_docs: int, samples: int | None, seed: int) -> list[int]:
    """A fixed, seeded random subset of doc ids, sorted.

    Random, not first-N: files are often ordered (by source, topic, difficulty), so a prefix is a
    biased sample. The stream depends only on (seed, task name), so every stage of a run, and every
    run with the same seed, scores the same docs. Sorted because lm-eval maps results back to ids
    assuming ascending order.
    """
    import numpy as np

    if samples is None or samples >= n_docs:
        return list(range(n_docs))
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    return sorted(int(i) for i in rng.choice(n_docs, size=samples, replace=False))


def select_doc_ids(cfg: EvalConfig, data: Path | None, seed: int,
                   given: dict[str, list[int]] | None = None,
                   sizes: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Doc ids per recipe task: given ones (e.g. the baseline's) win, else a seeded sample."""
    given = given or {}
    out: dict[str, list[int]] = {}
    for task in cfg.task_names():
        if task in given:
            out[task] = sorted(int(i) for i in given[task])
        else:
            size = sizes[task] if sizes and task in sizes else task_size(task, data)
            out[task] = sample_doc_ids(task, size, cfg.samples, seed)
    return out


# --------------------------------------------------------------------------- lm-eval

WIKITEXT_TASK = "wikitext"


def make_lm(model: Any, tokenizer: Any, backend: str, batch_size: int,
            max_length: int | None = None) -> Any:
    """The lm-eval model wrapping an already loaded model: pkdq's backend or stock HFLM.

    Both get the family's BOS convention (`tasks.core.conventions`) explicitly rather than
    whatever lm-eval's version defaults to.
    """
    from tasks.core.conventions import needs_bos, tokenizer_adds_bos

    bos = needs_bos(tokenizer, getattr(model, "config", None))
    if backend == "hf":
        from lm_eval.models.huggingface import HFLM

        if bos and not tokenizer_adds_bos(tokenizer):
            # stock HFLM only asks the tokenizer for special tokens: make this copy add BOS
            tokenizer = copy.deepcopy(tokenizer)
            tokenizer.add_bos_token = True

        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                    max_length=max_length, add_bos_token=bos)
    from tasks.evaluate.backend import PkdqLM

    return PkdqLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                  max_length=max_length, add_bos_token=bos)


def task_manager(data: Path | None = None, cfg: EvalConfig | None = None,
                 jsonl_folder: Path | None = None):
    """A TaskManager over pkdq's task YAMLs, plus the recipe's include_path and JSONL tasks;
    lm-eval's own registry is indexed only when a task needs it (it costs seconds)."""
    from lm_eval.tasks import TaskManager

    from tasks.evaluate.task_specs import include_paths, needs_registry

    meta = {"pkdq_data_dir": str(Path(data) if data else data_dir())}
    if cfg is None:
        return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=meta)
    return TaskManager(include_path=include_paths(cfg, jsonl_folder),
                       include_defaults=needs_registry(cfg), metadata=meta)


_print_lock = threading.Lock()
_print_depth = 0
_print_saved: Any = None


@contextmanager
def builtin_print() -> Iterator[None]:
    """Run lm-eval with Python's own `print`, not Prefect's `log_prints` patch.

    datasets fingerprints the offline task data with dill, and dill finds a function's globals by
    swapping `sys.stdout` for a buffer and calling `dis.dis`. Under Prefect's patch those prints go
    to the run log instead (a bytecode listing per task in every run log) and dill's buffer stays
    empty. Nesting-safe across threads (compare runs units side by side): the first entry swaps,
    the last exit restores.
    """
    global _print_depth, _print_saved
    try:
        from prefect.logging.loggers import print as real_print  # imported before any patch
    except ImportError:
        yield
        return
    with _print_lock:
        if _print_depth == 0:
            _print_saved = builtins.print
            builtins.print = real_print
        _print_depth += 1
    try:
        yield
    finally:
        with _print_lock:
            _print_depth -= 1
            if _print_depth == 0:
                builtins.print = _print_saved
                _print_saved = None


def run_task(lm: Any, task: str, doc_ids: list[int], n_docs: int, manager: Any,
             seed: int) -> dict[str, Any]:
    """One task through lm-eval's `simple_evaluate`; returns its results and logged samples."""
    from lm_eval import simple_evaluate

    subset = None if len(doc_ids) == n_docs else {task: doc_ids}
    with builtin_print():
        out = simple_evaluate(
            model=lm, tasks=[task], task_manager=manager, samples=subset, log_samples=True,
            bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed,
        )
    output_type = out["configs"][task].get("output_type", "multiple_choice")
    samples = out["samples"][task]
    if output_type == "generate_until":
        _add_chrf(samples)
    return {"results": out["results"][task], "samples": samples, "output_type": output_type}


def _add_chrf(samples: list[dict[str, Any]]) -> None:
    """Sentence chrF (sacrebleu, 0-100) of each greedy generation against its reference, per
    doc, so generation tasks get paired differences like accuracies do."""
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    for sample in samples:
        resp = sample.get("filtered_resps") or sample.get("resps") or [""]
        while isinstance(resp, list):
            resp = resp[0] if resp else ""
        sample["chrf"] = float(chrf.sentence_score(str(resp), [str(sample["target"])]).score)


def _chance(samples: list[dict[str, Any]], output_type: str) -> float:
    """Mean of 1/options over the scored docs (ARC has 3-5); 0 for open-vocabulary targets."""
    if output_type != "multiple_choice" or not samples:
        return 0.0
    return sum(1.0 / len(s["arguments"]) for s in samples) / len(samples)


def summarise_task(task: str, raw: dict[str, Any]) -> dict[str, Any]:
    """Flatten lm-eval's 'acc,none' keys; add n, chance, primary metric and the doc ids."""
    results, samples = raw["results"], raw["samples"]
    summary: dict[str, Any] = {}
    for key, value in results.items():
        if "," not in key or key.startswith("alias"):
            continue
        name, filt = key.split(",", 1)
        if isinstance(value, (int, float)) and (filt == "none" or name not in summary):
            summary[name] = float(value)
    if samples and "chrf" in samples[0]:
        scores = [float(s["chrf"]) for s in samples]
        mean = sum(scores) / len(scores)
        var = sum((x - mean) ** 2 for x in scores) / max(len(scores) - 1, 1)
        summary.update(chrf=mean, chrf_stderr=math.sqrt(var / len(scores)))
    candidates = PRIMARY_BY_TYPE.get(raw["output_type"], ("acc",))
    summary["metric"] = PRIMARY_METRIC.get(task) or next(
        (m for m in candidates if m in summary), next(iter(summary), "acc"))
    ids = sorted(int(s["doc_id"]) for s in samples)
    summary.update(n=len(ids), chance=_chance(samples, raw["output_type"]), doc_ids=ids)
    return summary


def per_doc(raw: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{metric: {doc_id: 0/1}} for paired comparisons between stages."""
    out: dict[str, dict[str, float]] = {}
    for sample in raw["samples"]:
        for metric in PER_DOC_METRICS:
            if metric in sample:
                out.setdefault(metric, {})[str(sample["doc_id"])] = float(sample[metric])
    return out


# --------------------------------------------------------------------------- perplexity


def _window_nll(model: Any, ids: list[int], max_length: int,
                prefix: list[int] | None = None) -> tuple[float, int]:
    """Summed next-token NLL over non-overlapping windows, and how many tokens were predicted.

    Each window is the family's `prefix` (BOS for Gemma, none for SmolLM2:
    `tasks.core.conventions.prefix_ids`) plus `max_length - len(prefix)` text tokens. The first
    text token of each window has no text context and is not predicted, with or without a
    prefix, so the same text windows score the same targets either way (standard, cheaper than a
    sliding window; slightly pessimistic versus stride < max_length).
    """
    import torch
    import torch.nn.functional as F

    prefix = list(prefix or [])
    body = max_length - len(prefix)
    skip = len(prefix)  # logits of the prefix positions predict the first text token: unscored
    total, count = 0.0, 0
    with torch.inference_mode():
        for window in windows(ids, body):
            x = torch.tensor([prefix + window], device=model.device)
            logits = model(input_ids=x).logits[0, skip:-1].float()
            total += float(F.cross_entropy(logits, x[0, skip + 1:], reduction="sum"))
            count += len(window) - 1
    return total, count


def wikitext_perplexity(model: Any, tokenizer: Any, path: Path, tokens: int | None,
                        max_length: int) -> dict[str, Any]:
    """Token and word perplexity on the first `tokens` tokens of WikiText-2 test.

    Word perplexity divides the same total NLL by whitespace words in the slice, so it compares
    across tokenizers (pruning never changes the tokenizer, but users compare models).
    """
    from tasks.core.conventions import prefix_ids

    text = Path(path).read_text(encoding="utf-8")
    ids = text_prefix_ids(tokenizer, text, tokens)
    limit = getattr(model.config, "max_position_embeddings", None) or max_length
    window = min(max_length, int(limit))
    prefix = prefix_ids(tokenizer, model.config)
    nll, predicted = _window_nll(model, ids, window, prefix)
    words = len(tokenizer.decode(ids).split())
    return {
        "token_perplexity": math.exp(nll / predicted),
        "word_perplexity": math.exp(nll / words),
        "tokens": len(ids),
        "predicted_tokens": predicted,
        "words": words,
        "max_length": window,
        "prefix_ids": prefix,
        "nll": nll,
    }


def wikitext_rolling(model: Any, tokenizer: Any, cfg: EvalConfig, data: Path, seed: int,
                     manager: Any) -> dict[str, Any] | None:
    """lm-eval's stock wikitext task (rolling windows of `wikitext.max_length`) on seeded pages.

    Word perplexity here is the published-number kind (stock detokenizer, words of the raw page);
    None when `wikitext.pages` is 0.
    """
    wt = cfg.wikitext
    if wt.pages == 0:
        return None
    n_pages = task_size(WIKITEXT_TASK, data)
    ids = sample_doc_ids(WIKITEXT_TASK, n_pages, wt.pages, seed)
    lm = make_lm(model, tokenizer, cfg.backend, cfg.batch_size, max_length=wt.max_length)
    t0 = time.perf_counter()
    summary = summarise_task(WIKITEXT_TASK, run_task(lm, WIKITEXT_TASK, ids, n_pages, manager,
                                                      seed))
    for key in ("metric", "chance"):
        summary.pop(key, None)
    summary.update(max_length=wt.max_length, wall_s=time.perf_counter() - t0)
    return summary


# --------------------------------------------------------------------------- speed


# Timed passes stop repeating past this: a float SmolLM2 fits its 3 repeats (about 5 s a pass),
# a GPTQ folder on GPTQModel's CPU kernel (about 20 s a pass) gets one.
SPEED_BUDGET_S = 20.0


def speed_section(model: Any, cfg: SpeedEval) -> dict[str, Any] | None:
    """Prefill latency and greedy decode tokens/s (None when disabled).

    `tasks.evaluate.speed.measure_latency`, the measurement the quantization table uses too, so
    eval.json speeds and bench numbers compare. Prompt + new tokens stay within the model's
    positions; repeats stop once the timed passes took `SPEED_BUDGET_S`.
    """
    if not cfg.enabled:
        return None
    import torch

    from tasks.evaluate.speed import measure_latency

    prompt_tokens = cfg.prompt_within(getattr(model.config, "max_position_embeddings", 0))
    speed = measure_latency(model, prompt_tokens, cfg.new_tokens, cfg.repeats,
                            budget_s=SPEED_BUDGET_S)
    speed.update(threads=torch.get_num_threads(),
                 dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
    return speed


# --------------------------------------------------------------------------- size


def count_params(model: Any) -> int:
    """Logical parameter count: quantized linears count in*out (their packed buffers would not).

    Shared tensors (tied embeddings) count once.
    """
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if hasattr(module, "qweight") and hasattr(module, "in_features"):
            bias = getattr(module, "bias", None) is not None
            total += int(module.in_features) * int(module.out_features)
            total += int(module.out_features) if bias else 0
            continue
        for param in module.parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
    return total


def _score_tasks(lm: Any, cfg: EvalConfig, ids: dict[str, list[int]], sizes: dict[str, int],
                 manager: Any, seed: int, start: float
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary per task, per-doc scores per task) on the seeded doc ids, one task at a time."""
    tasks: dict[str, Any] = {}
    per_doc_all: dict[str, Any] = {}
    for task in cfg.task_names():
        t0 = time.perf_counter()
        raw = run_task(lm, task, ids[task], sizes[task], manager, seed)
        tasks[task] = summarise_task(task, raw)
        tasks[task]["wall_s"] = time.perf_counter() - t0
        per_doc_all[task] = per_doc(raw)
        metric = tasks[task]["metric"]
        _log(f"{task}: {metric} {tasks[task].get(metric, float('nan')):.4f} "
             f"(n={tasks[task]['n']}, {tasks[task]['wall_s']:.1f}s)", start)
    return tasks, per_doc_all


def _score_wikitext(model: Any, tokenizer: Any, cfg: EvalConfig, data: Path, seed: int,
                    manager: Any, start: float) -> dict[str, Any]:
    """Direct token perplexity on the fixed slice, plus lm-eval's rolling word perplexity."""
    wt = cfg.wikitext
    t0 = time.perf_counter()
    wikitext = wikitext_perplexity(model, tokenizer, data / "wikitext" / "wiki.test.raw",
                                   wt.tokens, wt.max_length)
    wikitext["wall_s"] = time.perf_counter() - t0
    _log(f"wikitext: token ppl {wikitext['token_perplexity']:.3f} "
         f"({wikitext['tokens']} tokens, {wikitext['wall_s']:.1f}s)", start)
    rolling = wikitext_rolling(model, tokenizer, cfg, data, seed, manager)
    if rolling is not None:
        wikitext["lm_eval"] = rolling
        _log(f"wikitext (lm-eval rolling, {rolling['n']} pages): word ppl "
             f"{rolling['word_perplexity']:.3f} ({rolling['wall_s']:.1f}s)", start)
    return wikitext


# --------------------------------------------------------------------------- as served


def served_section(model_path: Path, cfg: EvalConfig, ids: dict[str, list[int]],
                   sizes: dict[str, int], manager: Any, seed: int, start: float
                   ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A quantized folder's benchmark scores as a user's runtime serves it, on the same docs.

    The main evaluation computes quantized layers with fp32 activations (like-for-like with the
    fp32 baseline); a user loading the folder with GPTQModel's defaults gets bf16 activations,
    and scores that can differ by more than the error bar. Benchmarks only (no perplexity or
    speed): bf16 is emulated on most CPUs, so this pass costs several times the fp32 one.
    None for float folders and when `evaluate.served` is off.
    """
    from tasks.core.model_store import is_quantized

    if not cfg.served or not is_quantized(Path(model_path)):
        return None
    import torch
    from transformers import AutoTokenizer

    from tasks.core.gptq_checkpoint import load_served

    t0 = time.perf_counter()
    model = load_served(Path(model_path))
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    _log(f"as served: loaded with GPTQModel's defaults ({dtype})", start)
    lm = make_lm(model, tokenizer, cfg.backend, cfg.batch_size)
    tasks, per_doc_all = _score_tasks(lm, cfg, ids, sizes, manager, seed, start)
    del lm, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    section = {"label": f"as served ({dtype}, GPTQModel default load)", "dtype": dtype,
               "loader": "gptqmodel default (GPTQModel.load, torch kernel, no dtype given)",
               "tasks": tasks, "wall_s": time.perf_counter() - t0}
    return section, per_doc_all


def gguf_section(model_path: Path, cfg: EvalConfig, ids: dict[str, list[int]],
                 sizes: dict[str, int], manager: Any, seed: int, data: Path, threads: int,
                 start: float) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The GGUF a quantize stage wrote beside its folder, scored as the file a user ships.

    Its bytes are the file's; its benchmark scores and WikiText-2 perplexity come from its own
    weights in torch (fp32, `gguf_weights`), the same ruler as every other row, so a Q4_0
    embedding's cost shows; its WikiText-2 perplexity in llama.cpp, on the same token ids, adds
    what llama.cpp's own arithmetic changes. None without a GGUF or with `evaluate.gguf` off.
    """
    gguf = Path(model_path).parent / GGUF_FILE
    if not cfg.gguf or not gguf.is_file():
        return None
    from transformers import AutoTokenizer

    from tasks.core.llama_cpp import gguf_type_label, llama_cpp_perplexity
    from tasks.evaluate.gguf_weights import load_gguf_weights

    t0 = time.perf_counter()
    model = load_gguf_weights(gguf, Path(model_path))
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    _log(f"GGUF: {gguf.name} loaded ({gguf.stat().st_size / 1e6:,.1f} MB)", start)
    lm = make_lm(model, tokenizer, cfg.backend, cfg.batch_size)
    tasks, per_doc_all = _score_tasks(lm, cfg, ids, sizes, manager, seed, start)
    wt = cfg.wikitext
    text_path = data / "wikitext" / "wiki.test.raw"
    wikitext = wikitext_perplexity(model, tokenizer, text_path, wt.tokens, wt.max_length)
    del lm, model
    token_ids = text_prefix_ids(tokenizer, text_path.read_text(encoding="utf-8"), wt.tokens)
    llama = llama_cpp_perplexity(gguf, ids=token_ids, max_length=wikitext["max_length"],
                                 threads=threads)
    _log(f"GGUF: token ppl {wikitext['token_perplexity']:.3f} (its weights in torch), "
         f"{llama['token_perplexity']:.3f} in llama.cpp", start)
    types, _, embedding, label = gguf_type_label(gguf)
    section = {"label": f"as GGUF ({label})", "file": gguf.name,
               "embedding_type": embedding,
               "bytes_on_disk": gguf.stat().st_size, "tensor_types": types, "tasks": tasks,
               "wikitext": wikitext,
               "llama_cpp_wikitext": {k: llama[k] for k in ("token_perplexity", "runtime",
                                                           "threads", "wall_s") if k in llama},
               "loader": "transformers' GGUF reader (dequantized to fp32), the run folder's "
                         "config", "wall_s": time.perf_counter() - t0}
    return section, per_doc_all


def generations_section(model: Any, tokenizer: Any, model_path: Path, cfg: EvalConfig,
                        out_dir: Path, start: float) -> dict[str, Any] | None:
    """Greedy answers to the fixed prompts, written to generations.json (None when off).

    A GPTQ folder answers through `load_for_generation` (its grid dequantized once, the same
    weights as its kernel at float speed), as `pkdq generate` does; any other folder through the
    model just scored, not loaded twice.
    """
    if not cfg.generations.enabled:
        return None
    from tasks.core.model_store import generates_dequantized, load_for_generation
    from tasks.evaluate.generations import GENERATIONS_JSON, generate_all

    loader = "the evaluated model"
    if generates_dequantized(Path(model_path)):
        model, tokenizer = load_for_generation(Path(model_path))
        loader = "the GPTQ grid dequantized to fp32 (pkdq generate's loader)"
    gens = generate_all(model, tokenizer, cfg.generations.max_new_tokens)
    gens["loader"] = loader
    write_json_atomic(Path(out_dir) / GENERATIONS_JSON, gens)
    _log(f"generations: {len(gens['prompts'])} prompts ({gens['wall_s']:.1f}s)", start)
    return {"file": GENERATIONS_JSON, "prompts": len(gens["prompts"]),
            "max_new_tokens": gens["max_new_tokens"], "wall_s": gens["wall_s"],
            "loader": loader}


# --------------------------------------------------------------------------- stage entry point


def evaluate_model(model_path: Path, cfg: EvalConfig, out_dir: Path, *, data: Path | None = None,
                   seed: int = 1234, threads: int = 1,
                   doc_ids: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Score one model folder; write `eval.json` and per-doc `eval_samples.json` to `out_dir`.

    `doc_ids` (e.g. the baseline's `tasks[t]["doc_ids"]`) pins the docs; otherwise they come from
    `seed`, which gives the same docs for every stage of a run anyway.
    """
    set_offline_env()
    import torch

    from tasks.core.model_store import load_model
    from tasks.core.peak_memory import peak_rss_bytes, reset_peak_rss
    from tasks.evaluate.backend import resolve_dtype

    start, cpu_start = time.perf_counter(), time.process_time()
    peak_scope = "eval" if reset_peak_rss() else "process"
    torch.set_num_threads(threads)
    quiet_lm_eval()
    data = Path(data) if data else data_dir()
    out_dir = Path(out_dir)
    model, tokenizer = load_model(Path(model_path), dtype=resolve_dtype(cfg.dtype))
    _log(f"loaded {model_path}", start)

    from tasks.evaluate.task_specs import jsonl_cache_root, write_jsonl_tasks

    manager = task_manager(data, cfg, write_jsonl_tasks(cfg.jsonl_tasks(), jsonl_cache_root()))
    sizes = {task: task_size(task, data, manager) for task in cfg.task_names()}
    ids = select_doc_ids(cfg, data, seed, doc_ids, sizes)
    lm = make_lm(model, tokenizer, cfg.backend, cfg.batch_size)
    tasks, per_doc_all = _score_tasks(lm, cfg, ids, sizes, manager, seed, start)
    wikitext = _score_wikitext(model, tokenizer, cfg, data, seed, manager, start)
    speed = speed_section(model, cfg.speed)
    if speed is not None:
        _log(f"speed: prefill {speed['prefill_tokens_per_s']:.0f} tok/s, decode "
             f"{speed['decode_tokens_per_s']:.1f} tok/s", start)
    generations = generations_section(model, tokenizer, Path(model_path), cfg, out_dir, start)
    params = count_params(model)
    eval_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    del lm, model
    served = served_section(model_path, cfg, ids, sizes, manager, seed, start)
    if served is not None:
        write_json_atomic(out_dir / SERVED_SAMPLES_JSON, served[1])
    shipped = gguf_section(model_path, cfg, ids, sizes, manager, seed, data, threads, start)
    if shipped is not None:
        write_json_atomic(out_dir / GGUF_SAMPLES_JSON, shipped[1])

    metrics = {
        "model_path": str(model_path),
        "tasks": tasks,
        "wikitext": wikitext,
        "params": params,
        # what computed the scores above: fp32 activations unless `evaluate.dtype` says else
        # (quantized layers included); "served" holds the as-served scores of a quantized model
        "activations_dtype": eval_dtype,
        "served": served[0] if served is not None else None,
        # the stage's GGUF (quantize with `gguf:`), scored with its own weights: what ships
        "gguf": shipped[0] if shipped is not None else None,
        "generations": generations,
        "bytes_on_disk": model_bytes(model_path),
        "speed": speed,
        "peak_rss_bytes": peak_rss_bytes(),
        # "eval": this evaluation's own peak; "process": the whole process's (no reset possible)
        "peak_rss_scope": peak_scope,
        "backend": cfg.backend,
        "seed": seed,
        "threads": threads,
        "config": cfg.model_dump(),
        "wall_s": time.perf_counter() - start,
        # CPU seconds of this process: comparable across runs on a shared machine, unlike wall
        "cpu_s": time.process_time() - cpu_start,
    }
    write_json_atomic(out_dir / SAMPLES_JSON, per_doc_all)
    write_json_atomic(out_dir / EVAL_JSON, metrics)
    _log("done", start)
    return metrics
