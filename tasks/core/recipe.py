"""Recipes: YAML validated into typed objects, with one-line errors that say what to fix.

A recipe names a model, an ordered list of stages and how to evaluate. Production recipes must
follow P-KD-Q (prune -> distill -> quantize): pruning needs the full model as KD teacher, and
quantizing before KD throws away precision KD then cannot use.
"""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    ValidationError,
    model_serializer,
    model_validator,
)

from tasks.core.common import REPO_ROOT, read_utf8
from tasks.core.resources import Resources

RECIPES_DIR = REPO_ROOT / "recipes"
# A recipe name, a run id: one path component, nothing that climbs out of recipes/ or runs/.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
STAGE_ORDER = ("prune", "distill", "quantize")
PKDQ_RULE = (
    "P-KD-Q rule: production recipes run prune -> distill -> quantize "
    "(KD recovers what pruning cost, using the unpruned model as teacher; quantization comes last "
    "so KD trains full-precision weights)"
)


# Upper bounds that no run on any machine pkdq targets comes near; past them a value is a typo
# or a fuzzer, and refusing it here keeps it from becoming an hour-late failure (or a KD run of
# years: `tasks.rules` also estimates KD time on this machine from the token budget).
MAX_TOKENS = 10**11  # KD tokens: Minitron's whole distillation was 94B
MAX_STEPS = 10**9  # step counters (warmup, eval/checkpoint intervals)
MAX_BATCH = 4096  # sequences per batch / accumulation steps
MAX_WIDTH = 10**9  # a kept size (neurons, channels, heads)
SEED_MAX = 2**32 - 1  # numpy's seed range; lm-eval seeds numpy with the recipe seed
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a short YAML file


class Strict(BaseModel):
    # allow_inf_nan=False: .inf / .nan pass every `gt=0`-style bound and then break a run late
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


BuiltinSource = Literal["wikipedia", "c4", "mixed"]
DATA_KINDS = ("builtin", "text", "jsonl", "parquet", "csv", "chat", "hf")
FILE_KINDS = ("text", "jsonl", "parquet", "csv", "chat")
MAX_PATHS = 1000


_FILES = {"paths", "heldout", "heldout_paths"}
DATA_FIELDS: dict[str, set[str]] = {  # the fields each kind reads (the rest must stay unset)
    kind: {"kind", "repeat"} | extra for kind, extra in {
        "builtin": {"source"}, "text": _FILES, "jsonl": _FILES | {"field"},
        "parquet": _FILES | {"field"}, "csv": _FILES | {"field"},
        "chat": _FILES | {"loss_on"}, "hf": {"path", "name", "split", "column", "heldout"},
    }.items()}


