"""Retention maths against hand computations (numbers worked out in the comments)."""

from __future__ import annotations

import math

import pytest

from tasks.report.retention import (
    paired_stats,
    paired_text,
    ratio_stderr,
    retention_from_dirs,
    stage_retention,
)


def _eval(tasks: dict, ppl: float = 20.0, params: int = 100, size: int = 1000) -> dict:
    return {"tasks": tasks, "params": params, "bytes_on_disk": size,
            "wikitext": {"token_perplexity": ppl, "word_perplexity": ppl * 3, "tokens": 8192,
                         "max_length": 512}}


def _task(score: float, stderr: float, chance: float, metric: str = "acc_norm", n: int = 100):
    return {"metric": metric, metric: score, f"{metric}_stderr": stderr, "chance": chance, "n": n}


def test_ratio_and_normalised_ratio_unpaired():
    base = _eval({"arc_easy": _task(0.6, 0.05, 0.25)})
    stage = _eval({"arc_easy": _task(0.45, 0.05, 0.25)})
    row = stage_retention(base, stage)["benchmarks"]["arc_easy"]
    # R = 0.45/0.6 = 0.75; se = sqrt(0.05^2 + 0.75^2 * 0.05^2) / 0.6 = 0.05 * 1.25 / 0.6
    assert row["ratio"] == pytest.approx(0.75)
    assert row["ratio_stderr"] == pytest.approx(0.05 * 1.25 / 0.6)
    # N = (0.45-0.25)/(0.6-0.25) = 0.2/0.35; se = 0.05 * sqrt(1 + N^2) / 0.35
    n = 0.2 / 0.35
    assert row["norm_ratio"] == pytest.approx(n)
    assert row["norm_ratio_stderr"] == pytest.approx(0.05 * math.sqrt(1 + n * n) / 0.35)
    # no per-doc results: the difference's stderr adds the two variances
    assert row["diff"] == pytest.approx(-0.15)
    assert row["diff_stderr"] == pytest.approx(math.sqrt(2) * 0.05)
    assert row["paired"] is False and row["uninformative"] is False


def test_paired_difference_and_covariance():
    base_docs = {"0": 1.0, "1": 1.0, "2": 0.0, "3": 0.0, "4": 1.0}
    stage_docs = {"0": 1.0, "1": 0.0, "2": 0.0, "3": 0.0, "4": 1.0}
    stats = paired_stats(base_docs, stage_docs)
    # d = [0,-1,0,0,0]: mean -0.2, sample var = (4*0.04 + 0.64)/4 = 0.2, se = sqrt(0.2/5) = 0.2
    assert stats["diff"] == pytest.approx(-0.2)
    assert stats["diff_stderr"] == pytest.approx(0.2)
    # cov of the means: sum((b-0.6)(s-0.4))/(n-1)/n = (0.24-0.16+0.24+0.24+0.24)/4/5 = 0.04
    assert stats["cov"] == pytest.approx(0.04)
    assert stats["same_docs"] is True

    se = math.sqrt(0.3 / 5)  # sample stderr of a mean of 3 ones in 5
    base = _eval({"piqa": _task(0.6, se, 0.5, metric="acc", n=5)})
    stage = _eval({"piqa": _task(0.4, se, 0.5, metric="acc", n=5)})
    row = stage_retention(base, stage, {"piqa": {"acc": base_docs}}, {"piqa": {"acc": stage_docs}})
    row = row["benchmarks"]["piqa"]
    # R = 2/3; var = (0.06 + (4/9)*0.06 - 2*(2/3)*0.04) / 0.36 = (1/30) / 0.36
    assert row["ratio_stderr"] == pytest.approx(math.sqrt((1 / 30) / 0.36))
    assert row["paired"] is True and row["n_paired"] == 5
    assert row["diff_stderr"] == pytest.approx(0.2)
    # the paired stderr is tighter than the unpaired one (sqrt(2*0.06) = 0.346)
    assert row["diff_stderr"] < math.sqrt(2) * se


def test_paired_text_is_the_paired_difference_in_points():
    base = {"piqa": {"acc": {"0": 1.0, "1": 1.0, "2": 0.0, "3": 0.0, "4": 1.0}}}
    stage = {"piqa": {"acc": {"0": 1.0, "1": 0.0, "2": 0.0, "3": 0.0, "4": 1.0}}}
    assert paired_text(base, stage, "piqa", "acc") == "-20.0 ± 20.0"
    assert paired_text(stage, base, "piqa", "acc") == "+20.0 ± 20.0"
    assert paired_text(base, None, "piqa", "acc") == "–"
    assert paired_text(base, stage, "arc_easy", "acc") == "–"


