"""Evaluation: lm-eval benchmarks offline, WikiText-2 perplexity, size and speed (see README.md)."""

from tasks.core.lazy import lazy_exports

_EXPORTS = {
    "evaluate_model": "stage",  # every score of one model folder, written under out_dir
    "wikitext_perplexity": "stage",  # token perplexity on a WikiText-2 slice
    "EVAL_JSON": "stage",
    "SAMPLES_JSON": "stage",
    "SERVED_SAMPLES_JSON": "stage",  # per-doc scores of a quantized model as served (bf16)
    "generate_greedy": "generations",  # one greedy answer (chat template when there is one)
    "GENERATIONS_JSON": "generations",  # the fixed prompts' answers of one stage
    "PROMPTS": "generations",
    "PkdqLM": "backend",  # the lm-eval backend (`--model pkdq`)
    "measure_latency": "speed",
    "profile_in_subprocess": "speed",
    # torch-free: what a run's evaluation would not find (task YAML, data file), before a run
    "missing_eval_data": "lm_eval_tasks.utils",
    # torch-free: the documents of every evaluation set a recipe scores (contamination check)
    "evaluation_texts": "eval_texts",
    "training_overlap": "eval_texts",  # contamination report of a data spec, cached on disk
    # torch-free: any evaluation task (built-in, registry, include_path, JSONL), one line
    "check_eval_tasks": "task_specs",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
