"""Pack log-likelihood requests that share token prefixes into rows scored by one forward each.

Multiple-choice benchmarks ask for log P(choice | context) once per choice, and a stock harness
re-encodes the shared context for every choice. Causal attention makes the hidden state at a
position depend only on the tokens up to it, so requests that share a prefix can share its work
exactly: a group of requests becomes a prefix tree (trie), the tree's nodes are laid out in one
row, each node attends only to its ancestors ("tree attention") and sits at position id = its
depth. One forward of the row then gives every node the hidden state a separate forward of its
root path would give, and only the nodes that predict a scored token need the vocabulary
projection.

Pure Python + numpy (no model here), so the packing can be tested on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ScoreRequest:
    """One request: the model's input tokens and the continuation tokens they must predict.

    `inputs` is (context + continuation)[:-1] (left-truncated to the model's window), so its last
    len(targets) positions predict `targets`.
    """

    inputs: tuple[int, ...]
    targets: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.targets or len(self.targets) > len(self.inputs):
            raise ValueError(f"need 1..{len(self.inputs)} targets, got {len(self.targets)}")


@dataclass
class Row:
    """A prefix tree laid out as one row: node i holds tokens[i] at depth depths[i]."""

    tokens: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    # (request index, the node predicting each of its targets, in order)
    members: list[tuple[int, list[int]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def scored_nodes(self) -> list[int]:
        """Nodes whose next-token distribution some member needs, ascending, each once."""
        return sorted({node for _, nodes in self.members for node in nodes})


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def group_requests(requests: Sequence[ScoreRequest], min_shared: int = 8,
                   max_row: int = 512) -> list[list[int]]:
    """Indices of requests that go into one row, so that shared prefixes are computed once.

    Requests are sorted by their input tokens, which puts requests with shared prefixes next to
    each other (the choices of one question). A request joins the current row when the row's
    first request and it share at least `min_shared` tokens, so rows are one question each (two
    questions that merely start alike, "Question: Which of the", stay apart: joining them saves a
    few tokens but makes rows long, and attention cost grows with the square of a row's length),
    and while the row stays within `max_row` nodes. In sorted order the nodes a request adds to
    the tree are its tokens beyond the common prefix with its predecessor, so row sizes are
    known without building the tree.
    """
    order = sorted(range(len(requests)), key=lambda i: requests[i].inputs)
    groups: list[list[int]] = []
    current: list[int] = []
    size = 0
    head: tuple[int, ...] = ()
    prev: tuple[int, ...] = ()
    for i in order:
        seq = requests[i].inputs
        added = len(seq) - common_prefix(prev, seq)
        if current and common_prefix(head, seq) >= min_shared and size + added <= max_row:
            current.append(i)
            size += added
        else:
            if current:
                groups.append(current)
            current, size, head = [i], len(seq), seq
        prev = seq
    if current:
        groups.append(current)
    return groups


def build_row(requests: Sequence[ScoreRequest], group: Sequence[int]) -> Row:
    """Merge a group's input sequences into a prefix tree; record which nodes score what."""
    row = Row()
    child: dict[tuple[int, int], int] = {}
    for idx in group:
        req = requests[idx]
        node, path = -1, []
        for depth, token in enumerate(req.inputs):
            key = (node, token)
            if key not in child:
                child[key] = len(row.tokens)
                row.tokens.append(token)
                row.depths.append(depth)
                row.parents.append(node)
            node = child[key]
            path.append(node)
        row.members.append((idx, path[len(path) - len(req.targets):]))
    return row


def pack(requests: Sequence[ScoreRequest], min_shared: int = 8, max_row: int = 512) -> list[Row]:
    """All requests as prefix-tree rows."""
    return [build_row(requests, g) for g in group_requests(requests, min_shared, max_row)]


def batch_rows(rows: Sequence[Row], max_rows: int, max_scored: int, max_tokens: int,
               min_fill: float = 0.85) -> list[list[int]]:
    """Row indices per forward, longest rows first.

    Rows in one forward are padded to the longest, so a batch closes when the next row would
    fill less than `min_fill` of the width (padding is wasted compute), or when the batch would
    pass `max_rows` rows, `max_tokens` padded tokens or `max_scored` scored positions (the logits
    tensor is scored x vocab floats). A row larger than the bounds goes alone.
    """
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    scored = width = 0
    for i in order:
        n_scored = len(rows[i].scored_nodes())
        full = (len(current) >= max_rows or scored + n_scored > max_scored
                or width * (len(current) + 1) > max_tokens or len(rows[i]) < min_fill * width)
        if current and full:
            batches.append(current)
            current, scored = [], 0
        if not current:
            width = len(rows[i])
        current.append(i)
        scored += n_scored
    if current:
        batches.append(current)
    return batches


def ancestor_mask(row: Row, width: int, window: int | None = None) -> np.ndarray:
    """[width, width] bool: node i may attend to node j (j is i or an ancestor of i).

    Padding positions attend to themselves only, so no attention row is empty (an empty row
    gives NaN, which would spread through the values of later layers). With `window`, a node
    also ignores ancestors `window` or more positions back (sliding-window attention layers).
    """
    n = len(row)
    mask = np.zeros((width, width), dtype=bool)
    for i, parent in enumerate(row.parents):
        if parent >= 0:
            mask[i, :i] = mask[parent, :i]
        mask[i, i] = True
    if window is not None:
        depths = np.asarray(row.depths)
        mask[:n, :n] &= (depths[:, None] - depths[None, :]) < window
    idx = np.arange(n, width)
    mask[idx, idx] = True
    return mask
