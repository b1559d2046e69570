"""The stages' greedy answers to the fixed prompts, arranged prompt by prompt.

evaluate writes one generations.json per stage (`tasks.evaluate.generations`); a reader wants
each prompt once with every stage's answer next to the baseline's, so the report's Markdown and
HTML both read this arrangement.
"""

from __future__ import annotations

from typing import Any

GENERATIONS_NOTE = (
    "Greedy decoding, the same prompts and token budget for every stage (the chat template "
    "when the tokenizer has one); reproduce one with `pkdq generate MODEL \"prompt\"`.")


def side_by_side(data: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """(stage names that have generations, [{"id", "prompt", "answers": {stage: text}}])."""
    stages = [e["stage"] for e in data["stages"] if e.get("generations")]
    prompts: dict[str, dict[str, Any]] = {}
    for entry in data["stages"]:
        for item in (entry.get("generations") or {}).get("prompts") or []:
            row = prompts.setdefault(item["id"], {"id": item["id"], "prompt": item["prompt"],
                                                  "answers": {}})
            row["answers"][entry["stage"]] = item["text"]
    return stages, list(prompts.values())


def max_new_tokens(data: dict[str, Any]) -> int | None:
    return next(((e.get("generations") or {}).get("max_new_tokens")
                 for e in data["stages"] if e.get("generations")), None)
