"""The `pkdq` command line. Every command has --help; bad input exits 2 with one line.

Bad input never reaches the work: option values are range-checked by the parser, recipes and
models are checked offline (no weights, no torch) before anything heavy is imported, and every
refusal, the parser's own included, is one `error: ...` line on stderr with exit code 2.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from typer.core import TyperGroup

from pkdq.env import configure_environment

if TYPE_CHECKING:
    from tasks.core.recipe import Recipe
    from tasks.rules import RuleWarning

configure_environment()

SEED_MAX = 2**32 - 1  # numpy's seed range (lm-eval seeds numpy with it)


class OneLineErrors(TyperGroup):
    """Usage errors (a bad option value, a missing argument, an unknown command) as one
    `error:` line and exit 2, the shape of every other refusal, instead of click's usage block.
    """

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        try:  # newer typer carries its own copy of click
            from typer._click import exceptions as clickx
        except ImportError:  # pragma: no cover - older typer runs on click itself
            from click import exceptions as clickx

        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except clickx.NoArgsIsHelpError as exc:
            exc.show()  # `pkdq` alone: the help text
            sys.exit(exc.exit_code)
        except clickx.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else "pkdq"
            _echo_error(f"{exc.format_message()} (see `{command} --help`)")
            sys.exit(exc.exit_code)
        except clickx.ClickException as exc:
            _echo_error(exc.format_message())
            sys.exit(exc.exit_code)
        except typer.Abort:
            _echo_error("aborted")
            sys.exit(1)
        except BrokenPipeError:  # `pkdq ... | head`: the reader left, nothing to say
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    help="pkdq: prune -> distill -> quantize an LLM, with an honest per-stage report.",
)


def _concurrency_option(what: str) -> Any:
    return typer.Option(1, min=1, max=64, help=f"{what} run at once (Prefect thread-pool task "
                        "runner); 1 on small machines")


def _verbose_option(folder: str) -> Any:
    return typer.Option(False, "--verbose", "-v", help="also show library warnings, banners "
                        f"and Prefect's log lines (always in {folder}/run.log)")


def _echo_error(message: str) -> None:
    typer.echo("error: " + " ".join(str(message).split()), err=True)


def _fail(message: str, code: int = 2) -> None:
    """Refuse in one line (newlines inside `message` are folded) and exit."""
    _echo_error(message)
    raise typer.Exit(code)


def _check_model(spec: str) -> None:
    """Refuse a model spec that names nothing offline, before heavy imports or conversion."""
    from tasks.core.model_store import ModelNotFoundError, offline_config

    try:
        offline_config(spec)
    except ModelNotFoundError as exc:
        _fail(str(exc))


def _check_run_id(run_id: str | None) -> None:
    """A run id is one folder name under runs_dir, like a recipe name: nothing that climbs out."""
    import re

    from tasks.core.recipe import NAME_PATTERN, shown

    if run_id is not None and (len(run_id) > 100 or not re.match(NAME_PATTERN, run_id)):
        _fail(f"--run-id {shown(run_id)}: use letters, digits, '_', '.', '-' (at most 100, "
              "starting with a letter or digit)")


def _validation_line(exc: Any) -> str:
    """A pydantic ValidationError of an option-built config as one line (its first error)."""
    from tasks.core.recipe import short_repr

    err = exc.errors()[0]
    where = ".".join(map(str, err["loc"])) or "value"
    got = f" (got {short_repr(err['input'])})" if "input" in err else ""
    return f"{where}: {err['msg']}{got}"


@app.command("recipes")
def recipes_cmd() -> None:
    """List the named recipes, one line each."""
    from tasks.core.recipe import list_recipes

    for name, description in list_recipes():
        typer.echo(f"{name:28s} {description}")


def _findings(recipe: Recipe, source: str, here: bool = True) -> list[RuleWarning]:
    """tasks.rules.check_recipe's findings; refuses (exit 2, one line) on the first error:
    what will fail (model not found offline, missing data, impossible prune targets, a KD
    budget of years) is refused before anything runs."""
    from tasks.rules import check_recipe

    found = check_recipe(recipe, here=here)
    errors = [finding for finding in found if finding.level == "error"]
    if errors:
        _fail(f"{source}: {errors[0].message}")
    return found


def _echo_findings(found: list[RuleWarning]) -> int:
    """Print the findings on stderr, one line each; returns the warning count.

    Info lines are printed but not counted: they never call for a change to the recipe.
    """
    for finding in found:
        typer.echo(finding.line(), err=True)
    return sum(finding.level == "warning" for finding in found)


def _load(recipe: str) -> tuple[Recipe, str]:
    """(the parsed recipe, its file) or one line saying what is wrong."""
    from tasks.core.recipe import RecipeError, load_recipe, recipe_path

    try:
        return load_recipe(recipe), str(recipe_path(recipe))
    except RecipeError as exc:
        _fail(str(exc))
        raise  # unreachable: _fail exits


@app.command("validate")
def validate_cmd(
    recipe: str = typer.Argument(..., help="recipe name or path to a YAML file"),
    strict: bool = typer.Option(False, "--strict", help="exit 1 when a rule warns (info lines "
                                                        "do not count)"),
) -> None:
    """Check a recipe: exit 0, or one line saying what is wrong and where.

    Besides the schema it refuses (exit 2) what a run would fail on: a model not found offline,
    training or benchmark files missing, prune targets the model's sizes cannot meet, a KD budget
    of years. It is also checked against rules backed by published results (one-shot prune over
    50%, stage order, quantization groups on the pruned shapes); each finding is one line on
    stderr and does not change the exit code unless --strict.
    """
    parsed, source = _load(recipe)
    found = _findings(parsed, source)
    stages = " -> ".join(kind for kind, _ in parsed.stage_list())
    typer.echo(f"ok: {parsed.name}: {stages} on {parsed.model}")
    if _echo_findings(found) and strict:
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
    verbose: bool = _verbose_option("<run>"),
) -> None:
    """Run a recipe as a Prefect flow; rerunning resumes from the last finished stage.

    The terminal shows pkdq's own lines (stages, steps, tok/s, ETA, results); everything, library
    output included, goes to the run folder's run.log.
    """
    _check_run_id(run_id)
    parsed, source = _load(recipe)
    source = str(Path(source).resolve())
    # errors stop here, before any stage; warnings are advice and the run goes ahead. A pool's
    # worker has its own disk: model and data are checked there (compress_flow), not here.
    findings = _findings(parsed, source, here=not pool)
    if pool:
        _echo_findings(findings)
        _run_on_pool(Path(source), f"{runs_dir.rstrip('/')}/{run_id or parsed.name}", pool,
                     api_url, wait)
        return
    _machine_ready(parsed)
    run_dir = (Path(runs_dir) / (run_id or parsed.name)).resolve()
    with _in_run_folder(run_dir, verbose):
        _echo_findings(findings)
        if parsed.ordering_experiment:  # a non-production order: a one-order comparison
            from tasks.compare import KIND_LETTER

            order = "-".join(KIND_LETTER[kind] for kind, _ in parsed.stage_list())
            typer.echo(f"pkdq: {parsed.name} is an ordering experiment ({order}); running it "
                       f"as a comparison of that one order in {run_dir}")
            from flows.compare import run_compare

            report = run_compare(source, str(run_dir), [order])
        else:
            typer.echo(f"pkdq: running {parsed.name} in {run_dir}")
            from flows.compress import compress_flow

            report = compress_flow(source, str(run_dir))
    typer.echo(f"pkdq: finished; report at {report}")


def _machine_ready(recipe: Recipe) -> None:
    """Refuse, before any stage starts or folder exists, a recipe this machine cannot run."""
    from tasks.core.resources import ResourceError, check_machine

    try:
        check_machine(recipe.resources)
    except ResourceError as exc:
        _fail(str(exc))


def _refuse_recipe_errors(source: str, recipe: Recipe, label: str = "") -> None:
    """The first error that fails every stage of `recipe` (model, data, prune target), as one
    line naming the recipe file (and the variant, with `label`)."""
    from tasks.rules import recipe_errors

    errors = recipe_errors(recipe)
    if errors:
        _fail(f"{source}{f' [{label}]' if label else ''}: {errors[0].message}")


@contextmanager
def _in_run_folder(run_dir: Path, verbose: bool) -> Iterator[Path]:
    """Hold `run_dir`, send everything to its run.log (the terminal keeps pkdq's own lines), and
    end a failure in one line: the frame every command that runs a flow works in. Yields the
    log's path."""
    with _holding(run_dir):
        log = _capture(run_dir, verbose)
        with _crash_to_one_line(log):
            yield log


@contextmanager
def _holding(run_dir: Path) -> Iterator[None]:
    """Hold the run folder (one writer; the flow takes it again, nested) and turn the errors
    the user fixes into one line and exit 2: the folder is busy, or the disk is full (exit 2,
    not 1: nothing is wrong with the run, the machine needs space, then a rerun resumes)."""
    from tasks.core.disk_full import disk_full_error, is_disk_full
    from tasks.run_folder import RunFolderBusyError, hold_run_folder

    try:
        with hold_run_folder(run_dir):
            yield
    except RunFolderBusyError as exc:
        _fail(str(exc))
    except typer.Exit:
        raise
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        _fail(str(disk_full_error(exc, run_dir)))


def _capture(run_dir: Path, verbose: bool) -> Path:
    """From here on the terminal shows pkdq's lines and run_dir/run.log gets everything."""
    from pkdq.terminal import capture_terminal

    return capture_terminal(run_dir, verbose, header=" ".join(["pkdq", *sys.argv[1:]])).log_path


@contextmanager
def _crash_to_one_line(log: Path) -> Iterator[None]:
    """A failed flow: one line on the terminal; a genuine crash's traceback goes to run.log.

    Errors the user fixes (model not found, busy folder, disk full) pass through to their own
    one-line handlers first.
    """
    import traceback

    from tasks.core.common import one_line
    from tasks.core.disk_full import is_disk_full
    from tasks.core.model_store import ModelNotFoundError
    from tasks.core.text_sources import DataError
    from tasks.run_folder import RunFolderBusyError

    try:
        yield
    except (ModelNotFoundError, DataError) as exc:  # data: a file, a budget, an overlap
        _fail(str(exc))
    except (typer.Exit, RunFolderBusyError):
        raise
    except KeyboardInterrupt:
        _fail(f"interrupted; the same command resumes (log: {log})", code=130)
    except Exception as exc:
        if is_disk_full(exc):
            raise
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
    port: int = typer.Option(4200, min=1, max=65535, help="Prefect API port on 127.0.0.1"),
    pool: str = typer.Option("pkdq", help="process work pool (created if missing)"),
    home: Path = typer.Option(None, help="PREFECT_HOME of this server (default: "
                                         "<cache>/prefect-serve/<port>)"),
    ui: bool = typer.Option(False, help="serve the Prefect UI too"),
    query_seconds: float = typer.Option(5.0, min=0.1, max=3600,
                                        help="how often the worker polls the pool"),
    limit: int = typer.Option(1, min=1, max=64, help="flow runs the worker runs at once"),
) -> None:
    """Start a local Prefect server (127.0.0.1 only) and a process worker on a work pool."""
    if not math.isfinite(query_seconds):  # the parser's range lets nan through
        _fail(f"--query-seconds {query_seconds}: give a number of seconds, 0.1 to 3600")
    from flows.serve import ServeError, serve

    try:
        svc = serve(port=port, pool=pool, home=home, ui=ui, query_seconds=query_seconds,
                    limit=limit)
    except ServeError as exc:
        _fail(str(exc))
    typer.echo(f"pkdq: prefect server pid {svc.server_pid} at {svc.api_url}")
    typer.echo(f"pkdq: worker pid {svc.worker_pid} polling process pool '{svc.pool}'")
    if svc.ui_url:
        typer.echo(f"pkdq: Prefect UI at {svc.ui_url}")
    typer.echo(f"pkdq: logs in {svc.logs}")
    typer.echo(f"submit: pkdq run RECIPE --pool {svc.pool} --api-url {svc.api_url}")
    typer.echo(f"stop:   {svc.stop_hint()}")