class DataSpec(Strict):
    """Where training / calibration text comes from: the bundled text or the user's own.

    Paths may start with `${data}/` (the data dir: PKDQ_DATA_DIR, else ../shared/data), so a
    recipe stays portable; other relative paths are relative to the directory pkdq runs in.
    Globs (`*`, `?`, `[...]`) expand in sorted order. `tasks.core.text_sources` loads each kind.
    """

    kind: Literal["builtin", "text", "jsonl", "parquet", "csv", "chat", "hf"] = "builtin"
    source: BuiltinSource = Field("wikipedia", description="builtin: the bundled text")
    paths: list[str] = Field([], max_length=MAX_PATHS, description="text/jsonl/parquet/csv/chat "
                             "files or globs")
    field: str = Field("text", min_length=1, max_length=200,
                       description="jsonl/parquet/csv: the column holding the text")
    path: str | None = Field(None, min_length=1, max_length=4096,
                             description="hf: a folder written by datasets' save_to_disk")
    name: str | None = Field(None, min_length=1, max_length=200,
                             description="hf: a hub dataset id already in the local HF cache")
    split: str = Field("train", min_length=1, max_length=100, description="hf: the split")
    column: str = Field("text", min_length=1, max_length=200, description="hf: the text column")
    heldout: float = Field(0.05, ge=0.0, lt=0.5, description="fraction of documents held out "
                           "for KD's held-out KL/perplexity (ignored with heldout_paths)")
    heldout_paths: list[str] = Field([], max_length=MAX_PATHS, description="separate held-out "
                                     "files (same kind and field as paths)")
    repeat: bool = Field(False, description="cycle the data for several epochs when it has "
                         "fewer tokens than the budget (else the run refuses)")
    loss_on: Literal["assistant", "all"] = Field(
        "assistant", description="chat: CE and KD on assistant tokens only, or on every token")

    @model_validator(mode="after")
    def _kind_fields(self) -> DataSpec:
        unused = sorted(set(self.model_fields_set) - DATA_FIELDS[self.kind])
        if unused:
            users = [k for k in DATA_KINDS if unused[0] in DATA_FIELDS[k]]
            raise ValueError(f"{unused[0]} is not used by kind {self.kind} (it is for "
                             f"{', '.join(users)})")
        if self.kind in FILE_KINDS and not self.paths:
            raise ValueError(f"kind {self.kind} needs paths: a list of files or globs")
        if self.kind not in FILE_KINDS and (self.paths or self.heldout_paths):
            raise ValueError(f"kind {self.kind} takes no paths"
                             + ("; use path (save_to_disk folder) or name" if self.kind == "hf"
                                else ""))
        if self.kind == "hf" and (self.path is None) == (self.name is None):
            raise ValueError("kind hf needs exactly one of path (a save_to_disk folder) or name "
                             "(a hub dataset in the local cache)")
        if self.kind != "hf" and (self.path is not None or self.name is not None):
            raise ValueError(f"path and name are for kind hf; kind {self.kind} uses paths")
        return self

    @model_serializer(mode="wrap")
    def _only_set_for_kind(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Only the fields the kind uses: the dump enters stage keys, and a field the kind
        ignores must not make two equal data specs look different."""
        data = handler(self)
        used = DATA_FIELDS[self.kind]
        return {key: value for key, value in data.items() if key in used}


def omit_at(dump: dict[str, Any], /, **as_before: Any) -> dict[str, Any]:
    """Drop each field whose dumped value is the one that means "as before this field existed".

    Stage and evaluation keys hash these dumps: a recipe that never uses a newer field (user
    data, a GGUF export, task YAMLs, llama.cpp timing, a search target) must keep the keys it
    had, so its finished units are reused rather than computed again.
    """
    for key, value in as_before.items():
        if key in dump and dump[key] == value:
            del dump[key]
    return dump


class TextSample(Strict):
    """Which training text, how many blocks of how many tokens."""

    source: BuiltinSource = "wikipedia"
    samples: int = Field(32, ge=1, le=100_000)
    seq_len: int = Field(256, ge=16, le=8192)
    data: DataSpec | None = Field(None, description="the user's own data (overrides source and "
                                  "the recipe's top-level data)")

    @model_validator(mode="after")
    def _builtin_as_source(self) -> TextSample:
        return _builtin_into_source(self)

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return omit_at(handler(self), data=None)  # the bundled text, as before user data

    def spec(self) -> DataSpec:
        """The data this sample draws from (the bundled `source` unless `data` is set)."""
        return self.data or DataSpec(kind="builtin", source=self.source)


def _builtin_into_source(cfg: Any) -> Any:
    """`data: {kind: builtin, source: x}` is spelled `source: x` inside a stage: one spelling
    per meaning, so both give the same stage key."""
    if cfg.data is not None and cfg.data.kind == "builtin":
        object.__setattr__(cfg, "source", cfg.data.source)
        object.__setattr__(cfg, "data", None)
        cfg.model_fields_set.add("source")  # the stage named its data: the recipe's won't apply
    return cfg


# Unit importance: activation (Minitron), weight magnitude L1 (`magnitude`) or L2, first-order
# Taylor |w * dL/dw| (LLM-Pruner), or random (the control that shows what a criterion is worth).
UnitCriterion = Literal["activation", "magnitude", "magnitude_l2", "taylor", "random"]
# Layer importance: block influence 1 - cos(in, out) (ShortGPT), perplexity rise when skipped.
DepthCriterion = Literal["block_influence", "ppl_skip", "random"]


def _exactly_one(ratio: Any, size: Any, size_key: str = "size") -> None:
    if (ratio is None) == (size is None):
        raise ValueError(f"give exactly one of ratio (fraction removed, 0..1) or {size_key}")


class _RatioOrSize(Strict):
    """An axis cut given as the fraction removed or the size kept: exactly one of the two."""

    ratio: float | None = Field(None, gt=0.0, lt=1.0, description="fraction removed")
    size: int | None = Field(None, ge=1, le=MAX_WIDTH, description="size kept")
    criterion: UnitCriterion = "activation"

    @model_validator(mode="after")
    def _one_target(self) -> _RatioOrSize:
        _exactly_one(self.ratio, self.size)
        return self


class FfnTarget(_RatioOrSize):
    """FFN neurons, the same count removed in every layer (HF configs hold one size)."""

    ratio: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of neurons removed")
    size: int | None = Field(None, ge=1, le=MAX_WIDTH, description="neurons kept per layer")


class HiddenTarget(_RatioOrSize):
    """Hidden width (embedding channels), cut in every norm and projection at once (Minitron)."""

    ratio: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of channels removed")
    size: int | None = Field(None, ge=1, le=MAX_WIDTH, description="hidden size kept")


class HeadsTarget(_RatioOrSize):
    """Attention heads, GQA-aware: whole KV groups, or query heads inside every KV group."""

    mode: Literal["kv_groups", "query"] = "kv_groups"
    ratio: float | None = Field(None, gt=0.0, lt=1.0,
                                description="fraction of KV groups (or query heads) removed")
    size: int | None = Field(None, ge=1, le=MAX_WIDTH,
                             description="KV groups kept (mode kv_groups) or query heads kept "
                             "per KV group (mode query)")


class DepthTarget(Strict):
    """Whole decoder layers."""

    remove: int | None = Field(None, ge=1, le=MAX_WIDTH, description="layers removed")
    ratio: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of layers removed")
    criterion: DepthCriterion = "block_influence"

    @model_validator(mode="after")
    def _one_target(self) -> DepthTarget:
        _exactly_one(self.ratio, self.remove, "remove")
        return self


PRUNE_AXES = ("ffn", "heads", "depth", "hidden")
DATA_FREE_CRITERIA = ("magnitude", "magnitude_l2", "random")  # score units from weights alone


def parse_bytes(value: Any) -> int:
    """`60MB`, `1.5 GB`, `60000000` -> bytes (decimal units: what `ls -l` sizes compare to)."""
    if isinstance(value, bool):
        raise ValueError("a size such as 60MB or 60000000")
    if isinstance(value, int | float):
        return int(value)
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgG]?)i?[bB]?\s*", str(value))
    if not match:
        raise ValueError(f"'{value}' is not a size; write e.g. 60MB, 1.2GB or 60000000")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


class BudgetTarget(Strict):
    """A budget instead of a shape: the search (tasks.search) finds the shape that meets it.

    Bounds follow the published guidance for one-shot structured pruning before KD (Minitron,
    Sreenivas et al. 2024: at most ~20% of layers, ~40% of any width axis).
    """

    params: float | None = Field(None, gt=0, le=1e13, description="parameters kept: a fraction "
                                 "of the baseline (<= 1) or an absolute count (> 1)")
    bytes: int | str | None = Field(None, description="size after the recipe's quantize stage "
                                    "(quantized linears, 16-bit embeddings and norms), e.g. 60MB")
    tolerance: float = Field(0.03, gt=0, lt=0.5, description="relative distance to the target "
                             "a candidate may have")
    axes: list[Literal["depth", "ffn", "heads", "hidden"]] = Field(
        ["depth", "ffn", "heads", "hidden"], min_length=1, description="axes the search may cut")
    max_depth_cut: float = Field(0.2, ge=0, lt=1, description="largest share of layers removed")
    max_width_cut: float = Field(0.4, ge=0, lt=1, description="largest share of any width axis "
                                 "(FFN, KV groups / query heads, hidden) removed")

    @model_validator(mode="after")
    def _one_budget(self) -> BudgetTarget:
        if (self.params is None) == (self.bytes is None):
            raise ValueError("give exactly one of params (fraction or count) or bytes (e.g. 60MB)")
        if self.bytes is not None:
            object.__setattr__(self, "bytes", parse_bytes(self.bytes))
            if self.bytes < 1:
                raise ValueError("bytes must be positive")
        return self


class SearchConfig(Strict):
    """How the budget search ranks candidates (tasks.search)."""

    top_k: int = Field(6, ge=1, le=64, description="finalists that get the short KD")
    candidates: int = Field(16, ge=1, le=512, description="most candidates scored by the "
                            "one-shot proxy (an even spread over the shapes that meet the target)")
    tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="KD tokens per finalist; "
                               "default an eighth of the distill stage's budget")
    depth_criterion: DepthCriterion = "block_influence"
    criterion: UnitCriterion = "activation"


class PruneConfig(Strict):
    target: BudgetTarget | None = None
    search: SearchConfig = SearchConfig()
    ffn: FfnTarget | None = None
    heads: HeadsTarget | None = None
    depth: DepthTarget | None = None
    hidden: HiddenTarget | None = None
    round_to: int = Field(32, ge=1, le=1024, description="kept sizes are multiples of this")
    calibration: TextSample = TextSample(samples=32, seq_len=256)
    taylor_samples: int = Field(8, ge=1, le=4096, description="calibration blocks that the "
                                "taylor criterion backpropagates (backward is ~2x a forward)")
    skip_samples: int = Field(8, ge=1, le=4096, description="calibration blocks that ppl_skip "
                              "scores each layer on (one pass per layer)")

    @model_validator(mode="after")
    def _some_axis(self) -> PruneConfig:
        given = [axis for axis in PRUNE_AXES if getattr(self, axis) is not None]
        if self.target is not None and given:
            raise ValueError(f"give a target (the search picks the shape) or axes to cut "
                             f"({', '.join(given)}), not both")
        if self.target is None and not given:
            raise ValueError(f"give at least one axis to prune: {', '.join(PRUNE_AXES)} (or a "
                             "target: {params: 0.75} for the search to meet)")
        return self

    @model_serializer(mode="wrap")
    def _omit_search_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave `target: null` and the default `search` out: stage keys hash this dump, and a
        recipe with a fixed shape must keep the key it had before the search existed."""
        data = handler(self)
        if data.get("target") is None:
            omit_at(data, target=None, search=SearchConfig().model_dump())
        return data

    def axes(self) -> list[str]:
        """The axes this config prunes, in the order the stage applies them."""
        return [axis for axis in ("depth", "heads", "ffn", "hidden") if getattr(self, axis)]

    def needs_calibration(self) -> bool:
        """Whether some axis scores units on calibration text (weight-only and random don't);
        a budget search always does (its proxy runs the model on calibration text)."""
        return self.target is not None or any(
            getattr(self, axis).criterion not in DATA_FREE_CRITERIA for axis in self.axes())


class DistillConfig(Strict):
    tokens: int = Field(100_000, ge=1, le=MAX_TOKENS, description="training token budget")
    seq_len: int = Field(256, ge=16, le=8192)
    batch_size: int = Field(4, ge=1, le=MAX_BATCH)
    grad_accum: int = Field(1, ge=1, le=MAX_BATCH)
    lr: float = Field(1e-4, gt=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=10)
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)
    temperature: float = Field(1.0, gt=0, le=100, description="softens both distributions; the "
                               "KD term is scaled by T^2. 1.0: at T=2 KD trailed plain CE on "
                               "WikiText ppl (bench/kd_recovery.py)")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the KD term; 1-alpha for CE")
    loss: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl"] = Field(
        "forward_kl", description="divergence: forward KL (Hinton), reverse KL (MiniLLM), "
        "generalised JSD (GKD, jsd_beta), skew KL / skew reverse KL (DistiLLM, skew_alpha)")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="GKD JSD mixture weight of the teacher")
    skew_alpha: float = Field(0.1, ge=0, lt=1, description="DistiLLM skew: weight of the "
                              "target distribution inside the mixture")
    alpha_schedule: Literal["constant", "linear", "taid"] = Field(
        "constant", description="constant alpha; linear alpha -> alpha_end; taid: target "
        "interpolates student -> teacher as lambda goes taid_start -> 1")
    alpha_end: float | None = Field(None, ge=0, le=1, description="final alpha (linear)")
    taid_start: float = Field(0.2, ge=0, le=1, description="TAID's lambda at step 1")
    hidden_loss: Literal["none", "mse", "cosine"] = Field(
        "none", description="match hidden states via learned projections (mse is relative)")
    hidden_weight: float = Field(1.0, ge=0, le=1e6, description="weight of the state-matching term")
    hidden_layers: Literal["uniform", "last"] = "uniform"
    hidden_num_layers: int = Field(4, ge=1, le=256, description="pairs matched (uniform map)")
    attention_match: bool = Field(False, description="also match attention outputs (same map)")
    logit_cache: bool = Field(False, description="precompute the teacher's top-k logits once "
                              "into the pkdq cache and train from them (no teacher forward)")
    cache_topk: int = Field(64, ge=1, le=65536, description="logits kept per position")
    loss_chunk: int = Field(0, ge=0, le=1 << 20, description="positions per LM-head+loss chunk "
                            "(checkpointed); 0 = full logits at once")
    checkpoint_every: int = Field(0, ge=0, le=MAX_STEPS,
                                  description="save resumable state every N steps")
    early_stop_patience: int = Field(0, ge=0, le=MAX_STEPS, description="held-out evals without "
                                     "improvement before stopping; 0 = never (needs eval_every)")
    early_stop_min_delta: float = Field(0.0, ge=0, le=1e6,
                                        description="held-out KL drop that counts")
    keep_best: bool = Field(True, description="with eval_every: save the best held-out weights, "
                            "not the last")
    source: BuiltinSource = "wikipedia"
    data: DataSpec | None = Field(None, description="the user's own training data (overrides "
                                  "source and the recipe's top-level data)")
    max_grad_norm: float = Field(1.0, gt=0, le=1e9)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor, fraction of lr")
    eval_every: int = Field(0, ge=0, le=MAX_STEPS,
                            description="held-out eval every N steps; 0 = before/after")
    eval_blocks: int = Field(8, ge=1, le=1024, description="held-out blocks of seq_len tokens")
    precision: Literal["fp32", "bf16-autocast", "auto"] = Field(
        "fp32", description="compute precision; weights and the saved model stay fp32; auto: "
        "bf16-autocast where bf16 is native (CUDA, AVX512-BF16/AMX CPUs), else fp32"
    )
    fused_adamw: bool = Field(True, description="AdamW's fused kernel (CPU/CUDA): one pass per "
                              "tensor and no full-size foreach temporaries; same update within "
                              "float rounding")
    activation_checkpointing: bool = Field(
        False, description="recompute the student's decoder layers in backward instead of "
        "keeping their activations: less peak memory, a slower step")
    teacher_offload: bool = Field(
        True, description="with logit_cache and no state matching the step never runs the "
        "teacher: free it while training, reload it for held-out evals")
    lean_norm: bool = Field(
        True, description="RMSNorm layers save only their input and 1/rms for backward (the "
        "normalized input is recomputed): same forward, one [batch, seq, hidden] fp32 tensor "
        "less per norm held through the step")

    @model_validator(mode="after")
    def _early_stop_needs_evals(self) -> DistillConfig:
        if self.early_stop_patience and not self.eval_every:
            raise ValueError("early_stop_patience needs eval_every > 0 (held-out KL is what "
                             "plateaus)")
        _builtin_into_source(self)
        if self.masked() and (self.loss_chunk or self.logit_cache):
            raise ValueError("chat data with loss_on: assistant trains through the plain step; "
                             "set loss_chunk: 0 and logit_cache: false (or data.loss_on: all)")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return omit_at(handler(self), data=None)  # the bundled text, as before user data

    def spec(self) -> DataSpec:
        """The training data (the bundled `source` unless `data` is set)."""
        return self.data or DataSpec(kind="builtin", source=self.source)

    def masked(self) -> bool:
        """Whether the loss covers only some positions (chat data, assistant tokens)."""
        return self.data is not None and self.data.kind == "chat" and \
            self.data.loss_on == "assistant"


