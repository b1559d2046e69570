"""Where a run's wall time went, read from finished run folders, side by side.

Two runs of the same recipe on the same machine (say the previous commit's and this one's, run
one after the other under one lock, as the default's timing on 2026-12-03 was) differ in
parts this machine's drift touches too; the parts a change did not touch (baseline evaluation,
GPTQ, KD) show how much of a gap is the machine. Every number comes from the run folder's own
records: stage and unit `wall_s`, and the total from run.json's `created` to report.md.

    .venv/bin/python bench/run_wall_time.py --out default_wall_time \\
        'old (50f5731)=/tmp/runs-old/smollm2-ffn12-kd-w4-gguf' \\
        'new=/tmp/runs-new2/smollm2-ffn12-kd-w4-gguf'

Writes bench/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.publish import publish  # noqa: E402
from bench.run_records import created_s, read_record  # noqa: E402


def parts(run_dir: Path) -> dict[str, float | None]:
    """Seconds per part of one run folder, in the order a run spends them."""
    run = read_record(run_dir / "run.json")
    created = created_s(run)
    out: dict[str, float | None] = {
        "total (run.json created -> report.md written)":
            (run_dir / "report.md").stat().st_mtime - created}
    for folder in run["stages"]:
        stage = run_dir / folder
        metrics, ev = read_record(stage / "metrics.json"), read_record(stage / "eval.json")
        if "stage_wall_s" in metrics:
            out[f"{folder}: stage"] = metrics["stage_wall_s"]
        if "equalize" in metrics:
            out[f"{folder}:   scale search (equalize)"] = metrics["equalize"].get("wall_s")
            out[f"{folder}:   GPTQ"] = metrics.get("wall_s")
        q8 = (metrics.get("gguf") or {}).get("q8_layers") or {}
        if "wall_s" in q8:
            out[f"{folder}:   Q8_0 layer choice"] = q8["wall_s"]
        if "train_s" in metrics:
            out[f"{folder}:   KD training"] = metrics["train_s"]
            out[f"{folder}:   KD tokens/s"] = metrics.get("tokens_per_s")
        out[f"{folder}: evaluation"] = ev.get("wall_s")
        if (ev.get("gguf") or {}).get("wall_s") is not None:
            out[f"{folder}:   model.gguf scored in llama.cpp"] = ev["gguf"]["wall_s"]
        speed = ev.get("speed") or {}
        if speed.get("decode_tokens_per_s"):  # warm-up (prefill + 4 steps) + timed passes
            step = 1 / speed["decode_tokens_per_s"]
            timed = (speed["prefill_s"] + speed["decode_tokens"] * step) * speed["repeats"]
            out[f"{folder}:   transformers timing (about)"] = timed + speed["prefill_s"] + 4 * step
        if (ev.get("generations") or {}).get("wall_s") is not None:
            out[f"{folder}:   generations"] = ev["generations"]["wall_s"]
        out[f"{folder}: llama.cpp speed"] = read_record(stage / "llama_cpp.json").get("wall_s")
        rounds = read_record(stage / "llama_cpp_rounds.json")
        if rounds:
            out[f"{folder}: llama.cpp side by side ({rounds.get('rounds')} rounds)"] = \
                rounds.get("wall_s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=RUN_DIR")
    parser.add_argument("--out", default="run_wall_time")
    args = parser.parse_args()
    runs = {name: Path(path) for name, _, path in (r.partition("=") for r in args.runs)}
    missing = [str(p) for p in runs.values() if not (p / "report.md").is_file()]
    if missing:
        raise SystemExit(f"not a finished run folder: {', '.join(missing)}")
    measured = {name: parts(path) for name, path in runs.items()}
    out = {"runs": {name: str(path) for name, path in runs.items()}, "parts": measured,
           "command": ".venv/bin/python bench/run_wall_time.py --out "
                      f"{args.out} " + " ".join(f"'{r}'" for r in args.runs),
           "date": time.strftime("%Y-%m-%d")}
    publish(args.out, out, render(out))


def render(out: dict[str, Any]) -> str:
    names = list(out["parts"])
    keys = list(dict.fromkeys(k for parts_ in out["parts"].values() for k in parts_))

    def cell(value: float | None, key: str = "") -> str:
        if value is None:
            return "–"
        if "tokens/s" in key:
            return f"{value:.0f}"
        return f"{value:.0f} s" if value < 120 else f"{value:.0f} s ({value / 60:.1f} min)"

    lines = ["# Where a run's wall time went", "", __doc__.split("\n\n")[1].replace("\n", " "),
             "", f"Measured {out['date']}; run folders: "
             + "; ".join(f"{n} = `{p}`" for n, p in out["runs"].items()) + ".", "",
             "| part | " + " | ".join(names) + " |",
             "| --- |" + " ---: |" * len(names)]
    for key in keys:
        lines.append(f"| {key} | "
                     + " | ".join(cell(out["parts"][n].get(key), key) for n in names) + " |")
    lines += ["", f"Command: `{out['command']}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
