"""Users' own training and calibration data: load each kind torch-free, fingerprint its content.

A `DataSpec` (tasks.core.recipe) names the data; `load_corpus` turns it into a `Corpus`: the
training documents (or conversations, for `chat`), the held-out slice KD scores on, and a
fingerprint of the content (not of file names or mtimes), which enters the stage key. Every
problem is a `DataError`: one line naming the file and what to fix, raised before any model
loads (`pkdq validate` calls `data_problem`), never half-way through a stage.

Kinds: `builtin` (the bundled wikipedia / c4 / mixed text, `tasks.core.data`), `text` (plain
files; a document per blank-line-separated paragraph), `jsonl` / `csv` / `parquet` (one document
per row, from `field`), `chat` (JSONL rows of `messages` with system / user / assistant turns),
`hf` (a `datasets.save_to_disk` folder, or a hub dataset already in the local cache, offline).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.common import REPO_ROOT, read_utf8
from tasks.core.data import HELDOUT_WIKI_FILES, load_train_texts, training_text_problem
from tasks.core.recipe import DataSpec, shown

DATA_PREFIX = "${data}"
REPO_PREFIX = "${repo}"  # the pkdq checkout: generated example data (examples/arc_chat.py)
ROLES = ("system", "user", "assistant")
MAX_ERRORS_SHOWN = 3
_PARAGRAPH = re.compile(r"\n[ \t]*\n")


class DataError(ValueError):
    """One line: the file (or dataset), what is wrong with it and what to fix."""


@dataclass(frozen=True)
class Corpus:
    """A data source loaded: training and held-out documents (text kinds) or conversations
    (`chat`, each a list of {role, content}), with the content's fingerprint."""

    kind: str
    docs: list[str] = field(default_factory=list)
    heldout_docs: list[str] = field(default_factory=list)
    chats: list[list[dict[str, str]]] = field(default_factory=list)
    heldout_chats: list[list[dict[str, str]]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    fingerprint: str = ""

    @property
    def size(self) -> int:
        """Training documents (or conversations)."""
        return len(self.chats) if self.kind == "chat" else len(self.docs)

    def texts(self) -> list[str]:
        """Training text as plain strings (conversations: their turns' contents), for the
        contamination check and for calibration."""
        if self.kind != "chat":
            return self.docs
        return ["\n".join(m["content"] for m in chat) for chat in self.chats]


def resolve_path(pattern: str, data: Path) -> str:
    """`${data}/x` -> <data dir>/x, `${repo}/x` -> <pkdq checkout>/x; `~` expanded; other
    paths as given (relative to the directory pkdq runs in)."""
    for prefix, root in ((DATA_PREFIX, Path(data)), (REPO_PREFIX, REPO_ROOT)):
        if pattern.startswith(prefix):
            return str(root / pattern[len(prefix):].lstrip("/"))
    return os.path.expanduser(pattern)


def expand(patterns: list[str], data: Path, key: str) -> list[Path]:
    """Every file the patterns name, sorted within each glob; a pattern that names nothing is an
    error (a typo must not silently shrink the data)."""
    files: list[Path] = []
    for pattern in patterns:
        try:
            files.extend(_expand_one(pattern, data, key))
        except (OSError, ValueError) as exc:  # a name too long, a NUL byte, a loop of links
            if isinstance(exc, DataError):
                raise
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise DataError(f"data.{key}: {shown(pattern)}: not a usable path ({why})") from None
    return files


def _expand_one(pattern: str, data: Path, key: str) -> list[Path]:
    path = resolve_path(pattern, data)
    if glob.has_magic(path):
        found = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not found:
            raise DataError(f"data.{key}: {shown(pattern)} matches no file; fix the glob "
                            "(paths may start with ${data}/ for the data dir)")
        return found
    if Path(path).is_dir():
        raise DataError(f"data.{key}: {shown(path)} is a folder; name files or a glob such as "
                        "folder/*.txt")
    if not Path(path).is_file():
        raise DataError(f"data.{key}: {shown(path)}: file not found (paths may start with "
                        "${data}/ for the data dir)")
    return [Path(path)]


def read_text(path: Path) -> str:
    """The file as UTF-8, or one line naming the first bad byte."""
    return read_utf8(path, DataError, shown(str(path)), "re-encode it as UTF-8")


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in _PARAGRAPH.split(text.replace("\r\n", "\n")) if p.strip()]


