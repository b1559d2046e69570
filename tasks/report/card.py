"""The model card (README.md) of a stage's output model, in the Hugging Face convention.

A compressed model on a hub proves itself by its card: what was done to which base model, on
what data, what it kept (with error bars), how big and fast it is, and how to load it. The card
is written from the run folder alone (`collect`), into the stage's sealed model folder, when the
stage finishes and again once its evaluation exists. It is documentation, not weights: the
folder's fingerprint and integrity check leave README.md out (`tasks.core.model_folder`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tasks.core.common import write_text_atomic
from tasks.core.model_folder import CARD_FILE
from tasks.report.format import extra_retentions, pm, scores_note
from tasks.report.run_report import collect

STAGE_TAGS = {"prune": "pruned", "distill": "distilled", "quantize": "quantized"}
TEXT_SOURCES = {"wikipedia": "Wikipedia", "c4": "C4 (web text)", "mixed": "Wikipedia + C4"}


def stage_entry(data: dict[str, Any], stage: str) -> tuple[int, dict[str, Any]]:
    for i, entry in enumerate(data["stages"]):
        if entry["stage"] == stage:
            return i, entry
    raise KeyError(f"no stage {stage!r} in run {data['run'].get('run_id')}")


def front_matter(data: dict[str, Any], index: int, source: dict[str, Any]) -> dict[str, Any]:
    """The YAML header the hub reads: base model, library, task, license, tags."""
    recipe = data["run"]["recipe"]
    kinds = [next(iter(s)) for s in recipe["stages"][:index]]
    tags = ["pkdq", *[STAGE_TAGS[k] for k in kinds if k in STAGE_TAGS]]
    meta: dict[str, Any] = {}
    if source.get("base_model"):
        meta["base_model"] = source["base_model"]
        meta["base_model_relation"] = "quantized" if kinds[-1:] == ["quantize"] else "finetune"
    meta.update(library_name="transformers", pipeline_tag="text-generation",
                license=source.get("license") or "unknown")
    quant = _quant_config(data, index)
    if quant:
        tags += [str(quant.get("method", "gptq")), f"{quant.get('bits')}-bit"]
    meta["tags"] = tags
    return meta


def _quant_config(data: dict[str, Any], index: int) -> dict[str, Any] | None:
    stages = data["run"]["recipe"]["stages"][:index]
    return next((s["quantize"] for s in reversed(stages) if "quantize" in s), None)


def _done_lines(data: dict[str, Any], index: int) -> list[str]:
    recipe = data["run"]["recipe"]
    lines = ["## What was done", "",
             f"Starting from `{data['run']['model']['spec']}` (fingerprint "
             f"`{data['run']['model'].get('fingerprint', '?')}`), pkdq ran, in order:", ""]
    for n, stage in enumerate(recipe["stages"][:index], start=1):
        kind, cfg = next(iter(stage.items()))
        metrics = data["stages"][n].get("metrics") or {}
        lines.append(f"{n}. **{kind}**: {_stage_summary(kind, cfg, metrics)}")
    lines += ["", "<details><summary>Each stage's full configuration</summary>", "", "```yaml",
              yaml.safe_dump({"stages": recipe["stages"][:index]}, sort_keys=False).rstrip(),
              "```", "", "</details>", ""]
    return lines


def _stage_summary(kind: str, cfg: dict[str, Any], metrics: dict[str, Any]) -> str:
    if kind == "prune":
        axes = [f"{axis} {v.get('ratio') if v.get('ratio') is not None else v.get('size')} by "
                f"{v.get('criterion', '?')}" for axis, v in cfg.items()
                if isinstance(v, dict) and axis in ("ffn", "heads", "depth", "hidden")]
        before, after = metrics.get("params_before"), metrics.get("params_after")
        params = (f"; parameters {before:,} → {after:,}" if before and after else "")
        return f"structured pruning ({', '.join(axes) or 'see config'}){params}"
    if kind == "distill":
        tokens = metrics.get("tokens_trained") or cfg.get("tokens")
        return (f"knowledge distillation from the model before pruning ({cfg.get('loss')}, "
                f"alpha {cfg.get('alpha')}, T {cfg.get('temperature')}), {tokens:,} tokens of "
                f"{TEXT_SOURCES.get(cfg.get('source'), cfg.get('source'))} at seq_len "
                f"{cfg.get('seq_len')}")
    if kind == "quantize":
        return (f"{cfg.get('method')} weight quantization, {cfg.get('bits')}-bit, group size "
                f"{cfg.get('group_size')} ({metrics.get('checkpoint_format', 'GPTQ format')})")
    return json.dumps(cfg)


def _data_lines(data: dict[str, Any], index: int) -> list[str]:
    recipe = data["run"]["recipe"]
    lines = ["## Data", ""]
    for stage in recipe["stages"][:index]:
        kind, cfg = next(iter(stage.items()))
        cal = cfg.get("calibration")
        if isinstance(cal, dict):
            lines.append(f"- {kind} calibration: {cal.get('samples')} samples × "
                         f"{cal.get('seq_len')} tokens of "
                         f"{TEXT_SOURCES.get(cal.get('source'), cal.get('source'))}")
        if kind == "distill":
            lines.append(f"- distillation: {cfg.get('tokens'):,} tokens of "
                         f"{TEXT_SOURCES.get(cfg.get('source'), cfg.get('source'))}")
    ev = recipe.get("evaluate") or {}
    lines += [f"- training and calibration text only from pkdq's `train/` split; evaluation "
              f"never trains: lm-eval tasks {', '.join(ev.get('tasks') or [])} "
              f"({ev.get('samples') or 'all'} seeded docs each, the same doc ids for every stage, "
              f"seed {recipe.get('seed')}) and WikiText-2 test perplexity", ""]
    return lines


def _results_lines(entry: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    ret = entry.get("retention")
    if not ret:
        return ["## Results", "", "Not evaluated yet: this card is rewritten with the retention "
                "table once the stage's evaluation exists.", ""]
    lines = ["## Results", "",
             "Score ± standard error on the same docs as the base model; retention = this "
             "model / base; paired Δ = this − base over the same doc ids.", "",
             "| benchmark | metric | n | base model | this model | retention | paired Δ |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    rows = [(name, r, "") for name, r in ret["benchmarks"].items()]
    for _, label, other in extra_retentions(entry):
        rows += [(name, r, f" {label}") for name, r in other["benchmarks"].items()]
    for name, r, label in rows:
        lines.append(f"| {name}{label} | {r['metric']} | {r.get('n', '–')} | "
                     f"{pm(r['baseline'], r['baseline_stderr'], pct=True)} | "
                     f"{pm(r['score'], r['stderr'], pct=True)} | "
                     f"{pm(r['ratio'], r['ratio_stderr'])} | "
                     f"{pm(r['diff'], r.get('diff_stderr'), pct=True)} |")
    ppl = ret.get("perplexity") or {}
    if ppl.get("stage"):
        lines += ["", f"WikiText-2 token perplexity: {ppl['stage']:.2f} (base model "
                  f"{ppl['baseline']:.2f}, ratio {ppl['ratio']:.3f})."]
    avg = ret.get("average_retention")
    if avg:
        lines.append(f"Mean retention over {avg['k']} informative benchmarks: "
                     f"{pm(avg['mean'], avg['stderr'])}.")
    lines += ["", scores_note([entry])]
    return [*lines, ""]


def _side_by_side_lines(entry: dict[str, Any], data: dict[str, Any]) -> list[str]:
    """The final stage's GGUFs timed together with the base model's (`llama_cpp_rounds.json`):
    the decode ratios the run's speed goal is judged on, one table row per file."""
    rounds = data.get("llama_cpp_rounds") or {}
    final = data["stages"][-1]["stage"]
    if entry["stage"] != final or rounds.get("error") or not rounds.get("rows"):
        return []
    timed = [r for r in rounds["rows"] if "decode_tok_s" in r]
    base = {r["type"]: r for r in timed if r["stage"] == data["stages"][0]["stage"]}
    lines = []
    for row in (r for r in timed if r["stage"] == entry["stage"]):
        ref = base.get(row.get("base_type", row["type"]))
        versus = (f", {row['decode_tok_s'] / ref['decode_tok_s']:.2f}× the base model's "
                  f"{ref['type']} ({ref['decode_tok_s']:.1f})" if ref else "")
        lines.append(f"| decode, llama.cpp side by side with the base model ({row['type']} "
                     f"GGUF, {row['file_bytes'] / 1e6:,.1f} MB, median of {rounds['rounds']} "
                     f"interleaved rounds) | {row['decode_tok_s']:.1f} tokens/s{versus} |")
    return lines


