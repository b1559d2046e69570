"""Evaluate stage: offline task YAMLs, seeded doc subsets, the real lm-eval path, perplexity."""

from __future__ import annotations

import json
import math

import pytest

from tasks.core.common import data_dir
from tasks.core.model_store import load_model
from tasks.core.recipe import EvalConfig, SpeedEval, WikitextEval
from tasks.evaluate.lm_eval_tasks.utils import load_docs, resolve_data_dir
from tasks.evaluate.stage import (
    EVAL_JSON,
    SAMPLES_JSON,
    count_params,
    evaluate_model,
    run_task,
    sample_doc_ids,
    task_manager,
    wikitext_perplexity,
)

COUNTS = {
    "arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "hellaswag": 10042,
    "winogrande": 1267, "lambada_openai": 5153, "boolq": 3270,
}


@pytest.fixture(scope="module")
def all_tasks():
    """All seven tasks built by lm-eval from pkdq's YAMLs (no model needed)."""
    return task_manager().load(list(COUNTS))["tasks"]


def test_all_seven_tasks_load_offline_with_full_counts(all_tasks):
    assert sorted(all_tasks) == sorted(COUNTS)
    for name, count in COUNTS.items():
        assert len(all_tasks[name].eval_docs) == count, name
        assert len(load_docs(name)) == count, name


def test_stock_prompts_and_targets(all_tasks):
    """First docs rendered through lm-eval match what the stock tasks produce."""
    def first(name):
        task = all_tasks[name]
        doc = task.eval_docs[0]
        return task, doc

    task, doc = first("arc_easy")
    assert task.doc_to_text(doc).startswith("Question: Which statement best explains why")
    assert task.doc_to_text(doc).endswith("\nAnswer:")
    assert task.doc_to_target(doc) == 0 and len(task.doc_to_choice(doc)) == 4

    task, doc = first("hellaswag")  # ctx_b "he" capitalised as lm-eval does; gold 3
    assert task.doc_to_text(doc) == "Roof shingle removal: A man is sitting on a roof. He"
    assert task.doc_to_target(doc) == 3
    assert task.doc_to_choice(doc)[3] == "starts pulling up roofing on a roof."

    task, doc = first("winogrande")  # answer "2": the text is the option index
    assert task.doc_to_text(doc) == 1
    assert task.doc_to_target(doc) == "always got the easier cases."
    assert task.doc_to_choice(doc)[1].endswith("than Maria so Maria")

    task, doc = first("piqa")
    assert task.doc_to_text(doc).startswith("Question: How do I ready a guinea pig cage")
    assert task.doc_to_target(doc) == 0

    task, doc = first("lambada_openai")
    assert task.doc_to_target(doc).startswith(" ") and " " not in task.doc_to_target(doc)[1:]

    task, doc = first("boolq")
    assert task.doc_to_text(doc).endswith("?\nAnswer:")
    assert task.doc_to_choice(doc) == ["no", "yes"]


def test_wikitext_task_is_the_62_test_articles():
    """Stock `wikitext` (rolling log-likelihood) on pages cut as wikitext_document_level does."""
    task = task_manager().load(["wikitext"])["tasks"]["wikitext"]
    docs = list(task.eval_docs)
    assert len(docs) == 62 == len(load_docs("wikitext"))
    assert task.OUTPUT_TYPE == "loglikelihood_rolling"
    assert docs[0]["page"].startswith(" = Robert Boulter = ")
    raw = (data_dir() / "wikitext" / "wiki.test.raw").read_text()
    assert "\n".join(d["page"] for d in docs) == raw.split("\n", 1)[1]  # only a blank line cut
    target = task.doc_to_target(docs[0])  # the stock detokenizer's output
    assert target.startswith(" = Robert Boulter =\n\nRobert Boulter is an English film, tele")
    assert "@-@" in docs[0]["page"] and "@-@" not in target


