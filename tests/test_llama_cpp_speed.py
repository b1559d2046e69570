"""Speed where users deploy (issue 18, must-have 4): every stage's GGUF, written by pkdq's own
exporter, timed in the real llama.cpp inside a run, beside transformers; the report's table and
goal verdict; a one-line reason for an architecture GGUF cannot hold; nothing redone on resume.

The tiny Llama runs baseline -> prune -> RTN W4 sym g32 (the Q4_0 grid, so its q4_0 export is
exact and its f16 export is the grid in f16), with a short prompt so llama.cpp takes seconds.
The quantize stage also writes the GGUF it ships (Q4_0, Q4_0 embedding), timed as it is.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tasks.core.common import ModelRef, read_json
from tasks.core.recipe import load_recipe
from tasks.pipeline import (
    LLAMA_CPP_DONE,
    LLAMA_CPP_FILE,
    LLAMA_CPP_ROUNDS_DONE,
    LLAMA_CPP_ROUNDS_FILE,
    LLAMA_CPP_ROUNDS_WORK,
    LLAMA_CPP_WORK,
    evaluate_stage,
    init_run,
    llama_cpp_rounds_unit,
    llama_cpp_unit,
    plan,
    run_stage,
)

SPEED = {"prompt_tokens": 32, "new_tokens": 8, "repeats": 1}
LLAMA = {"types": ["f16", "q4_0"], "rounds": 2}


def _raw(model_path, llama: bool) -> dict:
    speed = {**SPEED, **({"llama_cpp": LLAMA} if llama else {})}
    return {"name": "tiny-speed", "model": str(model_path), "seed": 7, "threads": 1,
            "stages": [{"prune": {"ffn": {"ratio": 0.5},
                                  "calibration": {"samples": 2, "seq_len": 32}}},
                       {"quantize": {"method": "rtn", "bits": 4, "group_size": 32, "sym": True,
                                     "gguf": "q4_0", "gguf_embedding": "q4_0",
                                     "calibration": {"source": "c4", "samples": 2,
                                                     "seq_len": 32}}}],
            "evaluate": {"tasks": ["arc_easy"], "samples": 2, "batch_size": 4,
                         "wikitext": {"tokens": 256, "max_length": 64, "pages": 0},
                         "speed": speed, "served": False, "generations": {"enabled": False}}}


def _recipe(tmp, model_path, llama: bool):
    path = tmp / f"tiny-speed-{'on' if llama else 'off'}.yaml"
    path.write_text(yaml.safe_dump(_raw(model_path, llama)))
    return load_recipe(str(path)), path


@pytest.fixture(scope="module")
def speed_run(tiny_llama_ref, tmp_path_factory):
    """The baseline evaluated without llama.cpp speed, then the whole run with it on."""
    from tasks.report import write_report

    tmp = tmp_path_factory.mktemp("speed")
    off, _ = _recipe(tmp, tiny_llama_ref.path, llama=False)
    recipe, recipe_file = _recipe(tmp, tiny_llama_ref.path, llama=True)
    run_dir = tmp / "runs" / "tiny-speed"
    init_run(run_dir, recipe, str(recipe_file), tiny_llama_ref)
    stages = plan(recipe)
    first, _ = evaluate_stage(run_dir, stages[0], off, tiny_llama_ref)
    off_unit = (run_dir / stages[0].folder / LLAMA_CPP_FILE).exists()
    again, eval_reused = evaluate_stage(run_dir, stages[0], recipe, tiny_llama_ref)
    ref = tiny_llama_ref
    for stage in stages[1:]:
        record, _ = run_stage(run_dir, stage, recipe, ref, None)
        ref = ModelRef.from_json(record["model"])
        evaluate_stage(run_dir, stage, recipe, ref)
    rounds, rounds_reused = llama_cpp_rounds_unit(run_dir, recipe, tiny_llama_ref, ref)
    return {"run_dir": run_dir, "recipe": recipe, "stages": stages, "final": ref,
            "base": tiny_llama_ref, "rounds": rounds, "rounds_reused": rounds_reused,
            "paths": write_report(run_dir), "off_unit": off_unit,
            "eval_reused": eval_reused and first["key"] == again["key"]}


def test_turning_llama_cpp_speed_on_keeps_the_evaluation(speed_run):
    assert not speed_run["off_unit"]  # off: no unit at all
    assert speed_run["eval_reused"]  # on: the finished evaluation is reused, not redone


def test_every_stage_is_timed_in_llama_cpp_at_every_type(speed_run):
    from tasks.core.peak_memory import peak_rss_bytes

    parent_mb = peak_rss_bytes() / 2**20  # this process: torch and the run's models loaded
    grids = {}
    for stage in speed_run["stages"]:
        folder = speed_run["run_dir"] / stage.folder
        got = read_json(folder / LLAMA_CPP_FILE)
        assert got["refused"] is None and got["threads"] == 1
        assert (got["prompt_tokens"], got["new_tokens"]) == (32, 8)
        shipped = ["q4_0, embedding q4_0 (model.gguf)"] if stage.kind == "quantize" else []
        assert [r["type"] for r in got["rows"]] == ["f16", "q4_0", *shipped]
        for row in got["rows"]:
            assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0, row
            assert row["file_bytes"] > 0
            # the measuring process's own peak: not the parent's RSS (torch, the run's models)
            # that Linux hands a child's ru_maxrss at fork
            assert row["peak_rss_mb"] >= row["process_before_load_mb"] > 0
            assert row["process_before_load_mb"] < parent_mb / 2, (row, parent_mb)
            assert row["runtime"].startswith("llama.cpp (llama-cpp-python ")
            assert (row["prompt_tokens"], row["decode_tokens"], row["threads"]) == (32, 8, 1)
        grids[stage.kind] = {r["type"]: r["grid"] for r in got["rows"]}
        q4, f16 = got["rows"][1]["file_bytes"], got["rows"][0]["file_bytes"]
        assert q4 < f16
        assert not (folder / LLAMA_CPP_WORK).exists()  # no GGUF left behind
        assert (folder / LLAMA_CPP_DONE).is_file()
    assert grids["baseline"] == grids["prune"] == {"f16": "from-float", "q4_0": "from-float"}
    # RTN W4 sym g32 is the Q4_0 grid: written code for code; f16 holds the grid values
    assert grids["quantize"] == {"f16": "grid-f16", "q4_0": "exact",
                                 "q4_0, embedding q4_0 (model.gguf)": "shipped"}
    rows = read_json(speed_run["run_dir"] / "02-quantize" / LLAMA_CPP_FILE)["rows"]
    shipped_file = speed_run["run_dir"] / "02-quantize" / "model.gguf"
    assert rows[2]["file_bytes"] == shipped_file.stat().st_size < rows[1]["file_bytes"]
    assert rows[2]["base_type"] == "q4_0" and rows[2]["tensor_types"]["Q4_0"] > 0


def test_report_shows_speed_where_deployed_and_the_goal(speed_run):
    from tasks.report import browser

    paths = speed_run["paths"]
    data = json.loads(paths["json"].read_text())
    md = paths["markdown"].read_text()
    assert "## Speed where it is deployed" in md
    section = md.split("## Speed where it is deployed")[1].split("\n## ")[0]
    for stage in speed_run["stages"]:
        assert f"| {stage.folder} | llama.cpp | q4_0 |" in section
        assert f"| {stage.folder} | transformers (reference) | float32 |" in section
    assert "GPTQ grid, exact" in section and "threads 1" in section
    assert "llama-cpp-python" in section and "not knowable" in section
    summary = data["deploy_speed"]
    assert summary["final_stage"] == "02-quantize"
    # judged on the side-by-side rounds, not on the per-stage timings minutes apart
    assert summary["timing"] == "side by side, 2 interleaved rounds"
    assert "judged on side by side, 2 interleaved rounds" in section
    rows = {t["type"]: t for t in summary["by_type"]}
    timed = data["llama_cpp_rounds"]["rows"]
    base = {r["type"]: r for r in timed if r["stage"] == "00-baseline"}
    final = {r["type"]: r for r in timed if r["stage"] == "02-quantize"}
    assert rows.keys() == final.keys()
    assert rows["q4_0"]["decode_vs_baseline_f16"] == pytest.approx(
        final["q4_0"]["decode_tok_s"] / base["f16"]["decode_tok_s"])
    shipped = rows["q4_0, embedding q4_0 (model.gguf)"]  # judged against the baseline's q4_0
    assert shipped["decode_vs_baseline_same_type"] == pytest.approx(
        final["q4_0, embedding q4_0 (model.gguf)"]["decode_tok_s"] / base["q4_0"]["decode_tok_s"])
    assert "the stage's own GGUF, as shipped" in section
    assert rows["q4_0"]["decode_vs_baseline_same_type"] == pytest.approx(
        final["q4_0"]["decode_tok_s"] / base["q4_0"]["decode_tok_s"])
    assert rows["q4_0"]["bytes_vs_baseline_bf16"] == pytest.approx(
        final["q4_0"]["file_bytes"] / (2 * data["stages"][0]["eval"]["params"]))
    assert isinstance(summary["met"], bool)
    assert ("**met by" in section) == summary["met"] and "Goal for 02-quantize" in section
    html = paths["html"].read_text()
    assert "Speed where it is deployed" in html and "Speed goal (llama.cpp, final model)" in html
    assert 'data-json="stages.2.llama_cpp.rows.1.decode_tok_s"' in html
    assert 'data-json="deploy_speed.by_type.1.decode_vs_baseline_same_type"' in html
    assert 'data-json="llama_cpp_rounds.rows.4.decode_tok_s"' in html
    assert "Speed side by side (llama.cpp, baseline and final model)" in html
    for row in timed:  # every file of the rounds has its row in report.md
        assert f"| {row['stage']} | {row['type']} |" in section
        after = section.split(f"| {row['stage']} | {row['type']} |")[1]
        assert f"| {row['decode_tok_s']:.1f} |" in after.split("\n")[0]
    assert browser.check_dom(html, data)["mismatches"] == []


def test_speed_table_renders_in_chromium_with_the_report_numbers(speed_run):
    from tasks.report import browser

    if browser.find_chromium() is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    data = json.loads(speed_run["paths"]["json"].read_text())
    result = browser.check_rendered(speed_run["paths"]["html"], data)
    assert result["rendered"] and result["mismatches"] == [], result
    assert result["numbers_checked"] >= 3 * 9 + 2 * 3  # speed rows and goal ratios among them


def test_the_baseline_and_final_model_are_timed_side_by_side_in_rounds(speed_run):
    """Each file once per round, in a fresh process, the rounds interleaved: its rate is the
    median of its rounds; the exports are those of the per-stage units (same bytes, same
    grid) and are gone once timed."""
    import statistics

    folder = speed_run["run_dir"] / "02-quantize"
    assert speed_run["rounds"] is not None and not speed_run["rounds_reused"]
    got = read_json(folder / LLAMA_CPP_ROUNDS_FILE)
    assert (got["rounds"], got["threads"], got["prompt_tokens"], got["new_tokens"]) == \
        (2, 1, 32, 8)
    shipped = "q4_0, embedding q4_0 (model.gguf)"
    assert [(r["stage"], r["type"]) for r in got["rows"]] == [
        ("00-baseline", "f16"), ("00-baseline", "q4_0"), ("02-quantize", "f16"),
        ("02-quantize", "q4_0"), ("02-quantize", shipped)]
    assert len(got["load_average_1m"]) == 3  # before, and after each round
    for row in got["rows"]:
        rates = row["decode_rounds"]
        assert len(rates) == 2 and all(r > 0 for r in rates)
        assert row["decode_tok_s"] == pytest.approx(statistics.median(rates))
        assert row["decode_spread"] == [min(rates), max(rates)]
        assert row["prefill_tok_s"] > 0 and row["peak_rss_mb"] > 0
        assert row["runtime"].startswith("llama.cpp (llama-cpp-python ")
        per_stage = {r["type"]: r for r in read_json(
            speed_run["run_dir"] / row["stage"] / LLAMA_CPP_FILE)["rows"]}[row["type"]]
        assert (row["file_bytes"], row["grid"]) == (per_stage["file_bytes"], per_stage["grid"])
    assert got["rows"][4]["base_type"] == "q4_0"
    assert not (folder / LLAMA_CPP_ROUNDS_WORK).exists()  # no exported GGUF left behind
    assert (folder / LLAMA_CPP_ROUNDS_DONE).is_file()
    assert (folder / "model.gguf").is_file()  # the shipped file is timed, never removed


def test_the_final_model_card_states_the_side_by_side_ratios(speed_run):
    """The card a hub user reads carries the ratios the goal is judged on; earlier stages'
    cards do not (their files were not timed together with the base model's)."""
    got = read_json(speed_run["run_dir"] / "02-quantize" / LLAMA_CPP_ROUNDS_FILE)["rows"]
    base = {r["type"]: r for r in got if r["stage"] == "00-baseline"}
    card = (speed_run["final"].path / "README.md").read_text()
    for row in (r for r in got if r["stage"] == "02-quantize"):
        ref = base[row.get("base_type", row["type"])]
        assert (f"| decode, llama.cpp side by side with the base model ({row['type']} GGUF, "
                in card)
        assert (f"{row['decode_tok_s']:.1f} tokens/s, "
                f"{row['decode_tok_s'] / ref['decode_tok_s']:.2f}× the base model's "
                f"{ref['type']}") in card
    pruned = speed_run["run_dir"] / "01-prune" / "model" / "README.md"
    assert "side by side with the base model" not in pruned.read_text()


def test_finished_rounds_are_reused_and_changed_ones_redone(speed_run, capsys):
    run_dir, recipe = speed_run["run_dir"], speed_run["recipe"]
    file = run_dir / "02-quantize" / LLAMA_CPP_ROUNDS_FILE
    before = file.read_bytes()
    capsys.readouterr()
    record, reused = llama_cpp_rounds_unit(run_dir, recipe, speed_run["base"],
                                           speed_run["final"])
    assert reused and record is not None and file.read_bytes() == before
    assert "[02-quantize] llama.cpp side by side finished earlier: reused" in \
        capsys.readouterr().out
    # asked for no rounds: nothing is timed and the finished record is left as it was
    speed = recipe.evaluate.speed
    no_rounds = speed.model_copy(
        update={"llama_cpp": speed.llama_cpp.model_copy(update={"rounds": 0})})
    off = recipe.model_copy(
        update={"evaluate": recipe.evaluate.model_copy(update={"speed": no_rounds})})
    assert llama_cpp_rounds_unit(run_dir, off, speed_run["final"], speed_run["final"]) == \
        (None, False)
    assert file.read_bytes() == before


def test_a_finished_measurement_is_reused_and_a_changed_one_redone(speed_run, capsys):
    run_dir, stage, recipe = speed_run["run_dir"], speed_run["stages"][2], speed_run["recipe"]
    file = run_dir / stage.folder / LLAMA_CPP_FILE
    before = file.read_bytes()
    capsys.readouterr()
    _, reused = evaluate_stage(run_dir, stage, recipe, speed_run["final"])
    out = capsys.readouterr().out
    assert reused and f"[{stage.folder}] llama.cpp speed finished earlier: reused" in out
    assert file.read_bytes() == before

    file.write_text(file.read_text().replace('"threads": 1', '"threads": 9', 1))
    record, reused = llama_cpp_unit(run_dir / stage.folder, stage.folder, recipe,
                                    speed_run["final"])
    assert not reused and record is not None
    assert f"llama.cpp speed finished earlier but {LLAMA_CPP_FILE} changed" in \
        capsys.readouterr().out
    assert read_json(file)["threads"] == 1


def test_an_architecture_without_gguf_mapping_is_one_line_not_a_failure(tmp_path, capsys,
                                                                        smollm2_ref):
    """GPT-2 has no GGUF writer in pkdq: the unit records why, once, and the report says so."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from tasks.core.model_folder import model_ref
    from tasks.report.deploy_speed import speed_rows

    tok = AutoTokenizer.from_pretrained(str(smollm2_ref.path))
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2,
                               n_positions=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    ref = model_ref(folder)
    recipe, _ = _recipe(tmp_path, smollm2_ref.path, llama=True)
    unit = tmp_path / "00-baseline"
    unit.mkdir()
    record, reused = llama_cpp_unit(unit, "00-baseline", recipe, ref)
    assert record is not None and not reused
    got = read_json(unit / LLAMA_CPP_FILE)
    assert got["rows"] == [] and "GPT2LMHeadModel" in got["refused"]
    assert "\n" not in got["refused"]
    assert "[00-baseline] llama.cpp speed not measured: GGUF export writes" in \
        capsys.readouterr().out
    _, reused = llama_cpp_unit(unit, "00-baseline", recipe, ref)
    assert reused
    rows = speed_rows({"stages": [{"stage": "00-baseline", "llama_cpp": got, "eval": None}]})
    assert rows[0][3].startswith("not measured: GGUF export writes")


def _stage(name: str, rows: list[dict] | None, params: int | None = None) -> dict:
    return {"stage": name, "eval": {"params": params} if params else None,
            "llama_cpp": None if rows is None else {"rows": rows, "refused": None}}


def _timed(qtype: str, decode: float, mb: float) -> dict:
    return {"type": qtype, "decode_tok_s": decode, "file_bytes": mb * 1e6}


def test_goal_is_judged_on_the_final_model_against_the_baseline():
    """SmolLM2-like numbers: baseline 135M params (270 MB in bf16), f16 36 tok/s, q4_0 55."""
    from tasks.report.deploy_speed import deploy_summary

    base = _stage("00-baseline", [_timed("f16", 36.0, 270.9), _timed("q4_0", 55.0, 91.7)],
                  params=135_000_000)
    hit = deploy_summary([base, _stage("01-prune", []),
                          _stage("02-quantize", [_timed("q4_0", 72.0, 80.0)])])
    (row,) = hit["by_type"]
    assert row["decode_vs_baseline_f16"] == pytest.approx(2.0)
    assert row["decode_vs_baseline_same_type"] == pytest.approx(72 / 55)
    assert row["bytes_vs_baseline_bf16"] == pytest.approx(80 / 270)
    assert hit["met"] and hit["met_by"] == ["q4_0"] and hit["final_stage"] == "02-quantize"
    # 1% slower: decode below 2x the f16 baseline, and the goal is not met
    miss = deploy_summary([base, _stage("02-quantize", [_timed("q4_0", 71.3, 80.0)])])
    assert not miss["met"] and miss["by_type"][0]["met"] is False
    # fast enough but too big
    big = deploy_summary([base, _stage("02-quantize", [_timed("q4_0", 90.0, 82.0)])])
    assert not big["met"]
    # a type the baseline was not timed at cannot be judged
    k = deploy_summary([base, _stage("02-quantize", [_timed("q4_k_m", 90.0, 60.0)])])
    assert k["by_type"][0]["met"] is None and not k["met"]
    # a final model llama.cpp could not take judges nothing; no baseline record: not judged
    refused = _stage("02-quantize", [])
    refused["llama_cpp"]["refused"] = "GGUF export writes llama, ... only"
    assert deploy_summary([base, refused])["by_type"] == []
    assert deploy_summary([_stage("00-baseline", None, 10), refused]) is None


def test_goal_is_judged_on_the_side_by_side_rounds_when_they_were_timed():
    """The per-stage timings say the final q4_0 decodes 2x the f16 baseline (minutes apart);
    the rounds, timed together, say 1.5x: the rounds judge. Failed rounds leave the per-stage
    verdict, and say so."""
    from tasks.report.deploy_speed import deploy_summary

    base = _stage("00-baseline", [_timed("f16", 36.0, 270.9), _timed("q4_0", 55.0, 91.7)],
                  params=135_000_000)
    final = _stage("02-quantize", [_timed("q4_0", 72.0, 80.0)])
    rounds = {"rounds": 3, "rows": [
        {"stage": "00-baseline", **_timed("f16", 48.0, 270.9)},
        {"stage": "00-baseline", **_timed("q4_0", 60.0, 91.7)},
        {"stage": "02-quantize", **_timed("q4_0", 72.0, 80.0)},
        {"stage": "02-quantize", "type": "q8_0", "refused": "no"}]}
    side = deploy_summary([base, final], rounds)
    (row,) = side["by_type"]
    assert row["decode_vs_baseline_f16"] == pytest.approx(1.5)
    assert row["decode_vs_baseline_same_type"] == pytest.approx(1.2)
    assert not side["met"] and side["timing"] == "side by side, 3 interleaved rounds"
    per_stage = deploy_summary([base, final], {**rounds, "error": "llama.cpp failed"})
    assert per_stage["met"] and per_stage["timing"] == "each stage's own timing, minutes apart"
    assert deploy_summary([base, final], None)["by_type"] == per_stage["by_type"]
    # rounds but no per-stage records: still judged, on the rounds
    bare = deploy_summary([_stage("00-baseline", None, 135_000_000),
                           _stage("02-quantize", None)], rounds)
    assert bare["by_type"][0]["decode_vs_baseline_f16"] == pytest.approx(1.5)