# A GGUF's embedding/output types (`tasks.quantize.gguf_export.embedding_type` checks them for
# `pkdq export --embedding` too): the one list both the recipe and the CLI accept.
GgufEmbedding = Literal["f16", "q8_0", "q5_1", "q5_0", "q4_0"]
GGUF_EMBEDDING_TYPES: tuple[str, ...] = get_args(GgufEmbedding)


class GgufQ8Layers(Strict):
    """Mixed 4/8-bit GGUF: the decoder layers whose linears lose most in 4 bits are written in
    Q8_0 instead, most sensitive first, while the file stays within `budget_mb` (or exactly
    `count` of them). Sensitivity is held-out KL to the stage's float input with that one layer
    in Q8_0 and the rest as the file holds them, on training-side held-out text; the idea of
    Model Optimizer's AutoQuantize at the granularity llama.cpp's files allow (a type per
    tensor). Measured first in bench/results/mixed_precision.md."""

    budget_mb: float | None = Field(None, gt=0, le=1e7, description="the file's size limit in "
                                    "MB (1e6 bytes), e.g. 0.30x the baseline's bf16 bytes")
    count: int | None = Field(None, ge=1, le=1000, description="this many layers in Q8_0, "
                              "whatever the size")
    blocks: int = Field(4, ge=1, le=64, description="held-out blocks that score each layer")
    seq_len: int = Field(256, ge=16, le=4096)

    @model_validator(mode="after")
    def _one_target(self) -> GgufQ8Layers:
        if (self.budget_mb is None) == (self.count is None):
            raise ValueError("give exactly one of budget_mb (a size limit) or count (a number "
                             "of layers)")
        return self


