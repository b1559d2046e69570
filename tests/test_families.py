"""The family matrix: Llama, Mistral, Qwen2, Qwen3 and Gemma 3 through every stage, and each
family's input conventions in every path that feeds a model text.

Tiny random models from each family's config (`tests/families.py`), SmolLM2's tokenizer adjusted
to the family's BOS convention. `bench/family_matrix.py` runs this file and writes the table
(bench/results/family_matrix.md). Each `test_matrix[<family>-<stage>]` is one cell.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from families import EXPECTS_BOS, FAMILIES, build_family
from transformers import AutoModelForCausalLM

from tasks.core.common import StageContext, data_dir
from tasks.core.conventions import needs_bos, prefix_ids, supported_families_line
from tasks.core.model_store import load_model, save_model
from tasks.core.recipe import (
    DepthTarget,
    DistillConfig,
    EvalConfig,
    FfnTarget,
    HeadsTarget,
    HiddenTarget,
    PruneConfig,
    QuantizeConfig,
    TextSample,
)

CALIB = TextSample(source="c4", samples=2, seq_len=32)  # c4: 2 MB to read, not 30
IDS = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
PRUNE_AXES = {
    "prune-ffn": dict(ffn=FfnTarget(ratio=0.5)),
    "prune-query-heads": dict(heads=HeadsTarget(mode="query", size=1)),  # 1 of 2 per group
    "prune-kv-groups": dict(heads=HeadsTarget(mode="kv_groups", size=1)),
    "prune-hidden": dict(hidden=HiddenTarget(size=32)),
    "prune-depth": dict(depth=DepthTarget(remove=1)),
}
STAGES = (*PRUNE_AXES, "kd", "rtn", "gptq", "gguf", "evaluate")
# llama.cpp architecture each family is written as (`tasks.quantize.gguf_arch`)
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "gemma3": "gemma3"}


@pytest.fixture(scope="module")
def family_refs(tmp_path_factory, smollm2_ref):
    root = tmp_path_factory.mktemp("families")
    return {name: build_family(name, smollm2_ref.path, root / name) for name in FAMILIES}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _prune(ref, axis: str, out_dir):
    from tasks.prune import prune_model

    model, tok = load_model(ref)
    cfg = PruneConfig(**PRUNE_AXES[axis], calibration=CALIB)
    metrics = prune_model(model, tok, cfg, StageContext(out_dir=out_dir, seed=0))
    assert metrics["params_after"] < metrics["params_before"]
    before = _logits(model)
    saved = save_model(model, tok, out_dir / "model")
    return saved, before


def _check_prune(ref, axis, tmp_path):
    saved, before = _prune(ref, axis, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(str(saved.path))  # stock transformers
    assert type(reloaded).__name__ == json.loads((ref.path / "config.json").read_text())[
        "architectures"][0]
    assert (_logits(reloaded) - before).abs().max().item() == 0.0
    prompt = IDS[:1, :6]
    cached = reloaded.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(cached, reloaded.generate(prompt, max_new_tokens=4, do_sample=False,
                                                 use_cache=False))


def _check_kd(ref, tmp_path):
    from tasks.distill import distill_stage

    student, _ = _prune(ref, "prune-ffn", tmp_path / "p")
    cfg = DistillConfig(tokens=32 * 2 * 2, seq_len=32, batch_size=2, lr=1e-3, warmup_steps=0,
                        eval_blocks=1, alpha=1.0, temperature=1.0, source="c4")
    result = distill_stage(student, cfg, StageContext(out_dir=tmp_path / "kd", seed=0,
                                                      teacher=ref))
    assert result.metrics["steps"] == 2
    assert math.isfinite(result.metrics["heldout_kl_after"])
    AutoModelForCausalLM.from_pretrained(str(result.model.path))


def _check_quantize(ref, method, tmp_path):
    from tasks.quantize import quantize_stage

    cfg = QuantizeConfig(method=method, group_size=32,
                         calibration=TextSample(source="c4", samples=2, seq_len=32))
    result = quantize_stage(ref, cfg, StageContext(out_dir=tmp_path, seed=0, threads=1))
    model, _ = load_model(result.model)
    fp, _ = load_model(ref)
    with torch.no_grad():
        got, want = model(IDS).logits.float(), fp(IDS).logits.float()
    lp, lq = torch.log_softmax(want, -1), torch.log_softmax(got, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    assert kl < 0.05 and (got - want).abs().max().item() > 1e-5


def _check_gguf(ref, family, tmp_path):
    """f16 GGUF run in llama.cpp: logits agree with pkdq's torch loader on the ids pkdq feeds
    the family (BOS included for Gemma/Mistral), and llama.cpp's own tokenizer produces those ids
    (so the file's add_bos_token follows the family). Gemma's norm +1, its sliding pattern or the
    BOS left out each break this (tests/test_gguf_export.py shows it)."""
    import gguf

    from tasks.quantize import export_gguf
    from tasks.quantize.gguf_verify import verify_in_llama_cpp

    out = tmp_path / "model.gguf"
    metrics = export_gguf(ref.path, out, "f16")
    if GGUF_ARCH[family] == "llama":  # also read back by transformers' GGUF loader
        assert metrics["verification"]["max_abs_logit_diff"] < 0.05
    model, tok = load_model(ref)
    check = verify_in_llama_cpp(out, model, tok)
    assert check["kl_nats"] < 1e-4 and check["top1_agreement"] >= 0.95, check
    assert check["max_abs_logit_diff"] < 0.05, check  # measured <= 0.021 (fp16 weights)
    assert check["tokenizer_same_ids"] is True, check
    fields = gguf.GGUFReader(str(out)).fields
    assert fields["general.architecture"].contents() == GGUF_ARCH[family]
    assert fields["tokenizer.ggml.add_bos_token"].contents() is EXPECTS_BOS[family]


def _check_evaluate(ref, tmp_path):
    from tasks.evaluate import evaluate_model

    cfg = EvalConfig(tasks=["arc_easy"], samples=2, batch_size=4,
                     wikitext={"tokens": 256, "max_length": 64, "pages": 0},
                     speed={"enabled": False})
    metrics = evaluate_model(ref.path, cfg, tmp_path)
    assert metrics["tasks"]["arc_easy"]["n"] == 2
    assert math.isfinite(metrics["wikitext"]["token_perplexity"])


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("family", FAMILIES)
def test_matrix(family, stage, family_refs, tmp_path):
    ref = family_refs[family]
    if stage in PRUNE_AXES:
        _check_prune(ref, stage, tmp_path)
    elif stage == "kd":
        _check_kd(ref, tmp_path)
    elif stage in ("rtn", "gptq"):
        _check_quantize(ref, stage, tmp_path)
    elif stage == "gguf":
        _check_gguf(ref, family, tmp_path)
    else:
        _check_evaluate(ref, tmp_path)


# --------------------------------------------------------------------------- input conventions


class _FirstTokens:
    """Records the first input token of every forward of a model (a hook on its embedding)."""

    def __init__(self, model):
        self.seen: list[int] = []
        model.get_input_embeddings().register_forward_pre_hook(self)

    def __call__(self, _module, args):
        self.seen.extend(int(t) for t in args[0][:, 0])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_path_follows_the_family_bos_convention(family, family_refs):
    """Calibration, KD training and held-out blocks, GPTQ calibration, WikiText windows and the
    lm-eval backend (log-likelihood, rolling and generation encodings) all open with BOS exactly
    when the family expects it: drop the convention anywhere and this fails for Gemma/Mistral
    (a BOS added to a family without one fails it for Llama/Qwen)."""
    from lm_eval.api.instance import Instance

    from tasks.distill.heldout import heldout_blocks
    from tasks.distill.stage import training_blocks
    from tasks.evaluate.stage import make_lm, wikitext_perplexity
    from tasks.prune.stage import calibration_blocks
    from tasks.quantize.stage import _calibration_data

    ref = family_refs[family]
    model, tok = load_model(ref)
    expect = EXPECTS_BOS[family]
    assert needs_bos(tok, model.config) is expect
    bos = tok.bos_token_id
    ctx = StageContext(out_dir=ref.path, seed=0)
    kd = DistillConfig(tokens=64, seq_len=32, batch_size=2, eval_blocks=2)
    blocks = {
        "prune calibration": calibration_blocks(tok, PruneConfig(ffn=FfnTarget(ratio=0.5),
                                                                  calibration=CALIB), ctx,
                                                model.config),
        "kd training": training_blocks(tok, kd, ctx, 2, model.config).ids,
        "kd held-out": heldout_blocks(tok, kd, ctx, model.config).ids,
        "gptq calibration": _calibration_data(
            tok, QuantizeConfig(calibration=CALIB), ctx, model.config).ids,
    }
    for where, block in blocks.items():
        starts = set(block[:, 0].tolist())
        assert (starts == {bos}) is expect, f"{family} {where}: blocks start with {starts}"
        assert block.shape[1] == 32, where

    seen = _FirstTokens(model)
    wikitext_perplexity(model, tok, data_dir() / "wikitext" / "wiki.test.raw", 256, 64)
    assert seen.seen and (set(seen.seen) == {bos}) is expect, f"{family} wikitext"

    lm = make_lm(model, tok, "pkdq", 4)
    seen.seen.clear()
    req = Instance(request_type="loglikelihood", doc={}, idx=0,
                   arguments=("Question: which gas do plants take in?\nAnswer:", " carbon"))
    lm.loglikelihood([req], disable_tqdm=True)
    assert (set(seen.seen) == {bos}) is expect, f"{family} lm-eval loglikelihood"
    gen_ids = lm.tok_batch_encode(["Question: 2 + 2 ="])[0][0]
    assert (int(gen_ids[0]) == bos) is expect, f"{family} lm-eval generation"
    hf = make_lm(model, tok, "hf", 4)
    assert (hf.tok_encode("Question: hi")[:1] == [bos]) is expect, f"{family} hf backend"


def test_gemma_bos_is_forced_even_when_its_tokenizer_forgets_it(family_refs):
    """Gemma's checkpoints need <bos> whatever the tokenizer file says (a converted tokenizer may
    not add it): the family decides, the tokenizer cannot opt out."""
    model, tok = load_model(family_refs["gemma3"])
    assert tok("a")["input_ids"][0] != tok.bos_token_id  # SmolLM2's tokenizer adds nothing
    assert prefix_ids(tok, model.config) == [tok.bos_token_id]
    assert prefix_ids(tok, {"model_type": "llama"}) == []


def test_gguf_refuses_an_architecture_it_does_not_map_in_one_line(family_refs, tmp_path):
    """A config llama.cpp may know but pkdq does not write (hand-edited to Phi-3): one line
    pointing at llama.cpp's converter, before any weight is read, and no file."""
    import shutil

    from tasks.quantize import GgufExportError, export_gguf

    folder = tmp_path / "phi3"
    shutil.copytree(family_refs["llama"].path, folder)
    config = json.loads((folder / "config.json").read_text())
    config |= {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3"}
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "model.gguf"
    with pytest.raises(GgufExportError) as info:
        export_gguf(folder, out, "f16")
    message = str(info.value)
    assert "\n" not in message and "convert_hf_to_gguf" in message and "Phi3" in message
    assert "Gemma3ForCausalLM" in message and not out.exists()


def test_unsupported_architecture_is_refused_naming_the_families(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tasks.prune import UnsupportedModelError
    from tasks.prune.units import Anatomy

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedModelError) as info:
        Anatomy.of(model)
    message = str(info.value)
    assert "\n" not in message and supported_families_line() in message
