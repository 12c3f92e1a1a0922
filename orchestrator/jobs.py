"""Submitting sweeps to a Ray cluster through the Ray Jobs API, and managing them.

``submit`` validates the sweep file here first (a bad file never reaches the
cluster), stages a small working directory (the project's code and the sweep
file, nothing else), and submits the entrypoint
``python -m orchestrator.cli launch SWEEP --address auto ...`` built with
``shlex.join``, so no argument is ever interpreted by a shell.

Credentials: nothing from the submitter's environment is forwarded. MLflow
credentials (``MLFLOW_TRACKING_USERNAME`` / ``PASSWORD``) belong in the cluster's
environment (docker/.env, a Kubernetes Secret), never in a job's runtime
environment, which the Ray dashboard shows to anyone who can reach it.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

Echo = Callable[[str], None]

# What a driver on the cluster needs from this checkout: the two packages, the
# shipped sweep files and the packaging metadata. Everything else stays home.
PROJECT_ITEMS = ("orchestrator", "trainables", "search_spaces", "pyproject.toml")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.db", ".pytest_cache")
SWEEPS_DIR = "submitted"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def project_root() -> Path:
    """The source tree this wrnsweep runs from (the repository in an editable install)."""
    return Path(__file__).resolve().parents[1]


@contextmanager
def staged_working_dir(sweep_file: Path) -> Iterator[tuple[Path, str]]:
    """A temporary working_dir with the project code and the sweep file.

    Yields ``(folder, sweep path relative to it)``. The file is copied under a
    fixed name, so odd characters in the user's path never reach the cluster.
    """
    root = project_root()
    with tempfile.TemporaryDirectory(prefix="wrnsweep-submit-") as tmp:
        stage = Path(tmp)
        for item in PROJECT_ITEMS:
            source = root / item
            if source.is_dir():
                shutil.copytree(source, stage / item, ignore=IGNORE)
            elif source.exists():
                shutil.copy2(source, stage / item)
        (stage / SWEEPS_DIR).mkdir()
        target = stage / SWEEPS_DIR / "sweep.yaml"
        shutil.copy2(sweep_file, target)
        yield stage, target.relative_to(stage).as_posix()


def entrypoint(sweep: str, *, storage: str | None, tracking_uri: str | None,
               num_samples: int | None, name: str | None) -> str:
    """The job's command line: every argument quoted, no shell syntax possible."""
    argv = ["python", "-m", "orchestrator.cli", "launch", sweep, "--address", "auto"]
    for flag, value in (("--storage", storage), ("--tracking-uri", tracking_uri),
                        ("--num-samples", num_samples), ("--name", name)):
        if value is not None:
            argv += [flag, str(value)]
    return shlex.join(argv)


def use_token_if_present() -> None:
    """Send the Ray auth token when one is configured (Ray 2.60 clusters require it).

    Ray's own clients only do so when ``RAY_AUTH_MODE=token``; like ``ray.init``,
    enable it when the user has a token and has not chosen a mode. Ray reads the
    mode when it is first imported, so call this before that. The token itself is
    read by Ray from its usual places and never touched here.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or Path(path).exists():
        os.environ["RAY_AUTH_MODE"] = "token"


def client(address: str) -> Any:
    use_token_if_present()
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit(sweep_file: str, *, address: str, storage: str | None = None,
           tracking_uri: str | None = None, num_samples: int | None = None,
           name: str | None = None, pip: tuple[str, ...] = ()) -> tuple[Any, str]:
    """Submit a validated sweep file; returns ``(client, job id)``."""
    from orchestrator.config import load_sweep

    cfg = load_sweep(sweep_file)  # ConfigError: nothing is submitted
    jobs = client(address)
    sweep_name = name or cfg.name
    with staged_working_dir(Path(sweep_file)) as (stage, sweep):
        runtime_env: dict[str, Any] = {"working_dir": str(stage)}
        if pip:
            runtime_env["pip"] = list(pip)
        request = dict(
            entrypoint=entrypoint(sweep, storage=storage, tracking_uri=tracking_uri,
                                  num_samples=num_samples, name=name),
            runtime_env=runtime_env,
            submission_id=f"wrnsweep-{sweep_name}-{time.strftime('%Y%m%d-%H%M%S')}",
            metadata={"wrnsweep.sweep": sweep_name},
        )
        job_id = _submit_with_retry(jobs, request)
    return jobs, job_id


def _submit_with_retry(jobs: Any, request: dict[str, Any], deadline: float = 300.0) -> str:
    """Submit, waiting out a head whose job agent is still starting.

    A freshly started head answers "No available agent to submit job, please try
    again later" (HTTP 500) for its first seconds (minutes on a busy 2-core head: 2
    minutes were seen not to be enough); that and nothing else is retried.
    """
    end = time.monotonic() + deadline
    delay = 1.0
    while True:
        try:
            return jobs.submit_job(**request)
        except RuntimeError as err:
            if "try again later" not in str(err) or time.monotonic() + delay > end:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 10.0)


def follow(jobs: Any, job_id: str, echo: Echo) -> str:
    """Stream the job's logs until it ends; its final status."""

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            echo(chunk.rstrip("\n"))

    asyncio.run(tail())
    return wait(jobs, job_id)


def wait(jobs: Any, job_id: str, timeout: float = 60.0) -> str:
    """The log stream can end a moment before the status turns terminal."""
    end = time.monotonic() + timeout
    status = str(jobs.get_job_status(job_id))
    while status.split(".")[-1] not in TERMINAL and time.monotonic() < end:
        time.sleep(0.5)
        status = str(jobs.get_job_status(job_id))
    return status.split(".")[-1]


def describe(job: Any) -> dict[str, Any]:
    return {
        "job_id": job.submission_id or job.job_id,
        "status": str(job.status).split(".")[-1],
        "sweep": (job.metadata or {}).get("wrnsweep.sweep"),
        "entrypoint": job.entrypoint,
        "start": job.start_time,
        "end": job.end_time,
        "message": job.message,
    }
