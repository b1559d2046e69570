"""Recipe files for the tiny random Llama, shared by the flow and comparison tests."""

from __future__ import annotations

from pathlib import Path

import yaml


def tiny_recipe(tmp_path: Path, model_path: Path, name: str = "tiny-run") -> Path:
    raw = {
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
        "evaluate": {"tasks": ["arc_easy", "piqa"], "samples": 4, "batch_size": 4,
                     "wikitext": {"tokens": 512, "max_length": 128}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path