@app.command("stop")
def stop_cmd(
    port: int = typer.Option(4200, min=1, max=65535, help="the port given to `pkdq serve`"),
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
    mse: float = typer.Option(0.0, help="gptq: per-group clipping search minimising "
                                        "|w - q(w)|^p (2.4 in the GPTQ authors' code; 0: off)"),
    equalize: bool = typer.Option(False, help="gptq/rtn: fold AWQ-style per-channel scales, "
                                              "searched on the calibration text, into the float "
                                              "model first"),
    grid: str = typer.Option("min-max", help="group scales: min-max (GPTQModel's) or q4_0 "
                                             "(llama.cpp's signed-max rule; needs --bits 4 "
                                             "--group 32)"),
    samples: int = typer.Option(16, help="calibration blocks (C4 train text)"),
    seq_len: int = typer.Option(512, help="calibration block length"),
    out: Path = typer.Option(None, help="output stage folder (default: runs/quantize-<...>)"),
    threads: int = typer.Option(2, min=1, max=256, help="CPU threads"),
    seed: int = typer.Option(0, min=0, max=SEED_MAX),
    gguf: str = typer.Option("none", help="also write OUT/model.gguf for llama.cpp: none, f16, "
                                          "q8_0, q4_0 or q4_k_m (Llama, Mistral, Qwen2, Qwen3, "
                                          "Gemma 3); --group 32 "
                                          "makes q4_0 (bits 4) / q8_0 (bits 8) bit-exact"),
    q8_layers: int = typer.Option(None, help="with --gguf q4_0: write this many decoder layers, "
                                             "those 4 bits hurt most, in Q8_0"),
    q8_budget_mb: float = typer.Option(None, help="with --gguf q4_0: as many Q8_0 layers, most "
                                                  "sensitive first, as keep the file within "
                                                  "this many MB"),
) -> None:
    """Quantize one model outside a recipe; writes OUT/model and OUT/metrics.json."""
    from pydantic import ValidationError

    from tasks.core.model_store import ModelNotFoundError, resolve_model
    from tasks.core.recipe import QuantizeConfig

    try:
        cfg = QuantizeConfig(method=method, bits=bits, group_size=group, desc_act=desc_act,
                             damp_percent=damp, gguf=gguf, equalize=equalize, mse=mse,
                             grid=grid,
                             calibration={"source": "c4", "samples": samples, "seq_len": seq_len},
                             gguf_q8_layers=None if q8_layers is None and q8_budget_mb is None
                             else {"count": q8_layers, "budget_mb": q8_budget_mb})
    except ValidationError as exc:
        _fail(_validation_line(exc))
    _check_model(model)  # offline and torch-free: a bad spec never waits for torch/GPTQModel
    from tasks.core.common import StageContext, write_json_atomic
    from tasks.core.gptq_checkpoint import QuantizeError
    from tasks.quantize import quantize_stage

    try:
        ref = resolve_model(model)
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
        loader = "llama.cpp" if metrics.get("verified_loader") == "llama.cpp" else "transformers"
        line += (f"; {loader} reload: top-1 agreement {check['top1_agreement']:.3f}, "
                 f"max |logit diff| {check['max_abs_logit_diff']:.3g}")
    if metrics.get("exact_grid_note"):
        line += f"; {metrics['exact_grid_note']}"
    typer.echo(line)
    plan = metrics.get("q8_layers")
    if plan:
        gains = ", ".join(f"layer {row['layer']} {row['gain']:+.4f}" for row in plan["scores"][:4])
        typer.echo(f"pkdq: q8_0 layers {plan['layers'] or 'none'} (held-out KL all 4-bit "
                   f"{plan['base_kl']:.4f}; won back by one layer in Q8_0: {gains})")


