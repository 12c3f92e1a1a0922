"""What a launch would refuse, found before anything starts: ``validate``, ``--dry-run``, launch.

A launch refuses a trial no node can hold, a tracking store it cannot reach, a
storage path it cannot write and an address Ray cannot join, but only once Ray
runs. :func:`preflight` finds the same problems without Ray, so that
``wrnsweep validate`` and ``launch --dry-run`` refuse what the launch would, and
the launch itself refuses them before Ray starts or a file is written:

- **resources**: with no cluster to join (no ``--address``, ``ray.address`` or
  ``RAY_ADDRESS``: the launch starts a Ray of its own on this machine), every
  architecture's per-trial request must fit this machine, read as Ray reads it
  (``os.cpu_count()``; NVIDIA GPUs visible through ``CUDA_VISIBLE_DEVICES``).
  A joined cluster may autoscale, so it is checked at launch, by Ray's nodes.
- **storage**: a folder that is a file, or that cannot be created here.
- **tracking**: a URI MLflow has no store for, a local store whose folder cannot
  be created, a server that does not answer (asked for one experiment, without
  MLflow's retries; the only check that imports MLflow).
- **address**: the forms Ray joins (``config.targets``).

Each problem is one line that names where the value came from: the option
(``--storage``), the environment variable, or the sweep file's line and key.
Nothing here starts Ray, writes a file or imports torch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import ConfigIssue, SweepConfig, check_cluster_fits
from orchestrator.config.targets import address_problem, storage_problem, tracking_uri_problem
from orchestrator.store import local_store_path

DEFAULT_STORAGE = "runs"  # relative to the working directory, as Ray Tune's default is not


@dataclass(frozen=True)
class Given:
    """A value and where it came from, as a message should name it."""

    value: str
    where: str  # "--storage", "RAY_ADDRESS", "sweep.yaml:12: ray.storage_path", "default"
    from_file: bool = False  # the file's values had their form checked when it loaded

    def problem(self, message: str) -> str:
        return f"{self.where}: {message}"


def _given(cfg: SweepConfig, option: str, cli: str | None, key: str, file_value: str | None,
           *, env: str | None = None) -> Given | None:
    if cli is not None:
        return Given(cli, env or option)
    if file_value is not None:
        return Given(file_value, str(ConfigIssue(cfg.source_path, cfg.line_of(key), key, "")
                                     ).rstrip(": "), from_file=True)
    return None


def cluster_address(cfg: SweepConfig, address: str | None) -> Given | None:
    """The cluster a launch would join (as ``sweep._start_ray`` decides), or None for a
    Ray of its own here. A Jobs API ``RAY_ADDRESS`` (http://) is for ``submit``, not Ray."""
    given = _given(cfg, "--address", address, "ray.address", cfg.ray.address)
    if given is None:
        env = os.environ.get("RAY_ADDRESS", "")
        if env and not env.startswith(("http://", "https://")):
            given = Given(env, "RAY_ADDRESS")
    return None if given is None or given.value == "local" else given


def visible_gpus() -> int:
    """NVIDIA GPUs a Ray started here would see, without importing torch or Ray."""
    found = len(list(Path("/proc/driver/nvidia/gpus").glob("*")))
    if not found and shutil.which("nvidia-smi"):
        try:
            listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                    timeout=10, check=False).stdout
        except (OSError, subprocess.TimeoutExpired):
            listed = ""
        found = sum(line.startswith("GPU ") for line in listed.splitlines())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # Ray counts only these ("" and "NoDevFiles": none)
        ids = [v for v in visible.split(",") if v.strip() and v.strip() != "NoDevFiles"]
        found = min(found, len(ids))
    return found


def this_machine() -> dict[str, float]:
    """This machine's resources as a Ray node of its own would list them."""
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(visible_gpus())}


def folder_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a folder wrnsweep writes into, or None."""
    if path.exists():
        if not path.is_dir():
            return f"{path} is a file, not a folder"
        return None if os.access(path, os.W_OK | os.X_OK) else f"{path}: no permission to write"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create {path}: {parent} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {path}: no permission to write in {parent}"
    return None


def probe_tracking(tracking_uri: str) -> str | None:
    """Why the tracking server at ``tracking_uri`` cannot be used, or None.

    A local store (SQLite, a folder) is created by the launch; a server is asked
    for one experiment, without MLflow's retries (seconds, not minutes).
    """
    from orchestrator.store import is_local_store

    if is_local_store(tracking_uri):
        return None
    from mlflow.exceptions import MlflowException

    from orchestrator.store import error_line, mlflow_client, tracking_env

    tracking_env()
    try:
        mlflow_client(tracking_uri).search_experiments(max_results=1)
    except MlflowException as err:
        return f"cannot use the tracking store {tracking_uri}: {error_line(err)}"
    return None


def preflight(cfg: SweepConfig, *, address: str | None = None, storage: str | None = None,
              tracking_uri: str | None = None, tracking_from_env: bool = False) -> list[str]:
    """Every problem a launch of ``cfg`` here would meet, one line each (empty: none).

    The arguments are the command line's (None where it gave nothing); the sweep
    file's own values and the defaults fill in the rest, as ``sweep.make_plan`` does.
    """
    problems: list[str] = []
    cluster = cluster_address(cfg, address)
    if cluster is not None and not cluster.from_file:
        found = address_problem(cluster.value)
        if found:
            problems.append(cluster.problem(found))
    if cluster is None:
        problems += [str(issue) for issue in check_cluster_fits(cfg, [this_machine()],
                                                                here=True)]
    store = _given(cfg, "--storage", storage, "ray.storage_path", cfg.ray.storage_path) \
        or Given(DEFAULT_STORAGE, f"the default storage ./{DEFAULT_STORAGE}")
    found = None if store.from_file else storage_problem(store.value)
    if found is None and "://" not in store.value:
        found = folder_problem(Path(store.value).expanduser().resolve())
    if found:
        problems.append(store.problem(found))
    env = "MLFLOW_TRACKING_URI" if tracking_from_env else None
    tracking = _given(cfg, "--tracking-uri", tracking_uri, "tracking.uri", cfg.tracking.uri,
                      env=env)
    if tracking is not None:
        problems += [tracking.problem(p) for p in _tracking_problems(tracking)]
    return problems


def _tracking_problems(tracking: Given) -> list[str]:
    found = None if tracking.from_file else tracking_uri_problem(tracking.value)
    if found:
        return [found]
    path = local_store_path(tracking.value)
    if path is not None:
        found = folder_problem(path.parent)
        return [f"cannot create the store {path}: {found}"] if found else []
    found = probe_tracking(tracking.value)
    return [found] if found else []
