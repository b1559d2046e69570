"""The `pkdq` command line. Every command has --help; bad input exits 2 with one line."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from pkdq.env import configure_environment

if TYPE_CHECKING:
    from tasks.core.recipe import Recipe

configure_environment()

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="pkdq: prune -> distill -> quantize an LLM, with an honest per-stage report.",
)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command("recipes")
def recipes_cmd() -> None:
    """List the named recipes, one line each."""
    from tasks.core.recipe import list_recipes

    for name, description in list_recipes():
        typer.echo(f"{name:28s} {description}")


def _echo_rule_warnings(recipe: Recipe) -> int:
    """Print the rule check (tasks.rules) on stderr, one line each; returns the warning count.

    Info lines are printed but not counted: they never call for a change to the recipe.
    """
    from tasks.rules import rule_warnings

    found = rule_warnings(recipe)
    for finding in found:
        typer.echo(finding.line(), err=True)
    return sum(finding.level == "warning" for finding in found)


@app.command("validate")
def validate_cmd(
    recipe: str = typer.Argument(..., help="recipe name or path to a YAML file"),
    strict: bool = typer.Option(False, "--strict", help="exit 1 when a rule warns (info lines "
                                                        "do not count)"),
) -> None:
    """Check a recipe: exit 0, or one line saying what is wrong and where.

    A valid recipe is also checked against rules backed by published results (one-shot prune
    over 50%, stage order, quantization groups on the pruned shapes); each finding is one line
    on stderr and does not change the exit code unless --strict.
    """
    from tasks.core.recipe import RecipeError, load_recipe

    try:
        parsed = load_recipe(recipe)
    except RecipeError as exc:
        _fail(str(exc))
    stages = " -> ".join(kind for kind, _ in parsed.stage_list())
    typer.echo(f"ok: {parsed.name}: {stages} on {parsed.model}")
    if _echo_rule_warnings(parsed) and strict:
        raise typer.Exit(1)


@app.command("run")
def run_cmd(
    recipe: str = typer.Argument(..., help="recipe name (see `pkdq recipes`) or YAML path"),
    runs_dir: str = typer.Option("runs", help="where run folders are created (with --pool: a "
                                              "path every worker sees, e.g. a shared mount)"),
    run_id: str = typer.Option(None, help="run folder name (default: the recipe's name); "
                                          "running again with the same id resumes"),
    pool: str = typer.Option(None, help="submit to this Prefect work pool instead of running "
                                        "here (see `pkdq serve`)"),
    api_url: str = typer.Option(None, help="with --pool: the Prefect API (default: "
                                           "PREFECT_API_URL, else http://127.0.0.1:4200/api)"),
    wait: bool = typer.Option(True, help="with --pool: wait until the flow run ends"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also show library warnings, "
                                 "banners and Prefect's log lines (always in <run>/run.log)"),
) -> None:
    """Run a recipe as a Prefect flow; rerunning resumes from the last finished stage.

    The terminal shows pkdq's own lines (stages, steps, tok/s, ETA, results); everything, library
    output included, goes to the run folder's run.log.
    """
    from tasks.core.recipe import RecipeError, load_recipe, recipe_path
    from tasks.core.resources import ResourceError, check_machine

    try:
        parsed = load_recipe(recipe)
        source = str(recipe_path(recipe).resolve())
    except RecipeError as exc:
        _fail(str(exc))
    if pool:
        _echo_rule_warnings(parsed)  # advice only: the run goes ahead
        _run_on_pool(Path(source), f"{runs_dir.rstrip('/')}/{run_id or parsed.name}", pool,
                     api_url, wait)
        return
    try:
        check_machine(parsed.resources)  # refuse before any stage starts or folder exists
    except ResourceError as exc:
        _fail(str(exc))
    run_dir = (Path(runs_dir) / (run_id or parsed.name)).resolve()
    log = _capture(run_dir, verbose)
    _echo_rule_warnings(parsed)  # advice only: the run goes ahead
    if parsed.ordering_experiment:  # a non-production order: run it as a one-order comparison
        from tasks.compare import KIND_LETTER

        order = "-".join(KIND_LETTER[kind] for kind, _ in parsed.stage_list())
        typer.echo(f"pkdq: {parsed.name} is an ordering experiment ({order}); running it as a "
                   f"comparison of that one order in {run_dir}")
        from flows.compare import run_compare

        with _crash_to_one_line(log):
            report = run_compare(source, str(run_dir), [order])
        typer.echo(f"pkdq: finished; report at {report}")
        return
    typer.echo(f"pkdq: running {parsed.name} in {run_dir}")
    from flows.compress import compress_flow

    with _crash_to_one_line(log):
        report = compress_flow(source, str(run_dir))
    typer.echo(f"pkdq: finished; report at {report}")


def _capture(run_dir: Path, verbose: bool) -> Path:
    """From here on the terminal shows pkdq's lines and run_dir/run.log gets everything."""
    from pkdq.terminal import capture_terminal

    return capture_terminal(run_dir, verbose, header=" ".join(["pkdq", *sys.argv[1:]])).log_path


