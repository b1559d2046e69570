"""Offline loaders for pkdq's lm-eval task YAMLs: the stock tasks, fed from local files.

`datasets` 5.x runs no loading scripts and pkdq never reaches a hub, so every YAML here uses
`custom_dataset: !function utils.<task>`. lm-eval calls that hook with the task's metadata as
keyword arguments; `pkdq_data_dir` (set through `TaskManager(metadata=...)`) names the data folder,
else `PKDQ_DATA_DIR`, else `../shared/data` beside the repo. Each loader maps the files' fields onto
the fields the stock lm-eval prompt templates read, so the prompts themselves stay stock.

The same loaders serve `load_docs(task)`, which tests and tools use to read docs without a model.
"""

from __future__ import annotations

import bz2
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

# (file names under the data dir, split name the stock task evaluates on)
SPLITS: dict[str, str] = {
    "arc_easy": "test",
    "arc_challenge": "test",
    "piqa": "validation",
    "hellaswag": "validation",
    "winogrande": "validation",
    "lambada_openai": "test",
    "boolq": "validation",
    "wikitext": "test",
}

DATA_DIR_KEY = "pkdq_data_dir"
# The files each task reads under the data dir (the loaders below open exactly these).
TASK_FILES: dict[str, tuple[str, ...]] = {
    "arc_easy": ("arc/ARC-Easy-Test.jsonl",),
    "arc_challenge": ("arc/ARC-Challenge-Test.jsonl",),
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt.bz2",),
    "winogrande": ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"),
    "lambada_openai": ("lambada/lambada_test.jsonl",),
    "boolq": ("boolq/val.jsonl",),
    "wikitext": ("wikitext/wiki.test.raw",),
}


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding arc/, piqa/, ...: explicit, else PKDQ_DATA_DIR, else ../shared/data.

    Resolved here (not imported from tasks.core.common) so lm-eval can load this file by path even
    when
    the repo root is not importable.
    """
    if data_dir:
        return Path(data_dir)
    env = os.environ.get("PKDQ_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _labels(path: Path) -> list[int]:
    with open(path, encoding="utf-8") as handle:
        return [int(line) for line in handle if line.strip()]


def _check_aligned(name: str, docs: list[Any], labels: list[Any]) -> None:
    if len(docs) != len(labels):
        raise ValueError(f"{name}: {len(docs)} docs but {len(labels)} labels; files not aligned")


# --------------------------------------------------------------------------- per-task docs


def arc_docs(root: Path, subset: str) -> list[dict[str, Any]]:
    """ARC jsonl -> HF ai2_arc fields (question, choices{text,label}, answerKey).

    Labels stay as in the file ("A".."E" or "1".."4"): the stock target
    `choices.label.index(answerKey)` works with either, as on the HF copy.
    """
    out = []
    for row in _jsonl(root / TASK_FILES[f"arc_{subset.lower()}"][0]):
        choices = row["question"]["choices"]
        out.append({
            "id": row["id"],
            "question": row["question"]["stem"],
            "choices": {"text": [c["text"] for c in choices],
                        "label": [c["label"] for c in choices]},
            "answerKey": row["answerKey"],
        })
    return out


def piqa_docs(root: Path) -> list[dict[str, Any]]:
    """PIQA jsonl + the line-aligned labels file (0 = sol1, 1 = sol2)."""
    docs_file, labels_file = TASK_FILES["piqa"]
    docs = _jsonl(root / docs_file)
    labels = _labels(root / labels_file)
    _check_aligned("piqa", docs, labels)
    return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": y}
            for d, y in zip(docs, labels, strict=True)]


def _hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`, verbatim (tags are already gone from this file)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


_SENTENCE_END = re.compile(r"[.!?] ")


def _capitalise_ctx_b(ctx: str) -> str:
    """Best guess at lm-eval's `ctx_a + " " + ctx_b.capitalize()` when only `ctx` survives.

    ctx_b is the unfinished sentence the endings complete, so it is the text after the last
    sentence end. Only a lowercase start is touched (the ActivityNet "... roof. he" pattern, where
    the guess is safe); there `.capitalize()` is applied as lm-eval does.
    """
    ends = list(_SENTENCE_END.finditer(ctx))
    start = ends[-1].end() if ends else 0
    tail = ctx[start:]
    if not tail or not tail[0].islower():
        return ctx
    return ctx[:start] + tail.capitalize()


def hellaswag_docs(root: Path) -> list[dict[str, Any]]:
    """HellaSwag val as text, 6 lines per example: 'label: ctx', gold, 4 endings.

    Produces the fields lm-eval's `process_docs` would (query, choices, label); see
    `_capitalise_ctx_b` for the one step that can only be approximated.
    """
    with bz2.open(root / TASK_FILES["hellaswag"][0], "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"hellaswag: {len(lines)} lines is not a multiple of 6")
    out = []
    for i in range(0, len(lines), 6):
        head, gold, *endings = lines[i:i + 6]
        activity, sep, ctx = head.partition(": ")
        query = f"{activity}: {_capitalise_ctx_b(ctx)}" if sep else _capitalise_ctx_b(head)
        out.append({
            "query": _hellaswag_preprocess(query),
            "choices": [_hellaswag_preprocess(e) for e in endings],
            "label": str(int(gold)),
        })
    return out


def winogrande_docs(root: Path) -> list[dict[str, Any]]:
    """WinoGrande dev; the labels file is the source of truth and must agree with `answer`."""
    docs_file, labels_file = TASK_FILES["winogrande"]
    docs = _jsonl(root / docs_file)
    labels = _labels(root / labels_file)
    _check_aligned("winogrande", docs, labels)
    out = []
    for d, y in zip(docs, labels, strict=True):
        if str(d.get("answer", y)) != str(y):
            raise ValueError(f"winogrande {d.get('qID')}: answer {d['answer']} != label {y}")
        out.append({"sentence": d["sentence"], "option1": d["option1"],
                    "option2": d["option2"], "answer": str(y)})
    return out


def lambada_docs(root: Path) -> list[dict[str, Any]]:
    """OpenAI's detokenised LAMBADA test, used as is (field `text`)."""
    return [{"text": d["text"]} for d in _jsonl(root / TASK_FILES["lambada_openai"][0])]


