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
    """Ray's own Jobs client (imports Ray): what ``submit`` uses to upload a working dir."""
    use_token_if_present()
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def _token() -> str | None:
    """The Ray auth token where Ray's clients look for it (env, then file); never logged."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


class JobsApi:
    """The Ray Jobs REST API of a cluster's head (``/api/jobs/``) over the standard library.

    What ``jobs list/status/logs/stop`` and following a job need, without importing
    Ray (seconds less per command). The requests and answers are those of Ray's
    ``JobSubmissionClient`` (``ray/dashboard/modules/job/sdk.py``); the token, when
    one is configured, goes in the ``authorization: Bearer`` header as Ray sends it.
    HTTP errors become ``RuntimeError`` and an unreachable head ``ConnectionError``,
    each with one line.
    """

    def __init__(self, address: str, *, timeout: float = 30.0) -> None:
        self.base = (address if "://" in address else f"http://{address}").rstrip("/")
        self.timeout = timeout
        token = _token()
        self._headers = {"authorization": f"Bearer {token}"} if token else {}

    def _call(self, method: str, path: str) -> Any:
        import json
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.base + path, method=method,
                                         headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                return json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as err:
            body = err.read().decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"{method} {path}: HTTP {err.code}"
                               + (f": {body[0][:300]}" if body else "")) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ConnectionError(f"cannot reach the Ray Jobs API at {self.base}: "
                                  f"{reason}") from None

    def list_jobs(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/jobs/") or [])

    def get_job_info(self, job_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/api/jobs/{job_id}"))

    def get_job_status(self, job_id: str) -> str:
        return str(self.get_job_info(job_id)["status"])

    def get_job_logs(self, job_id: str) -> str:
        return str(self._call("GET", f"/api/jobs/{job_id}/logs")["logs"])

    def stop_job(self, job_id: str) -> bool:
        return bool(self._call("POST", f"/api/jobs/{job_id}/stop")["stopped"])


def submit(sweep_file: str, *, address: str, storage: str | None = None,
           tracking_uri: str | None = None, num_samples: int | None = None,
           name: str | None = None, pip: tuple[str, ...] = (),
           agent_wait: float = 300.0) -> tuple[Any, str]:
    """Submit a validated sweep file; returns ``(client, job id)``.

    ``agent_wait``: seconds to retry a head that has no job agent yet.
    """
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
        job_id = _submit_with_retry(jobs, request, agent_wait)
    return jobs, job_id


# Why a head may never find its job agent, and the fix (one line: the CLI prints an
# error's first line).
NO_AGENT_HINT = (
    "The head's dashboard agent may have lost its HTTP port (52365 by default; any Ray "
    "on the machine, a local sweep's too, takes it): look for 'failed to bind' in "
    "dashboard_agent.log of the head's session folder and start the head with "
    "`ray start --head --dashboard-agent-listen-port=<free port>`."
)


def _submit_with_retry(jobs: Any, request: dict[str, Any], deadline: float = 300.0) -> str:
    """Submit, waiting ``deadline`` seconds at most for the head's job agent.

    A freshly started head answers "No available agent to submit job, please try
    again later" (HTTP 500) for its first seconds; that and nothing else is retried.
    A head whose agent could not bind its HTTP port answers it for ever: when the
    deadline passes, the error says so (:data:`NO_AGENT_HINT`).
    """
    end = time.monotonic() + deadline
    delay = 1.0
    while True:
        try:
            return jobs.submit_job(**request)
        except RuntimeError as err:
            if "try again later" not in str(err):
                raise
            if time.monotonic() + delay > end:
                first = str(err).strip().splitlines()[0]
                raise RuntimeError(f"{first} (retried for {deadline:g} s). "
                                   f"{NO_AGENT_HINT}") from None
        time.sleep(delay)
        delay = min(delay * 2, 10.0)


def follow(api: JobsApi, job_id: str, echo: Echo, *, poll: float = 1.0) -> str:
    """Print the job's logs as they grow until it ends; its final status.

    Polls the logs (Ray's streaming endpoint needs its client and a websocket);
    the job's end is read after the logs, so its last lines are always printed.
    """
    shown = 0
    while True:
        status = api.get_job_status(job_id)
        logs = api.get_job_logs(job_id)
        if len(logs) > shown:
            echo(logs[shown:].rstrip("\n"))
            shown = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll)


def describe(job: dict[str, Any]) -> dict[str, Any]:
    """A job as ``jobs list --json`` shows it."""
    return {
        "job_id": job.get("submission_id") or job.get("job_id"),
        "status": str(job.get("status")),
        "sweep": (job.get("metadata") or {}).get("wrnsweep.sweep"),
        "entrypoint": job.get("entrypoint"),
        "start": job.get("start_time"),
        "end": job.get("end_time"),
        "message": job.get("message"),
    }
