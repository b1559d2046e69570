"""Pruning outside the supported families through torch-pruning's dependency graph
(`tasks/prune/depgraph.py`): tiny random OPT, GPT-NeoX, Phi and Phi-3 models built from their
configs (no weights downloaded), SmolLM2's tokenizer.

What each test proves:
- kept sizes and the config: the pruned model's config.json names the new widths;
- stock `AutoModelForCausalLM.from_pretrained` of the saved folder gives the in-memory pruned
  model's logits;
- the right channels were cut in every coupled tensor: units made inert beforehand (their input
  rows, biases and output columns zeroed, so the magnitude criterion picks them) leave the
  logits unchanged when they are removed. A graph that cut a wrong row of Phi-3's fused
  gate_up_proj, or a head's k/v rows without its o columns, fails this;
- every refusal is one line naming the supported families.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tasks.core.common import StageContext
from tasks.core.conventions import supported_families_line
from tasks.core.model_store import save_model
from tasks.core.recipe import DepthTarget, FfnTarget, HeadsTarget, PruneConfig, TextSample

CALIB = TextSample(source="c4", samples=2, seq_len=32)
IDS = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=512)
FFN = 128
# architecture: (its FFN config key, the out-projection reading the FFN, the in-projections)
FFN_PARTS = {
    "opt": ("ffn_dim", "fc2", ("fc1",)),
    "gpt_neox": ("intermediate_size", "mlp.dense_4h_to_h", ("mlp.dense_h_to_4h",)),
    "phi": ("intermediate_size", "mlp.fc2", ("mlp.fc1",)),
    "phi3": ("intermediate_size", "mlp.down_proj", ("mlp.gate_up_proj",)),
}


def _config(arch: str, vocab: int):
    import transformers as tf

    if arch == "opt":
        return tf.OPTConfig(vocab_size=vocab, ffn_dim=FFN, word_embed_proj_dim=64, **SIZES)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=vocab, intermediate_size=FFN, **SIZES)
    if arch == "phi":
        return tf.PhiConfig(vocab_size=vocab, intermediate_size=FFN, **SIZES)
    if arch == "phi3":
        return tf.Phi3Config(vocab_size=vocab, intermediate_size=FFN, num_key_value_heads=4,
                             pad_token_id=0, **SIZES)
    raise ValueError(arch)


@pytest.fixture(scope="module")
def tokenizer(smollm2_ref):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_ref.path))


def _model(arch: str, tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(arch, len(tokenizer))).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norms and biases start constant, which would hide a mis-cut
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
    return model


def _layers(model) -> torch.nn.ModuleList:
    n = model.config.num_hidden_layers
    return next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n)


def _make_ffn_inert(model, arch: str, neurons: list[int]) -> None:
    """Zero everything the given FFN neurons read and write (Phi-3: both halves of gate_up)."""
    _key, out_name, in_names = FFN_PARTS[arch]
    with torch.no_grad():
        for layer in _layers(model):
            layer.get_submodule(out_name).weight[:, neurons] = 0
            for name in in_names:
                proj = layer.get_submodule(name)
                rows = neurons + [FFN + n for n in neurons] if arch == "phi3" else neurons
                proj.weight[rows] = 0
                if proj.bias is not None:
                    proj.bias[rows] = 0


def _make_heads_inert(model, heads: list[int], head_dim: int) -> None:
    rows = [h * head_dim + j for h in heads for j in range(head_dim)]
    with torch.no_grad():
        for layer in _layers(model):
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                proj.weight[rows] = 0
                proj.bias[rows] = 0
            attn.dense.weight[:, rows] = 0


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def _prune(model, tokenizer, cfg: PruneConfig, tmp_path):
    from tasks.prune import prune_model

    return prune_model(model, tokenizer, cfg, StageContext(out_dir=tmp_path, seed=0))


def _reloads_identically(model, tokenizer, tmp_path) -> AutoModelForCausalLM:
    saved = save_model(model, tokenizer, tmp_path / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(str(saved.path)).eval()  # stock
    assert type(reloaded) is type(model)
    assert torch.allclose(_logits(reloaded), _logits(model), rtol=0, atol=1e-6)
    return reloaded


@pytest.mark.parametrize("arch", sorted(FFN_PARTS))
def test_ffn_cut_keeps_the_asked_size_and_reloads_identically(arch, tokenizer, tmp_path):
    model = _model(arch, tokenizer)
    inert = list(range(0, FFN, 4))  # 32 of 128: the 25% a ratio of 0.25 removes
    _make_ffn_inert(model, arch, inert)
    before = _logits(model)
    cfg = PruneConfig(ffn=FfnTarget(ratio=0.25, criterion="magnitude"))
    metrics = _prune(model, tokenizer, cfg, tmp_path)
    key, out_name, _ = FFN_PARTS[arch]
    assert getattr(model.config, key) == 96 and metrics["plan"]["after"]["ffn"] == 96
    assert metrics["params_after"] < metrics["params_before"]
    assert metrics["method"].startswith("torch-pruning")
    for layer in _layers(model):
        assert layer.get_submodule(out_name).in_features == 96
    # the inert neurons were the ones cut, in every coupled tensor
    assert torch.allclose(_logits(model), before, rtol=0, atol=1e-5)
    reloaded = _reloads_identically(model, tokenizer, tmp_path)
    assert getattr(reloaded.config, key) == 96


@pytest.mark.parametrize("arch", ["opt", "phi"])
def test_ffn_activation_criterion_runs_on_calibration_text(arch, tokenizer, tmp_path):
    model = _model(arch, tokenizer)
    cfg = PruneConfig(ffn=FfnTarget(ratio=0.5), calibration=CALIB)  # activation: the default
    metrics = _prune(model, tokenizer, cfg, tmp_path)
    assert metrics["criteria"] == {"ffn": "activation"} and metrics["data"] is not None
    assert getattr(model.config, FFN_PARTS[arch][0]) == 64
    _reloads_identically(model, tokenizer, tmp_path)


def test_phi_heads_are_cut_whole_and_head_dim_is_kept(tokenizer, tmp_path):
    model = _model("phi", tokenizer)
    _make_heads_inert(model, [1, 2], head_dim=16)
    _make_ffn_inert(model, "phi", list(range(1, FFN, 4)))
    before = _logits(model)
    cfg = PruneConfig(heads=HeadsTarget(mode="kv_groups", size=2, criterion="magnitude"),
                      ffn=FfnTarget(ratio=0.25, criterion="magnitude"))
    metrics = _prune(model, tokenizer, cfg, tmp_path)
    assert metrics["heads_removed"] == [[1, 2], [1, 2]]
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim,
            config.intermediate_size) == (2, 2, 16, 96)
    attn = _layers(model)[0].self_attn
    assert attn.q_proj.out_features == attn.v_proj.out_features == attn.dense.in_features == 32
    assert torch.allclose(_logits(model), before, rtol=0, atol=1e-5)
    reloaded = _reloads_identically(model, tokenizer, tmp_path)
    assert reloaded.config.num_attention_heads == 2


def _opt_through_prune_stage(tokenizer, tmp_path):
    """A tiny OPT folder through the real stage entry: (pruned ModelRef, unpruned ModelRef)."""
    from tasks.prune import prune_stage

    ref = save_model(_model("opt", tokenizer), tokenizer, tmp_path / "opt")
    cfg = PruneConfig(ffn=FfnTarget(ratio=0.25), calibration=CALIB)
    result = prune_stage(ref, cfg, StageContext(out_dir=tmp_path / "stage", seed=0, threads=1))
    reloaded = AutoModelForCausalLM.from_pretrained(str(result.model.path))
    assert reloaded.config.ffn_dim == 96
    assert reloaded.model.decoder.layers[0].fc1.out_features == 96
    assert result.metrics["plan"]["before"]["ffn"] == 128
    return result.model, ref


def test_prune_stage_takes_an_opt_folder_end_to_end(tokenizer, tmp_path):
    _opt_through_prune_stage(tokenizer, tmp_path)


def test_a_pruned_opt_distills_and_gguf_refuses_it_in_one_line(tokenizer, tmp_path):
    """KD takes any causal LM; GGUF export maps only the supported families' architectures."""
    import math

    from tasks.core.recipe import DistillConfig
    from tasks.distill import distill_stage
    from tasks.quantize import GgufExportError, export_gguf

    student, teacher = _opt_through_prune_stage(tokenizer, tmp_path)
    cfg = DistillConfig(tokens=32 * 2 * 2, seq_len=32, batch_size=2, lr=1e-3, warmup_steps=0,
                        eval_blocks=1, alpha=1.0, temperature=1.0, source="c4")
    result = distill_stage(student, cfg, StageContext(out_dir=tmp_path / "kd", seed=0,
                                                      teacher=teacher))
    assert result.metrics["steps"] == 2 and math.isfinite(result.metrics["heldout_kl_after"])
    with pytest.raises(GgufExportError) as info:
        export_gguf(result.model.path, tmp_path / "m.gguf", "f16")
    assert "\n" not in str(info.value) and "OPTForCausalLM" in str(info.value)


