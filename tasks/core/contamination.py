"""Contamination: word n-grams shared by training text and the evaluation sets a recipe scores.

A score measured on text the model was trained (or calibrated) on says little about the model.
The usual test (GPT-3, appendix C; lm-eval's decontamination) is an n-gram overlap: lowercase,
split into words, and call an evaluation document contaminated when one of its 13-grams also
occurs in the training text. Both sides are hashed to 64-bit integers with numpy (a rolling
polynomial over word ids), so checking the bundled 30 MB of training text against every bundled
benchmark takes a second or two, not minutes. Words that appear in no evaluation document cannot
be part of a shared n-gram, so the training side is reduced to ids of evaluation words first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy only where hashes are computed: a cached check imports nothing
    import numpy as np

WORD = re.compile(r"\w+")
BASE = 1_000_003
EXAMPLES = 5  # overlapping documents listed per evaluation set


def words(text: str) -> list[str]:
    """Lowercased word tokens (punctuation and spacing, e.g. WikiText's ` @-@ `, ignored)."""
    return WORD.findall(text.lower())


def _window_hashes(ids: np.ndarray, starts: np.ndarray, n: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit hash of every n-word window that lies inside one document, its document)."""
    import numpy as np

    width = len(ids) - n + 1
    if width <= 0:
        return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
    vals = ids.view(np.uint64)
    out = np.zeros(width, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            out = out * np.uint64(BASE) + vals[k: k + width]
    first = _doc_of(np.arange(width), starts)
    inside = first == _doc_of(np.arange(n - 1, len(ids)), starts)
    return out[inside], first[inside]


def _word_ids(texts: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Word hashes of all texts end to end (Python's string hash: the same within one process,
    which is all a comparison inside one call needs), and each document's start offset."""
    import numpy as np

    all_words: list[str] = []
    starts: list[int] = []
    for text in texts:
        starts.append(len(all_words))
        all_words.extend(words(text))
    ids = np.fromiter(map(hash, all_words), dtype=np.int64, count=len(all_words))
    return ids, np.array(starts, dtype=np.int64)


def _doc_of(positions: np.ndarray, starts: np.ndarray) -> np.ndarray:
    import numpy as np

    return np.searchsorted(starts, positions, side="right") - 1


def overlap_report(train_docs: list[str], eval_sets: dict[str, list[str]], n: int = 13
                   ) -> dict[str, Any]:
    """Per evaluation set: documents, documents sharing an n-gram with the training text, their
    fraction, the shared n-grams and the first overlapping documents (index, opening words).

    Every window of both sides is hashed at once with numpy, and the training side is looked up
    in the evaluation side's sorted hashes in one call."""
    import numpy as np

    sides = {}
    for name, texts in eval_sets.items():
        hashes, docs = _window_hashes(*_word_ids(texts), n)
        sides[name] = (hashes, docs, len(texts))
    every = np.unique(np.concatenate([h for h, _, _ in sides.values()])) if sides \
        else np.empty(0, dtype=np.uint64)
    t_hashes, t_docs = _window_hashes(*_word_ids(train_docs), n)
    found = np.isin(t_hashes, every, kind="sort") if len(every) \
        else np.zeros(len(t_hashes), dtype=bool)
    hits = np.unique(t_hashes[found])
    train_hit_docs = np.unique(t_docs[found])
    sets: dict[str, Any] = {}
    for name, (hashes, docs, total) in sides.items():
        shared = np.isin(hashes, hits)
        overlapping = np.unique(docs[shared]).tolist()
        sets[name] = {
            "documents": total,
            "overlapping_documents": len(overlapping),
            "fraction": len(overlapping) / total if total else 0.0,
            "shared_ngrams": int(len(np.unique(hashes[shared]))),
            "examples": [{"doc": int(i), "text": " ".join(words(eval_sets[name][i])[:12])}
                         for i in overlapping[:EXAMPLES]],
        }
    return {"ngram": n, "training_documents": len(train_docs),
            "training_documents_overlapping": int(len(train_hit_docs)), "sets": sets}


def worst(report: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The evaluation set with the largest overlapping fraction, or None without sets."""
    sets = report.get("sets") or {}
    if not sets:
        return None
    name = max(sets, key=lambda key: sets[key]["fraction"])
    return name, sets[name]


def refusal(report: dict[str, Any], threshold: float, what: str) -> str | None:
    """One line when some evaluation set overlaps the training text of `what` (recipe keys or
    a stage) above `threshold`, else None."""
    top = worst(report)
    if top is None or top[1]["fraction"] <= threshold:
        return None
    name, row = top
    return (f"the training text of {what} shares {report['ngram']}-grams with "
            f"{row['overlapping_documents']} of "
            f"{row['documents']} {name} documents ({row['fraction']:.1%}, over the "
            f"{threshold:.1%} threshold): scores on {name} would be measured on training text; "
            "train on other data, or set contamination.allow_overlap: true")
