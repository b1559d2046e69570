"""Checks before a run: errors for what will fail, warnings that cite the result behind them.

The recipe loader refuses what is malformed. `check_recipe` then refuses, as errors, what is
well-formed but will fail once the run starts: a model that cannot be found offline, training or
benchmark files that are not there, a prune target the model's sizes cannot meet, a KD budget
that would run for more than a year on this machine. `pkdq validate` and `pkdq run` both stop on
them, before any stage starts. The rules (`rule_warnings`) flag what will run but is known to go
badly (cutting more than half in one shot, quantizing before KD), or what will fail late: a
quantization group size that does not divide the *pruned* widths is refused only when the
quantize stage starts, after prune and KD have spent their time. Nothing here loads weights or
imports torch: shapes come from config.json (or a GGUF header) and the prune plan
(`tasks.prune.plan`, the sizes the prune stage will keep), so `pkdq validate` stays instant and
`pkdq compare` can check every ordering it builds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tasks.core.common import data_dir
from tasks.core.contamination import refusal
from tasks.core.data import training_text_problem
from tasks.core.dims import Dims, approx_params
from tasks.core.model_store import ModelNotFoundError, cached_config, offline_config
from tasks.core.recipe import DataSpec, DistillConfig, PruneConfig, QuantizeConfig, Recipe
from tasks.core.resources import usable_cpus
from tasks.core.text_sources import DataError, byte_count, load_corpus, min_bytes_per_token
from tasks.evaluate import check_eval_tasks, training_overlap
from tasks.prune import PrunePlan, SearchSpaceError, enumerate_candidates, plan_prune
from tasks.quantize import (
    MARLIN_K_MULTIPLE,
    MARLIN_SOURCE,
    exact_grid_problem,
    group_size_hint,
    marlin_k_note,
)

MINITRON = ('Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge '
            'Distillation" (Minitron), arXiv:2407.14679')
ORDERING_STUDY = ('"A Systematic Study of Compression Ordering for Large Language Models" '
                  '(2025), arXiv:2511.19495')
GPTQ_GROUPS = ("GPTQ/AWQ keep one scale per group of input columns, so a partial group is not "
               "representable; tasks/quantize.check_group_size refuses it at stage start")
SEARCH_SPACE = "tasks/prune/space.py: the shapes a budget search may choose from"
PRUNE_PLAN = "tasks/prune/plan.py: the prune stage checks targets against the model's sizes"
GGUF_GRID = ("tasks/quantize/gguf_grid.py: GGUF Q4_0/Q8_0 hold 32-wide blocks with one fp16 "
             "scale and no zero point; bench/results/llama_cpp.md measures the re-gridding")
MODEL_STORE = "tasks/core/model_store.py: models resolve offline, pkdq never downloads"
TRAIN_DATA = ("tasks/core/text_sources.py: calibration and KD read <data>/train or the "
              "recipe's data")
CONTAMINATION = ("tasks/core/contamination.py: 13-gram overlap with the evaluation sets "
                 "(GPT-3 appendix C)")
EVAL_DATA = "tasks/evaluate/lm_eval_tasks: offline task YAMLs over the <data> benchmark files"
# KD speed on CPU, for the time estimate: the README's default run distilled SmolLM2-135M
# (pruned to 115M, the 135M teacher alongside) at 32k tokens in 182 s on 2 CPU threads.
KD_CPU_TOKENS_PER_S = 180.0
KD_REFERENCE_PARAMS = 134_515_008
KD_REFERENCE_THREADS = 2
KD_SPEED = ("KD of SmolLM2-135M ran at ~180 tokens/s on 2 CPU threads (README, default run); "
            "scaled by parameters and threads")
KD_WARN_S = 86_400  # a day
KD_REFUSE_S = 365 * 86_400  # a year: no run of that length will finish

ONE_SHOT_LIMIT = 0.5  # fraction of an axis, or of all parameters, cut in one prune step
# Dims field each prune axis shrinks, and what its units are called in a message.
AXIS_FIELD = {"depth": "layers", "heads": "heads", "ffn": "ffn", "hidden": "hidden"}
AXIS_UNITS = {"depth": "layers", "heads": "query heads", "ffn": "FFN neurons",
              "hidden": "hidden channels"}

Level = Literal["error", "warning", "info"]
LEVELS: tuple[Level, ...] = ("error", "warning", "info")  # the order findings are printed in


@dataclass(frozen=True)
class RuleWarning:
    """One finding: `message` is one line, `source` says where the rule comes from.

    `error` findings are what will fail: validate and run refuse the recipe (exit 2). `info`
    findings are worth knowing but no reason to change the recipe (`--strict` ignores them);
    SmolLM2's hidden size 576, for instance, always misses vLLM's Marlin tiling.
    """

    code: str
    message: str
    source: str
    level: Level = "warning"

    def line(self) -> str:
        return f"{self.level} [{self.code}]: {self.message} ({self.source})"


def check_recipe(recipe: Recipe, order: Sequence[str] | None = None, *,
                 here: bool = True) -> list[RuleWarning]:
    """Every finding before a run, errors first: what `pkdq validate` prints and `pkdq run`
    refuses on (any `error`), then `rule_warnings` and the KD time estimate.

    The model is looked up offline without converting anything (`offline_config`), and the
    training and benchmark files the stages will open must be under the data dir. `here=False`
    (a run submitted to another machine's work pool) skips what depends on this machine's disk:
    the worker checks it where the run happens.
    """
    errors: list[RuleWarning] = []
    config: dict[str, Any] | None = None
    if here:
        try:
            config = offline_config(recipe.model)
        except ModelNotFoundError as exc:
            errors.append(RuleWarning("model-not-found", str(exc), MODEL_STORE, "error"))
        errors.extend(_data_errors(recipe))
    else:
        config = cached_config(recipe.model)
    found = rule_warnings(recipe, order, model_config=config or {})
    if config is None and not errors and _needs_shapes(recipe):
        found.append(RuleWarning(
            "shapes-unchecked", f"the sizes of model '{recipe.model}' are not readable before "
            "it is resolved (first use joins or converts it), so the prune targets and "
            "quantization groups were not checked against them", MODEL_STORE, level="info"))
    found.extend(_distill_budget(recipe, config))
    return sorted(errors + found, key=lambda finding: LEVELS.index(finding.level))


def recipe_errors(recipe: Recipe, *, here: bool = True) -> list[RuleWarning]:
    """The `error` findings of `check_recipe`: what the run would fail on."""
    return [f for f in check_recipe(recipe, here=here) if f.level == "error"]


def _needs_shapes(recipe: Recipe) -> bool:
    return any(kind in ("prune", "quantize") for kind, _ in recipe.stage_list())


def data_uses(recipe: Recipe) -> list[tuple[str, DataSpec, int, int]]:
    """(recipe key, data, tokens needed, rows needed) of each stage that reads training text."""
    uses: list[tuple[str, DataSpec, int, int]] = []
    for i, (kind, cfg) in enumerate(recipe.stage_list()):
        if kind == "quantize" or (kind == "prune" and cfg.needs_calibration()):
            cal = cfg.calibration
            key = f"stages[{i}].{kind}.calibration." + ("data" if cal.data else "source")
            uses.append((key, cal.spec(), cal.samples * cal.seq_len, cal.samples))
        elif kind == "distill":
            per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
            rows = -(-cfg.tokens // per_step) * cfg.batch_size * cfg.grad_accum
            key = f"stages[{i}].distill." + ("data" if cfg.data else "source")
            uses.append((key, cfg.spec(), rows * cfg.seq_len, rows))
    return uses


def _data_errors(recipe: Recipe) -> list[RuleWarning]:
    """The first training or benchmark file a stage or an evaluation would miss, as an error;
    then a user's data that is unreadable, too small for its budget, or overlapping the
    evaluation sets the recipe scores (the contamination check)."""
    data = data_dir()
    uses = data_uses(recipe)
    reads_heldout = _heldout_keys(recipe)
    for key, spec, need, rows in uses:
        if spec.kind == "builtin":  # the bundled text: presence only (its lines predate data:)
            checks = [(f"{key} {spec.source}", spec.source, False)]
            if key in reads_heldout:
                checks.append((key.rsplit(".", 1)[0] + " (held-out KL slice) wikipedia",
                               "wikipedia", True))
            for where, source, heldout in checks:
                problem = training_text_problem(data, source, heldout)
                if problem:
                    return [RuleWarning("data-missing", f"{where}: {problem}", TRAIN_DATA,
                                        "error")]
            continue
        problem = _use_problem(recipe, key, spec, need, rows, data, key in reads_heldout)
        if problem:  # "data.paths: x" under key "...data" reads "...data.paths: x"
            line = f"{key}{problem[4:]}" if problem.startswith("data.") else \
                f"{key}: {problem.removeprefix('data: ')}"
            return [RuleWarning("data-missing", line, TRAIN_DATA, "error")]
    problem = check_eval_tasks(recipe.evaluate, data)
    if problem:
        if not problem.startswith("evaluate."):
            problem = f"evaluate.tasks: {problem}"
        return [RuleWarning("eval-data-missing", problem, EVAL_DATA, "error")]
    return contamination_errors(recipe, uses, data)


def _heldout_keys(recipe: Recipe) -> set[str]:
    """The `data_uses` keys whose stage also reads the data's held-out slice: KD (held-out KL)
    and a quantize stage choosing its Q8_0 layers (`gguf_q8_layers`) by held-out KL."""
    keys = set()
    for key, _, _, _ in data_uses(recipe):
        index = int(key[key.index("[") + 1:key.index("]")])
        kind, cfg = recipe.stage_list()[index]
        if kind == "distill" or (kind == "quantize" and cfg.gguf_q8_layers is not None):
            keys.add(key)
    return keys


def _use_problem(recipe: Recipe, key: str, spec: DataSpec, need: int, rows: int,
                 data, heldout: bool = False) -> str | None:
    """Why one stage's data would fail (one line), or None; `heldout`: the stage also reads
    the data's held-out slice."""
    try:
        corpus = load_corpus(spec, data)
    except DataError as exc:
        return str(exc)
    if spec.kind == "chat":
        problem = _chat_template_problem(recipe.model)
        if problem:
            return f"kind chat: {problem}"
    fix = "lower the budget, add data, or set data.repeat: true"
    if spec.kind == "chat" and ".distill." in key and spec.loss_on == "assistant":
        if corpus.size < rows and not spec.repeat:
            return (f"{', '.join(corpus.files[:2])}: {corpus.size} conversations, {rows} "
                    f"needed (one per row); {fix}")
    elif byte_count(corpus) / min_bytes_per_token() < need and not spec.repeat:
        return (f"{', '.join(corpus.files[:2])}: {byte_count(corpus)} bytes of text cannot "
                f"hold the {need} tokens needed; {fix}")
    if heldout and not corpus.heldout_docs and not corpus.heldout_chats:
        return (f"{', '.join(corpus.files[:2])}: the held-out slice is empty (too few "
                "documents); raise data.heldout or give data.heldout_paths")
    return None


def _chat_template_problem(model: str) -> str | None:
    """A model folder whose tokenizer has no chat template (other models: checked when the
    stage loads the tokenizer)."""
    import json
    from pathlib import Path

    folder = Path(model)
    config = folder / "tokenizer_config.json"
    if not folder.is_dir() or not config.is_file():
        return None
    if any((folder / name).is_file() for name in ("chat_template.jinja", "chat_template.json")):
        return None
    try:
        has = bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return None
    return None if has else (f"{folder}: the tokenizer has no chat template (no chat_template "
                             "in tokenizer_config.json); use a chat model or kind jsonl")


def contamination_errors(recipe: Recipe, uses=None, data=None) -> list[RuleWarning]:
    """The overlap check of every distinct training text against the evaluation sets the
    recipe scores: an error above the threshold unless `contamination.allow_overlap`."""
    data = data or data_dir()
    found: list[RuleWarning] = []
    cfg = recipe.contamination
    groups: dict[str, tuple[list[str], DataSpec]] = {}  # one check per distinct data
    for key, spec, _, _ in uses if uses is not None else data_uses(recipe):
        groups.setdefault(spec.model_dump_json(), ([], spec))[0].append(key)
    for keys, spec in groups.values():
        key = ", ".join(keys)
        try:
            report = training_overlap(spec, recipe.evaluate, data, cfg.ngram)
        except (ValueError, OSError, KeyError, TypeError) as exc:  # an unreadable benchmark
            found.append(RuleWarning(
                "contamination-unchecked", f"{key}: overlap with the evaluation sets not "
                f"measured ({' '.join(str(exc).split())[:160]})", CONTAMINATION, "info"))
            continue
        line = refusal(report, cfg.threshold, f"{key}")
        if line and not cfg.allow_overlap:
            return [RuleWarning("contamination", line, CONTAMINATION, "error")]
        if spec.kind == "builtin" and not line:
            continue  # the bundled text: measured and cached, said in the run's metrics
        counts = ", ".join(f"{name} {row['overlapping_documents']}/{row['documents']}"
                           for name, row in report["sets"].items())
        found.append(RuleWarning(
            "contamination", f"{key}: evaluation documents sharing a {cfg.ngram}-gram with the "
            f"training text: {counts}" + (" (allowed: contamination.allow_overlap)" if line
                                          else ""), CONTAMINATION,
            "warning" if line else "info"))
    return found


def kd_tokens_per_s(params: int, threads: int) -> float:
    """Rough CPU KD throughput: the measured rate scaled linearly by parameter count (a step's
    work) and threads (optimistic: CPU KD scales worse than that)."""
    return KD_CPU_TOKENS_PER_S * KD_REFERENCE_PARAMS / params * threads / KD_REFERENCE_THREADS


def kd_seconds(cfg: DistillConfig, params: int, threads: int) -> float:
    """Rough CPU wall time of a KD stage's token budget."""
    return cfg.tokens / kd_tokens_per_s(params, threads)


def _duration(seconds: float) -> str:
    for unit, size in (("years", 365 * 86_400), ("days", 86_400), ("hours", 3600)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds / 60:.3g} minutes"


def _distill_budget(recipe: Recipe, config: dict[str, Any] | None) -> list[RuleWarning]:
    """A KD token budget that keeps this machine's CPUs busy past a day (warning) or a year
    (error). GPU runs are not estimated: there is no measured rate to scale."""
    if recipe.resources.distill.device != "cpu":
        return []
    dims = _dims(config)
    params, assumed = KD_REFERENCE_PARAMS, " (sizes unknown: SmolLM2-135M's assumed)"
    if dims is not None:
        params = approx_params(dims, int((config or {}).get("vocab_size") or 0),
                               bool((config or {}).get("tie_word_embeddings", True)))
        assumed = ""
    threads = max(1, min(recipe.threads, usable_cpus()))
    found = []
    for i, (kind, cfg) in enumerate(recipe.stage_list()):
        if kind != "distill":
            continue
        seconds = kd_seconds(cfg, max(params, 1), threads)
        if seconds < KD_WARN_S:
            continue
        level: Level = "error" if seconds >= KD_REFUSE_S else "warning"
        per_day = int(kd_tokens_per_s(max(params, 1), threads) * KD_WARN_S)
        found.append(RuleWarning(
            "distill-budget",
            f"stages[{i}].distill.tokens {cfg.tokens}: about {_duration(seconds)} of KD on "
            f"{threads} CPU thread(s) of this machine for a {params / 1e6:.1f}M-parameter "
            f"model{assumed}; about {per_day} tokens fit in a day",
            KD_SPEED, level))
    return found


def rule_warnings(recipe: Recipe, order: Sequence[str] | None = None,
                  model_config: dict[str, Any] | None = None) -> list[RuleWarning]:
    """Every rule's findings for `recipe` run in `order` (stage kinds; default: recipe order).

    `order` is separate from the recipe because production recipes must be P-KD-Q while `pkdq
    compare` runs their stages in other orders. `model_config` is the model's config.json; when
    None it is read from disk if the model is already there (`cached_config`), else the rules that
    need shapes are skipped. Raises ValueError only for an `order` that is not a permutation of
    the recipe's stages.
    """
    configs: dict[str, Any] = dict(recipe.stage_list())
    kinds = _checked_order(configs, order)
    config = model_config if model_config is not None else cached_config(recipe.model)
    dims = _dims(config)
    prune: PruneConfig | None = configs.get("prune")
    quant: QuantizeConfig | None = configs.get("quantize")
    found: list[RuleWarning] = []
    plan = None
    if prune is not None and prune.target is not None:
        if config:
            found.extend(_search_space_rules(recipe, prune, quant, config))
    elif prune is not None and dims is not None:
        try:
            plan = plan_prune(dims, prune)
        except ValueError as exc:  # the prune stage would refuse it: an error before the run
            index = next(i for i, (kind, _) in enumerate(recipe.stage_list()) if kind == "prune")
            found.append(RuleWarning("prune-target-invalid", f"stages[{index}].{exc}",
                                     PRUNE_PLAN, "error"))
    if prune is not None:
        found.extend(_prune_over_half(prune, plan, config or {}))
    found.extend(_order_rules(kinds))
    if quant is not None and dims is not None:
        found.extend(_quantize_shape_rules(quant, _quantized_shapes(kinds, dims, plan)))
    if quant is not None:
        found.extend(_gguf_grid_rule(quant))
    return found


def _search_space_rules(recipe: Recipe, prune: PruneConfig, quant: QuantizeConfig | None,
                        config: dict[str, Any]) -> list[RuleWarning]:
    """A budget no shape meets (a bound, the baseline, or the tolerance): an error now, with the
    bound named, rather than an empty search after the model loads."""
    index = next(i for i, (kind, _) in enumerate(recipe.stage_list()) if kind == "prune")
    try:
        enumerate_candidates(config, prune, quant)
    except SearchSpaceError as exc:
        return [RuleWarning("prune-target-unreachable", f"stages[{index}].{exc}", SEARCH_SPACE,
                            "error")]
    return []


def _gguf_grid_rule(cfg: QuantizeConfig) -> list[RuleWarning]:
    """A q4_0/q8_0 GGUF of a GPTQ grid it cannot hold throws the GPTQ solution away."""
    if cfg.gguf not in ("q4_0", "q8_0") or cfg.method == "awq":
        return []
    quant = {"quant_method": "gptq", "bits": cfg.bits, "group_size": cfg.group_size,
             "sym": cfg.sym, "desc_act": cfg.desc_act}
    problem = exact_grid_problem(quant, cfg.gguf)
    if problem is None:
        return []
    bits = 4 if cfg.gguf == "q4_0" else 8
    return [RuleWarning(
        "gguf-exact-grid",
        f"quantize.gguf {cfg.gguf}: {problem}, so the GGUF re-quantizes the GPTQ weights onto "
        f"llama.cpp's blocks and loses what GPTQ solved; set bits {bits}, group_size 32, sym "
        "true, desc_act false for a bit-exact export (or gguf q4_k_m for llama.cpp's k-quants)",
        GGUF_GRID, level="info")]


def _checked_order(configs: dict[str, Any], order: Sequence[str] | None) -> list[str]:
    kinds = list(order) if order is not None else list(configs)
    if sorted(kinds) != sorted(configs):
        raise ValueError(f"order {' -> '.join(kinds)} must list the recipe's stages "
                         f"({', '.join(configs)}) once each")
    return kinds


def _dims(config: dict[str, Any] | None) -> Dims | None:
    """Dims of a config.json, or None when it lacks the sizes or they make no model (then shape
    rules are skipped; loading such a config fails in transformers, not here)."""
    if not isinstance(config, dict) or not config:
        return None
    try:
        dims = Dims.from_config(config)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
    if min(dims.to_json().values()) < 1 or dims.heads % dims.kv_heads:
        return None
    return dims


# --------------------------------------------------------------------------------------------
# prune-over-50
# --------------------------------------------------------------------------------------------


def _axis_cuts(cfg: PruneConfig, plan: PrunePlan | None) -> list[tuple[str, float, str]]:
    """(axis, fraction removed, what that is in sizes) for every pruned axis.

    With a plan the fraction is what the stage will really cut (after rounding to round_to and
    to whole KV groups); without one only ratio targets can be judged.
    """
    cuts = []
    for axis in cfg.axes():
        if plan is not None:
            before = getattr(plan.before, AXIS_FIELD[axis])
            after = getattr(plan.after, AXIS_FIELD[axis])
            cuts.append((axis, 1 - after / before, f"{before} -> {after}"))
        elif getattr(cfg, axis).ratio is not None:
            ratio = getattr(cfg, axis).ratio
            cuts.append((axis, ratio, f"ratio {ratio:g}"))
    return cuts


def _prune_over_half(cfg: PruneConfig, plan: PrunePlan | None,
                     config: dict[str, Any]) -> list[RuleWarning]:
    parts = [f"{frac:.0%} of {AXIS_UNITS[axis]} ({detail})"
             for axis, frac, detail in _axis_cuts(cfg, plan) if frac > ONE_SHOT_LIMIT]
    if plan is not None:
        vocab = int(config.get("vocab_size") or 0)
        tied = bool(config.get("tie_word_embeddings", True))
        before, after = (approx_params(d, vocab, tied) for d in (plan.before, plan.after))
        if 1 - after / before > ONE_SHOT_LIMIT:
            parts.append(f"{1 - after / before:.0%} of the parameters ({before / 1e6:.1f}M -> "
                         f"{after / 1e6:.1f}M)")
    if not parts:
        return []
    return [RuleWarning(
        "prune-over-50",
        f"one-shot prune removes {', '.join(parts)}; more than half in one step is hard to "
        "recover: Minitron compresses in steps of about half (15B -> 8B -> 4B) with distillation "
        "after each; cut less, or chain two recipes (the second one's model: the first run's "
        "02-distill/model)",
        MINITRON)]


# --------------------------------------------------------------------------------------------
# Order rules
# --------------------------------------------------------------------------------------------


def _order_rules(kinds: list[str]) -> list[RuleWarning]:
    pos = {kind: i for i, kind in enumerate(kinds)}

    def before(a: str, b: str) -> bool:
        return a in pos and b in pos and pos[a] < pos[b]

    found = []
    if before("quantize", "distill"):
        found.append(RuleWarning(
            "quantize-before-distill",
            "quantize runs before distill, so KD can only train on the frozen quantization grid "
            "and cannot win back what rounding lost; the ordering study found pipelines that "
            "quantize early degrade severely and P-KD-Q (prune -> distill -> quantize) best",
            ORDERING_STUDY))
    if before("quantize", "prune"):
        found.append(RuleWarning(
            "quantize-before-prune",
            "prune runs after quantize: it cuts dequantized grid weights (down_proj loses input "
            "columns, shifting whole quantization groups), so the pruned model is quantized a "
            "second time and pays rounding twice; P-KD-Q quantizes once, last",
            ORDERING_STUDY))
    if "distill" in pos and not (before("prune", "distill") or before("quantize", "distill")):
        found.append(RuleWarning(
            "distill-without-prune",
            "distill runs before anything is pruned or quantized: the student starts equal to "
            "the teacher (self-distillation), so KD has nothing to recover and only fine-tunes",
            f"{ORDERING_STUDY}: KD placed to recover from pruning (P-KD-Q) ranks best",
            level="info"))
    return found


# --------------------------------------------------------------------------------------------
# Quantization shapes: group-size-divides, marlin-128
# --------------------------------------------------------------------------------------------


def _in_features(dims: Dims) -> dict[str, tuple[int, str]]:
    """in_features of each quantized linear kind of a Llama/Gemma decoder block, and its origin.

    The prune stage shrinks them through the config sizes: hidden -> every input projection,
    kept heads x head_dim -> o_proj, kept FFN neurons -> down_proj.
    """
    return {
        "q/k/v/gate/up_proj": (dims.hidden, "hidden size"),
        "o_proj": (dims.heads * dims.head_dim, f"{dims.heads} heads x {dims.head_dim}"),
        "down_proj": (dims.ffn, "FFN size"),
    }


def _quantized_shapes(kinds: list[str], dims: Dims,
                      plan: PrunePlan | None) -> list[tuple[str, Dims]]:
    """(when, sizes) of every quantization pass, the served checkpoint's last.

    Quantize after prune sees the pruned sizes; quantize before prune sees the full model and
    then re-quantizes the pruned one (tasks.compare.orderings). An invalid prune target leaves the
    pruned sizes unknown, so only a pass on the full model is checked then.
    """
    if "prune" not in kinds:
        return [("of the model", dims)]
    prune_first = kinds.index("prune") < kinds.index("quantize")
    shapes = [] if prune_first else [("before pruning", dims)]
    if plan is not None:
        shapes.append(("after pruning" if prune_first else "when re-quantized after pruning",
                       plan.after))
    return shapes


def _quantize_shape_rules(cfg: QuantizeConfig,
                          shapes: list[tuple[str, Dims]]) -> list[RuleWarning]:
    found = []
    g = cfg.group_size
    for when, dims in shapes:
        inputs = _in_features(dims)
        bad = [f"{kind} in_features {n} ({why})" for kind, (n, why) in inputs.items() if n % g]
        if bad:
            hint = group_size_hint(n for n, _ in inputs.values())
            found.append(RuleWarning(
                "group-size-divides",
                f"quantize group_size {g} does not divide in_features {when}: {', '.join(bad)}; "
                f"{hint}; the quantize stage would refuse it after the stages before it ran",
                GPTQ_GROUPS))
    if shapes:
        served = _in_features(shapes[-1][1])
        off_tile = {kind: n for kind, (n, _) in served.items() if n % MARLIN_K_MULTIPLE}
        if off_tile:
            found.append(RuleWarning("marlin-128", marlin_k_note(off_tile), MARLIN_SOURCE,
                                     level="info"))
    return found
