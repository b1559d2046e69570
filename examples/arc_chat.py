"""Worked example 2's data: ARC Dev questions as a `chat` JSONL for KD on your own chat data.

Each ARC-Easy / ARC-Challenge *Dev* question becomes one conversation: the user asks the
question with its lettered choices, the assistant answers with the correct letter and its text.
The Dev splits are not scored by any pkdq evaluation (arc_easy / arc_challenge score the Test
splits), and the contamination check of `recipes/smollm2-ffn25-kd-w4-arc-chat.yaml` measures
that.

    python examples/arc_chat.py            # -> generated/arc-dev-chat.jsonl (git-ignored)
    python examples/arc_chat.py --out x.jsonl --data /path/to/data

The recipe names the file as `${repo}/generated/arc-dev-chat.jsonl`; the output is generated,
not committed (about 900 lines, rebuilt from the data dir in well under a second).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILES = ("arc/ARC-Easy-Dev.jsonl", "arc/ARC-Challenge-Dev.jsonl")
DEFAULT_OUT = REPO / "generated" / "arc-dev-chat.jsonl"


def conversation(row: dict) -> dict:
    """One ARC row -> {"messages": [user question with choices, assistant answer]}."""
    question = row["question"]
    choices = {c["label"]: c["text"] for c in question["choices"]}
    lines = [question["stem"], *(f"{label}. {text}" for label, text in choices.items())]
    user = "\n".join(lines) + "\nAnswer with the letter of the correct choice."
    key = row["answerKey"]
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": f"{key}. {choices[key]}"}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = os.environ.get("PKDQ_DATA_DIR") or str(REPO.parent / "shared" / "data")
    parser.add_argument("--data", default=default_data, help="the data dir (holds arc/)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="the chat JSONL to write")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for rel in FILES:
        for line in (Path(args.data) / rel).read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append(json.dumps(conversation(json.loads(line)), ensure_ascii=False))
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    print(f"{out}: {len(rows)} conversations")


if __name__ == "__main__":
    main()