class QuantizeConfig(Strict):
    # awq: activation-aware scales through GPTQModel's AWQ (GEMM layout, always zero-point)
    method: Literal["gptq", "awq", "rtn"] = "gptq"
    bits: Literal[4, 8] = 4
    group_size: Literal[32, 64, 128] = 64
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = Field(0.01, gt=0, lt=1)
    mse: float = Field(
        0.0, ge=0, le=10, description="gptq: GPTQModel's per-group clipping search, the norm p "
        "of |w - q(w)|^p it minimises over 80 shrunken ranges (2.4 in the GPTQ authors' code; "
        "0: the full min-max range); the zero point stays put, so a sym grid stays sym")
    equalize: bool = Field(
        False, description="gptq/rtn: before quantizing, fold per-channel scales searched on "
        "the calibration text into the float model (AWQ's scale search; the model computes the "
        "same, only what is rounded changes: tasks/quantize/equalize.py)")
    grid: Literal["min-max", "q4_0"] = Field(
        "min-max", description="how each group's scale is set: min-max is GPTQModel's grid "
        "(sym 4-bit: step 2max/15, the top level clipped to 14/15 of max); q4_0 is llama.cpp's "
        "Q4_0 rule (the largest-magnitude weight lands exactly on code 0, step max/8; the scale "
        "may be negative), so GPTQ rounds to the grid a q4_0 GGUF stores: needs "
        "method gptq or rtn, bits 4, sym, group_size 32 (tasks/quantize/q4_0_grid.py)")
    calibration: TextSample = TextSample(source="c4", samples=16, seq_len=512)
    gguf: Literal["none", "f16", "q8_0", "q4_0", "q4_k_m"] = Field(
        "none", description="also write the stage's model as model.gguf beside it, for "
        "llama.cpp (Llama models); q4_0/q8_0 hold a GPTQ grid with bits 4/8, sym, group_size "
        "32 exactly and re-quantize any other; q4_k_m is llama.cpp's own quantizer on the f16 "
        "file, with an importance matrix on this section's calibration text; f16 keeps the "
        "grid up to fp16 rounding")
    gguf_embedding: GgufEmbedding | None = Field(
        None, description="the GGUF's embedding/output type (default q8_0 for q4_0/q8_0, f16 "
        "for f16); the tied embedding of a small model is a fifth of its weights, so q5_1, "
        "q5_0 or q4_0 here is what brings a 4-bit file under a tight size budget (what each "
        "costs is measured in bench/results/embedding_types.md)")

    gguf_q8_layers: GgufQ8Layers | None = Field(
        None, description="gguf q4_0 only: write the decoder layers most sensitive to 4 bits in "
        "Q8_0 (from the stage's float input) within a size budget or a layer count")

    @model_validator(mode="after")
    def _embedding_needs_gguf(self) -> QuantizeConfig:
        if self.gguf_embedding is not None and self.gguf in ("none", "q4_k_m"):
            raise ValueError("gguf_embedding applies to gguf f16, q8_0 or q4_0 (q4_k_m's "
                             "embedding type is llama.cpp's quantizer's choice); set gguf or "
                             "drop gguf_embedding")
        if self.gguf_q8_layers is not None and self.gguf != "q4_0":
            raise ValueError(f"gguf_q8_layers mixes Q8_0 layers into a q4_0 file; gguf is "
                             f"{self.gguf!r}: set gguf: q4_0 or drop gguf_q8_layers")
        if self.mse and self.method != "gptq":
            raise ValueError(f"mse is GPTQ's clipping search; method is {self.method!r}: set "
                             "method: gptq or drop mse")
        if self.grid == "q4_0":
            wrong = [f"{key} {value!r}" for key, value, needed in (
                ("method", self.method, self.method in ("gptq", "rtn")),
                ("bits", self.bits, self.bits == 4), ("sym", self.sym, self.sym),
                ("group_size", self.group_size, self.group_size == 32),
                ("mse", self.mse, not self.mse)) if not needed]
            if wrong:
                raise ValueError(f"grid q4_0 is Q4_0's 4-bit, symmetric, 32-wide grid for gptq "
                                 f"or rtn (no mse search); here {', '.join(wrong)}: change "
                                 "those or set grid: min-max")
        if self.equalize and self.method == "awq":
            raise ValueError("equalize applies to gptq and rtn: awq searches its own scales; "
                             "drop equalize or set method: gptq")
        return self

    @model_serializer(mode="wrap")
    def _omit_gguf_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave `gguf` out while it is "none" (`gguf_embedding`, `gguf_q8_layers` while
        unset): stage keys hash this dump, and a recipe that does not ask for a GGUF must keep
        the key it had before the field existed (finished quantize stages are reused, not
        quantized again); `equalize`, `mse` and `grid` likewise while off / min-max."""
        return omit_at(handler(self), gguf="none", gguf_embedding=None, gguf_q8_layers=None,
                       equalize=False, mse=0.0, grid="min-max")


class WikitextEval(Strict):
    tokens: int | None = Field(8192, ge=256, le=MAX_WIDTH,
                               description="slice of WikiText-2 test; null = all")
    max_length: int = Field(512, ge=64, le=8192, description="window length")
    pages: int | None = Field(2, ge=0, le=62, description="articles scored by lm-eval's "
                              "rolling wikitext task (seeded); 0 = skip, null = all 62")


GgufType = Literal["f16", "q8_0", "q4_0", "q4_k_m"]  # what tasks.quantize's exporter writes


class LlamaCppSpeed(Strict):
    """Speed where CPU users deploy: every stage's model (the baseline's too) exported to GGUF
    by pkdq's own exporter and timed in llama.cpp, with `speed`'s prompt and new tokens and the
    run's threads. A unit of its own (`tasks.pipeline.llama_cpp_unit`), so turning it on never
    re-runs an evaluation."""

    enabled: bool = True
    types: list[GgufType] = Field(
        ["f16", "q4_0"], min_length=1, max_length=4,
        description="GGUF types each stage is exported to and timed in; q4_0/q8_0 hold a GPTQ "
        "grid with bits 4/8, sym, group_size 32 exactly, any other is re-gridded")
    rounds: int = Field(
        3, ge=0, le=20,
        description="after the last evaluation, the baseline's and the final model's GGUFs are "
        "timed side by side in this many interleaved rounds, and the speed goal is judged on "
        "them (each stage's own timing is minutes from the baseline's, and the machine's speed "
        "drifts); 0: off, judged on the per-stage timings")

    @model_validator(mode="after")
    def _unique_types(self) -> LlamaCppSpeed:
        if len(set(self.types)) != len(self.types):
            raise ValueError(f"types must be unique; got {self.types}")
        return self


class SpeedEval(Strict):
    """CPU generation speed, measured the same way for every stage's model."""

    enabled: bool = True
    prompt_tokens: int = Field(512, ge=8, le=8192, description="prefill length (WikiText text)")
    new_tokens: int = Field(64, ge=1, le=4096, description="greedy tokens decoded with KV cache")
    repeats: int = Field(3, ge=1, le=50, description="timed repeats; the median is reported")
    llama_cpp: LlamaCppSpeed | None = Field(
        None, description="also time each stage's GGUF export in llama.cpp (null: off)")

    @model_serializer(mode="wrap")
    def _omit_unset_llama_cpp(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave `llama_cpp` out while unset: comparison folders hash this dump, and recipes
        that never ask for it keep the names and keys they had before the field existed."""
        return omit_at(handler(self), llama_cpp=None)

    def llama_cpp_on(self) -> bool:
        return self.llama_cpp is not None and self.llama_cpp.enabled

    def prompt_within(self, positions: int | None) -> int:
        """The prompt length that leaves room for `new_tokens` in a model with `positions`
        (max_position_embeddings; 0/None: no limit), at least 8: one rule for both runtimes,
        so transformers and llama.cpp time the same prompt."""
        if not positions:
            return self.prompt_tokens
        return max(8, min(self.prompt_tokens, int(positions) - self.new_tokens))


BUILTIN_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande",
                 "lambada_openai", "boolq")
TASK_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class JsonlTask(Strict):
    """A team's own eval set as JSONL, without writing lm-eval YAML.

    multiple_choice lines: {"question": str, "choices": [str, ...], "answer": index or choice};
    scored by log-likelihood accuracy (acc, acc_norm), chance = mean 1/len(choices).
    generation lines: {"prompt": str, "reference": str}; greedy generation until `until`, scored
    by exact match and chrF (sacrebleu), chance 0. pkdq writes an lm-eval task for it on the fly
    (tasks.evaluate.jsonl_task), so doc sampling, paired differences and retention are shared.
    """

    name: str = Field(pattern=TASK_NAME_PATTERN, max_length=100)
    jsonl: str = Field(min_length=1, max_length=4096)
    kind: Literal["multiple_choice", "generation"]
    until: list[str] = Field(["\n"], max_length=16, description="generation stop strings")
    max_gen_toks: int = Field(64, ge=1, le=4096)


EvalTask = Annotated[
    Annotated[Annotated[str, Field(pattern=TASK_NAME_PATTERN, max_length=200)], Tag("name")]
    | Annotated[JsonlTask, Tag("jsonl")],
    # a string is a task name, anything else a JSONL set: errors name the branch that was meant
    Discriminator(lambda v: "name" if isinstance(v, str) else "jsonl"),
]


class GenerationsEval(Strict):
    """Greedy answers to pkdq's fixed prompts, per stage, for the report's side-by-side."""

    enabled: bool = True
    max_new_tokens: int = Field(48, ge=1, le=1024, description="greedy tokens per prompt")


class EvalConfig(Strict):
    tasks: list[EvalTask] = Field(
        ["arc_easy", "piqa"],
        description="built-in offline tasks, any lm-eval task name (offline: its dataset must "
        "be in the local HF cache), tasks from include_path, or {name, jsonl, kind} JSONL sets")
    include_path: str | None = Field(
        None, max_length=4096, description="folder of the team's own lm-eval task YAMLs")
    samples: int | None = Field(100, ge=1, le=MAX_WIDTH,
                                description="docs per task (seeded); null = full split")
    wikitext: WikitextEval = WikitextEval()
    batch_size: int = Field(16, ge=1, le=MAX_BATCH)
    backend: Literal["pkdq", "hf"] = Field(
        "pkdq", description="lm-eval model: pkdq (shared-prefix packing, same scores) or stock hf")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="compute dtype of the evaluated model (quantized ones keep theirs)")
    speed: SpeedEval = SpeedEval()
    generations: GenerationsEval = GenerationsEval()
    served: bool = Field(
        True, description="quantized models: score the same docs again as a user's runtime "
        "loads them (GPTQModel's default dtype, bf16), next to the fp32-activation scores")
    gguf: bool = Field(
        True, description="a quantize stage that wrote model.gguf: score the same docs and "
        "WikiText-2 with the GGUF's own weights (its embedding type included), and its "
        "WikiText-2 in llama.cpp; the report's row for the file a user ships")

    @model_serializer(mode="wrap")
    def _omit_unset_include(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave `include_path` out while unset (and `gguf` while on, its default): evaluation
        keys hash this dump, and recipes that never set them keep the keys they had before the
        fields existed."""
        return omit_at(handler(self), include_path=None, gguf=True)

    def unit_config(self) -> dict[str, Any]:
        """What keys the evaluation unit: the whole config but `speed.llama_cpp`, which is a
        unit of its own; turning it on or off never re-runs an evaluation."""
        data = self.model_dump(mode="json")
        data["speed"].pop("llama_cpp", None)
        return data

    def task_names(self) -> list[str]:
        """Every task's lm-eval name, in recipe order (JSONL tasks by their `name`)."""
        return [t if isinstance(t, str) else t.name for t in self.tasks]

    def jsonl_tasks(self) -> list[JsonlTask]:
        return [t for t in self.tasks if isinstance(t, JsonlTask)]

    @model_validator(mode="after")
    def _unique_names(self) -> EvalConfig:
        names = self.task_names()
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task names must be unique; repeated: {', '.join(dup)}")
        return self


class PruneStage(Strict):
    prune: PruneConfig


class DistillStage(Strict):
    distill: DistillConfig


class QuantizeStage(Strict):
    quantize: QuantizeConfig


def _stage_tag(value: Any) -> str | None:
    if isinstance(value, dict) and len(value) == 1:
        return next(iter(value))
    return next(iter(type(value).model_fields), None) if isinstance(value, BaseModel) else None


Stage = Annotated[
    Annotated[PruneStage, Tag("prune")]
    | Annotated[DistillStage, Tag("distill")]
    | Annotated[QuantizeStage, Tag("quantize")],
    Discriminator(_stage_tag),
]
STAGE_MODELS: dict[str, type[BaseModel]] = {
    "prune": PruneStage, "distill": DistillStage, "quantize": QuantizeStage,
}


class ContaminationConfig(Strict):
    """The overlap check between training text and the evaluation sets the recipe scores.

    An evaluation document counts as overlapping when it shares one word n-gram (lowercased
    words, n = 13 as in GPT-3's appendix C and lm-eval's decontamination) with the training or
    calibration text. Above `threshold` (fraction of one evaluation set's documents) the run
    refuses, unless `allow_overlap` says the overlap is intended.
    """

    ngram: int = Field(13, ge=5, le=50, description="words per n-gram")
    threshold: float = Field(0.02, ge=0, le=1, description="largest fraction of an evaluation "
                             "set's documents that may overlap the training text")
    allow_overlap: bool = Field(False, description="run even above the threshold (the overlap "
                                "is still measured and reported)")


class Recipe(Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=100)
    description: str = Field("", max_length=10_000)
    model: str = Field("smollm2-135m", min_length=1, max_length=4096)
    seed: int = Field(1234, ge=0, le=SEED_MAX)
    threads: int = Field(1, ge=1, le=256)
    stages: list[Stage] = Field(min_length=1)
    evaluate: EvalConfig = EvalConfig()
    data: DataSpec | None = Field(None, description="training/calibration data of every stage "
                                  "that names none itself (a stage's data or source wins)")
    contamination: ContaminationConfig = ContaminationConfig()
    resources: Resources = Resources()  # processes/devices; not in stage keys
    ordering_experiment: bool = Field(
        False, description="allow stage orders other than P-KD-Q (for studying orderings; "
        "never for a model you ship). `pkdq compare` builds such variants itself")

    @model_validator(mode="after")
    def _data_into_stages(self) -> Recipe:
        """Hand the top-level `data` to each stage that names no data of its own, so a stage
        config alone says what it trains on (stage keys hash it; units get only their config)."""
        if self.data is None:
            return self
        stages = [_with_data(stage, self.data) for stage in self.stages]
        object.__setattr__(self, "stages", stages)
        return self

    def stage_list(self) -> list[tuple[str, Strict]]:
        """[(kind, config)] in recipe order."""
        out: list[tuple[str, Strict]] = []
        for stage in self.stages:
            kind = next(iter(type(stage).model_fields))
            out.append((kind, getattr(stage, kind)))
        return out


def _sample_with(sample: TextSample, spec: DataSpec, explicit: bool) -> TextSample:
    if explicit and (sample.data is not None or "source" in sample.model_fields_set):
        return sample
    if spec.kind == "builtin":
        return sample.model_copy(update={"source": spec.source})
    return sample.model_copy(update={"data": spec})


def _with_data(stage: Any, spec: DataSpec) -> Any:
    """`stage` with the recipe's data where the stage names none (its `data` or `source`)."""
    kind = next(iter(type(stage).model_fields))
    cfg = getattr(stage, kind)
    if kind == "distill":
        if cfg.data is not None or "source" in cfg.model_fields_set:
            return stage
        update = {"source": spec.source} if spec.kind == "builtin" else {"data": spec}
        new = DistillConfig.model_validate({**cfg.model_dump(), **update})
    else:
        explicit = "calibration" in cfg.model_fields_set
        calibration = _sample_with(cfg.calibration, spec, explicit)
        if calibration is cfg.calibration:
            return stage
        new = cfg.model_copy(update={"calibration": calibration})
    return type(stage)(**{kind: new})


class RecipeError(ValueError):
    """One line: file, key path, what is wrong and what is allowed."""


def _loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in STAGE_MODELS and i > 0 and isinstance(loc[i - 1], int):
            continue  # the discriminator tag repeats the stage key that follows
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "<top>"


def _stage_kind_error(raw: dict[str, Any], source: str) -> None:
    """Give stage-list errors a direct message before pydantic's union noise."""
    stages = raw.get("stages")
    if not isinstance(stages, list):
        return
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict) or len(stage) != 1:
            raise RecipeError(f"{source}: stages[{i}]: each stage is a mapping with one key, "
                              f"one of {', '.join(STAGE_ORDER)}")
        kind = next(iter(stage))
        if kind not in STAGE_ORDER:
            raise RecipeError(f"{source}: stages[{i}]: unknown stage '{kind}'; "
                              f"allowed: {', '.join(STAGE_ORDER)}")


