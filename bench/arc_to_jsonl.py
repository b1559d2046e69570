"""ARC-Easy Test as the evaluate stage's JSONL multiple-choice shortcut (question/choices/answer).

    python bench/arc_to_jsonl.py [--src <data>/arc/ARC-Easy-Test.jsonl] [--out FILE]

Writes `~/.cache/pkdq/jsonl/arc_easy_test_mc.jsonl` by default (an evaluation split: never train
on it). A recipe scores it with
    evaluate: {tasks: [{name: arc_easy_jsonl, jsonl: ~/.cache/pkdq/jsonl/arc_easy_test_mc.jsonl,
                        kind: multiple_choice}]}
The prompt is the stock ARC one, so its scores equal the built-in `arc_easy` task's on the same
docs (tests/test_eval_tasks.py checks this).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def convert(src: Path, out: Path) -> int:
    rows = []
    for line in src.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        doc = json.loads(line)
        q = doc["question"]
        labels = [c["label"] for c in q["choices"]]
        rows.append({"question": q["stem"], "choices": [c["text"] for c in q["choices"]],
                     "answer": labels.index(doc["answerKey"])})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def main() -> None:
    from tasks.core.common import REPO_ROOT, data_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=data_dir() / "arc" / "ARC-Easy-Test.jsonl")
    parser.add_argument("--out", type=Path,
                        default=REPO_ROOT / "generated" / "arc_easy_test_mc.jsonl")
    args = parser.parse_args()
    print(f"{convert(args.src, args.out)} questions -> {args.out}")


if __name__ == "__main__":
    main()
