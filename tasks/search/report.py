"""The search's candidate table and plot: every candidate, not only the winner.

Minitron's NAS reports the shape it keeps; a user deciding whether to trust a cheap proxy needs
every candidate's size, proxy score, short-KD score and rank, and whether the two rankings agree
(Spearman's rho between them: near 1 means the proxy alone would have picked well).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.core.common import write_json_atomic


def spearman(a: list[float], b: list[float]) -> float | None:
    """Rank correlation of two score lists (average ranks for ties); None under 3 pairs."""
    if len(a) < 3:
        return None

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else None


def search_rows(candidates: list[dict[str, Any]], proxy: list[dict[str, Any]],
                short: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per candidate: shape, sizes, proxy KL and rank, short-KD KL and rank."""
    proxy_order = sorted(range(len(proxy)), key=lambda i: (proxy[i]["kl"], i))
    short_order = sorted(short, key=lambda i: (short[i]["kl"], i))
    rows = []
    for i, cand in enumerate(candidates):
        rows.append({**cand, "proxy_kl": proxy[i]["kl"], "proxy_ppl": proxy[i]["ppl"],
                     "proxy_rank": proxy_order.index(i) + 1,
                     "short_kl": short[i]["kl"] if i in short else None,
                     "short_ppl": short[i]["ppl"] if i in short else None,
                     "short_rank": short_order.index(i) + 1 if i in short else None})
    return rows


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def render_markdown(data: dict[str, Any]) -> str:
    t = data["plan"]["target"]
    goal = (f"params {t['params']:g}" if t.get("params") is not None
            else f"bytes {t['bytes'] / 1e6:.1f} MB")
    # a recipe without a quantize stage ships the dense fp32 folder: say which bytes these are
    bytes_head = ("bytes after quantize (MB)" if data["plan"].get("quantized", True)
                  else "bytes, fp32 folder (MB)")
    lines = [f"## Shape search ({goal}, tolerance {t['tolerance']:g})", "",
             f"{data['plan']['enumerated']} shapes met the target within the bounds "
             f"(max_depth_cut {t['max_depth_cut']:g}, max_width_cut {t['max_width_cut']:g}, "
             f"axes {', '.join(t['axes'])}); {data['plan']['scored']} were scored by the "
             f"one-shot proxy (held-out KL to the unpruned model), the top "
             f"{data['plan']['top_k']} by a short KD of {data['plan']['short_kd_tokens']:,} "
             "tokens each. Scores are on training-side held-out text, never an evaluation "
             "split.", "",
             f"| # | shape | params (M) | {bytes_head} | proxy KL | proxy rank "
             "| short-KD KL | short-KD rank |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for i, row in enumerate(data["rows"], start=1):
        mark = " **(winner)**" if i - 1 == data["winner"] else ""
        lines.append(
            f"| {i} | {row['label']}{mark} | {_mb(row['params'])} | {_mb(row['bytes'])} | "
            f"{row['proxy_kl']:.4f} | {row['proxy_rank']} | "
            + (f"{row['short_kl']:.4f} | {row['short_rank']} |" if row["short_kl"] is not None
               else "- | - |"))
    rho = data.get("spearman")
    lines += ["", f"**Winner:** {data['reason']}.", "",
              "Proxy vs short-KD ranking of the finalists: Spearman rho "
              + (f"{rho:.2f}" if rho is not None else "n/a (fewer than 3 finalists)")
              + " (1 = the proxy alone would have ranked them the same).",
              f"Search wall time: {data['wall_s']:.0f} s.", ""]
    return "\n".join(lines)


def write_search_report(folder: Path, data: dict[str, Any]) -> dict[str, Path]:
    """results.json, search.md and search.png (scores against size) in the search folder."""
    from tasks.report import plots

    folder = Path(folder)
    paths = {"json": folder / "results.json", "markdown": folder / "search.md",
             "plot": folder / "search.png"}
    write_json_atomic(paths["json"], data)
    paths["markdown"].write_text(render_markdown(data))
    rows = data["rows"]
    points = [{"label": str(i + 1), "series": "proxy (one-shot)", "bytes": r["bytes"],
               "value": r["proxy_kl"]} for i, r in enumerate(rows)]
    points += [{"label": str(i + 1), "series": "short KD", "bytes": r["bytes"],
                "value": r["short_kl"]} for i, r in enumerate(rows) if r["short_kl"] is not None]
    paths["plot"].write_bytes(plots.size_vs_quality(points, ylabel="held-out KL to the teacher",
                                                    log_y=False, join=False))
    return paths