def _jsonl_rows(path: Path) -> list[tuple[int, Any]]:
    rows = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{shown(str(path))}: line {number} is not JSON ({exc.msg}); one "
                            "JSON object per line") from None
    return rows


def _field_text(path: Path, where: str, row: Any, name: str) -> str:
    if not isinstance(row, dict) or name not in row:
        have = ", ".join(list(row)[:8]) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{shown(str(path))}: {where} has no field '{shown(name, 60)}' (it has: "
                        f"{have}); set data.field to the column holding the text")
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{shown(str(path))}: {where} field '{shown(name, 60)}' is "
                        f"{type(value).__name__}, not text; set data.field to a text column")
    return value


def _table_docs(path: Path, kind: str, name: str) -> list[str]:
    """One document per row of a jsonl / csv / parquet file, from column `name`."""
    if kind == "jsonl":
        return [_field_text(path, f"line {n}", row, name) for n, row in _jsonl_rows(path)]
    if kind == "csv":
        reader = csv.DictReader(read_text(path).splitlines())
        if reader.fieldnames is None or name not in reader.fieldnames:
            have = ", ".join((reader.fieldnames or [])[:8]) or "no header"
            raise DataError(f"{shown(str(path))}: no column '{shown(name, 60)}' (columns: "
                            f"{have}); set data.field to the column holding the text")
        return [row[name] or "" for row in reader]
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a bad file
        raise DataError(f"{shown(str(path))}: not a readable parquet file "
                        f"({' '.join(str(exc).split())[:120]})") from None
    if name not in table.column_names:
        raise DataError(f"{shown(str(path))}: no column '{shown(name, 60)}' (columns: "
                        f"{', '.join(table.column_names[:8])}); set data.field")
    values = table.column(name).to_pylist()
    if any(v is not None and not isinstance(v, str) for v in values):
        raise DataError(f"{shown(str(path))}: column '{shown(name, 60)}' is not text; set "
                        "data.field to a text column")
    return [v or "" for v in values]


def _chat_rows(path: Path) -> list[list[dict[str, str]]]:
    """Conversations of a chat JSONL, each checked: roles, text contents, an assistant turn."""
    chats = []
    for number, row in _jsonl_rows(path):
        messages = row.get("messages") if isinstance(row, dict) else None
        where = f"{shown(str(path))}: line {number}"
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where} has no 'messages' list; each line is "
                            '{"messages": [{"role": "user", "content": ...}, ...]}')
        for turn in messages:
            if not isinstance(turn, dict) or turn.get("role") not in ROLES \
                    or not isinstance(turn.get("content"), str):
                raise DataError(f"{where}: each message needs role ({', '.join(ROLES)}) and "
                                f"text content (got {shown(json.dumps(turn)[:80], 90)})")
        chats.append([{"role": t["role"], "content": t["content"]} for t in messages])
    if chats and not any(t["role"] == "assistant" for chat in chats for t in chat):
        raise DataError(f"{shown(str(path))}: no assistant turns, so there is nothing to train "
                        "on; add assistant messages (or use kind jsonl for plain text)")
    return chats


def _file_items(files: list[Path], spec: DataSpec) -> list[Any]:
    items: list[Any] = []
    for path in files:
        if spec.kind == "text":
            items.extend(_paragraphs(read_text(path)))
        elif spec.kind == "chat":
            items.extend(_chat_rows(path))
        else:
            items.extend(_table_docs(path, spec.kind, spec.field))
        if spec.kind != "chat":
            items = [doc for doc in items if doc.strip()]
    return items


