"""The search flow: candidates' one-shot proxies, then the finalists' short KD, as Prefect tasks.

Every candidate is a cached unit (the compare/sweep unit layout: a unit id hashes the whole
path from the base model), so an interrupted search resumes, and a second recipe with the same
base model and proxy settings in the same folder reuses finished candidates. A finalist's prune
unit is its proxy's unit: only the short KD is new.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from flows.holding import hold_for_flow
from flows.sweep import UnitSubmitter
from tasks.core.common import ModelRef
from tasks.core.model_store import read_config, resolve_model
from tasks.core.recipe import Recipe, load_recipe, parse_recipe
from tasks.pipeline import mark_run_file, write_run_file
from tasks.search import search_plan, search_rows, write_search_report
from tasks.search.report import spearman

SEARCH_FILE = "search.json"


def run_search_here(recipe: Recipe, source: str, folder: Path, base: ModelRef) -> dict[str, Any]:
    """Run (or resume) the search for `recipe` in `folder`, inside the current flow; returns the
    results (rows, winner index, the concrete winning recipe as JSON)."""
    started = time.perf_counter()
    plan = search_plan(recipe, read_config(base.path))
    write_run_file(folder / SEARCH_FILE, recipe, source, base, kind="search",
                   plan=plan.describe(),
                   candidates=[c.label for c in plan.candidates])
    print(f"[search] {plan.enumerated} shapes meet the target; scoring {len(plan.candidates)} "
          f"by the one-shot proxy, the top {plan.target.search.top_k} by a short KD of "
          f"{plan.short_tokens:,} tokens", flush=True)
    submit = UnitSubmitter(str(folder), base, recipe)
    try:
        proxies = [submit.variant(plan.proxy_variant(i))[1] for i in range(len(plan.candidates))]
        wait(proxies)
        proxy = [f.result() for f in proxies]
        order = sorted(range(len(proxy)), key=lambda i: (proxy[i]["kl"], i))
        finalists = order[:plan.target.search.top_k]
        short: dict[int, dict[str, Any]] = {}
        if "distill" in dict(recipe.stage_list()):
            futures = {i: submit.variant(plan.finalist_variant(i))[1] for i in finalists}
            wait(list(futures.values()))
            short = {i: f.result() for i, f in futures.items()}
    except BaseException as exc:
        mark_run_file(folder / SEARCH_FILE, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    scores = short or {i: proxy[i] for i in finalists}
    winner = min(scores, key=lambda i: (scores[i]["kl"], i))
    cands = [{"label": c.label, "params": c.params, "bytes": c.bytes,
              "prune": c.prune.model_dump(mode="json")} for c in plan.candidates]
    rows = search_rows(cands, proxy, short)
    by = "short-KD" if short else "one-shot proxy"
    reason = (f"{plan.candidates[winner].label} ({plan.candidates[winner].params / 1e6:.1f} M "
              f"params) has the lowest {by} held-out KL ({scores[winner]['kl']:.4f})")
    if len(scores) > 1:
        second = sorted(scores, key=lambda i: (scores[i]["kl"], i))[1]
        reason += (f", {scores[second]['kl'] - scores[winner]['kl']:.4f} below "
                   f"{plan.candidates[second].label}")
    data = {"plan": plan.describe(), "rows": rows, "winner": winner, "reason": reason,
            "spearman": spearman([proxy[i]["kl"] for i in short], [short[i]["kl"] for i in short]),
            "wall_s": time.perf_counter() - started,
            "recipe": plan.concrete(winner).model_dump(mode="json")}
    paths = write_search_report(folder, data)
    mark_run_file(folder / SEARCH_FILE, "finished", winner=plan.candidates[winner].label)
    print(f"[search] winner: {reason}", flush=True)
    return {**data, "markdown": str(paths["markdown"])}


@flow(name="pkdq-search", log_prints=True)
def search_flow(recipe_file: str, run_dir: str) -> str:
    """`pkdq search`: the search alone, in its own folder."""
    with hold_for_flow(run_dir, "pkdq search", recipe_file):
        recipe = load_recipe(recipe_file)
        base = resolve_model(recipe.model)
        result = run_search_here(recipe, recipe_file, Path(run_dir), base)
        return result["markdown"]


def run_search(recipe_file: str, run_dir: str, concurrency: int = 1) -> str:
    runner = ThreadPoolTaskRunner(max_workers=max(1, concurrency))
    return search_flow.with_options(task_runner=runner)(recipe_file, run_dir)


def resolved_recipe(result: dict[str, Any], source: str) -> Recipe:
    return parse_recipe(result["recipe"], f"{source} (searched)")
