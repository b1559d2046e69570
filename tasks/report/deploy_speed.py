"""The report's "Speed where it is deployed" section: every stage's GGUF timed in llama.cpp (the
runtime CPU users deploy on; `llama_cpp.json` of each stage folder), beside the same stage timed
in transformers by its evaluation (`eval.json` "speed", the reference), and the issue's goal for
the final model.

The side-by-side rounds (`llama_cpp_rounds.json` of the final stage): the baseline's and the
final model's GGUFs timed together, which the goal is judged on when present.

The goal (issue 18): in llama.cpp on this CPU, the final model decodes at least 2x as fast as
the baseline in f16 and at least 1.3x as fast as the baseline at the same GGUF type, in no more
than 0.30x the baseline's bf16 bytes (its parameters at 2 bytes each). Judged per GGUF type of
the final model; met when one type meets all three.

Built from collected data alone (`run_report.collect`); the rows are table cells shared by
report.md and report.html, numbers tagged with their report.json path.
"""

from __future__ import annotations

from typing import Any

from tasks.report.format import DASH, Cell, json_path, num
from tasks.report.retention import BF16_BYTES, safe_ratio

GOAL = {"decode_vs_baseline_f16": 2.0, "decode_vs_baseline_same_type": 1.3,
        "bytes_vs_baseline_bf16": 0.30}
COLUMNS = ["stage", "runtime", "type", "weights", "MB", "prefill tok/s", "decode tok/s",
           "peak RSS MB"]
GOAL_COLUMNS = ["final stage, type", "decode vs baseline f16 (goal ≥ 2)",
                "decode vs baseline, same type (goal ≥ 1.3)",
                "bytes vs baseline bf16 (goal ≤ 0.30)", "goal met"]
WEIGHTS = {"exact": "GPTQ grid, exact", "re-gridded": "GPTQ grid re-gridded",
           "grid-f16": "GPTQ grid in f16", "from-float": "from float",
           "shipped": "the stage's own GGUF, as shipped"}


def _timed(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["type"]: row for row in rows if "decode_tok_s" in row}


