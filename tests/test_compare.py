"""The real compare flow on the tiny Llama: shared prefixes are cache hits, every ordering's
final model is pruned, distilled and on the quantization grid, and a rerun recomputes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_recipes import tiny_recipe

from tasks.core.common import read_json
from tasks.core.model_store import is_quantized, read_config

ORDERS = ["P-KD-Q", "P-Q-KD", "Q-KD-P"]


def _task_run_states() -> list[tuple[str, str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(limit=200, sort=TaskRunSort.EXPECTED_START_TIME_ASC)
    # Prefect appends a short random suffix to task run names ("P-KD-Q 1:P-c7b")
    return [(r.name.rsplit("-", 1)[0], r.state.name if r.state else "?") for r in runs]


@pytest.fixture(scope="module")
def compared(tiny_llama_ref, tmp_path_factory):
    from flows.compare import run_compare

    tmp = tmp_path_factory.mktemp("compare")
    recipe = tiny_recipe(tmp, tiny_llama_ref.path, "tiny-compare")
    run_dir = tmp / "runs" / "tiny-compare"
    report = run_compare(str(recipe), str(run_dir), ORDERS)
    return recipe, run_dir, Path(report)


def test_every_ordering_finishes_pruned_distilled_and_quantized(compared, tiny_llama_ref):
    _, run_dir, report = compared
    data = read_json(run_dir / "report.json")
    assert data["compare"]["status"] == "finished"
    base_ffn = read_config(tiny_llama_ref.path)["intermediate_size"]
    for ordering in data["orderings"]:
        assert ordering["summary"]["complete"], ordering["name"]
        kinds = [s["kind"] for s in ordering["steps"]]
        assert {"prune", "distill", "quantize"} <= set(kinds)
        final = Path(ordering["steps"][-1]["eval"]["model_path"])
        assert is_quantized(final), ordering["name"]
        assert read_config(final)["intermediate_size"] == base_ffn // 2, ordering["name"]
        assert ordering["summary"]["bytes"] < data["baseline"]["bytes"]
    by_name = {o["name"]: o for o in data["orderings"]}
    qat = by_name["P-Q-KD"]["steps"][-1]
    assert qat["role"] == "qat-kd" and qat["metrics"]["quantization_aware"] is True
    requant = by_name["Q-KD-P"]["steps"]
    assert [s["role"] for s in requant] == ["quantize", "qat-kd", "prune", "requantize"]
    assert requant[2]["metrics"]["input_quantized"] is True
    assert report.name == "report.md" and (run_dir / "report.html").is_file()


def test_html_renders_in_chromium_with_the_json_numbers(compared):
    from tasks.report.browser import check_rendered, find_chromium, screenshot

    if find_chromium() is None:
        pytest.skip("Debian's chromium is not installed (setup.sh installs it when root)")
    _, run_dir, _ = compared
    html = run_dir / "report.html"
    check = check_rendered(html, read_json(run_dir / "report.json"))
    assert check["rendered"] and check["broken_images"] == 0, check
    assert check["images"] >= 4 and check["numbers_checked"] >= 20, check
    assert check["mismatches"] == [], check["mismatches"][:3]
    shot = screenshot(html, run_dir / "report.png")
    assert shot.stat().st_size > 20_000


def test_shared_prefix_runs_once_and_is_a_prefect_cache_hit(compared):
    _, run_dir, _ = compared
    data = read_json(run_dir / "report.json")
    by_name = {o["name"]: o for o in data["orderings"]}
    shared = by_name["P-Q-KD"]["steps"][0]
    assert shared["unit"] == by_name["P-KD-Q"]["steps"][0]["unit"]
    assert not shared["computed_here"] and shared["computed_by"] == "P-KD-Q"
    assert data["shared_units"] == [shared["unit"]]
    states = _task_run_states()
    assert ("P-Q-KD 1:P", "Cached") in states, states
    assert ("P-KD-Q 1:P", "Completed") in states, states


def test_rerun_recomputes_nothing(compared):
    from flows.compare import run_compare

    recipe, run_dir, _ = compared
    records = sorted(run_dir.glob("units/*/stage.json"))
    before = {p: p.stat().st_mtime_ns for p in records}
    run_compare(str(recipe), str(run_dir), ORDERS)
    assert {p: p.stat().st_mtime_ns for p in records} == before
    assert read_json(run_dir / "compare.json")["attempts"] == 2