def _hf_docs(spec: DataSpec) -> tuple[list[str], str]:
    """Text column of an on-disk dataset (`path`) or a cached hub dataset (`name`), offline."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    label = spec.path or spec.name or ""
    try:
        if spec.path is not None:
            if not Path(spec.path).is_dir():
                raise DataError(f"data.path: {shown(spec.path)}: folder not found (a folder "
                                "written by datasets' save_to_disk)")
            loaded = datasets.load_from_disk(spec.path)
            if isinstance(loaded, datasets.DatasetDict):
                if spec.split not in loaded:
                    raise DataError(f"data.split: {shown(spec.path)} has no split "
                                    f"'{shown(spec.split, 60)}' (splits: {', '.join(loaded)})")
                loaded = loaded[spec.split]
        else:
            loaded = datasets.load_dataset(spec.name, split=spec.split)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; one line for each
        raise DataError(f"data: hf dataset {shown(label)} ({spec.split}) is not loadable "
                        f"offline: {' '.join(str(exc).split())[:160]}") from None
    if spec.column not in loaded.column_names:
        raise DataError(f"data.column: {shown(label)} has no column '{shown(spec.column, 60)}' "
                        f"(columns: {', '.join(loaded.column_names[:8])})")
    values = loaded[spec.column]
    if any(v is not None and not isinstance(v, str) for v in values[:100]):
        raise DataError(f"data.column: {shown(label)} column '{spec.column}' is not text")
    return [v for v in values if isinstance(v, str) and v.strip()], label


def content_fingerprint(kind: str, train: list[Any], heldout: list[Any]) -> str:
    """sha256 of the documents themselves: the same text gives the same key whatever the files
    are called or when they were touched; one changed character gives another."""
    digest = hashlib.sha256(kind.encode())
    for part in (train, heldout):
        digest.update(b"\x00split")
        for item in part:
            digest.update(json.dumps(item, ensure_ascii=False, sort_keys=True).encode())
            digest.update(b"\x00")
    return digest.hexdigest()[:16]


def split_heldout(items: list[Any], fraction: float) -> tuple[list[Any], list[Any]]:
    """(training, held-out): the held-out documents are picked by a hash of their content, so
    the slice does not depend on file order and stays put when documents are appended."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    k = min(max(1, round(fraction * len(items))), len(items) - 1)

    def rank(index: int) -> str:
        text = json.dumps(items[index], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest() + f"{index:012d}"

    held = set(sorted(range(len(items)), key=rank)[:k])
    return ([x for i, x in enumerate(items) if i not in held],
            [x for i, x in enumerate(items) if i in held])


def load_corpus(spec: DataSpec, data: Path) -> Corpus:
    """Load what `spec` names (torch-free). Raises DataError (one line) on any problem."""
    data = Path(data)
    if spec.kind == "builtin":
        problem = training_text_problem(data, spec.source) or \
            training_text_problem(data, spec.source, heldout=True)
        if problem:
            raise DataError(f"data: {problem}")
        docs = load_train_texts(data, spec.source)
        held = load_train_texts(data, spec.source, heldout=True)
        files = [f"train/{spec.source}", *(f"train/wikipedia/{f}" for f in HELDOUT_WIKI_FILES)]
        return Corpus("builtin", docs=docs, heldout_docs=held, files=files,
                      fingerprint=content_fingerprint("builtin", docs, held))
    if spec.kind == "hf":
        items, label = _hf_docs(spec)
        files = [label]
        train, held = split_heldout(items, spec.heldout)
    else:
        paths = expand(spec.paths, data, "paths")
        items = _file_items(paths, spec)
        files = [str(p) for p in paths]
        if spec.heldout_paths:
            held_paths = expand(spec.heldout_paths, data, "heldout_paths")
            train, held = items, _file_items(held_paths, spec)
            files += [str(p) for p in held_paths]
        else:
            train, held = split_heldout(items, spec.heldout)
    where = ", ".join(shown(f, 80) for f in files[:MAX_ERRORS_SHOWN])
    if not items:
        raise DataError(f"data: {where}: no documents (empty, or only blank lines); point "
                        "data.paths at files with text")
    if spec.kind == "chat":
        return Corpus("chat", chats=train, heldout_chats=held, files=files,
                      fingerprint=content_fingerprint("chat", train, held))
    return Corpus(spec.kind, docs=train, heldout_docs=held, files=files,
                  fingerprint=content_fingerprint(spec.kind, train, held))


def data_problem(spec: DataSpec, data: Path) -> str | None:
    """Why `load_corpus(spec, data)` would fail (one line), or None: what validate checks."""
    try:
        load_corpus(spec, data)
    except DataError as exc:
        return str(exc)
    return None


def min_bytes_per_token() -> float:
    """Fewest UTF-8 bytes a token covers in practice (BPE on prose averages ~4): validate
    refuses a budget only when even this generous rate cannot fill it; the stage checks the
    exact count with the tokenizer."""
    return 1.5


def byte_count(corpus: Corpus) -> int:
    return sum(len(t.encode("utf-8")) for t in corpus.texts())
