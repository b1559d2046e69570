"""One writer per run folder, taken by each flow (so runs a pool worker picks up are covered)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

from tasks.run_folder import hold_run_folder


def hold_for_flow(run_dir: str, what: str, recipe_file: str) -> AbstractContextManager[None]:
    """Hold `run_dir` for this flow run (`tasks.run_folder.hold_run_folder`).

    The holder is named by its command line when the CLI started the flow in this process (the
    CLI then holds the folder already; this is a nested no-op), else by the Prefect flow run: a
    pool worker's process has no useful command line.
    """
    from prefect.runtime import flow_run

    name = flow_run.name
    command = f"{what} {Path(recipe_file).name}, flow run {name}" if name else None
    return hold_run_folder(Path(run_dir), command=command)