def _check_order(recipe: Recipe, source: str) -> None:
    kinds = [kind for kind, _ in recipe.stage_list()]
    if len(set(kinds)) != len(kinds):
        raise RecipeError(f"{source}: stages: each stage may appear once, got {' -> '.join(kinds)}")
    if recipe.ordering_experiment:
        return  # any order of distinct stages; tasks.compare.orderings says what each order means
    ranks = [STAGE_ORDER.index(k) for k in kinds]
    if ranks != sorted(ranks):
        raise RecipeError(f"{source}: stages: order {' -> '.join(kinds)} breaks the {PKDQ_RULE}"
                          "; to study other orders use `pkdq compare` or set "
                          "ordering_experiment: true")
    if "distill" in kinds and "prune" not in kinds:
        raise RecipeError(f"{source}: stages: distill without a prune stage has no teacher; "
                          f"add a prune stage before it ({PKDQ_RULE})")


def _check_prune_fits_quantize(recipe: Recipe, source: str) -> None:
    """Pruned widths must split into whole quantization groups (group_size divides in_features).

    FFN and hidden sizes are rounded to `round_to`, so `round_to` must be a multiple of the
    group size; head counts are checked on the real shapes by the quantize stage.
    """
    stages = recipe.stage_list()
    prune = next(((i, c) for i, (k, c) in enumerate(stages) if k == "prune"), None)
    quant = next(((i, c) for i, (k, c) in enumerate(stages) if k == "quantize"), None)
    if prune is None or quant is None:
        return
    (pi, pcfg), (qi, qcfg) = prune, quant
    if (pcfg.ffn or pcfg.hidden) and pcfg.round_to % qcfg.group_size:
        raise RecipeError(
            f"{source}: stages[{pi}].prune.round_to: {pcfg.round_to} is not a multiple of "
            f"stages[{qi}].quantize.group_size {qcfg.group_size}, so pruned widths may not split "
            f"into whole quantization groups; use round_to: {qcfg.group_size} (or a multiple)")


