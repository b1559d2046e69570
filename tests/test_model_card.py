"""Model cards, side-by-side generations and honest numbers (issue 18 parts 2, 6, 7).

The real pipeline in-process on the tiny Llama (prune, RTN quantize, each evaluated), then the
report and the cards read back: valid front matter, fingerprints untouched, the as-served scores
of the quantized stage labelled, sizes against the bf16 baseline, error bars on the plot.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.core.common import REPO_ROOT, ModelRef, read_json
from tasks.core.model_folder import (
    CARD_FILE,
    MANIFEST_FILE,
    check_folder,
    fingerprint_folder,
    model_ref,
)
from tasks.core.recipe import load_recipe
from tasks.pipeline import evaluate_stage, init_run, plan, run_stage

EVAL = {"tasks": ["arc_easy", "piqa"], "samples": 6, "batch_size": 4,
        "wikitext": {"tokens": 256, "max_length": 64, "pages": 0},
        "speed": {"enabled": False}, "generations": {"max_new_tokens": 6}}


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n"), text[:80]
    head, _, _ = text[4:].partition("\n---\n")
    meta = yaml.safe_load(head)
    assert isinstance(meta, dict)
    return meta


@pytest.fixture(scope="module")
def tiny_run(tiny_llama_ref, tmp_path_factory):
    """A finished prune -> quantize run of the tiny Llama, with its report written."""
    from tasks.report import write_report

    tmp = tmp_path_factory.mktemp("card")
    raw = {"name": "tiny-card", "model": str(tiny_llama_ref.path), "seed": 7, "threads": 1,
           "stages": [{"prune": {"ffn": {"ratio": 0.5},
                                 "calibration": {"samples": 2, "seq_len": 32}}},
                      {"quantize": {"method": "rtn", "bits": 4, "group_size": 32,
                                    "gguf": "q4_0", "gguf_embedding": "q4_0",
                                    "calibration": {"source": "c4", "samples": 2,
                                                    "seq_len": 32}}}],
           "evaluate": EVAL}
    recipe_file = tmp / "tiny-card.yaml"
    recipe_file.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(str(recipe_file))
    run_dir = tmp / "runs" / "tiny-card"
    init_run(run_dir, recipe, str(recipe_file), tiny_llama_ref)
    stages = plan(recipe)
    evaluate_stage(run_dir, stages[0], recipe, tiny_llama_ref)
    ref = tiny_llama_ref
    for stage in stages[1:]:
        record, _ = run_stage(run_dir, stage, recipe, ref, None)
        ref = ModelRef.from_json(record["model"])
        evaluate_stage(run_dir, stage, recipe, ref)
    paths = write_report(run_dir)
    return {"run_dir": run_dir, "recipe": recipe, "stages": stages, "paths": paths,
            "base": tiny_llama_ref}


def test_every_stage_model_gets_a_card_with_valid_front_matter(tiny_run):
    for stage in tiny_run["stages"][1:]:
        record = read_json(tiny_run["run_dir"] / stage.folder / "stage.json")
        card = (Path(record["model"]["path"]) / CARD_FILE).read_text()
        meta = _front_matter(card)
        for key in ("library_name", "pipeline_tag", "license", "tags"):
            assert key in meta, (stage.folder, key)
        assert meta["pipeline_tag"] == "text-generation"
        assert "pruned" in meta["tags"]
        assert ("quantized" in meta["tags"]) == (stage.kind == "quantize")
        for heading in ("## What was done", "## Data", "## Results", "## Size and speed",
                        "## How to load"):
            assert heading in card, (stage.folder, heading)
        assert "| arc_easy |" in card  # the retention table, rewritten after evaluation
        assert "vllm serve" in card and "llama-cli" in card
    quant = tiny_run["stages"][2]
    record = read_json(tiny_run["run_dir"] / quant.folder / "stage.json")
    card = (Path(record["model"]["path"]) / CARD_FILE).read_text()
    assert "arc_easy as served (" in card  # the as-served rows, labelled
    assert "float32 activations" in card  # and which numbers are which


def test_card_leaves_fingerprint_and_integrity_check_alone(tiny_run):
    for stage in tiny_run["stages"][1:]:
        record = read_json(tiny_run["run_dir"] / stage.folder / "stage.json")
        path, fp = Path(record["model"]["path"]), record["model"]["fingerprint"]
        assert (path / CARD_FILE).is_file()
        assert check_folder(path, fp) is None
        assert model_ref(path).fingerprint == fp
        assert fingerprint_folder(path, skip_card=True) == fp
        assert fingerprint_folder(path) != fp  # the card is a file; only checks skip it
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        assert CARD_FILE not in manifest["files"]  # no card (e.g. the input's) sealed inside
    # a rerun reuses every stage: the card did not make the folders look altered
    ref = tiny_run["base"]
    for stage in tiny_run["stages"][1:]:
        record, reused = run_stage(tiny_run["run_dir"], stage, tiny_run["recipe"], ref, None)
        assert reused, stage.folder
        ref = ModelRef.from_json(record["model"])


def test_weights_changed_after_the_card_still_fail_the_check(tiny_run, tmp_path):
    import shutil

    record = read_json(tiny_run["run_dir"] / "01-prune" / "stage.json")
    copy = tmp_path / "model"
    shutil.copytree(record["model"]["path"], copy)
    (copy / "extra.bin").write_bytes(b"x")
    assert "extra.bin was added" in check_folder(copy)


def test_license_and_base_model_come_from_the_source():
    from tasks.core.model_store import source_metadata
    from tasks.report.card import front_matter

    source = source_metadata("smollm2-135m")
    assert source["license"] == "apache-2.0"  # read from the GGUF's general.license
    data = {"run": {"recipe": {"stages": [{"prune": {}}, {"quantize": {"method": "gptq",
                                                                        "bits": 4}}]}}}
    meta = front_matter(data, 2, source)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["license"] == "apache-2.0" and meta["base_model_relation"] == "quantized"
    assert {"pruned", "quantized", "4-bit"} <= set(meta["tags"])
    assert source_metadata("/no/such/model")["license"] == "unknown"


def test_report_has_generations_served_scores_bf16_size_and_labels(tiny_run):
    data = read_json(tiny_run["paths"]["json"])
    md = tiny_run["paths"]["markdown"].read_text()
    html = tiny_run["paths"]["html"].read_text()
    from tasks.evaluate import PROMPTS

    assert "## Generations side by side" in md
    assert "Generations side by side" in html and 'class="generations"' in html
    for _, prompt in PROMPTS:
        assert prompt in md
    gens = [e["generations"] for e in data["stages"]]
    assert all(g and len(g["prompts"]) == len(PROMPTS) for g in gens)

    quant = data["stages"][2]
    served = quant["eval"]["served"]
    assert served["dtype"] == "bfloat16" and set(served["tasks"]) == {"arc_easy", "piqa"}
    for task in ("arc_easy", "piqa"):  # the same docs as the fp32-activation scores
        assert served["tasks"][task]["doc_ids"] == quant["eval"]["tasks"][task]["doc_ids"]
    assert quant["eval"]["activations_dtype"] == "float32"
    assert quant["retention_served"]["benchmarks"]["arc_easy"]["n"] == 6
    assert data["stages"][1]["eval"]["served"] is None  # float model: nothing else to serve
    assert "02-quantize as served (bfloat16)" in md and "float32 activations" in md
    assert "02-quantize as served (bfloat16)" in html

    size = quant["retention"]["size"]
    base = data["stages"][0]["eval"]
    assert size["bytes_baseline_bf16"] == base["params"] * 2
    assert size["bytes_ratio_bf16"] == pytest.approx(
        quant["eval"]["bytes_on_disk"] / (base["params"] * 2))
    assert "size vs bf16 baseline" in md and "size vs bf16 baseline" in html


def test_the_stages_gguf_is_scored_as_the_file_that_ships(tiny_run):
    """The quantize stage's model.gguf (Q4_0, Q4_0 embedding) gets its own rows: the file's
    bytes, its weights' scores on the same docs, its perplexity in torch and in llama.cpp."""
    data = read_json(tiny_run["paths"]["json"])
    md = tiny_run["paths"]["markdown"].read_text()
    html = tiny_run["paths"]["html"].read_text()
    quant = data["stages"][2]
    shipped = quant["eval"]["gguf"]
    gguf_file = tiny_run["run_dir"] / "02-quantize" / "model.gguf"
    assert shipped["label"] == "as GGUF (q4_0, embedding q4_0)"
    assert shipped["bytes_on_disk"] == gguf_file.stat().st_size
    assert shipped["bytes_on_disk"] < quant["eval"]["bytes_on_disk"]  # 4-bit embedding
    for task in ("arc_easy", "piqa"):
        assert shipped["tasks"][task]["doc_ids"] == quant["eval"]["tasks"][task]["doc_ids"]
    torch_ppl = shipped["wikitext"]["token_perplexity"]
    llama_ppl = shipped["llama_cpp_wikitext"]["token_perplexity"]
    assert llama_ppl == pytest.approx(torch_ppl, rel=0.05)  # the same weights, two runtimes
    # the rounded embedding is in these scores, not in the GPTQ folder's
    assert shipped["wikitext"]["nll"] != quant["eval"]["wikitext"]["nll"]
    ret = quant["retention_gguf"]
    assert ret["benchmarks"]["arc_easy"]["n"] == 6
    base_params = data["stages"][0]["eval"]["params"]
    assert ret["size"]["bytes_ratio_bf16"] == pytest.approx(
        shipped["bytes_on_disk"] / (base_params * 2))
    assert data["stages"][1]["eval"]["gguf"] is None  # no GGUF beside the pruned folder
    label = "02-quantize as GGUF (q4_0, embedding q4_0)"
    assert f"| {label} | " in md and label in html
    assert f"({llama_ppl:.2f})" in md  # llama.cpp's perplexity beside the torch one


