"""Recipe files for the tiny random Llama, shared by the flow and comparison tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def tiny_recipe_raw(model_path: Path, name: str = "tiny-run") -> dict[str, Any]:
    return {
        "name": name,
        "model": str(model_path),
        "seed": 7,
        "threads": 1,
        "stages": [
            {"prune": {"ffn": {"ratio": 0.5}, "calibration": {"samples": 4, "seq_len": 32}}},
            {"distill": {"tokens": 256, "seq_len": 32, "batch_size": 2, "lr": 1e-3}},
            {"quantize": {"method": "rtn", "bits": 4, "group_size": 32,
                          "calibration": {"source": "c4", "samples": 2, "seq_len": 32}}},
        ],
        # The as-served pass, the generations (test_model_card), the speed probe and lm-eval's
        # rolling WikiText pages (test_evaluate) have their own tests; flow, resume and
        # comparison tests don't pay for them on every unit.
        "evaluate": {"tasks": ["arc_easy", "piqa"], "samples": 4, "batch_size": 4,
                     "wikitext": {"tokens": 512, "max_length": 128, "pages": 0},
                     "speed": {"enabled": False}, "served": False,
                     "generations": {"enabled": False}},
    }


def write_recipe(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def tiny_recipe(tmp_path: Path, model_path: Path, name: str = "tiny-run") -> Path:
    return write_recipe(tmp_path, tiny_recipe_raw(model_path, name))


def tiny_resume_recipe(tmp_path: Path, model_path: Path, name: str = "tiny-resume") -> Path:
    """`tiny_recipe` for a test that restarts a run a dozen times: KD long enough to be killed
    mid-training after a checkpoint (16 steps, a checkpoint every 2), evaluation trimmed to what
    each unit still needs to show (2 docs per task, a short WikiText slice, no lm-eval rolling
    pages, no speed measurement: timings are not compared anyway)."""
    raw = tiny_recipe_raw(model_path, name)
    raw["stages"][1]["distill"].update(tokens=1024, checkpoint_every=2)
    raw["evaluate"] = {"tasks": ["arc_easy", "piqa"], "samples": 2, "batch_size": 4,
                       "wikitext": {"tokens": 256, "max_length": 64, "pages": 0},
                       "speed": {"enabled": False}, "served": False,
                       "generations": {"enabled": False}}
    return write_recipe(tmp_path, raw)