def _check_batch_splits(recipe: Recipe, source: str) -> None:
    """Each KD process takes batch_size / world rows, so the global batch must split evenly."""
    world = recipe.resources.distill.world_size
    for i, (kind, cfg) in enumerate(recipe.stage_list()):
        if kind == "distill" and cfg.batch_size % world:
            raise RecipeError(f"{source}: stages[{i}].distill.batch_size: {cfg.batch_size} does "
                              f"not split over resources.distill's {world} processes; use a "
                              f"multiple of {world}")


def _format_validation(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    where = _loc(tuple(err["loc"]))
    if err["type"] == "extra_forbidden":
        parent = tuple(err["loc"])[:-1]
        allowed = _allowed_keys(parent)
        hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return f"{source}: {where}: unknown key{hint}"
    msg = " ".join(str(err["msg"]).split())
    if "input" in err and err["type"] not in {"missing"}:
        msg += f" (got {short_repr(err['input'])})"
    return f"{source}: {where}: {msg}"


_REPR = reprlib.Repr()  # (keyword arguments need Python 3.12)
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist = 3, 4, 4
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 60


def short_repr(value: Any) -> str:
    """repr for one error line: bounded length and depth, whatever a YAML file holds."""
    try:
        return _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails still gets a line
        return f"<{type(value).__name__}>"


def shown(text: str, limit: int = 120) -> str:
    """A user-given name or path for a message: as typed when short and printable, else quoted
    and cut, so one error stays one readable line."""
    if text.isprintable() and len(text) <= limit:
        return text
    quoted = repr(text)
    return quoted if len(quoted) <= limit else quoted[:limit - 3] + "..."


def _allowed_keys(parent: tuple[Any, ...]) -> list[str]:
    model: Any = Recipe
    for i, item in enumerate(parent):
        if isinstance(item, int) or item == "stages":
            continue
        if item in STAGE_MODELS and i > 0 and isinstance(parent[i - 1], int):
            model = STAGE_MODELS[item]
            continue
        field = getattr(model, "model_fields", {}).get(item)
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        models = (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel))
        nxt = next(models, None)
        if nxt is None:
            return []
        model = nxt
    return list(getattr(model, "model_fields", {}))