def test_accuracy_plot_carries_error_bars(tiny_run):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    from tasks.report.page import stage_quality
    from tasks.report.plots import draw_quality

    data = read_json(tiny_run["paths"]["json"])
    quality = stage_quality(data)
    assert all(q["accuracy_stderr"] and q["accuracy_stderr"] > 0 for q in quality)
    fig, ax = plt.subplots()
    try:
        draw_quality(ax, {"run": [(q["label"], q["accuracy"]) for q in quality]}, "acc",
                     quality[0]["accuracy"], {"run": [q["accuracy_stderr"] for q in quality]})
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert len(bars) == 1
        segments = bars[0].lines[2][0].get_segments()
        half = [abs(seg[1][1] - seg[0][1]) / 2 for seg in segments]
        assert half == pytest.approx([q["accuracy_stderr"] for q in quality])
    finally:
        plt.close(fig)


def _pkdq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pkdq", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def test_pkdq_generate_equals_model_generate(tiny_llama_ref):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "What is the capital of France?"
    out = _pkdq("generate", str(tiny_llama_ref.path), prompt, "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr[-2000:]
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_ref.path))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_ref.path),
                                                 dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.inference_mode():
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    want = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert out.stdout.rstrip("\n") == want


def test_quantized_stage_generations_are_pkdq_generate_of_its_folder(tiny_run):
    """The GPTQ folder answers through its grid dequantized once (float speed): the report's
    text is what `pkdq generate` prints, and that model's logits are the kernel's."""
    import torch

    from tasks.core.gptq_checkpoint import load_quantized
    from tasks.core.model_store import load_for_generation

    stage_dir = tiny_run["run_dir"] / "02-quantize"
    folder = Path(read_json(stage_dir / "stage.json")["model"]["path"])
    gens = read_json(stage_dir / "eval" / "generations.json")
    assert gens["loader"].startswith("the GPTQ grid dequantized to fp32")
    first = gens["prompts"][0]
    out = _pkdq("generate", str(folder), first["prompt"], "--max-new-tokens",
                str(gens["max_new_tokens"]))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.rstrip("\n") == first["text"]
    dense, _ = load_for_generation(folder)
    assert not any(hasattr(m, "qweight") for m in dense.modules())
    kernel = load_quantized(folder)
    ids = torch.randint(0, dense.config.vocab_size, (3, 24),
                        generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = kernel(ids).logits, dense(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


@pytest.mark.parametrize("make", ["missing", "no_model", "empty_config"])
def test_pkdq_generate_refuses_a_non_model_in_one_line(tmp_path, make):
    target = tmp_path / "thing"
    if make != "missing":
        target.mkdir()
    if make == "empty_config":
        (target / "config.json").write_text(json.dumps({}))
    out = _pkdq("generate", str(target), "hi")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in out.stderr