@contextmanager
def _crash_to_one_line(log: Path) -> Iterator[None]:
    """A failed flow: one line on the terminal; a genuine crash's traceback goes to run.log."""
    import traceback

    from tasks.core.common import one_line
    from tasks.core.model_store import ModelNotFoundError

    try:
        yield
    except ModelNotFoundError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail(f"interrupted; the same command resumes (log: {log})", code=130)
    except Exception as exc:
        traceback.print_exc()  # stderr is captured: run.log only, unless --verbose
        _fail(f"{one_line(exc)} (traceback in {log})", code=1)


def _run_on_pool(recipe_file: Path, run_dir: str, pool: str, api_url: str | None,
                 wait: bool) -> None:
    """Submit to a work pool; the worker's machine checks resources, not this one."""
    import os

    from flows.deploy import RunLocationError, submit
    from flows.serve import DEFAULT_PORT
    from flows.serve import api_url as local_api

    url = api_url or os.environ.get("PREFECT_API_URL") or local_api("127.0.0.1", DEFAULT_PORT)
    try:
        done = submit(recipe_file, run_dir, pool, url, wait=wait, on_created=lambda s: typer.echo(
            f"pkdq: flow run {s.flow_run_id} submitted to pool '{pool}' ({s.deployment} at "
            f"{url}); run folder {s.run_dir}"))
    except RunLocationError as exc:
        _fail(str(exc))
    if not wait:
        return
    if done.state != "Completed":
        _fail(f"flow run {done.flow_run_id} ended {done.state}; see the worker's log", code=1)
    typer.echo(f"pkdq: flow run {done.flow_run_id} Completed; report at {done.run_dir}/report.md")


@app.command("serve")
def serve_cmd(
    port: int = typer.Option(4200, help="Prefect API port on 127.0.0.1"),
    pool: str = typer.Option("pkdq", help="process work pool (created if missing)"),
    home: Path = typer.Option(None, help="PREFECT_HOME of this server (default: "
                                         "<cache>/prefect-serve/<port>)"),
    ui: bool = typer.Option(False, help="serve the Prefect UI too"),
    query_seconds: float = typer.Option(5.0, help="how often the worker polls the pool"),
    limit: int = typer.Option(1, min=1, help="flow runs the worker runs at once"),
) -> None:
    """Start a local Prefect server (127.0.0.1 only) and a process worker on a work pool."""
    from flows.serve import ServeError, serve

    try:
        svc = serve(port=port, pool=pool, home=home, ui=ui, query_seconds=query_seconds,
                    limit=limit)
    except ServeError as exc:
        _fail(str(exc))
    typer.echo(f"pkdq: prefect server pid {svc.server_pid} at {svc.api_url}")
    typer.echo(f"pkdq: worker pid {svc.worker_pid} polling process pool '{svc.pool}'")
    typer.echo(f"pkdq: logs in {svc.logs}")
    typer.echo(f"submit: pkdq run RECIPE --pool {svc.pool} --api-url {svc.api_url}")
    typer.echo(f"stop:   {svc.stop_hint()}")


@app.command("stop")
def stop_cmd(
    port: int = typer.Option(4200, help="the port given to `pkdq serve`"),
    home: Path = typer.Option(None, help="the --home given to `pkdq serve`, if any"),
) -> None:
    """Stop the server and worker that `pkdq serve` started (by their recorded pids)."""
    from flows.serve import ServeError, default_home, stop

    try:
        stopped = stop(home or default_home(port))
    except ServeError as exc:
        _fail(str(exc))
    typer.echo(f"pkdq: stopped {', '.join(map(str, stopped)) or 'nothing (already gone)'}")