def parse_recipe(raw: Any, source: str = "<recipe>") -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping with name, model, stages, "
                          "evaluate")
    _stage_kind_error(raw, source)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_format_validation(exc, source)) from None
    _check_order(recipe, source)
    _check_prune_fits_quantize(recipe, source)
    _check_batch_splits(recipe, source)
    return recipe


def recipe_path(name_or_path: str) -> Path:
    """A named recipe (recipes/<name>.yaml) or a path to a YAML file."""
    path = Path(name_or_path)
    try:
        is_path = path.suffix in {".yaml", ".yml"} or path.exists()
        if is_path and path.is_dir():
            raise RecipeError(f"{shown(name_or_path)}: a folder, not a recipe file")
        if is_path and not path.is_file():
            raise RecipeError(f"{shown(name_or_path)}: recipe file not found")
    except OSError as exc:  # a name too long for the file system, say
        raise RecipeError(f"{shown(name_or_path)}: not a usable path "
                          f"({exc.strerror or exc})") from None
    if is_path:
        return path
    named = RECIPES_DIR / f"{name_or_path}.yaml"
    if not re.match(NAME_PATTERN, name_or_path) or not named.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        raise RecipeError(f"recipe '{shown(name_or_path)}' not found; named recipes: {known}")
    return named


