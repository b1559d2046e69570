"""The text of every evaluation set a recipe scores, for the contamination check (torch-free).

Each set's documents come from the same loaders the lm-eval tasks use (`lm_eval_tasks.utils`),
so the check sees exactly what is scored: WikiText-2 test pages (every evaluation scores
WikiText-2 perplexity) and each task in `evaluate.tasks`. A document's text is all of its string
fields joined (question, choices, context, answer), since overlap with any of them leaks.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from tasks.core.common import cache_dir, write_json_atomic
from tasks.core.contamination import overlap_report
from tasks.core.recipe import DataSpec, EvalConfig
from tasks.core.text_sources import expand, load_corpus, resolve_path
from tasks.evaluate.lm_eval_tasks.utils import TASK_FILES, load_docs


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


def _jsonl_path(cfg: EvalConfig, task: str, data: Path) -> Path | None:
    """The file of a JSONL-shortcut task (`evaluate.tasks: [{name, jsonl, kind}]`), else None."""
    for spec in cfg.jsonl_tasks():
        if spec.name == task:
            return Path(resolve_path(spec.jsonl, data))
    return None


def _task_files(cfg: EvalConfig, task: str, data: Path) -> list[Path]:
    """The files a scored set reads (KeyError for a registry task pkdq has no files for)."""
    path = _jsonl_path(cfg, task, data)
    return [path] if path is not None else [data / rel for rel in TASK_FILES[task]]


def _task_docs(cfg: EvalConfig, task: str, data: Path) -> list[Any]:
    path = _jsonl_path(cfg, task, data)
    if path is None:
        return load_docs(task, data)
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def evaluation_texts(cfg: EvalConfig, data: Path, only: list[str] | None = None
                     ) -> dict[str, list[str]]:
    """{evaluation set: [document text]} for WikiText-2 test and each task scored (built-in,
    or a JSONL set: its question and choices or prompt and reference), or just `only`."""
    sets: dict[str, list[str]] = {}
    for task in only if only is not None else ["wikitext", *cfg.task_names()]:
        sets[task] = [" \n ".join(_strings(doc)) for doc in _task_docs(cfg, task, data)]
    return sets


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _file_hash(path: Path) -> str:
    """Content hash of one file, memoised per (path, size, mtime) within the process: validate
    and every stage of a run check the same files."""
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _FILE_HASHES:
        _FILE_HASHES[memo] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _FILE_HASHES[memo]


def _files_key(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(str(file).encode() + b"\0" + _file_hash(file).encode())
    return digest.hexdigest()


def _training_files(spec: DataSpec, data: Path) -> list[Path] | None:
    """The files `spec` reads, or None when they cannot be listed cheaply (hub datasets)."""
    if spec.kind == "builtin":
        return sorted(p for p in (Path(data) / "train").rglob("*") if p.is_file())
    if spec.kind == "hf":
        if spec.path is None or not Path(spec.path).is_dir():
            return None
        return sorted(p for p in Path(spec.path).rglob("*") if p.is_file())
    return expand(spec.paths, data, "paths") + expand(spec.heldout_paths, data, "heldout_paths")


def training_overlap(spec: DataSpec, cfg: EvalConfig, data: Path, n: int = 13
                     ) -> dict[str, Any]:
    """`tasks.core.contamination.overlap_report` of the training text `spec` names against every
    evaluation set `cfg` scores. Each set's row is cached on disk by the contents of the files
    on both sides: the bundled 30 MB take seconds to check, and validate, run and every stage
    that reads the same data ask again, with any mix of tasks."""
    data = Path(data)
    tasks = ["wikitext", *cfg.task_names()]
    train_files = _training_files(spec, data)
    train_key = None if train_files is None else hashlib.sha256(json.dumps(
        {"spec": spec.model_dump(mode="json"), "n": n, "train": _files_key(train_files)},
        sort_keys=True).encode()).hexdigest()[:20]
    folder = cache_dir() / "contamination"
    rows: dict[str, Any] = {}
    paths: dict[str, Path] = {}
    for task in tasks:
        if train_key is None:
            continue
        eval_key = _files_key(_task_files(cfg, task, data))[:20]
        paths[task] = folder / f"{train_key}-{task}-{eval_key}.json"
        try:
            rows[task] = json.loads(paths[task].read_text())
        except (OSError, ValueError):
            pass
    missing = [task for task in tasks if task not in rows]
    start = time.perf_counter()
    if missing:
        corpus = load_corpus(spec, data)
        texts = evaluation_texts(cfg, data, only=missing)
        report = overlap_report(corpus.texts() + _heldout_texts(corpus),
                                {task: texts[task] for task in missing}, n)
        for task in missing:
            rows[task] = {**report["sets"][task],
                          "training_documents": report["training_documents"]}
            if task in paths:
                write_json_atomic(paths[task], rows[task])
    return {"ngram": n, "sets": {task: rows[task] for task in tasks},
            "checked": missing, "check_s": round(time.perf_counter() - start, 2)}


def _heldout_texts(corpus: Any) -> list[str]:
    """The held-out slice is scored by KD, never by evaluation, but it is still text the run
    reads; it is checked too, so a user's held-out file cut from a test split is caught."""
    if corpus.kind == "chat":
        return ["\n".join(m["content"] for m in chat) for chat in corpus.heldout_chats]
    return list(corpus.heldout_docs)