@app.command("quantize")
def quantize_cmd(
    model: str = typer.Argument(..., help="built-in name, HF folder, .gguf, or cached HF id"),
    method: str = typer.Option("gptq", help="gptq, awq or rtn"),
    bits: int = typer.Option(4, help="4 or 8"),
    group: int = typer.Option(64, help="group size: 32, 64 or 128"),
    desc_act: bool = typer.Option(False, help="GPTQ activation order"),
    damp: float = typer.Option(0.01, help="GPTQ damping (fraction of the mean diagonal)"),
    samples: int = typer.Option(16, help="calibration blocks (C4 train text)"),
    seq_len: int = typer.Option(512, help="calibration block length"),
    out: Path = typer.Option(None, help="output stage folder (default: runs/quantize-<...>)"),
    threads: int = typer.Option(2, help="CPU threads"),
    seed: int = typer.Option(0),
    gguf: str = typer.Option("none", help="also write OUT/model.gguf for llama.cpp: none, f16, "
                                          "q8_0 or q4_0 (Llama models)"),
) -> None:
    """Quantize one model outside a recipe; writes OUT/model and OUT/metrics.json."""
    from pydantic import ValidationError

    from tasks.core.common import StageContext, write_json_atomic
    from tasks.core.gptq_checkpoint import QuantizeError
    from tasks.core.model_store import ModelNotFoundError, resolve_model
    from tasks.core.recipe import QuantizeConfig
    from tasks.quantize import quantize_stage

    try:
        cfg = QuantizeConfig(method=method, bits=bits, group_size=group, desc_act=desc_act,
                             damp_percent=damp, gguf=gguf,
                             calibration={"source": "c4", "samples": samples, "seq_len": seq_len})
        ref = resolve_model(model)
    except ValidationError as exc:
        _fail(" ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    except ModelNotFoundError as exc:
        _fail(str(exc))
    out = (out or Path("runs") / f"quantize-{Path(model).stem}-{method}-w{bits}-g{group}").resolve()
    try:
        result = quantize_stage(ref, cfg, StageContext(out_dir=out, seed=seed, threads=threads))
    except (ValueError, QuantizeError) as exc:
        _fail(str(exc))
    write_json_atomic(out / "metrics.json", result.metrics)
    size = result.metrics["bytes_on_disk"]
    typer.echo(f"pkdq: {method} W{bits} g{group} -> {result.model.path} "
               f"({size['output_weights'] / 1e6:.1f} MB weights, was "
               f"{size['input_weights'] / 1e6:.1f} MB; {result.metrics['wall_s']:.0f}s)")
    for warning in result.metrics["serving"]["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    if "gguf" in result.metrics:
        _echo_gguf(result.metrics["gguf"])


def _echo_gguf(metrics: dict) -> None:
    """One line: where the GGUF went, its size, and what reloading it showed."""
    line = (f"pkdq: gguf {metrics['qtype']} -> {metrics['file']} ({metrics['bytes'] / 1e6:.1f} MB"
            f", {metrics['tensor_count']} tensors)")
    check = metrics.get("verification")
    if check:
        line += (f"; transformers reload: top-1 agreement {check['top1_agreement']:.3f}, "
                 f"max |logit diff| {check['max_abs_logit_diff']:.3g}")
    typer.echo(line + "; llama.cpp not run (not installed here)")


@app.command("export-gguf")
def export_gguf_cmd(
    model: str = typer.Argument(..., help="built-in name, HF folder (float or GPTQ), .gguf, or "
                                          "cached HF id; Llama architecture"),
    out: Path = typer.Argument(..., help="the .gguf file to write"),
    qtype: str = typer.Option("q8_0", help="f16, q8_0 or q4_0 (llama.cpp's block grids)"),
    reference: Path = typer.Option(None, help="GGUF whose tokenizer.* keys are copied (default: "
                                              "one with the same vocabulary, e.g. SmolLM2's)"),
    verify: bool = typer.Option(True, "--verify/--no-verify",
                                help="reload with transformers and compare logits"),
    metrics_out: Path = typer.Option(None, "--metrics", help="write the metrics JSON here"),
    threads: int = typer.Option(1, min=1, help="torch CPU threads"),
) -> None:
    """Write a model as a GGUF file for llama.cpp (a GPTQ folder exports its grid values)."""
    import torch

    from tasks.core.common import write_json_atomic
    from tasks.core.model_store import ModelNotFoundError, resolve_model
    from tasks.quantize import GgufExportError, GgufVerifyError, export_gguf

    torch.set_num_threads(threads)
    try:
        ref = resolve_model(model)
        metrics = export_gguf(ref.path, out, qtype, reference, verify=verify)
    except (ModelNotFoundError, GgufExportError, GgufVerifyError) as exc:
        _fail(str(exc))
    if metrics_out is not None:
        write_json_atomic(metrics_out, metrics)
    _echo_gguf(metrics)


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="built-in name, HF folder, .gguf, or cached HF id"),
    tasks: str = typer.Option("arc_easy,piqa", help="comma-separated: arc_easy, arc_challenge, "
                              "piqa, hellaswag, winogrande, lambada_openai, boolq"),
    samples: int = typer.Option(100, min=0, help="docs per task (seeded); 0 = full split"),
    out: Path = typer.Option(None, help="write the results JSON here (per-doc scores beside it "
                                        "as <name>.samples.json); default: JSON to stdout"),
    backend: str = typer.Option("pkdq", help="pkdq (same scores, less compute) or hf (stock)"),
    dtype: str = typer.Option("float32", help="float32 or bfloat16"),
    batch_size: int = typer.Option(16, min=1),
    wikitext_tokens: int = typer.Option(8192, min=256, help="direct token-perplexity slice"),
    wikitext_pages: int = typer.Option(2, min=-1, help="articles for lm-eval's rolling wikitext "
                                                       "(0 = skip, -1 = all 62)"),
    speed: bool = typer.Option(True, "--speed/--no-speed", help="measure prefill/decode speed"),
    threads: int = typer.Option(1, min=1, help="torch CPU threads"),
    seed: int = typer.Option(1234, help="picks the doc subset (same seed = same docs)"),
) -> None:
    """Evaluate any model outside a recipe: benchmarks, WikiText-2, size, memory, speed."""
    import json
    import tempfile

    from pydantic import ValidationError

    from tasks.core.common import write_json_atomic
    from tasks.core.model_store import ModelNotFoundError, resolve_model
    from tasks.core.recipe import EvalConfig
    from tasks.evaluate import SAMPLES_JSON, evaluate_model

    try:
        cfg = EvalConfig(tasks=[t.strip() for t in tasks.split(",") if t.strip()],
                         samples=samples or None, backend=backend, dtype=dtype,
                         batch_size=batch_size, speed={"enabled": speed},
                         wikitext={"tokens": wikitext_tokens,
                                   "pages": None if wikitext_pages < 0 else wikitext_pages})
        ref = resolve_model(model)
    except ValidationError as exc:
        _fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    except ModelNotFoundError as exc:
        _fail(str(exc))
    with tempfile.TemporaryDirectory(prefix="pkdq-eval-") as tmp:
        metrics = evaluate_model(ref.path, cfg, Path(tmp), seed=seed, threads=threads)
        per_doc = json.loads((Path(tmp) / SAMPLES_JSON).read_text())
    if out is None:
        typer.echo(json.dumps(metrics, indent=2, default=str))
        return
    write_json_atomic(out, metrics)
    write_json_atomic(out.with_suffix(".samples.json"), per_doc)
    for name, res in metrics["tasks"].items():
        metric = res["metric"]
        stderr = res.get(f"{metric}_stderr", 0.0)
        typer.echo(f"{name:16s} {metric:8s} {res[metric]:.4f} ± {stderr:.4f}  (n={res['n']})")
    typer.echo(f"written: {out}, {out.with_suffix('.samples.json')}")