# libyaml when PyYAML was built with it: 10x faster, and it refuses nesting past 1000 levels with
# a YAMLError where the pure-Python composer recurses until RecursionError.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _yaml_error(path: Path, exc: yaml.YAMLError) -> RecipeError:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}" if mark else "?"
    problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or str(exc)
    text = " ".join(str(problem).split())
    return RecipeError(f"{path}: {where}: not valid YAML ({text[:200]})")


def read_recipe_text(path: Path) -> str:
    """The file as UTF-8 text, or one line saying why it is not a recipe file."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: {size} bytes; a recipe is a short YAML file (at most "
                          f"{MAX_RECIPE_BYTES} bytes)")
    return read_utf8(path, RecipeError, str(path), "save the recipe as UTF-8")


def load_recipe(name_or_path: str) -> Recipe:
    path = recipe_path(name_or_path)
    text = read_recipe_text(path)
    try:
        raw = yaml.load(text, Loader=_LOADER)  # noqa: S506 - a safe loader (C or Python)
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    except RecursionError:
        raise RecipeError(f"{path}: not valid YAML (nested too deeply)") from None
    return parse_recipe(raw, str(path))


def list_recipes() -> list[tuple[str, str]]:
    out = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        out.append((path.stem, str(raw.get("description", ""))))
    return out
