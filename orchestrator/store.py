"""The tracking store, read and written without Ray: MLflow clients, tags, store paths.

The read-only commands (``best``, ``report``, ``ui``) and the registry use this
module alone, so printing a leaderboard imports MLflow but not Ray Tune, Optuna or
torch; :mod:`orchestrator.tracking` (the Tune callback that writes a running
sweep) builds on it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "wrnsweep.trial_id"
SWEEP_TAG = "wrnsweep.sweep"
GPU_TAG = "wrnsweep.gpu"  # GPUs the trial holds (a fraction with resources: auto)


def mlflow_client(tracking_uri: str) -> Any:
    """A client whose model registry is the tracking store itself.

    Without an explicit ``registry_uri`` MLflow falls back to a process-wide
    default (``sqlite:///mlflow.db`` in the working directory), so versions
    would be registered somewhere other than where the runs are.
    """
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def local_store_path(tracking_uri: str) -> Path | None:
    """The file or folder of a local tracking store (SQLite database, file store).

    None for a server (http, https, databricks, ...), whose existence only a request
    can tell, and for an in-memory database.
    """
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    if tracking_uri.lower().startswith("databricks"):  # "databricks", "databricks://profile"
        return None
    parsed = urlparse(tracking_uri)  # the scheme comes back lower-cased
    if parsed.scheme == "sqlite":
        # SQLAlchemy's forms: sqlite:///relative.db, sqlite:////absolute.db, and in its
        # URI mode sqlite:///file:path.db?mode=ro&uri=true.
        rest = tracking_uri.split(":", 1)[1].removeprefix("///").split("?", 1)[0]
        if "uri=true" in parsed.query:
            rest = rest.removeprefix("file:")
        return Path(rest) if rest and rest != ":memory:" else None  # as SQLAlchemy: undecoded
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if not parsed.scheme or len(parsed.scheme) == 1:  # a bare path (or C:\\ on Windows)
        return Path(tracking_uri)
    return None


def error_line(err: BaseException) -> str:
    """An error as one line for the terminal: its message's first line, else its type."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def git_commit(cwd: str | os.PathLike[str] | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=cwd, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def ensure_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created (with its artifact root) if missing."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def is_local_store(tracking_uri: str) -> bool:
    """Whether MLflow writes to ``tracking_uri`` run in this process (SQLite, files)."""
    return local_store_path(tracking_uri) is not None or \
        tracking_uri.lower().startswith("sqlite:")  # an in-memory database too