@app.command("compare")
def compare_cmd(
    recipe: str = typer.Argument(..., help="recipe name or YAML path (its stages are permuted)"),
    orders: str = typer.Option("P-KD-Q,KD-P-Q,P-Q-KD,Q-KD-P",
                               help="comma list of orderings of P (prune), KD, Q (quantize)"),
    runs_dir: str = typer.Option("runs", help="where the comparison folder is created"),
    run_id: str = typer.Option(None, help="folder name (default <recipe>-compare); running "
                                          "again with the same id resumes"),
    concurrency: int = typer.Option(1, min=1, help="orderings run at once (Prefect thread-pool "
                                                   "task runner); 1 on small machines"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also show library warnings, "
                                 "banners and Prefect's log lines (always in <folder>/run.log)"),
) -> None:
    """Run every ordering of a recipe's stages under equal budgets, as one Prefect flow.

    The terminal shows pkdq's own lines; everything goes to the comparison folder's run.log.
    """
    from tasks.compare import parse_orders, plan_ordering
    from tasks.core.recipe import RecipeError, load_recipe, recipe_path
    from tasks.core.resources import ResourceError, check_machine

    try:
        parsed = load_recipe(recipe)
        source = str(recipe_path(recipe).resolve())
        order_list = parse_orders(orders, parsed)
    except RecipeError as exc:
        _fail(str(exc))
    try:
        check_machine(parsed.resources)
    except ResourceError as exc:
        _fail(str(exc))
    run_dir = (Path(runs_dir) / (run_id or f"{parsed.name}-compare")).resolve()
    log = _capture(run_dir, verbose)
    _print_rule_warnings(parsed, order_list)
    typer.echo(f"pkdq: comparing {', '.join(order_list)} of {parsed.name} in {run_dir}")
    for name in order_list:
        for i, step in enumerate(plan_ordering(parsed, name).steps, start=1):
            typer.echo(f"  {name} {i}. {step.label}: {step.note}")
    from flows.compare import run_compare

    with _crash_to_one_line(log):
        report = run_compare(source, str(run_dir), order_list, concurrency)
    typer.echo(f"pkdq: finished; report at {report} (and report.html beside it)")


