"""One writer per run folder, taken by each flow (so runs a pool worker picks up are covered),
and the errors that end a run in one line kept to one line in Prefect's log too."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from pathlib import Path

from tasks.core.disk_full import DiskFullError, is_disk_full
from tasks.run_folder import RunFolderBusyError, hold_run_folder

_PREFECT_RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


def hold_for_flow(run_dir: str, what: str, recipe_file: str) -> AbstractContextManager[None]:
    """Hold `run_dir` for this flow run (`tasks.run_folder.hold_run_folder`).

    The holder is named by its command line when the CLI started the flow in this process (the
    CLI then holds the folder already; this is a nested no-op), else by the Prefect flow run: a
    pool worker's process has no useful command line.
    """
    from prefect.runtime import flow_run

    quiet_one_line_errors()
    name = flow_run.name
    command = f"{what} {Path(recipe_file).name}, flow run {name}" if name else None
    return hold_run_folder(Path(run_dir), command=command)


class _NoTraceback(logging.Filter):
    """Prefect logs a failed task or flow run with its traceback; for a busy run folder or a
    full disk the message already says all (which folder or file, what to do), and the CLI
    ends with it as its one `error:` line, so the traceback is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and (isinstance(exc, DiskFullError | RunFolderBusyError)
                                or is_disk_full(exc)):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_one_line_errors() -> None:
    """Install `_NoTraceback` on Prefect's run loggers, once per process."""
    for name in _PREFECT_RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTraceback) for f in logger.filters):
            logger.addFilter(_NoTraceback())
