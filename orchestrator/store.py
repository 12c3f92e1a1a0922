"""The tracking store, read and written without Ray: MLflow clients, tags, store paths.

The read-only commands (``best``, ``report``, ``ui``) and the registry use this
module alone, so printing a leaderboard imports MLflow but not Ray Tune, Optuna or
torch; :mod:`orchestrator.tracking` (the Tune callback that writes a running
sweep) builds on it.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import closing
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


def tracking_env() -> None:
    """Fail fast on an unreachable server: BufferedWriter retries without blocking Tune.

    MLflow's own HTTP retries (7 with back-off, 120 s timeout) would stall the
    driver's event loop, and with it every trial's results, for minutes.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def is_local_store(tracking_uri: str) -> bool:
    """Whether MLflow writes to ``tracking_uri`` run in this process (SQLite, files)."""
    return local_store_path(tracking_uri) is not None or \
        tracking_uri.lower().startswith("sqlite:")  # an in-memory database too


# Where MLflow keeps absolute artifact locations: (table, column). A sweep folder's
# embedded store records them under the folder (its mlartifacts/), so a moved or
# copied folder needs them re-pointed before MLflow reads or writes an artifact.
_ARTIFACT_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)
ARTIFACTS_DIR = "mlartifacts"  # a sweep folder's artifact root, beside its mlflow.db


class StoreMovedError(RuntimeError):
    """A moved sweep folder's store records another location and cannot be re-pointed."""


def relocate_store(db: Path) -> Path | None:
    """Re-point a sweep folder's SQLite store at its artifacts after a move; the old folder.

    The store in ``folder/mlflow.db`` keeps absolute artifact locations under
    ``folder/mlartifacts``. When the experiment's location names another folder (the
    folder was moved, copied or renamed), every such location in the store is
    rewritten to this folder, so that nothing of the original is read or written.
    Idempotent: None when the locations already point here (or the store is not a
    sweep folder's).
    """
    import sqlite3
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    folder = db.resolve().parent
    con = sqlite3.connect(db)
    try:
        tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
        if "experiments" not in tables:
            return None
        roots = set()
        for (location,) in con.execute("select artifact_location from experiments"):
            text = str(location or "").rstrip("/")
            if text.endswith(f"/{ARTIFACTS_DIR}"):
                path = url2pathname(urlparse(text).path) if text.startswith("file:") else text
                roots.add(Path(path).parent)
        old = [r for r in roots if r != folder]
        if not old:
            return None
        pairs = [(prefix(r), prefix(folder)) for r in old for prefix in (Path.as_uri, str)]
        for table, column in _ARTIFACT_COLUMNS:
            if table in tables:
                _rewrite(con, table, column, pairs)
        con.commit()
    except sqlite3.OperationalError as err:
        raise StoreMovedError(
            f"{db}: this sweep folder was moved (its store names {old[0]}) and the store "
            f"cannot be updated ({err}); make the folder writable once") from None
    finally:
        con.close()
    return old[0]


def _rewrite(con: Any, table: str, column: str, pairs: list[tuple[str, str]]) -> None:
    """Replace each old prefix by the new one in ``table.column`` (whole path parts only)."""
    rows = con.execute(f"select rowid, {column} from {table} where {column} is not null").fetchall()
    for rowid, value in rows:
        for old, new in pairs:
            if value == old or value.startswith(old + "/"):
                con.execute(f"update {table} set {column} = ? where rowid = ?",
                            (new + value[len(old):], rowid))
                break


# An empty store, made once per MLflow schema and copied for each new sweep folder.
STORE_CACHE = "mlflow-stores"  # under trainables.config.cache_home()


