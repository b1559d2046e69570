"""Nothing altered is reused, one process writes a run folder, a full disk is one line.

Real files, the tiny Llama, the real pipeline (in-process: a prune on the tiny model takes about
a second) and, where the command line is the subject, `python -m pkdq` in a subprocess.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tasks.core.common import REPO_ROOT, ModelRef, read_json
from tasks.core.model_folder import MANIFEST_FILE, check_folder, checked_model_ref
from tasks.core.recipe import load_recipe
from tasks.pipeline import evaluate_stage, plan, run_stage, run_unit
from tasks.run_folder import HOLDER_FILE, hold_run_folder

# The smallest evaluation that still writes per-doc samples: one task, two docs, no rolling
# WikiText pages, no speed runs.
QUICK_EVAL = {"tasks": ["arc_easy"], "samples": 2, "batch_size": 4,
              "wikitext": {"tokens": 256, "max_length": 64, "pages": 0},
              "speed": {"enabled": False}}


def _recipe_file(tmp_path: Path, model: Path, quantize: bool = False,
                 name: str = "tiny-integrity") -> Path:
    stages: list[dict] = [{"prune": {"ffn": {"ratio": 0.5},
                                     "calibration": {"samples": 2, "seq_len": 32}}}]
    if quantize:
        stages.append({"quantize": {"method": "rtn", "bits": 4, "group_size": 32,
                                    "calibration": {"source": "c4", "samples": 2,
                                                    "seq_len": 32}}})
    raw = {"name": name, "model": str(model), "seed": 7, "threads": 1, "stages": stages,
           "evaluate": QUICK_EVAL}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _pkdq(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pkdq", *args], cwd=REPO_ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)


def test_overwritten_weights_are_recomputed_to_the_same_model(tiny_llama_ref, tmp_path, capsys):
    """Same size, same mtime, other bytes: only a content hash sees it."""
    recipe = load_recipe(str(_recipe_file(tmp_path, tiny_llama_ref.path)))
    prune = plan(recipe)[1]
    run_dir = tmp_path / "run"
    first, _ = run_stage(run_dir, prune, recipe, tiny_llama_ref, None)
    pruned = ModelRef.from_json(first["model"])
    # a downstream unit fed by the pruned model (here: pruned once more)
    downstream, _ = run_unit(run_dir / "02-prune", "02-prune", "prune", prune.config, recipe,
                             pruned, None)

    weights = run_dir / "01-prune" / "model" / "model.safetensors"
    before = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # zero the last 64 bytes of the last tensor
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.stat().st_size == before.st_size
    capsys.readouterr()

    again, reused = run_stage(run_dir, prune, recipe, tiny_llama_ref, None)
    out = capsys.readouterr().out
    assert not reused
    line = next(x for x in out.splitlines() if "finished earlier but" in x)
    assert line.startswith("[01-prune] finished earlier but model/model.safetensors changed "
                           "(sha256 ") and line.endswith("recorded): recomputing"), line
    assert again["model"]["fingerprint"] == first["model"]["fingerprint"]
    assert check_folder(weights.parent, first["model"]["fingerprint"]) is None
    # Downstream keys follow the input's content, which is byte-identical again: the unit is
    # reused (its own files checked too). Had the recomputed model differed, its fingerprint,
    # hence every downstream key, would have too.
    later, reused = run_unit(run_dir / "02-prune", "02-prune", "prune", prune.config, recipe,
                             ModelRef.from_json(again["model"]), None)
    assert reused and later == downstream


def test_truncated_weights_and_changed_records_are_recomputed(tiny_llama_ref, tmp_path, capsys):
    recipe = load_recipe(str(_recipe_file(tmp_path, tiny_llama_ref.path)))
    prune = plan(recipe)[1]
    run_dir = tmp_path / "run"
    first, _ = run_stage(run_dir, prune, recipe, tiny_llama_ref, None)
    weights = run_dir / "01-prune" / "model" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(size - 10)
    capsys.readouterr()
    again, reused = run_stage(run_dir, prune, recipe, tiny_llama_ref, None)
    assert not reused
    assert (f"[01-prune] finished earlier but model/model.safetensors changed (size {size - 10}"
            f" != {size} recorded): recomputing") in capsys.readouterr().out
    assert again["model"]["fingerprint"] == first["model"]["fingerprint"]
    assert weights.stat().st_size == size

    # A file added to the sealed folder, and the stage's own metrics, count as well.
    (weights.parent / "extra.safetensors").write_bytes(b"x")
    run_stage(run_dir, prune, recipe, tiny_llama_ref, None)
    assert ("[01-prune] finished earlier but model/extra.safetensors was added: recomputing"
            in capsys.readouterr().out)
    metrics = run_dir / "01-prune" / "metrics.json"
    metrics.write_text(metrics.read_text().replace('"prune"', '"prunE"', 1))
    _, reused = run_stage(run_dir, prune, recipe, tiny_llama_ref, None)
    assert not reused
    assert "finished earlier but metrics.json changed (sha256" in capsys.readouterr().out
    _, reused = run_stage(run_dir, prune, recipe, tiny_llama_ref, None)
    assert reused


def test_changed_evaluation_is_recomputed(tiny_llama_ref, tmp_path, capsys):
    recipe = load_recipe(str(_recipe_file(tmp_path, tiny_llama_ref.path)))
    baseline = plan(recipe)[0]
    run_dir = tmp_path / "run"
    first, _ = evaluate_stage(run_dir, baseline, recipe, tiny_llama_ref)
    folder = run_dir / "00-baseline"
    scores = read_json(folder / "eval.json")["tasks"]["arc_easy"]
    assert set(first["files"]) == {"eval.json", "eval/eval.json", "eval/eval_samples.json",
                                   "eval/generations.json", "metrics.json"}

    altered = read_json(folder / "eval.json")
    altered["tasks"]["arc_easy"]["acc"] = 1.0  # a "better" score written by hand
    (folder / "eval.json").write_text(json.dumps(altered, indent=2))
    capsys.readouterr()
    _, reused = evaluate_stage(run_dir, baseline, recipe, tiny_llama_ref)
    assert not reused
    assert "[00-baseline] evaluation finished earlier but eval.json changed (" in \
        capsys.readouterr().out
    assert read_json(folder / "eval.json")["tasks"]["arc_easy"]["acc"] == scores["acc"]

    samples = folder / "eval" / "eval_samples.json"
    samples.write_text(samples.read_text()[:-20])
    _, reused = evaluate_stage(run_dir, baseline, recipe, tiny_llama_ref)
    assert not reused
    assert ("[00-baseline] evaluation finished earlier but eval/eval_samples.json changed (size"
            in capsys.readouterr().out)
    _, reused = evaluate_stage(run_dir, baseline, recipe, tiny_llama_ref)
    assert reused


def test_input_folder_changed_since_sealing_gets_its_real_fingerprint(tiny_llama_ref, tmp_path,
                                                                      capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_ref.path, copy)
    assert checked_model_ref(copy).fingerprint == tiny_llama_ref.fingerprint
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")
    ref = checked_model_ref(copy)
    assert ref.fingerprint != tiny_llama_ref.fingerprint
    assert "config.json changed (size" in capsys.readouterr().out
    assert (copy / MANIFEST_FILE).is_file()


def test_compare_cache_is_refreshed_for_a_changed_unit(tiny_llama_ref, tmp_path):
    """The compare flow's Prefect cache may stand in only for an intact unit folder.

    No capsys here: Prefect binds its console handler to the sys.stderr of its first import,
    and capsys closes its stream after the test, breaking every later flow in the session.
    """
    from flows.compare import REFRESH, _cache_options, _ensure_folder

    recipe = load_recipe(str(_recipe_file(tmp_path, tiny_llama_ref.path)))
    folder = tmp_path / "units" / "abc-prune"
    assert _cache_options(folder, "abc-prune") == REFRESH  # nothing there yet
    record, _ = run_unit(folder, "P-Q prune", "prune", plan(recipe)[1].config, recipe,
                         tiny_llama_ref, None)
    assert _cache_options(folder, "abc-prune") == {}
    model = folder / "model"

    class Done:
        def result(self) -> dict[str, str]:
            return {"path": str(model.resolve()), "fingerprint": record["model"]["fingerprint"]}

    _ensure_folder(Done(), str(tmp_path))
    (model / "model.safetensors").write_bytes(b"")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert _cache_options(folder, "abc-prune") == REFRESH
    assert printed.getvalue().startswith(
        "[compare] abc-prune: model/model.safetensors changed (size 0 != ")
    with pytest.raises(RuntimeError, match=r"model.safetensors changed \(size 0 != \d+ recorded"
                                           r"\) after its step finished"):
        _ensure_folder(Done(), str(tmp_path))


def test_second_run_on_a_held_folder_exits_2_naming_the_holder(tiny_llama_ref, tmp_path):
    recipe = _recipe_file(tmp_path, tiny_llama_ref.path)
    run_dir = tmp_path / "runs" / "tiny-integrity"
    with hold_run_folder(run_dir, command="pkdq run first-one"):
        done = _pkdq(["run", str(recipe), "--runs-dir", str(tmp_path / "runs")])
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {run_dir} is in use by pid {os.getpid()} on host "
                                f"{socket.gethostname()} since "), lines
    assert lines[-1].endswith(" (pkdq run first-one); wait for it or use another --run-id")
    assert "Traceback" not in done.stderr + done.stdout
    assert not (run_dir / "run.json").exists()  # nothing of the holder's was touched
    assert not (run_dir / HOLDER_FILE).exists()  # the holder released it on leaving


HOLD_AND_DIE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from tasks.run_folder import hold_run_folder
    with hold_run_folder(Path(sys.argv[1]), command="pkdq run doomed"):
        os.kill(os.getpid(), signal.SIGKILL)  # dies holding it, as a crash or kill -9 would
""")


