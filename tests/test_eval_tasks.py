"""Any evaluation task: JSONL multiple choice and generation, include_path YAMLs, lm-eval
registry names, and the one-line refusals `pkdq validate` gives before a model loads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import typer.testing
import yaml

from tasks.core.common import data_dir
from tasks.core.recipe import EvalConfig
from tasks.evaluate.task_specs import check_eval_tasks

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
N_DOCS = 6
QUICK = {"samples": None, "batch_size": 8, "speed": {"enabled": False},
         "wikitext": {"tokens": 256, "max_length": 64, "pages": 0}}


@pytest.fixture(scope="module")
def arc_jsonl(tmp_path_factory) -> Path:
    from arc_to_jsonl import convert

    full = tmp_path_factory.mktemp("arc") / "arc_easy_mc.jsonl"
    convert(data_dir() / "arc" / "ARC-Easy-Test.jsonl", full)
    return full


def test_jsonl_multiple_choice_equals_the_builtin_arc_easy(tiny_llama_ref, arc_jsonl, tmp_path):
    """The ARC-Easy Test file converted to the shortcut scores exactly as the built-in task on
    the same docs: same prompt, same per-doc accuracies, chance = mean 1/len(choices)."""
    from tasks.evaluate import evaluate_model

    cfg = EvalConfig(tasks=["arc_easy", {"name": "arc_jsonl", "jsonl": str(arc_jsonl),
                                         "kind": "multiple_choice"}], **QUICK)
    ids = list(range(N_DOCS))
    metrics = evaluate_model(tiny_llama_ref.path, cfg, tmp_path,
                             doc_ids={"arc_easy": ids, "arc_jsonl": ids})
    builtin, mine = metrics["tasks"]["arc_easy"], metrics["tasks"]["arc_jsonl"]
    assert mine["metric"] == "acc_norm" and mine["n"] == N_DOCS
    for key in ("acc", "acc_norm", "chance"):
        assert mine[key] == pytest.approx(builtin[key]), key
    rows = [json.loads(x) for x in arc_jsonl.read_text().splitlines()[:N_DOCS]]
    assert mine["chance"] == pytest.approx(sum(1 / len(r["choices"]) for r in rows) / N_DOCS)
    samples = json.loads((tmp_path / "eval_samples.json").read_text())
    assert samples["arc_jsonl"]["acc_norm"] == samples["arc_easy"]["acc_norm"]


def test_jsonl_generation_scores_exact_match_and_chrf(tiny_llama_ref, tmp_path):
    from tasks.evaluate import evaluate_model
    from tasks.report.retention import benchmark_retention

    lines = [{"prompt": f"Q: {i} plus {i}?\nA:", "reference": str(2 * i)} for i in range(4)]
    path = tmp_path / "gen.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = EvalConfig(tasks=[{"name": "sums", "jsonl": str(path), "kind": "generation",
                             "max_gen_toks": 4}], **QUICK)
    metrics = evaluate_model(tiny_llama_ref.path, cfg, tmp_path / "out")
    task = metrics["tasks"]["sums"]
    assert task["metric"] == "chrf" and task["chance"] == 0.0 and task["n"] == 4
    assert 0.0 <= task["exact_match"] <= 1.0 and 0.0 <= task["chrf"] <= 100.0
    per_doc = json.loads((tmp_path / "out" / "eval_samples.json").read_text())["sums"]
    assert set(per_doc) >= {"exact_match", "chrf"} and len(per_doc["chrf"]) == 4
    row = benchmark_retention(task, task)
    assert row["chance"] == 0.0 and row["diff"] == 0.0


def test_include_path_tasks_and_refusals(tmp_path):
    good = tmp_path / "mine"
    good.mkdir()
    (good / "my_task.yaml").write_text(yaml.safe_dump({"task": "my_task", "dataset_path": "json"}))
    cfg = EvalConfig(tasks=["my_task"], include_path=str(good))
    assert check_eval_tasks(cfg) is None
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.yaml").write_text("task: [unclosed\n")
    problem = check_eval_tasks(EvalConfig(tasks=["arc_easy"], include_path=str(bad)))
    assert "broken.yaml line" in problem and "\n" not in problem
    problem = check_eval_tasks(EvalConfig(tasks=["no_such_task_xyz"]))
    assert "unknown task 'no_such_task_xyz'" in problem and "\n" not in problem


def test_registry_tasks_are_known_and_a_missing_dataset_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    problem = check_eval_tasks(EvalConfig(tasks=["sciq"]))
    assert "lm-eval task 'sciq' reads the HF dataset" in problem and "\n" not in problem


def test_jsonl_lines_are_checked(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    problem = check_eval_tasks(EvalConfig(tasks=[{"name": "x", "jsonl": str(path),
                                                  "kind": "multiple_choice"}]))
    assert "line 1" in problem and "'answer'" in problem


def test_validate_refuses_an_unknown_task_with_exit_2(tmp_path):
    from pkdq.cli import app

    recipe = {"name": "bad-task", "stages": [{"prune": {"ffn": {"ratio": 0.25}}}],
              "evaluate": {"tasks": ["arc_easy", "not_a_task_at_all"]}}
    path = tmp_path / "bad-task.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = typer.testing.CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "unknown task 'not_a_task_at_all'" in result.output
    assert len(result.output.strip().splitlines()) == 1