def new_folder_store(db: Path) -> None:
    """Create a sweep folder's empty SQLite store at ``db`` (a path that does not exist).

    MLflow makes a SQLite store by running every one of its schema migrations
    (alembic), about 1.8 s of CPU here (MLflow 3.17.2, 69 migrations), and the result
    is the same for every store of that schema. So the first store is made that way
    in the user's cache, under a name keyed by MLflow's version and its migration
    scripts (:func:`_schema_key`), and each new folder gets a copy (the cache is the
    user's own, as trusted as the signing key in ``$XDG_CONFIG_HOME``; an SQLite file
    runs no code). Where the cache cannot be written, MLflow makes the store in place.
    Either way the Default experiment (id 0), which MLflow points at ``./mlruns`` of
    the working directory, is pointed into the folder's ``mlartifacts/``: a sweep
    folder's store names no path outside it. tests/test_portable.py compares such a
    store with one MLflow made itself.
    """
    import shutil
    import sqlite3

    template = _cached_empty_store()
    if template is None:
        _create_store(db)
    else:
        partial = db.with_name(f".{db.name}.{os.getpid()}.partial")  # mode from the umask
        try:
            shutil.copyfile(template, partial)
            os.replace(partial, db)  # a half-copied file is never seen as the store
        finally:
            partial.unlink(missing_ok=True)
    default = (db.resolve().parent / ARTIFACTS_DIR / "0").as_uri()
    with closing(sqlite3.connect(db)) as con:
        con.execute("update experiments set artifact_location = ? where experiment_id = 0",
                    (default,))
        con.commit()


def _create_store(db: Path) -> None:
    """An empty store at ``db``, made by MLflow (its migrations)."""
    mlflow_client(f"sqlite:///{db.resolve()}").search_experiments(max_results=1)


def _schema_key() -> str:
    """MLflow's version and a digest of its migration scripts' names: one per schema."""
    import hashlib

    import mlflow

    versions = Path(mlflow.__file__).parent / "store" / "db_migrations" / "versions"
    names = sorted(p.name for p in versions.glob("*.py"))
    return f"{mlflow.__version__}-{hashlib.sha256(' '.join(names).encode()).hexdigest()[:12]}"


def _cached_empty_store() -> Path | None:
    """The user's cached empty store for this MLflow (made now if missing or not a
    readable store); None where the cache cannot be written."""
    import tempfile

    from trainables.config import cache_home

    try:
        folder = cache_home() / STORE_CACHE
    except RuntimeError:  # no home directory to be found
        return None
    cached = folder / f"empty-{_schema_key()}.db"
    if _is_store(cached):
        return cached
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            made = Path(scratch) / "mlflow.db"
            _create_store(made)
            os.replace(made, cached)  # two launches at once: either file is whole
    except OSError:
        return None
    return cached


def _is_store(db: Path) -> bool:
    """Whether ``db`` is an SQLite store that records an alembic revision."""
    import sqlite3

    if not db.is_file():
        return False
    try:
        with closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as con:
            return con.execute("select version_num from alembic_version").fetchone() is not None
    except sqlite3.Error:
        return False


def logged_manifest(client: Any, run_id: str) -> Any:
    """The sweep record its launch logged on the parent run ``run_id``.

    ``manifest.json`` (the current format), or the ``plan.json`` of a sweep launched
    by an earlier wrnsweep (loaded through the same migration as a folder's).
    Raises ``ManifestError`` when the run has neither.
    """
    import json
    import tempfile

    from mlflow.exceptions import MlflowException

    from orchestrator.manifest import MANIFEST_ARTIFACT, Manifest, ManifestError

    for name in (MANIFEST_ARTIFACT, "plan.json"):
        with tempfile.TemporaryDirectory(prefix="wrnsweep-manifest-") as tmp:
            try:
                path = client.download_artifacts(run_id, name, tmp)
                data = json.loads(Path(path).read_text())
            except (MlflowException, OSError, ValueError):
                continue
        if isinstance(data, dict):
            return Manifest.from_json(data, Path(str(data.get("home", "."))))
    raise ManifestError(f"run {run_id} holds no sweep record ({MANIFEST_ARTIFACT})")
