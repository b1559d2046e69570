"""The `pkdq` command line. Every command has --help; bad input exits 2 with one line."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from pkdq.env import configure_environment

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
    from tasks.recipe import list_recipes

    for name, description in list_recipes():
        typer.echo(f"{name:28s} {description}")


@app.command("validate")
def validate_cmd(
    recipe: str = typer.Argument(..., help="recipe name or path to a YAML file"),
) -> None:
    """Check a recipe: exit 0, or one line saying what is wrong and where."""
    from tasks.recipe import RecipeError, load_recipe

    try:
        parsed = load_recipe(recipe)
    except RecipeError as exc:
        _fail(str(exc))
    stages = " -> ".join(kind for kind, _ in parsed.stage_list())
    typer.echo(f"ok: {parsed.name}: {stages} on {parsed.model}")


@app.command("run")
def run_cmd(
    recipe: str = typer.Argument(..., help="recipe name (see `pkdq recipes`) or YAML path"),
    runs_dir: Path = typer.Option(Path("runs"), help="where run folders are created"),
    run_id: str = typer.Option(None, help="run folder name (default: the recipe's name); "
                                          "running again with the same id resumes"),
) -> None:
    """Run a recipe as a Prefect flow; rerunning resumes from the last finished stage."""
    from tasks.model_store import ModelNotFoundError
    from tasks.recipe import RecipeError, load_recipe, recipe_path

    try:
        parsed = load_recipe(recipe)
        source = str(recipe_path(recipe).resolve())
    except RecipeError as exc:
        _fail(str(exc))
    run_dir = (runs_dir / (run_id or parsed.name)).resolve()
    typer.echo(f"pkdq: running {parsed.name} in {run_dir}")
    from flows.compress import compress_flow

    try:
        report = compress_flow(source, str(run_dir))
    except ModelNotFoundError as exc:
        _fail(str(exc))
    typer.echo(f"pkdq: finished; report at {report}")


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="a run folder, e.g. runs/<run-id>"),
) -> None:
    """(Re)build the report of a run from its folder alone."""
    from tasks.report import write_report

    if not (run_dir / "run.json").is_file():
        _fail(f"{run_dir}: not a run folder (no run.json)")
    paths = write_report(run_dir)
    typer.echo(paths["markdown"].read_text())
    typer.echo(f"written: {', '.join(str(p) for p in paths.values())}")


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())
