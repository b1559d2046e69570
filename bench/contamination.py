"""How long the contamination check takes, cold (nothing cached), on the bundled data.

    .venv/bin/python bench/contamination.py
Writes bench/results/contamination.md (+ .json): per training text (the bundled wikipedia / c4 /
mixed and the worked examples' WikiText-2 validation / ARC Dev chat, plus WikiText-2 test as the
contaminated control), the time to load the evaluation sets, to hash and compare, and the
overlapping documents per evaluation set (all seven bundled tasks and WikiText-2 test).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.core.common import data_dir  # noqa: E402
from tasks.core.contamination import overlap_report  # noqa: E402
from tasks.core.recipe import DataSpec, EvalConfig  # noqa: E402
from tasks.core.text_sources import load_corpus  # noqa: E402
from tasks.evaluate import evaluation_texts  # noqa: E402

TASKS = ["arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "lambada_openai",
         "boolq"]
SPECS = {
    "builtin wikipedia": DataSpec(kind="builtin", source="wikipedia"),
    "builtin c4": DataSpec(kind="builtin", source="c4"),
    "builtin mixed": DataSpec(kind="builtin", source="mixed"),
    "text wiki.valid.raw": DataSpec(kind="text", paths=["${data}/wikitext/wiki.valid.raw"]),
    "text wiki.test.raw (control)": DataSpec(kind="text",
                                             paths=["${data}/wikitext/wiki.test.raw"]),
    "chat ARC Dev": DataSpec(kind="chat", paths=["${repo}/generated/arc-dev-chat.jsonl"]),
}


def main() -> None:
    data = data_dir()
    start = time.perf_counter()
    eval_sets = evaluation_texts(EvalConfig(tasks=TASKS), data)
    load_s = time.perf_counter() - start
    rows = []
    for label, spec in SPECS.items():
        try:
            corpus = load_corpus(spec, data)
        except ValueError as exc:
            print(f"skip {label}: {exc}", file=sys.stderr)
            continue
        texts = corpus.texts()
        start = time.perf_counter()
        report = overlap_report(texts, eval_sets)
        check_s = time.perf_counter() - start
        words = sum(len(t.split()) for t in texts)
        rows.append({"training": label, "documents": len(texts), "words": words,
                     "check_s": round(check_s, 2),
                     "overlap": {k: [v["overlapping_documents"], v["documents"]]
                                 for k, v in report["sets"].items()}})
        print(f"{label}: {check_s:.2f} s", file=sys.stderr)
    out = Path(__file__).parent / "results" / "contamination"
    out.with_suffix(".json").write_text(json.dumps({"eval_load_s": round(load_s, 2),
                                                    "rows": rows}, indent=2))
    names = ["wikitext", *TASKS]
    lines = [f"Evaluation sets loaded in {load_s:.2f} s (all {len(names)}: "
             f"{sum(len(v) for v in eval_sets.values()):,} documents).", "",
             "| training text | docs | words | check s | " + " | ".join(names) + " |",
             "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in names) + " |"]
    for row in rows:
        lines.append(f"| {row['training']} | {row['documents']:,} | {row['words']:,} | "
                     f"{row['check_s']} | " + " | ".join(
                         f"{row['overlap'][n][0]}/{row['overlap'][n][1]}" for n in names) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
