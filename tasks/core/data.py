"""Training text for calibration and distillation, from `<data>/train/` only.

Evaluation splits are never read here. Wikipedia files `wiki_49` and `wiki_50` are held out of
training so that KD can measure held-out KL/perplexity on text it never trained on.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only where blocks are built: `pkdq validate` checks files torch-free
    import torch

HELDOUT_WIKI_FILES = ("wiki_49", "wiki_50")
SOURCES = ("wikipedia", "c4", "mixed")
C4_FILE = "c4/c4_sample.jsonl"


def _wikipedia_files(train_dir: Path, heldout: bool) -> list[Path]:
    """The Wikipedia extract files of the training side, or of the held-out slice."""
    files = sorted((train_dir / "wikipedia").glob("wiki_*"))
    return [f for f in files if (f.name in HELDOUT_WIKI_FILES) == heldout and f.is_file()]


def training_text_problem(data: Path, source: str, heldout: bool = False) -> str | None:
    """Why `load_train_texts(data, source, heldout)` would find no text (one line), or None.

    Checked before a run, so a missing data folder stops `pkdq validate`, not the stage that
    needs it an hour in. Only presence is checked here; reading the text is the stage's job.
    """
    train_dir = Path(data) / "train"
    if not train_dir.is_dir():
        return f"training data folder {train_dir} is missing (set PKDQ_DATA_DIR)"
    if source not in SOURCES:
        return f"unknown text source '{source}': allowed {', '.join(SOURCES)}"
    if (heldout or source in ("wikipedia", "mixed")) and not _wikipedia_files(train_dir, heldout):
        which = f"held-out files {' and '.join(HELDOUT_WIKI_FILES)}" if heldout else "wiki_* files"
        return f"{train_dir / 'wikipedia'} has no {which}"
    if not heldout and source in ("c4", "mixed") and not (train_dir / C4_FILE).is_file():
        return f"{train_dir / C4_FILE} is missing"
    return None


def _wikipedia_docs(train_dir: Path, heldout: bool) -> list[str]:
    docs: list[str] = []
    for file in _wikipedia_files(train_dir, heldout):
        body: list[str] = []
        for line in file.read_text(encoding="utf-8").splitlines():
            if line.startswith("<doc "):
                body = []
            elif line.startswith("</doc>"):
                text = "\n".join(body[1:]).strip()  # drop the repeated title line
                if text:
                    docs.append(text)
            else:
                body.append(line)
    return docs


def _c4_docs(train_dir: Path) -> list[str]:
    lines = (train_dir / C4_FILE).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def load_train_texts(data: Path, source: str = "wikipedia", heldout: bool = False) -> list[str]:
    """Documents of a training source; `heldout=True` gives the KD validation slice instead."""
    train_dir = Path(data) / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(f"training data folder {train_dir} is missing (set PKDQ_DATA_DIR)")
    if source not in SOURCES:
        raise ValueError(f"unknown text source '{source}': allowed {', '.join(SOURCES)}")
    if heldout:
        return _wikipedia_docs(train_dir, heldout=True)
    if source == "wikipedia":
        return _wikipedia_docs(train_dir, heldout=False)
    if source == "c4":
        return _c4_docs(train_dir)
    return _wikipedia_docs(train_dir, heldout=False) + _c4_docs(train_dir)


def token_blocks(
    tokenizer, texts: list[str], seq_len: int, n_blocks: int, seed: int = 0,
    prefix: list[int] | tuple[int, ...] = (),
) -> torch.Tensor:
    """`n_blocks` packed blocks of `seq_len` tokens: documents shuffled by seed, joined by EOS.

    Packing wastes no positions on padding; shuffling by seed keeps the sample fixed per seed.
    `prefix` (the family's start-of-sequence tokens, `tasks.core.conventions.prefix_ids`) opens
    every block, so a family trained with BOS (Gemma) never sees a block without it.
    """
    import torch

    prefix = list(prefix)
    body = seq_len - len(prefix)
    if body < 1:
        raise ValueError(f"seq_len {seq_len} leaves no room after the {len(prefix)} prefix tokens")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    need = body * n_blocks
    ids: list[int] = []
    for index in order:
        ids.extend(tokenizer(texts[index], add_special_tokens=False)["input_ids"])
        ids.append(eos)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"training text has {len(ids)} tokens, {need} needed")
    blocks = torch.tensor(ids[:need], dtype=torch.long).view(n_blocks, body)
    if not prefix:
        return blocks
    head = torch.tensor(prefix, dtype=torch.long).expand(n_blocks, len(prefix))
    return torch.cat([head, blocks], dim=1)
