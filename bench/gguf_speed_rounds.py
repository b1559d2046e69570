"""GGUF files timed in llama.cpp side by side, in interleaved rounds, so drift cancels.

A run's own speed table times each stage right after that stage's evaluation, minutes apart,
and this machine's speed drifts by ±15% over minutes (measured: the same q4_0 file at 55 and
63 tok/s in one run). Ratios such as "decode vs the baseline" need the files timed together:
here every round times every file once (`tasks.quantize.speed_rounds.interleaved_speed`, which
a run's side-by-side unit uses too: a fresh process per file and round; prompt 512 fixed ids,
greedy decode 64, the given threads), and the table reports each file's median over rounds, and
its ratio to the first file's.

    flock /tmp/pkdq-heavy.lock .venv/bin/python bench/gguf_speed_rounds.py --rounds 5 \
        --out shipped_speed \
        'baseline f16=runs/smollm2-ffn12-kd-w4-gguf/00-baseline/llama_cpp/model-f16.gguf' ...

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", metavar="NAME=GGUF", help="the first is the ratio's "
                        "denominator")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="gguf_speed_rounds")
    args = parser.parse_args()

    from tasks.quantize import interleaved_speed

    files = {name: Path(path) for name, _, path in (f.partition("=") for f in args.files)}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"no such GGUF: {', '.join(missing)}")
    started = time.perf_counter()
    timed = interleaved_speed(files, args.rounds, threads=args.threads,
                              progress=lambda line: print(f"[speed] {line}", file=sys.stderr,
                                                          flush=True))
    out = {**timed, "wall_s": time.perf_counter() - started,
           "command": "flock /tmp/pkdq-heavy.lock .venv/bin/python bench/gguf_speed_rounds.py "
                      f"--rounds {args.rounds} --out {args.out} "
                      + " ".join(f"'{f}'" for f in args.files),
           "date": time.strftime("%Y-%m-%d")}
    publish(args.out, out, render(out))


def render(out: dict[str, Any]) -> str:
    first = out["rows"][0]
    lines = ["# GGUF speed in llama.cpp, interleaved rounds", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             f"{out['rounds']} rounds, {out['threads']} threads; 1-minute load average "
             f"{min(out['load_average_1m']):.1f}–{max(out['load_average_1m']):.1f} (the "
             f"timing's own process included), {out['date']}.", "",
             "| file | types | MB | prefill tok/s | decode tok/s (min–max) | decode vs "
             f"{first['name']} | peak RSS MB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in out["rows"]:
        low, high = row["decode_spread"]
        lines.append(f"| {row['name']} | {row['types']} | {row['file_bytes'] / 1e6:.1f} | "
                     f"{row['prefill_tok_s']:.0f} | {row['decode_tok_s']:.1f} ({low:.1f}–"
                     f"{high:.1f}) | {row['decode_tok_s'] / first['decode_tok_s']:.2f}x | "
                     f"{row['peak_rss_mb'] or out.get('peak_rss_mb') or 0:.0f} |")
    lines += ["", f"Command: `{out['command']}` ({out['wall_s'] / 60:.1f} min).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
