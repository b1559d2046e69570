"""Report figures as PNG bytes (matplotlib, Agg backend).

Every function returns bytes rather than writing a file, so a caller can inline the figure in a
self-contained HTML page, embed it in a Prefect artifact, or save it; nothing here touches disk.
matplotlib is imported lazily: building report.json must not pay for it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Keys of a loss_curve.json step row that are bookkeeping, not parts of the training loss.
_NOT_LOSS = frozenset({"step", "tokens", "lr", "grad_norm", "time_s", "train_tokens"})


@contextmanager
def _figure(ncols: int = 1, figsize: tuple[float, float] = (8.0, 4.0)) -> Iterator[Any]:
    """(fig, axes) on the Agg backend; closed afterwards so long runs do not leak figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize)
    try:
        yield fig, axes
    finally:
        plt.close(fig)


def _png(fig: Any) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _tick_labels(series: dict[str, list[tuple[str, float]]]) -> tuple[list[str], set[int]]:
    """One x label per stage position, and the positions where the series disagree.

    Orderings compared side by side (P-KD-Q against Q-P-KD) put different stages at the same
    position; there the tick shows the position and each point carries its own label.
    """
    width = max((len(points) for points in series.values()), default=0)
    labels, mixed = [], set()
    for pos in range(width):
        names = {points[pos][0] for points in series.values() if pos < len(points)}
        if len(names) == 1:
            labels.append(names.pop())
        else:
            labels.append(f"stage {pos}")
            mixed.add(pos)
    return labels, mixed


def quality_per_stage(series: dict[str, list[tuple[str, float]]], ylabel: str,
                      baseline: float | None,
                      errors: dict[str, list[float | None]] | None = None) -> bytes:
    """One line per series (name -> [(stage label, value)]) over stage positions.

    The baseline is a dashed horizontal line so every stage reads as a distance from it.
    `errors` (name -> one standard error per point, None where unknown) draws error bars: a
    zoomed y-axis without them makes noise look like a trend.
    """
    with _figure(figsize=(8.0, 4.0)) as (fig, ax):
        draw_quality(ax, series, ylabel, baseline, errors)
        return _png(fig)


def draw_quality(ax: Any, series: dict[str, list[tuple[str, float]]], ylabel: str,
                 baseline: float | None,
                 errors: dict[str, list[float | None]] | None = None) -> None:
    """`quality_per_stage`'s drawing on a given Axes (tests inspect its artists)."""
    labels, mixed = _tick_labels(series)
    for name, points in series.items():
        xs = list(range(len(points)))
        errs = (errors or {}).get(name)
        if errs and len(errs) == len(points) and any(e is not None for e in errs):
            ax.errorbar(xs, [v for _, v in points],
                        yerr=[0.0 if e is None else float(e) for e in errs], fmt="o-",
                        capsize=4, label=name)
        else:
            ax.plot(xs, [v for _, v in points], "o-", label=name)
        for x, (label, value) in zip(xs, points, strict=True):
            if x in mixed:
                ax.annotate(label, (x, value), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
    if baseline is not None:
        ax.axhline(baseline, linestyle="--", color="grey", label="baseline")
    ax.set_xticks(range(len(labels)), labels)
    ax.set(xlabel="stage", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _log_axis(ax: Any, values: list[float]) -> None:
    """Log y with plain numbers; within one decade the in-between ticks get labels too."""
    from matplotlib.ticker import FormatStrFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) < 10:
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))