@app.command("export-gguf")
def export_gguf_cmd(
    model: str = typer.Argument(..., help="built-in name, HF folder (float or GPTQ), .gguf, or "
                                          "cached HF id; Llama, Mistral, Qwen2, Qwen3 or "
                                          "Gemma 3 (text)"),
    out: Path = typer.Argument(..., help="the .gguf file to write"),
    qtype: str = typer.Option("q8_0", help="f16, q8_0 or q4_0 (llama.cpp's block grids)"),
    reference: Path = typer.Option(None, help="GGUF whose tokenizer.* keys are copied (default: "
                                              "one with the same vocabulary, e.g. SmolLM2's)"),
    verify: bool = typer.Option(True, "--verify/--no-verify",
                                help="reload with transformers and compare logits"),
    metrics_out: Path = typer.Option(None, "--metrics", help="write the metrics JSON here"),
    threads: int = typer.Option(1, min=1, max=256, help="torch CPU threads"),
) -> None:
    """Write a model as a GGUF file for llama.cpp (a GPTQ folder exports its grid values)."""
    from tasks.quantize import GgufExportError, check_qtype

    try:
        check_qtype(qtype)
    except GgufExportError as exc:
        _fail(str(exc))
    if reference is not None and not _is_file(reference):
        _fail(f"--reference {reference}: no such GGUF file")
    _check_model(model)
    import torch

    from tasks.core.common import write_json_atomic
    from tasks.core.model_store import ModelNotFoundError, resolve_model
    from tasks.quantize import GgufVerifyError, export_gguf

    torch.set_num_threads(threads)
    try:
        ref = resolve_model(model)
        metrics = export_gguf(ref.path, out, qtype, reference, verify=verify)
    except (ModelNotFoundError, GgufExportError, GgufVerifyError) as exc:
        _fail(str(exc))
    if metrics_out is not None:
        write_json_atomic(metrics_out, metrics)
    _echo_gguf(metrics)


