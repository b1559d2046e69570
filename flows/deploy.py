"""Submit a recipe to a Prefect work pool as a deployment of `flows.compress.compress_flow`.

`pkdq run RECIPE --pool NAME` calls `submit`: it registers (or updates) the deployment
`pkdq-compress/pkdq-<pool>` whose code is this repository (`flow.from_source(REPO_ROOT, ...)`),
creates a flow run with the recipe and run folder as parameters, prints its id and, unless told
not to, waits for it to finish. A worker polling the pool runs it with its own checkout at the
same path.

Where the run folder may live: every stage reads and writes the run folder with ordinary file
APIs (safetensors, lm-eval, GPTQModel), so a worker must see it as a local path. A shared
filesystem (NFS, or an object store mounted with s3fs/gcsfuse/mountpoint-s3) mounted at the same
path on the submitting machine and every worker works as is. Object-store URLs (`s3://...`) are
refused with a one-line message: syncing a run folder to and from a bucket around each stage is
not implemented. `run_location` is the one place that would change to add it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tasks.core.common import REPO_ROOT

ENTRYPOINT = "flows/compress.py:compress_flow"
FLOW_NAME = "pkdq-compress"
RECIPE_COPY = "recipe.yaml"


class RunLocationError(ValueError):
    """The run folder is somewhere a worker cannot write with file APIs."""


@dataclass
class Submitted:
    flow_run_id: str
    deployment: str
    run_dir: str
    state: str | None = None  # final state name when waited for


def run_location(run_dir: str) -> Path:
    """An absolute local path for `run_dir` (plain path or file:// URL); refuse object stores."""
    parsed = urlparse(run_dir)
    if parsed.scheme == "file":
        return Path(parsed.path).resolve()
    if parsed.scheme and len(parsed.scheme) > 1:  # "c:" on Windows is a drive, not a scheme
        raise RunLocationError(
            f"run folder {run_dir}: {parsed.scheme}:// run folders are not supported end to end "
            "(stages write it with file APIs); mount the bucket or share (s3fs, gcsfuse, NFS) at "
            "the same path on every worker and pass that path")
    return Path(run_dir).expanduser().resolve()


def deployment_name(pool: str) -> str:
    return f"pkdq-{pool}"


def submit(recipe_file: Path, run_dir: str, pool: str, api_url: str, wait: bool = True,
           poll_s: int = 2, on_created=None) -> Submitted:
    """Deploy compress_flow to `pool`, start a run of `recipe_file` into `run_dir`, maybe wait.

    The recipe is copied into the run folder first, so a worker on another machine reads it from
    the shared run folder rather than from the submitter's disk.
    """
    location = run_location(run_dir)
    location.mkdir(parents=True, exist_ok=True)
    recipe_copy = location / RECIPE_COPY
    if Path(recipe_file).resolve() != recipe_copy:
        tmp = recipe_copy.with_suffix(".yaml.tmp")
        shutil.copyfile(recipe_file, tmp)
        tmp.replace(recipe_copy)

    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.compress import compress_flow

    name = deployment_name(pool)
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        remote = compress_flow.from_source(source=str(REPO_ROOT), entrypoint=ENTRYPOINT)
        # to_deployment + apply, not flow.deploy: deploy's "any worker online?" query fails
        # with 422 against prefect 3.8.8's own server (it sends limit/offset = null).
        deployment = remote.to_deployment(name=name, work_pool_name=pool,
                                          description="pkdq compress run: recipe + run folder")
        deployment.apply(work_pool_name=pool)
        flow_run = run_deployment(f"{FLOW_NAME}/{name}", timeout=0, as_subflow=False,
                                  parameters={"recipe_file": str(recipe_copy),
                                              "run_dir": str(location)})
        result = Submitted(str(flow_run.id), f"{FLOW_NAME}/{name}", str(location))
        if on_created is not None:
            on_created(result)
        if wait:
            result.state = wait_final(api_url, flow_run.id, poll_s)
    return result


def wait_final(api_url: str, flow_run_id, poll_s: float = 2) -> str:
    """Poll the flow run until its state is final; return the state's name (e.g. Completed)."""
    import time

    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api_url) as client:
        while True:
            state = client.read_flow_run(flow_run_id).state
            if state is not None and state.is_final():
                return state.name
            time.sleep(poll_s)