def size_vs_quality(points: list[dict[str, Any]], ylabel: str = "WikiText-2 perplexity",
                    log_y: bool = True, join: bool = True) -> bytes:
    """Quality against bytes on disk (MB): where each stage lands on the size/quality plane.

    Points ({"label", "series", "bytes", "value", "baseline"}) of one series are joined in the
    order given (`join=False`: unjoined, for candidates that form no sequence); baseline points
    are stars so the starting point is unmistakable.
    """
    with _figure(figsize=(8.0, 4.5)) as (fig, ax):
        by_series: dict[str, list[dict[str, Any]]] = {}
        for point in points:
            by_series.setdefault(point["series"], []).append(point)
        for name, pts in by_series.items():
            ax.plot([p["bytes"] / 1e6 for p in pts], [p["value"] for p in pts],
                    "o-" if join else "o", label=name, alpha=0.8)
        for point in points:
            x, y = point["bytes"] / 1e6, point["value"]
            if point.get("baseline"):
                ax.plot([x], [y], marker="*", markersize=16, color="gold",
                        markeredgecolor="black", linestyle="none", zorder=5)
            ax.annotate(point["label"], (x, y), textcoords="offset points", xytext=(5, 5),
                        fontsize=8)
        ax.plot([], [], marker="*", markersize=12, color="gold", markeredgecolor="black",
                linestyle="none", label="baseline")
        if log_y:
            _log_axis(ax, [p["value"] for p in points])
        ax.set(xlabel="bytes on disk (MB)", ylabel=ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        return _png(fig)


def loss_curve(curve: dict[str, Any]) -> bytes:
    """A KD stage's loss_curve.json: training loss parts per step, and held-out KL / ppl.

    The held-out panel is what says whether distillation helped: training loss is measured on
    the batches being fitted, held-out KL on text the student never trained on.
    """
    steps = curve.get("steps") or []
    heldout = curve.get("heldout") or []
    with _figure(ncols=2, figsize=(11.0, 4.0)) as (fig, (ax_train, ax_held)):
        first = steps[0] if steps else {}
        parts = [k for k, v in first.items() if k not in _NOT_LOSS
                 and isinstance(v, int | float) and not isinstance(v, bool)]
        xs = [row["step"] for row in steps]
        for key in parts:
            ax_train.plot(xs, [row.get(key, math.nan) for row in steps], label=key)
        ax_train.set(xlabel="step", ylabel="training loss", title="training (per step)")
        if parts:
            ax_train.legend(fontsize=8)
        ax_held.set(xlabel="step", title="held-out")
        if heldout:
            hx = [h["step"] for h in heldout]
            ax_held.plot(hx, [h["kl"] for h in heldout], "o-", color="tab:blue", label="KL")
            ax_held.set_ylabel("KL(teacher || student), T=1", color="tab:blue")
            if all("ppl" in h for h in heldout):
                ax_ppl = ax_held.twinx()
                ax_ppl.plot(hx, [h["ppl"] for h in heldout], "s--", color="tab:orange",
                            label="student ppl")
                if all("teacher_ppl" in h for h in heldout):
                    ax_ppl.plot(hx, [h["teacher_ppl"] for h in heldout], ":", color="grey",
                                label="teacher ppl")
                ax_ppl.set_ylabel("perplexity", color="tab:orange")
                ax_ppl.legend(fontsize=8, loc="upper right")
            ax_held.legend(fontsize=8, loc="upper left")
        else:
            ax_held.text(0.5, 0.5, "no held-out evaluation", ha="center", va="center",
                         transform=ax_held.transAxes)
        return _png(fig)


def score_per_variant(labels: list[str], values: list[float], highlight: int | None,
                      ylabel: str, title: str) -> bytes:
    """One bar per sweep variant (lower is better); the selected one is drawn in another colour.

    Bars, not a line: variants of a grid are not ordered along one axis.
    """
    with _figure(figsize=(max(6.0, 0.9 * len(labels) + 2.0), 4.5)) as (fig, ax):
        colours = ["tab:orange" if i == highlight else "tab:blue" for i in range(len(values))]
        ax.bar(range(len(values)), values, color=colours)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        if values:
            low, high = min(values), max(values)
            pad = (high - low) * 0.15 or abs(high) * 0.05 or 1.0
            ax.set_ylim(max(0.0, low - pad), high + pad)  # differences, not bars from zero
        ax.set(ylabel=ylabel, title=title)
        ax.grid(alpha=0.3, axis="y")
        return _png(fig)