@app.command("export")
def export_cmd(
    model: Path = typer.Argument(..., help="a pkdq run folder (its final model), a model folder "
                                           "pkdq wrote, or a built-in model name"),
    to: Path = typer.Option(..., "--to", help="the folder to write (must be new or empty)"),
    fmt: str = typer.Option(..., "--format", help="hf, hf-bf16, gptq, compressed-tensors "
                                                  "(GPTQ sym grid as pack-quantized, vLLM's "
                                                  "W4A16), gguf-f16, gguf-q8_0, gguf-q4_0 or "
                                                  "gguf-q4_k_m"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --to folder"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="score WikiText-2 in the "
                                "serving runtime (transformers or llama.cpp) against pkdq"),
    reference: Path = typer.Option(None, help="GGUF whose tokenizer.* keys are copied"),
    threads: int = typer.Option(2, min=1, max=256, help="CPU threads"),
    imatrix: bool = typer.Option(True, "--imatrix/--no-imatrix", help="gguf-q4_k_m: give "
                                 "llama.cpp's quantizer an importance matrix (llama-imatrix) "
                                 "computed on calibration text: a run folder's recipe "
                                 "calibration (or --calibration); a model folder outside a "
                                 "run without --calibration gets none"),
    calibration: str = typer.Option(None, "--calibration", help="gguf-q4_k_m importance-matrix "
                                    "text: a built-in training source (wikipedia, c4, mixed) or "
                                    "a UTF-8 text file; token budget and seed from the run's "
                                    "recipe, else 16 x 512 tokens, seed 1234"),
    embedding: str = typer.Option(None, "--embedding", help="gguf-f16/q8_0/q4_0: the type of "
                                  "the embedding and output matrices (f16, q8_0, q5_1, q5_0, "
                                  "q4_0; default q8_0 for the quantized types). In a small model "
                                  "the tied embedding is a fifth of the weights: q5_1 or q4_0 "
                                  "there is what takes a 4-bit file under a tight size budget"),
) -> None:
    """Export a model for the runtime that serves it, verified in that runtime.

    gguf-q4_k_m from a run folder (or a stage model inside one) uses an importance matrix
    computed by llama.cpp's llama-imatrix on the recipe's quantize calibration text (training
    split, never evaluation data); .pkdq-export.json records whether one was used, on how many
    tokens of which text.
    """
    from tasks.core.model_store import BUILTIN_MODELS
    from tasks.quantize import ExportError, check_export, plan_imatrix

    if not model.exists() and str(model) in BUILTIN_MODELS:  # the baseline, by its name
        from tasks.core.model_store import resolve_model

        model = resolve_model(str(model)).path
    try:
        check_export(model, to, fmt, overwrite, embedding)
        plan_imatrix(model, fmt, imatrix, calibration)
    except ExportError as exc:
        _fail(str(exc))
    import torch

    from tasks.core.gptq_checkpoint import QuantizeError
    from tasks.core.llama_cpp import LlamaCppError
    from tasks.quantize import GgufExportError, export_model

    torch.set_num_threads(threads)
    try:
        record = export_model(model, to, fmt, overwrite, verify, reference, threads=threads,
                              imatrix=imatrix, calibration=calibration, embedding=embedding)
    except (ExportError, GgufExportError, LlamaCppError, QuantizeError) as exc:
        _fail(str(exc))
    line = f"pkdq: {fmt} -> {record['dest']} ({record['bytes'] / 1e6:.1f} MB)"
    note = record["written"].get("exact_grid_note")
    if note:
        line += f"; {note}"
    if record["written"].get("embedding_type"):
        line += f"; embedding/output {record['written']['embedding_type']}"
    matrix = record["written"].get("imatrix")
    if matrix and matrix["used"]:
        line += (f"; imatrix on {matrix['tokens']} tokens ({matrix['chunks']} x "
                 f"{matrix['chunk_tokens']})")
    elif matrix:
        line += f"; no imatrix ({matrix['why']})"
    typer.echo(line)
    check = record.get("verification")
    if check:
        typer.echo(f"pkdq: {check['slice']}: perplexity {check['pkdq_loader_perplexity']:.4f} "
                   f"(pkdq loader) vs {check['export_perplexity']:.4f} "
                   f"({check['export_runtime']}), {100 * check['relative_difference']:+.3f}%")


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
    threads: int = typer.Option(1, min=1, max=256, help="torch CPU threads"),
    seed: int = typer.Option(1234, min=0, max=SEED_MAX,
                             help="picks the doc subset (same seed = same docs)"),
) -> None:
    """Evaluate any model outside a recipe: benchmarks, WikiText-2, size, memory, speed."""
    import json
    import tempfile

    from pydantic import ValidationError

    from tasks.core.common import data_dir
    from tasks.core.model_store import ModelNotFoundError, resolve_model
    from tasks.core.recipe import EvalConfig
    from tasks.evaluate import check_eval_tasks

    try:
        cfg = EvalConfig(tasks=[t.strip() for t in tasks.split(",") if t.strip()],
                         samples=samples or None, backend=backend, dtype=dtype,
                         batch_size=batch_size, speed={"enabled": speed},
                         wikitext={"tokens": wikitext_tokens,
                                   "pages": None if wikitext_pages < 0 else wikitext_pages})
    except ValidationError as exc:
        _fail(_validation_line(exc))
    problem = check_eval_tasks(cfg, data_dir())
    if problem:
        _fail(problem)
    _check_model(model)
    from tasks.core.common import write_json_atomic
    from tasks.evaluate import SAMPLES_JSON, evaluate_model

    try:
        ref = resolve_model(model)
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
    served = metrics.get("served") or {}
    for name, res in (served.get("tasks") or {}).items():  # a quantized model, as served
        metric = res["metric"]
        stderr = res.get(f"{metric}_stderr", 0.0)
        typer.echo(f"{name:16s} {metric:8s} {res[metric]:.4f} ± {stderr:.4f}  (n={res['n']}) "
                   f"{served['label']}")
    typer.echo(f"written: {out}, {out.with_suffix('.samples.json')}")