def _print_rule_warnings(recipe, order_list: list[str]) -> None:
    """Rule-check findings for every ordering; one shared by several orderings prints once."""
    from tasks.compare import LETTERS
    from tasks.rules import rule_warnings

    seen: dict[str, list[str]] = {}
    for name in order_list:
        for warning in rule_warnings(recipe, order=[LETTERS[x] for x in name.split("-")]):
            seen.setdefault(warning.line(), []).append(name)
    for line, names in seen.items():
        typer.echo(f"{','.join(names)}: {line}", err=True)


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="a run folder, e.g. runs/<run-id>"),
) -> None:
    """(Re)build the report of a run or an ordering comparison from its folder alone."""
    from tasks.compare import COMPARE_FILE

    if (run_dir / COMPARE_FILE).is_file():
        from tasks.compare import write_compare_report

        paths = write_compare_report(run_dir)
    elif (run_dir / "run.json").is_file():
        from tasks.report import write_report

        paths = write_report(run_dir)
    else:
        _fail(f"{run_dir}: not a run folder (no run.json or {COMPARE_FILE})")
    typer.echo(paths["markdown"].read_text())
    typer.echo(f"written: {', '.join(str(p) for p in paths.values())}")


@app.command("prune-scan")
def prune_scan_cmd(
    model: str = typer.Argument(..., help="built-in name, HF folder, .gguf, or cached HF id"),
    out: Path = typer.Option(None, help="output folder (default runs/prune-scan/<model>)"),
    samples: int = typer.Option(32, min=1, help="calibration blocks from <data>/train/"),
    seq_len: int = typer.Option(256, min=16, help="tokens per calibration block"),
    source: str = typer.Option("wikipedia", help="wikipedia, c4 or mixed"),
    ppl_skip: bool = typer.Option(False, help="also measure perplexity when each layer is "
                                              "skipped (one calibration pass per layer)"),
    threads: int = typer.Option(1, min=1, help="torch CPU threads"),
) -> None:
    """Importance of every layer, KV group / query head, FFN neuron and hidden channel."""
    from tasks.core.model_store import ModelNotFoundError
    from tasks.prune import UnsupportedModelError, prune_scan

    try:
        paths = prune_scan(model, out, samples=samples, seq_len=seq_len, source=source,
                           ppl_skip=ppl_skip, threads=threads)
    except (ModelNotFoundError, UnsupportedModelError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    typer.echo(paths["text"].read_text())
    typer.echo(f"written: {', '.join(str(p) for p in paths.values())}")


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())