def test_pkdq_eval_command_writes_json(tiny_llama_ref, tmp_path):
    from typer.testing import CliRunner

    from pkdq.cli import app

    out = tmp_path / "tiny.json"
    result = CliRunner().invoke(app, ["eval", str(tiny_llama_ref.path), "--tasks", "piqa",
                                      "--samples", "3", "--out", str(out), "--no-speed",
                                      "--wikitext-tokens", "256", "--wikitext-pages", "0"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert metrics["tasks"]["piqa"]["n"] == 3 and metrics["backend"] == "pkdq"
    assert set(json.loads(out.with_suffix(".samples.json").read_text())) == {"piqa"}
    assert "piqa" in result.output
    bad = CliRunner().invoke(app, ["eval", str(tiny_llama_ref.path), "--tasks", "mmlu"])
    assert bad.exit_code == 2 and "tasks" in bad.output


def test_label_quirks_are_mapped():
    boolq = load_docs("boolq")
    assert sum(d["label"] for d in boolq) == 2033  # "true" -> 1
    arc = load_docs("arc_easy")
    numeric = [d for d in arc if d["choices"]["label"][0] == "1"]
    assert numeric and all(d["answerKey"] in d["choices"]["label"] for d in arc)
    assert {len(d["choices"]["text"]) for d in arc} >= {3, 4, 5}
    assert sum(d["label"] for d in load_docs("piqa")) > 0
    assert {d["answer"] for d in load_docs("winogrande")} == {"1", "2"}


def test_another_data_folder_is_accepted(tmp_path):
    src = load_docs("piqa")
    (tmp_path / "piqa").mkdir()
    lines = (data_dir() / "piqa" / "valid.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "piqa" / "valid.jsonl").write_text("".join(lines[:3]))
    (tmp_path / "piqa" / "valid-labels.lst").write_text("1\n0\n1\n")
    task = task_manager(tmp_path).load(["piqa"])["tasks"]["piqa"]
    docs = list(task.eval_docs)
    assert len(docs) == 3 and [d["label"] for d in docs] == [1, 0, 1]
    assert docs[0]["goal"] == src[0]["goal"]


def test_sample_doc_ids_seeded_sorted_and_not_a_prefix():
    a = sample_doc_ids("arc_easy", 2376, 100, seed=1234)
    assert a == sample_doc_ids("arc_easy", 2376, 100, seed=1234)
    assert a == sorted(a) and len(set(a)) == 100 and max(a) < 2376
    assert a != list(range(100)) and max(a) > 1000
    assert a != sample_doc_ids("arc_easy", 2376, 100, seed=1235)
    assert a != sample_doc_ids("arc_challenge", 2376, 100, seed=1234)
    assert sample_doc_ids("piqa", 10, None, seed=1) == list(range(10))
    assert sample_doc_ids("piqa", 10, 50, seed=1) == list(range(10))


def test_logged_doc_ids_point_at_the_right_docs(tiny_llama_ref):
    """lm-eval maps sampled results back to ids by position: check it against the files."""
    from lm_eval.models.huggingface import HFLM

    model, tok = load_model(tiny_llama_ref.path)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    ids = [3, 17, 400, 1500]
    raw = run_task(lm, "piqa", ids, 1838, task_manager(), seed=0)
    docs = load_docs("piqa")
    assert sorted(int(s["doc_id"]) for s in raw["samples"]) == ids
    for sample in raw["samples"]:
        assert sample["doc"]["goal"] == docs[int(sample["doc_id"])]["goal"]


def test_evaluate_model_tiny_end_to_end(tiny_llama_ref, tmp_path):
    cfg = EvalConfig(tasks=["arc_easy", "piqa"], samples=5, batch_size=8,
                     wikitext=WikitextEval(tokens=300, max_length=128, pages=2),
                     speed=SpeedEval(repeats=1))
    out = evaluate_model(tiny_llama_ref.path, cfg, tmp_path, seed=7)

    assert json.loads((tmp_path / EVAL_JSON).read_text()) == json.loads(json.dumps(out))
    per_doc = json.loads((tmp_path / SAMPLES_JSON).read_text())
    for task, n_docs in (("arc_easy", 2376), ("piqa", 1838)):
        res = out["tasks"][task]
        assert res["n"] == 5
        assert res["doc_ids"] == sample_doc_ids(task, n_docs, 5, seed=7)
        for metric in ("acc", "acc_norm"):
            assert 0.0 <= res[metric] <= 1.0 and res[f"{metric}_stderr"] >= 0.0
            docs = per_doc[task][metric]
            assert sorted(int(i) for i in docs) == res["doc_ids"]
            assert set(docs.values()) <= {0.0, 1.0}
            assert sum(docs.values()) / 5 == pytest.approx(res[metric])
    assert out["tasks"]["piqa"]["chance"] == pytest.approx(0.5)
    assert 0.2 <= out["tasks"]["arc_easy"]["chance"] <= 1 / 3

    wt = out["wikitext"]
    # windows of 128, 128, 44 tokens: the first token of each is not predicted
    assert wt["tokens"] == 300 and wt["predicted_tokens"] == 297 and wt["max_length"] == 128
    assert math.isfinite(wt["token_perplexity"]) and wt["token_perplexity"] > 100  # random model
    assert wt["word_perplexity"] > wt["token_perplexity"]  # fewer words than tokens
    rolling = wt["lm_eval"]  # lm-eval's stock rolling wikitext on 2 seeded articles
    assert rolling["n"] == 2 and rolling["doc_ids"] == sample_doc_ids("wikitext", 62, 2, seed=7)
    assert rolling["max_length"] == 128 and rolling["word_perplexity"] > 1
    assert 0 < rolling["bits_per_byte"] < 20
    speed = out["speed"]
    assert speed["prefill_tokens"] == 448 and speed["decode_tokens"] == 64  # 512 positions - 64
    assert speed["prefill_s"] > 0 and speed["decode_tokens_per_s"] > 0
    assert speed["dtype"] == "float32" and speed["threads"] == 1
    assert out["peak_rss_bytes"] > 50e6 and out["peak_rss_scope"] in ("eval", "process")
    assert out["backend"] == "pkdq"
    assert out["params"] == count_params(load_model(tiny_llama_ref.path)[0])
    assert out["bytes_on_disk"] > 4 * out["params"] * 0.9  # fp32 safetensors
    assert out["wall_s"] > 0

    # pinned doc ids (the baseline's) win over the seed: paired comparison across stages
    # (and the stock hf backend gives the same scores, without the extra sections when disabled)
    quick = cfg.model_copy(update={"tasks": ["piqa"], "backend": "hf",
                                   "wikitext": WikitextEval(tokens=300, max_length=128, pages=0),
                                   "speed": SpeedEval(enabled=False)})
    again = evaluate_model(tiny_llama_ref.path, quick, tmp_path / "again", seed=999,
                           doc_ids={"piqa": out["tasks"]["piqa"]["doc_ids"]})
    assert again["tasks"]["piqa"]["doc_ids"] == out["tasks"]["piqa"]["doc_ids"]
    assert again["tasks"]["piqa"]["acc"] == out["tasks"]["piqa"]["acc"]
    assert again["speed"] is None and "lm_eval" not in again["wikitext"]


def test_count_params_dedupes_tied_embeddings(tiny_llama_ref):
    model, _ = load_model(tiny_llama_ref.path)
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight


def test_perplexity_matches_model_loss(tiny_llama_ref, tmp_path):
    """One full window: exp(mean NLL) equals exp(HF's own shifted LM loss)."""
    import torch

    model, tok = load_model(tiny_llama_ref.path)
    text = "The quick brown fox jumps over the lazy dog. " * 40
    path = tmp_path / "wiki.test.raw"
    path.write_text(text)
    res = wikitext_perplexity(model, tok, path, tokens=256, max_length=256)
    ids = tok(text, add_special_tokens=False)["input_ids"][:256]
    with torch.inference_mode():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert res["token_perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert res["words"] == len(tok.decode(ids).split())


@pytest.mark.integration
def test_smollm2_wikitext_perplexity_in_sane_range(smollm2_ref, tmp_path):
    cfg = EvalConfig(tasks=[], wikitext=WikitextEval(tokens=2048, max_length=512, pages=0),
                     speed=SpeedEval(enabled=False))
    out = evaluate_model(smollm2_ref.path, cfg, tmp_path)
    ppl = out["wikitext"]["token_perplexity"]
    assert 10 < ppl < 80, ppl
    assert 130e6 < out["params"] < 140e6


def test_default_data_dir_needs_no_hard_coded_path():
    """The YAML hook resolves the same default folder as the rest of pkdq (PKDQ_DATA_DIR aware)."""
    assert resolve_data_dir() == data_dir()


def test_builtin_print_undoes_prefects_patch_and_nests_across_threads():
    """dill captures `dis.dis` through sys.stdout; under Prefect's log_prints patch that output
    would go to the run log instead. Inside `builtin_print` the real print is back."""
    import builtins
    import threading

    from prefect.logging.loggers import print as real_print

    from tasks.evaluate.stage import builtin_print

    def patched(*args, **kwargs):  # stands in for prefect's print_as_log
        raise AssertionError("patched print called")

    original = builtins.print
    builtins.print = patched
    try:
        inside: list[object] = []
        gate = threading.Barrier(2)

        def worker():
            with builtin_print():
                gate.wait()
                inside.append(builtins.print)
                gate.wait()

        threads = [threading.Thread(target=worker) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert inside == [real_print, real_print]
        assert builtins.print is patched  # restored once the last user left
        with builtin_print():
            from dill.temp import capture

            with capture("stdout") as out:
                print("seen by dill")
            assert out.getvalue() == "seen by dill\n"
        assert builtins.print is patched
    finally:
        builtins.print = original