@app.command("generate")
def generate_cmd(
    model: str = typer.Argument(..., help="built-in name, HF folder (a pkdq stage's model/), "
                                          ".gguf, or cached HF id"),
    prompt: str = typer.Argument(..., help="the text to answer"),
    max_new_tokens: int = typer.Option(48, min=1, max=4096, help="greedy tokens at most"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="wrap the prompt in the "
                              "tokenizer's chat template when it has one"),
    threads: int = typer.Option(1, min=1, max=256, help="torch CPU threads"),
) -> None:
    """Greedy answer of one model to one prompt: what the report's side-by-side shows."""
    _check_model(model)
    from tasks.core.model_store import ModelNotFoundError, resolve_model

    try:
        ref = resolve_model(model)
    except ModelNotFoundError as exc:
        _fail(str(exc))
    import torch

    from tasks.core.model_store import load_for_generation
    from tasks.evaluate import generate_greedy

    torch.set_num_threads(threads)
    try:
        loaded, tokenizer = load_for_generation(ref.path)
    except Exception as exc:  # noqa: BLE001 - a folder that holds no loadable model: one line
        from tasks.core.common import one_line

        _fail(f"{ref.path} is not a loadable model folder: {one_line(exc)}")
    out = generate_greedy(loaded, tokenizer, prompt, max_new_tokens,
                          chat=None if chat else False)
    typer.echo(out["text"])


