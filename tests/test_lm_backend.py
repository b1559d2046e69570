"""pkdq's lm-eval backend: prefix-tree packing, HFLM-equal scores, registry and command line."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tasks.core.common import REPO_ROOT
from tasks.evaluate.stage import run_task, sample_doc_ids, task_manager
from tasks.evaluate.tree_pack import (
    ScoreRequest,
    ancestor_mask,
    batch_rows,
    build_row,
    group_requests,
)

# --------------------------------------------------------------------------- packing (no model)


def _req(inputs: list[int], n_targets: int = 1) -> ScoreRequest:
    return ScoreRequest(tuple(inputs), tuple(range(100, 100 + n_targets)))


def test_choices_of_one_question_share_a_row_and_their_prefix():
    shared = list(range(1, 11))
    reqs = [_req(shared + [20, 21]), _req([50] * 12), _req(shared + [30], 2), _req(shared)]
    groups = group_requests(reqs, min_shared=8)
    assert sorted(map(sorted, groups)) == [[0, 2, 3], [1]]
    row = build_row(reqs, next(g for g in groups if 0 in g))
    assert len(row) == 10 + 2 + 1  # the shared 10 tokens once, then each choice's own tokens
    assert row.depths[:10] == list(range(10)) and max(row.depths) == 11
    nodes = dict(row.members)
    assert len(nodes[2]) == 2 and nodes[3] == [9]  # targets predicted from their last inputs


def test_min_shared_and_max_row_keep_unrelated_requests_apart():
    reqs = [_req([1, 2, 3, 4, 5, 6]), _req([1, 2, 3, 9, 9, 9])]
    assert len(group_requests(reqs, min_shared=4)) == 2
    assert len(group_requests(reqs, min_shared=3)) == 1
    assert len(group_requests(reqs, min_shared=3, max_row=8)) == 2


def test_ancestor_mask_is_tree_causal_and_pads_attend_to_themselves():
    reqs = [_req([1, 2, 3]), _req([1, 2, 4])]
    row = build_row(reqs, [0, 1])  # nodes: 1, 2, 3 | 4 (sibling of 3)
    mask = ancestor_mask(row, width=5)
    expected = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 1, 0],
                         [0, 0, 0, 0, 1]], dtype=bool)
    assert (mask == expected).all()
    windowed = ancestor_mask(row, width=4, window=2)
    assert not windowed[2, 0] and windowed[2, 1] and windowed[3, 1] and not windowed[3, 2]


def test_batches_bound_rows_tokens_scored_and_padding():
    reqs = [_req([i] * n, 1) for i, n in enumerate([40, 38, 20, 19, 18, 5])]
    rows = [build_row(reqs, [i]) for i in range(len(reqs))]
    batches = batch_rows(rows, max_rows=8, max_scored=100, max_tokens=1000, min_fill=0.85)
    assert batches == [[0, 1], [2, 3, 4], [5]]
    assert batch_rows(rows, max_rows=2, max_scored=100, max_tokens=1000, min_fill=0) == [
        [0, 1], [2, 3], [4, 5]]
    assert len(batch_rows(rows, max_rows=8, max_scored=2, max_tokens=1000, min_fill=0)) == 3


# --------------------------------------------------------------------------- against HFLM


@pytest.fixture(scope="module")
def tiny_lms(tiny_llama_ref):
    """Stock HFLM and the pkdq backend over one tiny Llama (fp32)."""
    from lm_eval.models.huggingface import HFLM

    from tasks.core.model_store import load_model
    from tasks.evaluate.backend import PkdqLM

    model, tok = load_model(tiny_llama_ref.path)
    return (HFLM(pretrained=model, tokenizer=tok, batch_size=8),
            PkdqLM(pretrained=model, tokenizer=tok, batch_size=8))


def _responses(raw):
    return {int(s["doc_id"]): s for s in raw["samples"]}


@pytest.mark.parametrize("task,n_docs", [("arc_easy", 2376), ("piqa", 1838),
                                         ("winogrande", 1267)])
def test_loglikelihoods_and_accuracies_equal_hflm(tiny_lms, task, n_docs):
    hf, pk = tiny_lms
    ids = sample_doc_ids(task, n_docs, 12, seed=3)
    manager = task_manager()
    a = _responses(run_task(hf, task, ids, n_docs, manager, seed=3))
    b = _responses(run_task(pk, task, ids, n_docs, manager, seed=3))
    assert a.keys() == b.keys() == set(ids)
    for doc_id, sa in a.items():
        sb = b[doc_id]
        lls_a = [r[0] for r in sa["filtered_resps"]]
        lls_b = [r[0] for r in sb["filtered_resps"]]
        assert lls_b == pytest.approx(lls_a, abs=1e-4), doc_id
        assert [r[1] for r in sa["filtered_resps"]] == [r[1] for r in sb["filtered_resps"]]
        for metric in ("acc", "acc_norm"):
            assert sa.get(metric) == sb.get(metric), (doc_id, metric)


def test_rolling_loglikelihood_equals_hflm_windows(tiny_llama_ref):
    """Several windows per text (max_length 64): same windows, same sum, as HFLM."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from tasks.core.model_store import load_model
    from tasks.evaluate.backend import PkdqLM
    from tasks.evaluate.lm_eval_tasks.utils import load_docs

    model, tok = load_model(tiny_llama_ref.path)
    pages = [d["page"][:1500] for d in load_docs("wikitext")[:2]]
    reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(p,), idx=i)
            for i, p in enumerate(pages)]
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=64)
    pk = PkdqLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=64)
    expected = hf.loglikelihood_rolling(reqs, disable_tqdm=True)
    got = pk.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert len(tok(pages[0])["input_ids"]) > 3 * 64  # really several windows
    assert got == pytest.approx(expected, rel=1e-6)


def test_wrong_attention_mask_is_caught_at_build_time(tiny_llama_ref, monkeypatch):
    """The build-time check compares packed rows with plain forwards: a plain causal mask over
    the row (siblings see each other) must fail it."""
    import tasks.evaluate.backend as backend
    from tasks.core.model_store import load_model

    def causal(row, width, window=None):
        return np.tril(np.ones((width, width), dtype=bool))

    model, tok = load_model(tiny_llama_ref.path)
    monkeypatch.setattr(backend, "ancestor_mask", causal)
    with pytest.raises(RuntimeError, match="hf backend"):
        backend.PkdqLM(pretrained=model, tokenizer=tok)


# --------------------------------------------------------------------------- registry and CLI


def test_registered_as_pkdq_for_simple_evaluate(tiny_llama_ref):
    from lm_eval import simple_evaluate

    import tasks.evaluate.backend  # noqa: F401 - registers "pkdq"

    out = simple_evaluate(model="pkdq", model_args={"pretrained": str(tiny_llama_ref.path),
                                                    "batch_size": 4},
                          tasks=["piqa"], task_manager=task_manager(), limit=3)
    assert out["config"]["model"] == "pkdq"
    assert 0.0 <= out["results"]["piqa"]["acc,none"] <= 1.0


def test_lm_eval_command_line_runs_the_pkdq_model(tiny_llama_ref, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.evaluate.backend", "--model", "pkdq", "--model_args",
         f"pretrained={tiny_llama_ref.path}", "--batch_size", "4", "--tasks", "arc_easy",
         "--limit", "2",
         "--output_path", str(tmp_path / "out")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "arc_easy" in proc.stdout and "acc_norm" in proc.stdout
    assert list((tmp_path / "out").rglob("results_*.json"))