# ------------------------------------------------------------------------------------ refusals


def _refusal(model, tokenizer, cfg, tmp_path) -> str:
    from tasks.prune import UnsupportedModelError

    with pytest.raises(UnsupportedModelError) as info:
        _prune(model, tokenizer, cfg, tmp_path)
    message = str(info.value)
    assert "\n" not in message and supported_families_line() in message
    return message


HEADS = PruneConfig(heads=HeadsTarget(mode="kv_groups", size=2, criterion="magnitude"))


def test_heads_refused_where_head_dim_is_derived(tokenizer, tmp_path):
    message = _refusal(_model("opt", tokenizer), tokenizer, HEADS, tmp_path)
    assert "derives head_dim as hidden_size / num_attention_heads" in message


@pytest.mark.parametrize("arch", ["gpt_neox", "phi3"])
def test_heads_refused_on_fused_qkv(arch, tokenizer, tmp_path):
    model = _model(arch, tokenizer)
    message = _refusal(model, tokenizer, HEADS, tmp_path)
    assert "fuses them" in message and model.config.num_attention_heads == 4


def test_depth_and_hidden_refused_outside_the_families(tokenizer, tmp_path):
    model = _model("opt", tokenizer)
    message = _refusal(model, tokenizer, PruneConfig(depth=DepthTarget(remove=1)), tmp_path)
    assert "prune.depth" in message
    assert model.config.num_hidden_layers == 2


def test_gpt2_conv1d_is_refused(tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_inner=64,
                                       vocab_size=len(tokenizer)))
    message = _refusal(model, tokenizer, PruneConfig(ffn=FfnTarget(ratio=0.5,
                                                                   criterion="magnitude")),
                       tmp_path)
    assert "Conv1D" in message


def test_encoder_decoder_is_refused(tokenizer, tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                                d_kv=16, vocab_size=100))
    message = _refusal(model, tokenizer, PruneConfig(ffn=FfnTarget(ratio=0.5,
                                                                   criterion="magnitude")),
                       tmp_path)
    assert "encoder-decoder" in message