def test_flat_per_doc_mapping_is_accepted():
    base = _eval({"boolq": _task(0.6, 0.2, 0.5, metric="acc", n=5)})
    stage = _eval({"boolq": _task(0.4, 0.2, 0.5, metric="acc", n=5)})
    flat_b = {"boolq": {"0": 1, "1": 1, "2": 0, "3": 0, "4": 1}}
    flat_s = {"boolq": {"0": 1, "1": 0, "2": 0, "3": 0, "4": 1}}
    row = stage_retention(base, stage, flat_b, flat_s)["benchmarks"]["boolq"]
    assert row["paired"] and row["diff_stderr"] == pytest.approx(0.2)


def test_uninformative_benchmark_is_kept_out_of_averages():
    base = _eval({
        "arc_easy": _task(0.6, 0.05, 0.25),
        "piqa": _task(0.8, 0.04, 0.5),
        # 0.27 - 0.25 = 0.02 <= 2 * 0.02: within 2 stderr of chance
        "arc_challenge": _task(0.27, 0.02, 0.25),
    })
    stage = _eval({
        "arc_easy": _task(0.45, 0.05, 0.25),
        "piqa": _task(0.72, 0.04, 0.5),
        "arc_challenge": _task(0.10, 0.02, 0.25),
    })
    out = stage_retention(base, stage)
    assert out["uninformative"] == ["arc_challenge"]
    assert out["informative"] == ["arc_easy", "piqa"]
    avg = out["average_retention"]
    # mean of 0.75 and 0.9; se = sqrt(se1^2 + se2^2) / 2
    se1 = 0.05 * 1.25 / 0.6
    se2 = math.sqrt(0.04**2 + 0.9**2 * 0.04**2) / 0.8
    assert avg["k"] == 2
    assert avg["mean"] == pytest.approx((0.75 + 0.9) / 2)
    assert avg["stderr"] == pytest.approx(math.sqrt(se1**2 + se2**2) / 2)
    norm = out["average_norm_retention"]
    assert norm["mean"] == pytest.approx((0.2 / 0.35 + 0.22 / 0.3) / 2)


def test_baseline_exactly_two_stderr_above_chance_is_uninformative_just_above_is_not():
    stage = _eval({"boolq": _task(0.55, 0.02, 0.5, metric="acc")})
    at = stage_retention(_eval({"boolq": _task(0.54, 0.02, 0.5, metric="acc")}), stage)
    above = stage_retention(_eval({"boolq": _task(0.5401, 0.02, 0.5, metric="acc")}), stage)
    assert at["benchmarks"]["boolq"]["uninformative"] is True
    assert above["benchmarks"]["boolq"]["uninformative"] is False
    assert at["average_retention"] is None


def test_perplexity_and_size_ratios():
    base = _eval({}, ppl=20.0, params=200, size=4000)
    stage = _eval({}, ppl=25.0, params=150, size=1000)
    out = stage_retention(base, stage)
    assert out["perplexity"]["ratio"] == pytest.approx(1.25)
    assert out["perplexity"]["word_ratio"] == pytest.approx(1.25)
    assert out["perplexity"]["same_slice"] is True
    assert out["size"]["params_ratio"] == pytest.approx(0.75)
    assert out["size"]["bytes_ratio"] == pytest.approx(0.25)


def test_ratio_stderr_edge_cases():
    assert ratio_stderr(0.5, 0.1, 0.0, 0.1) is None
    # perfectly correlated identical scores: R = 1, var = (s^2 + s^2 - 2 s^2)/b^2 = 0
    assert ratio_stderr(0.5, 0.1, 0.5, 0.1, cov=0.01) == pytest.approx(0.0, abs=1e-6)


def test_retention_from_dirs(tmp_path):
    from tasks.core.common import write_json_atomic

    for name, score, docs in (("b", 0.6, {"0": 1, "1": 1, "2": 0, "3": 0, "4": 1}),
                              ("s", 0.4, {"0": 1, "1": 0, "2": 0, "3": 0, "4": 1})):
        write_json_atomic(tmp_path / name / "eval.json",
                          _eval({"piqa": _task(score, 0.2, 0.5, metric="acc", n=5)}))
        write_json_atomic(tmp_path / name / "eval_samples.json", {"piqa": {"acc": docs}})
    row = retention_from_dirs(tmp_path / "b", tmp_path / "s")["benchmarks"]["piqa"]
    assert row["paired"] and row["paired_diff"] == pytest.approx(-0.2)