@app.command("compare")
def compare_cmd(
    recipe: str = typer.Argument(..., help="recipe name or YAML path (its stages are permuted)"),
    orders: str = typer.Option("P-KD-Q,KD-P-Q,P-Q-KD,Q-KD-P",
                               help="comma list of orderings of P (prune), KD, Q (quantize)"),
    runs_dir: str = typer.Option("runs", help="where the comparison folder is created"),
    run_id: str = typer.Option(None, help="folder name (default <recipe>-compare); running "
                                          "again with the same id resumes"),
    concurrency: int = _concurrency_option("orderings"),
    verbose: bool = _verbose_option("<folder>"),
) -> None:
    """Run every ordering of a recipe's stages under equal budgets, as one Prefect flow.

    The terminal shows pkdq's own lines; everything goes to the comparison folder's run.log.
    """
    from tasks.compare import parse_orders, plan_ordering
    from tasks.core.recipe import RecipeError

    _check_run_id(run_id)
    parsed, source = _load(recipe)
    source = str(Path(source).resolve())
    try:
        order_list = parse_orders(orders, parsed)
    except RecipeError as exc:
        _fail(str(exc))
    _refuse_recipe_errors(source, parsed)  # what fails in every ordering
    _machine_ready(parsed)
    run_dir = (Path(runs_dir) / (run_id or f"{parsed.name}-compare")).resolve()
    with _in_run_folder(run_dir, verbose):
        _print_rule_warnings(parsed, order_list)
        typer.echo(f"pkdq: comparing {', '.join(order_list)} of {parsed.name} in {run_dir}")
        for name in order_list:
            for i, step in enumerate(plan_ordering(parsed, name).steps, start=1):
                typer.echo(f"  {name} {i}. {step.label}: {step.note}")
        from flows.compare import run_compare

        report = run_compare(source, str(run_dir), order_list, concurrency)
    typer.echo(f"pkdq: finished; report at {report} (and report.html beside it)")