def test_lock_of_a_killed_holder_is_taken_over_and_the_run_finishes(tiny_llama_ref, tmp_path,
                                                                     capsys):
    recipe = load_recipe(str(_recipe_file(tmp_path, tiny_llama_ref.path)))
    run_dir = tmp_path / "run"
    child = subprocess.run([sys.executable, "-c", HOLD_AND_DIE, str(run_dir)], env=_env(),
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    holder = read_json(run_dir / HOLDER_FILE)
    assert holder["command"] == "pkdq run doomed" and holder["pid"] != os.getpid()
    with hold_run_folder(run_dir):
        out = capsys.readouterr().out
        assert (f"[run] {run_dir} was left locked by pid {holder['pid']} on host "
                f"{holder['host']}") in out and "which is gone: taking it over" in out
        assert read_json(run_dir / HOLDER_FILE)["pid"] == os.getpid()
        record, reused = run_stage(run_dir, plan(recipe)[1], recipe, tiny_llama_ref, None)
    assert not reused and (run_dir / "01-prune" / "stage.json").is_file()
    assert not (run_dir / HOLDER_FILE).exists()


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child, before exec: SIG_IGN survives exec, so writes get EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_full_is_one_line_and_the_unit_stays_unfinished(tiny_llama_ref, tmp_path):
    """EFBIG from RLIMIT_FSIZE stands in for ENOSPC: the same code path, no device to fill."""
    recipe_file = _recipe_file(tmp_path, tiny_llama_ref.path)
    weights = (tiny_llama_ref.path / "model.safetensors").stat().st_size
    limit = 4 << 20
    assert weights > limit  # the prune's saved model (half the FFN) is still over the limit
    runs = tmp_path / "runs"
    prefect = tmp_path / "prefect"  # its database stays under the limit
    env = {**_env(), "PREFECT_HOME": str(prefect),
           "PREFECT_LOCAL_STORAGE_PATH": str(prefect / "storage")}
    done = subprocess.run([sys.executable, "-m", "pkdq", "run", str(recipe_file), "--runs-dir",
                           str(runs)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600, preexec_fn=_file_size_limit(limit))
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-4000:]
    run_dir = runs / "tiny-integrity"
    errors = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert errors == [f"error: disk full while writing {run_dir}/01-prune/model.partial/"
                      "model.safetensors: free space and rerun"], output[-4000:]
    # the error is the last line but for Prefect's own log line on stopping its API server
    last = [x for x in done.stderr.strip().splitlines() if "Stopping temporary server" not in x]
    assert last[-1] == errors[0]
    assert "Traceback" not in output, output[-4000:]
    # the unfinished attempt is cleared (space freed): no record, no sealed or partial model
    assert list((run_dir / "01-prune").iterdir()) == []
    assert (run_dir / "00-baseline" / "eval.json.done").is_file()
    assert read_json(run_dir / "run.json")["status"] == "failed"

    # Space freed: the rerun finishes the unit.
    recipe = load_recipe(str(recipe_file))
    record, reused = run_stage(run_dir, plan(recipe)[1], recipe, tiny_llama_ref, None)
    assert not reused and check_folder(Path(record["model"]["path"]),
                                       record["model"]["fingerprint"]) is None