def boolq_docs(root: Path) -> list[dict[str, Any]]:
    """BoolQ val: the label is the string "true"/"false"; the stock task wants 1 = yes, 0 = no."""
    out = []
    for d in _jsonl(root / TASK_FILES["boolq"][0]):
        label = d["label"]
        value = label if isinstance(label, bool) else str(label).strip().lower()
        if value not in (True, False, "true", "false"):
            raise ValueError(f"boolq idx {d.get('idx')}: label {label!r} is not true/false")
        out.append({"question": d["question"], "passage": d["passage"], "idx": d.get("idx"),
                    "label": int(value in (True, "true"))})
    return out


def _is_page_title(line: str) -> bool:
    """A level-1 heading (' = Title = '), once deeper ' = = ' headings are collapsed."""
    collapsed = line.replace("= = =", "===").replace("= =", "==").strip()
    return collapsed.startswith("= ") and collapsed.endswith(" =")


def wikitext_docs(root: Path) -> list[dict[str, Any]]:
    """WikiText-2 raw test, one doc per article (field `page`), as the stock task reads it.

    The stock task uses EleutherAI/wikitext_document_level, which cuts the raw file before
    every level-1 heading line and drops blank chunks; the same cut here gives the same 62 pages,
    so word/byte counts and rolling windows match the stock task.
    """
    lines = (root / TASK_FILES["wikitext"][0]).read_text(encoding="utf-8").split("\n")
    pages: list[str] = []
    current: list[str] = []
    for line in lines:
        if _is_page_title(line):
            page = "\n".join(current)
            if page.strip():
                pages.append(page)
            current = []
        current.append(line)
    pages.append("\n".join(current))
    return [{"page": page} for page in pages]


DOC_LOADERS: dict[str, Callable[[Path], list[dict[str, Any]]]] = {
    "arc_easy": lambda root: arc_docs(root, "Easy"),
    "arc_challenge": lambda root: arc_docs(root, "Challenge"),
    "piqa": piqa_docs,
    "hellaswag": hellaswag_docs,
    "winogrande": winogrande_docs,
    "lambada_openai": lambada_docs,
    "boolq": boolq_docs,
    "wikitext": wikitext_docs,
}


def missing_eval_data(tasks: list[str], data_dir: str | os.PathLike[str] | None = None
                      ) -> str | None:
    """What evaluating `tasks` (and WikiText-2, which every evaluation scores) would not find:
    a task YAML or a data file, in one line; None when all are there. Checked before a run."""
    root = resolve_data_dir(data_dir)
    for task in [*tasks, "wikitext"]:
        if task not in TASK_FILES or not (Path(__file__).parent / f"{task}.yaml").is_file():
            return f"evaluation task '{task}' does not exist here (no {task}.yaml)"
        for rel in TASK_FILES[task]:
            if not (root / rel).is_file():
                return (f"evaluation task {task} reads {root / rel}, which is missing "
                        "(set PKDQ_DATA_DIR to the folder holding the benchmark files)")
    return None


def load_docs(task: str, data_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The evaluation docs of one task, in file order (doc id = position), without lm-eval."""
    return DOC_LOADERS[task](resolve_data_dir(data_dir))


# --------------------------------------------------------------------------- lm-eval hooks


def _dataset(task: str, kwargs: dict[str, Any]):
    """A DatasetDict holding the one split the stock task evaluates on."""
    import datasets

    docs = load_docs(task, kwargs.get(DATA_DIR_KEY))
    return datasets.DatasetDict({SPLITS[task]: datasets.Dataset.from_list(docs)})


def arc_easy(**kwargs: Any):
    return _dataset("arc_easy", kwargs)


def arc_challenge(**kwargs: Any):
    return _dataset("arc_challenge", kwargs)


def piqa(**kwargs: Any):
    return _dataset("piqa", kwargs)


def hellaswag(**kwargs: Any):
    return _dataset("hellaswag", kwargs)


def winogrande(**kwargs: Any):
    return _dataset("winogrande", kwargs)


def lambada_openai(**kwargs: Any):
    return _dataset("lambada_openai", kwargs)


def boolq(**kwargs: Any):
    return _dataset("boolq", kwargs)


def wikitext(**kwargs: Any):
    return _dataset("wikitext", kwargs)


def wikitext_detokenizer(doc: dict[str, Any]) -> str:
    """lm-eval's stock wikitext detokenizer (delegated to, not copied)."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer as stock

    return stock(doc)


def wikitext_process_results(doc: dict[str, Any], results: list[float]) -> dict[str, Any]:
    """lm-eval's stock wikitext word/byte counting, on the page before detokenization."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results as stock

    return stock(doc, results)


# WinoGrande's stock prompt functions (lm_eval/tasks/winogrande/preprocess_winogrande.py), verbatim:
# the "text" is the index of the right option; options fill the blank; the rest is the target.


def winogrande_doc_to_text(doc: dict[str, Any]) -> int:
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def winogrande_doc_to_target(doc: dict[str, Any]) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]