@app.command("search")
def search_cmd(
    recipe: str = typer.Argument(..., help="recipe whose prune stage has a target (a budget)"),
    runs_dir: str = typer.Option("runs", help="where the search folder is created"),
    run_id: str = typer.Option(None, help="folder name (default <recipe>-search); running "
                                          "again with the same id resumes and reuses candidates"),
    concurrency: int = _concurrency_option("candidates"),
    verbose: bool = _verbose_option("<folder>"),
) -> None:
    """Search the pruned shape for a budget (prune.target) and print every candidate.

    Candidates meeting the target are ranked by a one-shot proxy (held-out KL to the unpruned
    model on training-side text), the top k get a short KD, and the best is kept. `pkdq run` on
    the same recipe runs this search as its prune stage.
    """
    from tasks.search import prune_target_index

    _check_run_id(run_id)
    parsed, source = _load(recipe)
    source = str(Path(source).resolve())
    if prune_target_index(parsed) is None:
        _fail(f"{source}: no prune stage with a target; give e.g. prune: {{target: {{params: "
              "0.75}}}} for the search to meet")
    _refuse_recipe_errors(source, parsed)
    _machine_ready(parsed)
    run_dir = (Path(runs_dir) / (run_id or f"{parsed.name}-search")).resolve()
    with _in_run_folder(run_dir, verbose):
        typer.echo(f"pkdq: searching the prune shape of {parsed.name} in {run_dir}")
        from flows.search import run_search

        report = run_search(source, str(run_dir), concurrency)
    typer.echo(Path(report).read_text())
    typer.echo(f"pkdq: finished; table at {report}, plot at {Path(report).with_suffix('.png')}")