def _size_lines(entry: dict[str, Any], data: dict[str, Any]) -> list[str]:
    ev = entry.get("eval") or {}
    size = (entry.get("retention") or {}).get("size") or {}
    if not ev:
        return []
    lines = ["## Size and speed", "", "| | value |", "| --- | ---: |",
             f"| parameters | {ev.get('params', 0):,} |",
             f"| bytes on disk | {ev.get('bytes_on_disk', 0) / 1e6:,.1f} MB |"]
    if size.get("bytes_ratio_bf16") is not None:
        lines.append(f"| size vs base model in bf16 | {size['bytes_ratio_bf16']:.3f}× |")
    if size.get("bytes_ratio") is not None:
        lines.append(f"| size vs base model in fp32 | {size['bytes_ratio']:.3f}× |")
    speed = ev.get("speed") or {}
    if speed:
        lines += [f"| decode, PyTorch CPU ({speed.get('threads')} threads, {speed.get('dtype')}) "
                  f"| {speed.get('decode_tokens_per_s', 0):.1f} tokens/s |",
                  f"| prefill, PyTorch CPU | {speed.get('prefill_tokens_per_s', 0):,.0f} "
                  "tokens/s |"]
    llama = entry.get("llama_cpp") or {}
    for row in llama.get("rows") or []:
        if "decode_tok_s" in row:
            lines.append(f"| decode, llama.cpp ({row['type']} GGUF, {row['file_bytes'] / 1e6:,.1f}"
                         f" MB, {llama.get('threads', '?')} threads) | "
                         f"{row['decode_tok_s']:.1f} tokens/s |")
    return [*lines, *_side_by_side_lines(entry, data), ""]