def _rounds_rows(rounds: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The timed rows of the side-by-side rounds, or None when there are none to judge on
    (not asked for, llama.cpp failed, every export refused)."""
    if not rounds or rounds.get("error"):
        return None
    timed = [row for row in rounds.get("rows") or [] if "decode_tok_s" in row]
    return timed or None


def deploy_summary(stages: list[dict[str, Any]],
                   rounds: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The goal ratios of the run's final model in llama.cpp; None until both the baseline and
    the last stage have a llama.cpp record (a refused one judges nothing: no types, not met).

    Each GGUF type the final model was timed at is compared with the baseline in f16 and at
    that type: on the side-by-side `rounds` (`llama_cpp_rounds.json`) when they were timed,
    else on each stage's own timing, minutes apart (`timing` says which).
    """
    base = next((e for e in stages if e["stage"].endswith("baseline")), None)
    final = stages[-1] if stages else None
    if base is None or final is base:
        return None
    side = _rounds_rows(rounds)
    if side is not None:
        base_rows = {r["type"]: r for r in side if r["stage"] == base["stage"]}
        final_rows = [r for r in side if r["stage"] == final["stage"]]
        timing = f"side by side, {(rounds or {}).get('rounds')} interleaved rounds"
    elif base.get("llama_cpp") and final.get("llama_cpp"):
        base_rows = _timed(base["llama_cpp"].get("rows") or [])
        final_rows = list(_timed(final["llama_cpp"].get("rows") or []).values())
        timing = "each stage's own timing, minutes apart"
    else:
        return None
    params = (base.get("eval") or {}).get("params")
    bf16 = params * BF16_BYTES if params else None
    by_type = []
    for row in final_rows:
        qtype = row["type"]
        ratios = {
            "decode_vs_baseline_f16": safe_ratio(row["decode_tok_s"],
                                             (base_rows.get("f16") or {}).get("decode_tok_s")),
            "decode_vs_baseline_same_type": safe_ratio(  # the shipped file: its main type
                row["decode_tok_s"],
                (base_rows.get(row.get("base_type", qtype)) or {}).get("decode_tok_s")),
            "bytes_vs_baseline_bf16": safe_ratio(row["file_bytes"], bf16),
        }
        known = all(v is not None for v in ratios.values())
        met = known and all(
            ratios[k] <= goal if k.startswith("bytes") else ratios[k] >= goal
            for k, goal in GOAL.items())
        by_type.append({"type": qtype, **ratios, "met": met if known else None})
    return {"final_stage": final["stage"], "goal": GOAL, "bytes_baseline_bf16": bf16,
            "timing": timing, "by_type": by_type, "met": any(t["met"] for t in by_type),
            "met_by": [t["type"] for t in by_type if t["met"]]}


ROUNDS_COLUMNS = ["stage", "type", "weights", "MB", "prefill tok/s", "decode tok/s (median)",
                  "decode, each round", "peak RSS MB"]


def rounds_rows(data: dict[str, Any], prefix: str = "") -> list[list[Cell]]:
    """The side-by-side rounds, a row per file (a refused export: its reason)."""
    rounds = data.get("llama_cpp_rounds") or {}
    rows: list[list[Cell]] = []
    for j, row in enumerate(rounds.get("rows") or []):
        if "decode_tok_s" not in row:
            rows.append([row["stage"], row["type"], f"not measured: {row.get('refused')}",
                         DASH, DASH, DASH, DASH, DASH])
            continue
        path = json_path(prefix, "llama_cpp_rounds", "rows", j)
        rows.append([
            row["stage"], row["type"], WEIGHTS.get(row["grid"], row["grid"]),
            num(f"{path}.file_bytes", row["file_bytes"], _mb(row["file_bytes"])),
            num(f"{path}.prefill_tok_s", row["prefill_tok_s"], f"{row['prefill_tok_s']:,.0f}"),
            num(f"{path}.decode_tok_s", row["decode_tok_s"], f"{row['decode_tok_s']:.1f}"),
            ", ".join(f"{v:.1f}" for v in row.get("decode_rounds") or []),
            num(f"{path}.peak_rss_mb", row.get("peak_rss_mb"),
                f"{row.get('peak_rss_mb') or 0:,.0f}")])
    return rows


def rounds_note(data: dict[str, Any]) -> str:
    rounds = data.get("llama_cpp_rounds") or {}
    if rounds.get("error"):
        return (f"The side-by-side timing failed ({rounds['error']}); the goal is judged on "
                "each stage's own timing.")
    loads = rounds.get("load_average_1m") or []
    load = (f"; the 1-minute load average was {min(loads):.1f}–{max(loads):.1f} on "
            f"{rounds.get('cpus', '?')} CPUs" if loads else "")
    return (f"The baseline's and the final model's GGUFs timed together after the last "
            f"evaluation: {rounds.get('rounds')} rounds, each timing every file once, in a fresh "
            "process per file and round after a warm-up pass; "
            f"threads {rounds.get('threads')}, prompt {rounds.get('prompt_tokens')} tokens, "
            f"greedy decode {rounds.get('new_tokens')} tokens. The machine's drift over "
            "minutes falls on every file alike; the median is reported and the goal below is "
            f"judged on it{load}.")


def _mb(value: float | None) -> str:
    return f"{(value or 0) / 1e6:,.1f}"


def speed_rows(data: dict[str, Any], prefix: str = "") -> list[list[Cell]]:
    """Per stage: a row per llama.cpp type (or the reason there is none), then transformers."""
    rows: list[list[Cell]] = []
    for i, entry in enumerate(data["stages"]):
        llama = entry.get("llama_cpp")
        if llama is None:
            continue
        base = json_path(prefix, "stages", i)
        if llama.get("refused"):
            rows.append([entry["stage"], "llama.cpp", DASH, f"not measured: {llama['refused']}",
                         DASH, DASH, DASH, DASH])
        for j, row in enumerate(llama.get("rows") or []):
            path = f"{base}.llama_cpp.rows.{j}"
            if "decode_tok_s" not in row:
                why = row.get("refused") or row.get("error")
                rows.append([entry["stage"], "llama.cpp", row["type"], f"not measured: {why}",
                             DASH, DASH, DASH, DASH])
                continue
            rows.append([
                entry["stage"], "llama.cpp", row["type"], WEIGHTS.get(row["grid"], row["grid"]),
                num(f"{path}.file_bytes", row["file_bytes"], _mb(row["file_bytes"])),
                num(f"{path}.prefill_tok_s", row["prefill_tok_s"], f"{row['prefill_tok_s']:,.0f}"),
                num(f"{path}.decode_tok_s", row["decode_tok_s"], f"{row['decode_tok_s']:.1f}"),
                num(f"{path}.peak_rss_mb", row["peak_rss_mb"], f"{row['peak_rss_mb']:,.0f}")])
        rows.append(_transformers_row(entry, base))
    return rows


def _transformers_row(entry: dict[str, Any], base: str) -> list[Cell]:
    """The evaluation's own timing of the stage in transformers (peak RSS: the evaluation's)."""
    ev = entry.get("eval") or {}
    speed = ev.get("speed") or {}
    prefill, decode = speed.get("prefill_tokens_per_s"), speed.get("decode_tokens_per_s")
    rss = ev.get("peak_rss_bytes")
    return [entry["stage"], "transformers (reference)", speed.get("dtype") or DASH,
            "as pkdq evaluates it" if speed else "speed not measured",
            num(f"{base}.eval.bytes_on_disk", ev.get("bytes_on_disk"),
                _mb(ev.get("bytes_on_disk"))),
            num(f"{base}.eval.speed.prefill_tokens_per_s", prefill, f"{prefill or 0:,.0f}"),
            num(f"{base}.eval.speed.decode_tokens_per_s", decode, f"{decode or 0:.1f}"),
            num(f"{base}.eval.peak_rss_bytes", rss if speed else None, f"{(rss or 0) / 1e6:,.0f}")]


def goal_rows(summary: dict[str, Any] | None, prefix: str = "") -> list[list[Cell]]:
    if not summary:
        return []
    rows: list[list[Cell]] = []
    for k, t in enumerate(summary["by_type"]):
        path = json_path(prefix, "deploy_speed", "by_type", k)
        met = {True: "yes", False: "no", None: "unknown (a baseline row is missing)"}[t["met"]]
        rows.append([f"{summary['final_stage']}, {t['type']}",
                     *[num(f"{path}.{key}", t[key], f"{t[key] or 0:.2f}x") for key in GOAL],
                     met])
    return rows


def speed_note(data: dict[str, Any]) -> str:
    """How the numbers were taken: runtime version, threads, prompt, and what is not known."""
    units = [e["llama_cpp"] for e in data["stages"] if e.get("llama_cpp")]
    timed = [r for u in units for r in u.get("rows") or [] if "runtime" in r]
    runtimes = sorted({r["runtime"] for r in timed}) or ["llama.cpp (not run)"]
    threads = sorted({u.get("threads") for u in units if u.get("threads") is not None})
    prompts = sorted({u.get("prompt_tokens") for u in units if u.get("prompt_tokens")})
    new = sorted({u.get("new_tokens") for u in units if u.get("new_tokens")})
    repeats = sorted({u.get("repeats") for u in units if u.get("repeats")})
    loads = [u["load_average_1m_before"] for u in units if "load_average_1m_before" in u]
    cpus = next((u.get("cpus") for u in units if u.get("cpus")), "?")
    cut = _torch_repeats_cut(data["stages"])
    load = (f"the 1-minute load average before timing was {min(loads):.1f}–{max(loads):.1f} "
            f"on {cpus} CPUs" if loads else "no load average was recorded")

    def join(values: list[Any]) -> str:
        return "/".join(str(v) for v in values) or "?"

    return (f"{', '.join(runtimes)}, threads {join(threads)}; prompt {join(prompts)} tokens "
            f"(fixed random ids), greedy decode {join(new)} tokens, median of {join(repeats)} "
            "after a warm-up; each GGUF (pkdq's own exporter) timed in a fresh process, whose "
            "peak RSS is Python + llama.cpp + the model. transformers rows: the stage's "
            "evaluation timing the same prompt length, new tokens and threads (its peak RSS is "
            f"the whole evaluation's{cut}). Whether other processes shared the CPU while these "
            f"were measured is not knowable from the run folder: {load}; rates taken on a busy "
            "machine are lower bounds.")


def _torch_repeats_cut(stages: list[dict[str, Any]]) -> str:
    """The transformers timings that stopped short of their repeats (`measure_latency`'s
    budget), named, or nothing."""
    cut, budget = [], None
    for entry in stages:
        speed = (entry.get("eval") or {}).get("speed") or {}
        if speed.get("repeats_asked", speed.get("repeats")) != speed.get("repeats"):
            cut.append(f"{entry['stage']} ({speed['repeats']} of {speed['repeats_asked']})")
            budget = speed.get("budget_s")
    if not cut:
        return ""
    return (f"; its timed passes stop repeating once they took {budget:g} s, so the median is "
            f"of fewer passes for {', '.join(cut)}")


def goal_sentence(summary: dict[str, Any] | None) -> str:
    if not summary:
        return ("Goal (final decode ≥ 2x baseline f16 and ≥ 1.3x baseline at the same type, "
                "≤ 0.30x baseline bf16 bytes): not judged (baseline or final stage not "
                "measured in llama.cpp).")
    verdict = (f"met by {', '.join(summary['met_by'])}" if summary["met"] else "not met")
    timing = summary.get("timing", "each stage's own timing, minutes apart")
    return (f"Goal for {summary['final_stage']} in llama.cpp (decode ≥ 2x baseline f16 and ≥ "
            f"1.3x baseline at the same type, ≤ 0.30x baseline bf16 bytes): **{verdict}**, "
            f"judged on {timing}. Bytes: the GGUF file, tokenizer included, against the "
            "baseline's parameters at 2 bytes each.")


def speed_markdown(data: dict[str, Any]) -> list[str]:
    """The Markdown section (empty when no stage was timed in llama.cpp)."""
    from tasks.report.format import cell_text

    rows = speed_rows(data)
    if not rows:
        return []

    def table(columns: list[str], body: list[list[Cell]], numeric: range) -> list[str]:
        align = ["---:" if i in numeric else "---" for i in range(len(columns))]
        return ["| " + " | ".join(columns) + " |", "| " + " | ".join(align) + " |",
                *("| " + " | ".join(cell_text(c).replace("|", "\\|") for c in row) + " |"
                  for row in body)]

    summary = data.get("deploy_speed")
    lines = ["## Speed where it is deployed", "", speed_note(data), "",
             *table(COLUMNS, rows, range(4, 8)), ""]
    if data.get("llama_cpp_rounds"):
        lines += [f"Side by side: {rounds_note(data)}", "",
                  *table(ROUNDS_COLUMNS, rounds_rows(data), range(3, 8)), ""]
    lines += [goal_sentence(summary), ""]
    if summary:
        lines += [*table(GOAL_COLUMNS, goal_rows(summary), range(1, 4)), ""]
    return lines