@app.command("sweep")
def sweep_cmd(
    recipe: str = typer.Argument(..., help="recipe name or YAML path (the grid's base)"),
    grid: list[str] = typer.Option(..., "--grid", help="KEY=V1,V2,... a recipe key and its "
                                   "values, e.g. distill.lr=1e-4,3e-4 (repeat for more keys; "
                                   "every combination runs)"),
    select: str = typer.Option("kl", help="selection score on training-side held-out text: kl "
                               "(KL to the teacher) or ppl"),
    fraction: float = typer.Option(None, help="screen every variant at this share of the KD "
                                   "tokens, then run the winner at the full budget"),
    runs_dir: str = typer.Option("runs", help="where the sweep folder is created"),
    run_id: str = typer.Option(None, help="folder name (default <recipe>-sweep); running again "
                                          "with the same id resumes"),
    concurrency: int = _concurrency_option("units"),
    verbose: bool = _verbose_option("<folder>"),
) -> None:
    """Run a grid of recipe variants as one Prefect flow and pick the best on held-out KL.

    Variants share every common prefix (the prune stage runs once). Selection never looks at an
    evaluation split; the winner is written as winner.yaml for `pkdq run`.
    """
    from tasks.core.recipe import RecipeError
    from tasks.sweep import parse_grid, sweep_plan

    _check_run_id(run_id)
    parsed, source = _load(recipe)
    source = str(Path(source).resolve())
    try:
        plan = sweep_plan(parsed, parse_grid(grid), fraction, select)
        variants = plan.screen(source)
    except RecipeError as exc:
        _fail(str(exc))
    for variant in variants:
        _refuse_recipe_errors(source, variant.recipe, variant.label)
    _machine_ready(parsed)
    run_dir = (Path(runs_dir) / (run_id or f"{parsed.name}-sweep")).resolve()
    with _in_run_folder(run_dir, verbose):
        typer.echo(f"pkdq: sweeping {len(variants)} variants of {parsed.name} in {run_dir} "
                   f"(select on held-out {select}"
                   + (f"; screening at {fraction:g}x KD tokens" if fraction else "") + ")")
        for i, variant in enumerate(variants, start=1):
            typer.echo(f"  {i}. {variant.label}")
        from flows.sweep import run_sweep

        report = run_sweep(source, str(run_dir), plan.to_json(), concurrency)
    typer.echo(Path(report).read_text())
    winner = Path(report).parent / "winner.yaml"
    typer.echo(f"pkdq: finished; table at {report}, winner at {winner}")


def _print_rule_warnings(recipe, order_list: list[str]) -> None:
    """Rule-check findings for every ordering; one shared by several orderings prints once."""
    from tasks.compare import LETTERS
    from tasks.rules import rule_warnings

    seen: dict[str, list[str]] = {}
    for name in order_list:
        for warning in rule_warnings(recipe, order=[LETTERS[x] for x in name.split("-")]):
            if warning.level != "error":  # errors refused the comparison already
                seen.setdefault(warning.line(), []).append(name)
    for line, names in seen.items():
        typer.echo(f"{','.join(names)}: {line}", err=True)


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="a run folder, e.g. runs/<run-id>"),
) -> None:
    """(Re)build the report of a run or an ordering comparison from its folder alone."""
    import json

    from tasks.compare import COMPARE_FILE

    if _is_file(run_dir / COMPARE_FILE):
        record = run_dir / COMPARE_FILE
    elif _is_file(run_dir / "run.json"):
        record = run_dir / "run.json"
    else:
        _fail(f"{run_dir}: not a run folder (no run.json or {COMPARE_FILE})")
    try:
        if not isinstance(json.loads(record.read_bytes()), dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        _fail(f"{record}: not a pkdq run record ({exc})")
    try:
        if record.name == COMPARE_FILE:
            from tasks.compare import write_compare_report

            paths = write_compare_report(run_dir)
        else:
            from tasks.report import write_report

            paths = write_report(run_dir)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OSError) as exc:
        # a folder pkdq wrote has every key; this one was edited, truncated or is not pkdq's
        _fail(f"{run_dir}: cannot build a report from this folder ({type(exc).__name__}: "
              f"{exc}); its {record.name} or stage files are damaged or not pkdq's")
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
    threads: int = typer.Option(1, min=1, max=256, help="torch CPU threads"),
) -> None:
    """Importance of every layer, KV group / query head, FFN neuron and hidden channel."""
    from pydantic import ValidationError

    from tasks.core.common import data_dir
    from tasks.core.data import training_text_problem
    from tasks.core.model_store import ModelNotFoundError
    from tasks.core.recipe import TextSample

    try:
        TextSample(source=source, samples=samples, seq_len=seq_len)
    except ValidationError as exc:
        _fail(_validation_line(exc))
    problem = training_text_problem(data_dir(), source)
    if problem:
        _fail(problem)
    _check_model(model)
    from tasks.prune import UnsupportedModelError, prune_scan

    try:
        paths = prune_scan(model, out, samples=samples, seq_len=seq_len, source=source,
                           ppl_skip=ppl_skip, threads=threads)
    except (ModelNotFoundError, UnsupportedModelError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    typer.echo(paths["text"].read_text())
    typer.echo(f"written: {', '.join(str(p) for p in paths.values())}")


def _is_file(path: Path) -> bool:
    """Path.is_file for user-given paths: a name no file system can hold is no file."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())
