"""The sweep's table, plot and winning recipe: what was tried, what won, and why.

The table shows every variant with the held-out score it was selected on (training-side text,
never an evaluation split) and what it cost; the winner is written as a recipe a user can run
(`pkdq run winner.yaml`) and evaluate on the benchmarks, which the sweep itself never looks at.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tasks.core.common import write_json_atomic
from tasks.core.recipe import Recipe
from tasks.report import fmt
from tasks.sweep.grid import format_value

METRICS = {"kl": "held-out KL to the teacher", "ppl": "held-out perplexity"}


def rank(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Rows with a 1-based `rank` on `metric` (lower is better; ties keep grid order)."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["score"][metric], i))
    ranked = [dict(row) for row in rows]
    for position, index in enumerate(order, start=1):
        ranked[index]["rank"] = position
    return ranked


def winner_reason(rows: list[dict[str, Any]], metric: str) -> str:
    """One sentence: the winner, its score, and its margin over the runner-up."""
    ordered = sorted(rows, key=lambda r: r["rank"])
    best = ordered[0]
    text = (f"{best['label']} has the lowest {METRICS[metric]} "
            f"({best['score'][metric]:.4f}) on training-side held-out text")
    if len(ordered) > 1:
        second = ordered[1]
        gap = second["score"][metric] - best["score"][metric]
        text += f", {gap:.4f} below the runner-up ({second['label']})"
    return text


def winner_recipe(recipe: Recipe, label: str, sweep_name: str) -> dict[str, Any]:
    raw = recipe.model_dump(mode="json")
    raw["name"] = f"{sweep_name}-best"
    raw["description"] = f"winner of `pkdq sweep` {sweep_name}: {label}"
    return raw


def render_markdown(data: dict[str, Any]) -> str:
    metric = data["metric"]
    keys = [axis["key"] for axis in data["grid"]]
    head = ["rank", *keys, "KD tokens", "held-out KL", "held-out ppl", "compute s", "phase"]
    lines = [f"# Sweep {data['name']}", "",
             f"Recipe `{data['recipe']}`; selection on **{METRICS[metric]}** "
             f"(training-side held-out slice, {data['ruler']['blocks']} blocks of "
             f"{data['ruler']['seq_len']} tokens, T=1, fp32; teacher ppl "
             f"{fmt(data['teacher_ppl'])}). Evaluation splits were not used.", ""]
    if data.get("fraction"):
        lines += [f"Screening ran every variant at {data['fraction']:g}x the KD tokens; the "
                  "winner was then run at the full budget (phase `full`).", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sorted(data["rows"], key=lambda r: (r["phase"] != "full", r["rank"])):
        cells = [str(row["rank"]) if row["phase"] != "full" else "-",
                 *(format_value(row["settings"].get(k, "")) for k in keys),
                 str(row["kd_tokens"] or "-"), f"{row['score']['kl']:.4f}",
                 f"{row['score']['ppl']:.2f}", f"{row['compute_s']:.0f}", row["phase"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"**Winner:** {data['reason']}.", "",
              f"Winning recipe: `{data['winner_file']}` (run it with `pkdq run "
              f"{data['winner_file']}` to score it on the benchmarks).", "",
              "Compute s sums the stage wall times of the units a variant ran; a unit shared "
              "with an earlier variant (the prune stage, say) counts for each variant that uses "
              "it but ran once.", ""]
    return "\n".join(lines)


def write_sweep_report(run_dir: Path, data: dict[str, Any], winner: Recipe) -> dict[str, Path]:
    """results.json, sweep.md, sweep.png and winner.yaml in the sweep folder."""
    from tasks.report import plots

    run_dir = Path(run_dir)
    paths = {"json": run_dir / "results.json", "markdown": run_dir / "sweep.md",
             "plot": run_dir / "sweep.png", "winner": run_dir / "winner.yaml"}
    data = {**data, "winner_file": str(paths["winner"])}
    paths["winner"].write_text(yaml.safe_dump(winner_recipe(winner, data["winner"],
                                                            data["name"]), sort_keys=False))
    write_json_atomic(paths["json"], data)
    paths["markdown"].write_text(render_markdown(data))
    screen = [r for r in data["rows"] if r["phase"] == "screen"]
    best = next((i for i, r in enumerate(screen) if r["rank"] == 1), None)
    paths["plot"].write_bytes(plots.score_per_variant(
        [r["label"] for r in screen], [r["score"][data["metric"]] for r in screen], best,
        METRICS[data["metric"]], f"sweep {data['name']} (lower is better)"))
    return paths
