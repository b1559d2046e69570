"""The family matrix (model family x stage), each cell one test of tests/test_families.py.

    python bench/family_matrix.py                      # runs the tests (a few CPU minutes)
    python bench/family_matrix.py --junit results.xml  # tabulates an existing pytest run

Writes bench/results/family_matrix.md: `pass` / `FAIL` / `skip` per cell, plus the per-family
BOS-convention test (every path's first token checked) and how long each cell took; then every
test of tests/test_depgraph_prune.py (architectures outside the families, pruned through
torch-pruning's dependency graph or refused in one line).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "family_matrix.md"
CELL = re.compile(r"test_matrix\[(\w+)-([\w-]+)\]")
BOS = re.compile(r"test_every_path_follows_the_family_bos_convention\[(\w+)\]")


def run_tests(junit: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_families.py",
                    "tests/test_depgraph_prune.py", "-p", "no:cacheprovider",
                    f"--junitxml={junit}"], cwd=REPO, env=env,
                   check=False)


def outcomes(junit: Path) -> dict[tuple[str, str], tuple[str, float]]:
    cells: dict[tuple[str, str], tuple[str, float]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name", "")
        state = "pass"
        if case.find("failure") is not None or case.find("error") is not None:
            state = "FAIL"
        elif case.find("skipped") is not None:
            state = "skip"
        seconds = float(case.get("time", 0))
        if m := CELL.fullmatch(name):
            cells[(m[1], m[2])] = (state, seconds)
        elif m := BOS.fullmatch(name):
            cells[(m[1], "bos-every-path")] = (state, seconds)
    return cells


def outside_families(junit: Path) -> str:
    """One row per test of tests/test_depgraph_prune.py: what it shows and its outcome."""
    lines = ["| test (tests/test_depgraph_prune.py) | outcome |", "| --- | --- |"]
    for case in ET.parse(junit).getroot().iter("testcase"):
        if not case.get("classname", "").endswith("test_depgraph_prune"):
            continue
        state = "FAIL" if case.find("failure") is not None or case.find("error") is not None \
            else "skip" if case.find("skipped") is not None else "pass"
        lines.append(f"| `{case.get('name')}` | {state} ({float(case.get('time', 0)):.0f}s) |")
    return "\n".join(lines)


def table(cells: dict[tuple[str, str], tuple[str, float]]) -> str:
    families = list(dict.fromkeys(f for f, _ in cells))
    stages = list(dict.fromkeys(s for _, s in cells))
    lines = ["| family | " + " | ".join(stages) + " |",
             "| --- | " + " | ".join("---" for _ in stages) + " |"]
    for fam in families:
        row = []
        for stage in stages:
            state, secs = cells.get((fam, stage), ("-", 0.0))
            row.append(f"{state} ({secs:.0f}s)" if state != "-" else "-")
        lines.append(f"| {fam} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--junit", type=Path, help="tabulate this pytest junit XML")
    args = parser.parse_args()
    junit = args.junit or REPO / "bench" / "results" / "family_matrix.xml"
    if args.junit is None:
        run_tests(junit)
    text = (
        "# Family matrix: model family x stage\n\n"
        "Each cell is one test in `tests/test_families.py` on a tiny random model built from "
        "the family's config (`tests/families.py`). prune-*: the axis is cut, the checkpoint "
        "reloads in stock transformers with identical logits and generates the same with and "
        "without KV cache; kd: 2 KD steps from the unpruned teacher; rtn/gptq: 4-bit, group 32, "
        "logits close to float; gguf: f16 GGUF run in llama.cpp (Llama and Mistral as `llama`, "
        "also read back by transformers; Qwen2, Qwen3, Gemma 3 as `qwen2`, `qwen3`, `gemma3`): "
        "logits agree with pkdq's torch loader on the same ids and llama.cpp's own tokenizer "
        "gives those ids (BOS by the family's convention); "
        "evaluate: arc_easy + WikiText through pkdq's lm-eval backend; bos-every-path: "
        "calibration, KD, held-out, GPTQ calibration, WikiText windows and the lm-eval backend "
        "open with BOS exactly when the family expects it.\n\n"
        f"Command: `python bench/family_matrix.py` (junit: `{junit.name}`).\n\n"
        + table(outcomes(junit)) + "\n\n"
        "## Outside the families: torch-pruning's dependency graph\n\n"
        "Decoder-only architectures outside the five families (`tasks/prune/depgraph.py`): FFN "
        "neurons on OPT, GPT-NeoX, Phi and Phi-3 (fused gate_up), whole heads on Phi; the "
        "checkpoint reloads in stock transformers with identical logits. What the config cannot "
        "express (derived head_dim, fused q/k/v, Conv1D, encoder-decoder, depth/hidden) is "
        "refused in one line naming the supported families.\n\n"
        + outside_families(junit) + "\n")
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