def _load_lines(entry: dict[str, Any], quant: dict[str, Any] | None,
                stage_dir: Path) -> list[str]:
    model = "path/to/this/folder"
    lines = ["## How to load", "", "transformers:", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f'model = AutoModelForCausalLM.from_pretrained("{model}")',
             f'tokenizer = AutoTokenizer.from_pretrained("{model}")', "```", ""]
    if quant:
        lines += [f"This is a GPTQ-format checkpoint ({quant.get('bits')}-bit, group size "
                  f"{quant.get('group_size')}): transformers reads it through its GPTQ "
                  "integration (`gptqmodel` installed); GPTQModel loads it directly:", "",
                  "```python",
                  "from gptqmodel import GPTQModel",
                  f'model = GPTQModel.load("{model}")  # bf16 on CPU: the "as served" scores',
                  "```", ""]
    lines += ["vLLM:", "", "```bash", f"vllm serve {model}"
              + ("  # GPTQ is detected from config.json" if quant else "")]
    if quant and quant.get("method", "gptq") != "awq" and quant.get("sym", True) \
            and not quant.get("desc_act"):  # what `pkdq export` rewrites without requantizing
        lines += [f"pkdq export {model} --to model-ct --format compressed-tensors  # same grid, "
                  "vLLM's native pack-quantized W4A16", "vllm serve model-ct"]
    lines += ["```", ""]
    serving = (entry.get("metrics") or {}).get("serving") or {}
    for warning in serving.get("warnings") or []:
        lines += [f"> vLLM: {warning}", ""]
    ggufs = sorted(p.name for p in stage_dir.glob("*.gguf"))
    lines += ["llama.cpp:", "", "```bash"]
    if ggufs:
        lines.append(f"llama-cli -m {ggufs[0]} -p \"Hello\"  # the GGUF next to this folder")
    else:
        lines += [f"pkdq export-gguf {model} model.gguf  # llama.cpp's format",
                  'llama-cli -m model.gguf -p "Hello"']
    return [*lines, "```", ""]


def render_card(data: dict[str, Any], stage: str, source: dict[str, Any],
                stage_dir: Path) -> str:
    """The card's text for `stage` of a collected run (`collect`), front matter first."""
    index, entry = stage_entry(data, stage)
    run = data["run"]
    meta = front_matter(data, index, source)
    kinds = " → ".join(next(iter(s)) for s in run["recipe"]["stages"][:index])
    base = source.get("base_model") or run["model"]["spec"]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {run['run_id']} / {stage}", "",
             f"{base} after {kinds}, made with pkdq "
             f"(recipe `{run['recipe']['name']}`). License carried from the source model: "
             f"{meta['license']}.", "",
             *_done_lines(data, index), *_data_lines(data, index),
             *_results_lines(entry, data["stages"][0]), *_size_lines(entry, data),
             *_load_lines(entry, _quant_config(data, index), stage_dir),
             "## Reproduce", "",
             f"- model fingerprint `{(entry.get('model') or {}).get('fingerprint', '?')}`; "
             f"pkdq {run.get('versions', {}).get('pkdq', '?')}, seed {run.get('seed')}",
             f"- `pkdq run {run.get('recipe_source')}`", ""]
    return "\n".join(lines)


def write_card(run_dir: Path, stage: str, source: dict[str, Any]) -> Path | None:
    """Write README.md into `stage`'s model folder (None: the stage has no model folder yet).

    Written through a dot-named temporary file (dot files are not folder content), so a crash
    never leaves a half card or a stray file the integrity check would count as added.
    """
    data = collect(Path(run_dir))
    _, entry = stage_entry(data, stage)
    model_path = (entry.get("model") or {}).get("path")
    if not model_path or not Path(model_path).is_dir():
        return None
    target = Path(model_path) / CARD_FILE
    # one temporary name per writer: evaluations of two stages may rewrite cards side by side
    write_text_atomic(target, render_card(data, stage, source, Path(run_dir) / stage))
    return target
