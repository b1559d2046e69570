"""The real Prefect flow on the tiny Llama: full run, report, and resume after a hard kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tiny_recipes import tiny_recipe

from tasks.core.common import REPO_ROOT, read_json
from tasks.core.recipe import load_recipe
from tasks.pipeline import plan, run_stage


def test_partial_stage_folder_is_redone_and_finished_one_reused(tiny_llama_ref, tmp_path):
    recipe = load_recipe(str(tiny_recipe(tmp_path, tiny_llama_ref.path)))
    prune = plan(recipe)[1]
    run_dir = tmp_path / "run"
    (run_dir / prune.folder / "model").mkdir(parents=True)
    (run_dir / prune.folder / "model" / "junk.safetensors").write_text("half-written")
    record, reused = run_stage(run_dir, prune, recipe, tiny_llama_ref, None)
    assert not reused
    assert not (run_dir / prune.folder / "model" / "junk.safetensors").exists()
    again, reused = run_stage(run_dir, prune, recipe, tiny_llama_ref, None)
    assert reused and again == record
    # A different config is a different key: the stage reruns.
    other = load_recipe(str(tiny_recipe(tmp_path, tiny_llama_ref.path, "other")))
    changed = other.model_copy(update={"seed": 8})
    _, reused = run_stage(run_dir, prune, changed, tiny_llama_ref, None)
    assert not reused


def _pkdq(args: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pkdq", *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kwargs)


def test_flow_runs_and_resumes_after_kill(tiny_llama_ref, tmp_path):
    recipe = tiny_recipe(tmp_path, tiny_llama_ref.path)
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = _pkdq(["run", str(recipe), "--runs-dir", str(runs), "--verbose"], env)
    marker = runs / "tiny-run" / "01-prune" / "stage.json"
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert marker.exists(), first.communicate()[0][-3000:]
    os.killpg(first.pid, signal.SIGKILL)  # a hard kill mid-run, as a crash would
    verbose_terminal = first.communicate()[0]
    prune_record = marker.read_text()
    prune_mtime = marker.stat().st_mtime

    second = _pkdq(["run", str(recipe), "--runs-dir", str(runs)], env)
    output = second.communicate(timeout=900)[0]
    assert second.returncode == 0, output[-4000:]
    assert "[01-prune] finished earlier" in output
    assert "which is gone: taking it over" in output  # the killed run's folder lock
    # lm-eval runs with the real print: no bytecode listing from dill leaks into the run log
    assert "RETURN_VALUE" not in output and "LOAD_GLOBAL" not in output, output[-4000:]
    assert marker.read_text() == prune_record and marker.stat().st_mtime == prune_mtime

    run_dir = runs / "tiny-run"
    run = read_json(run_dir / "run.json")
    assert run["status"] == "finished" and run["attempts"] == 2
    for folder in ["00-baseline", "01-prune", "02-distill", "03-quantize"]:
        assert (run_dir / folder / "eval.json").is_file(), folder
    for folder in ["01-prune", "02-distill", "03-quantize"]:
        metrics = read_json(run_dir / folder / "metrics.json")
        assert metrics["stage_wall_s"] > 0
    report = json.loads((run_dir / "report.json").read_text())
    quant = report["stages"][3]["retention"]
    assert quant["benchmarks"]["arc_easy"]["n"] == 4
    assert quant["size"]["bytes_ratio"] < 1.0
    md = (run_dir / "report.md").read_text()
    assert "03-quantize" in md and "arc_easy" in md
    assert "status **finished**" in md

    _check_terminal(verbose_terminal, output, (run_dir / "run.log").read_text())

    # pkdq report rebuilds from the folder alone.
    rebuilt = subprocess.run([sys.executable, "-m", "pkdq", "report", str(run_dir)],
                             cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "Retention per benchmark" in rebuilt.stdout


# Library lines of a tiny run: Prefect's per-task INFO lines, GPTQModel's banner and tables, the
# startup warnings of torch/torchao/accelerate (these come and go with library versions).
PREFECT_CHATTER = ("| INFO    | Task run", "Finished in state Completed()", "Beginning flow run")
LIBRARY_NOISE = (*PREFECT_CHATTER, "GPT-QModel", "INFO  Kernel:", "_pytree.py", "torchao",
                 "Failed to load", "recompil", "| WARNING |", "Loading weights")


def _check_terminal(verbose: str, default: str, log: str) -> None:
    """pkdq's lines on the terminal, library output only in run.log (and with --verbose)."""
    for text in LIBRARY_NOISE:
        assert text not in default, f"{text!r} on the terminal:\n{default[-3000:]}"
    for text in ("[02-distill] step 4/4 |", "tok/s", "ETA", "[03-quantize] starting",
                 "[evaluate] piqa: acc_norm", "[01-prune] finished earlier",
                 "[03-quantize] done", "pkdq: finished; report at"):
        assert text in default, f"{text!r} missing:\n{default[-3000:]}"
        assert text in log, text
    for text in (*PREFECT_CHATTER, "GPT-QModel", "INFO  Kernel:"):
        assert text in log, text
    # the verbose first attempt (killed after prune) showed the library lines as they came
    assert "| INFO    | Task run" in verbose and "[00-baseline] evaluating" in verbose
    assert sum(line in log for line in verbose.splitlines()) >= len(verbose.splitlines()) - 1
    headers = [line for line in log.splitlines() if line.startswith("==== ")]
    assert len(headers) == 2  # one header per attempt: run.log is appended to


@pytest.mark.parametrize("missing", ["no-such-model-xyz", "/nonexistent/folder"])
def test_missing_model_is_one_line(tmp_path, missing):
    from tasks.core.model_store import ModelNotFoundError, resolve_model

    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(missing)
    assert "\n" not in str(info.value) and "never downloads" in str(info.value)
