"""``wrnsweep ui``: the MLflow UI for a sweep's tracking store.

A sweep tracked in its embedded store (``sqlite:///<sweep>/mlflow.db``, artifacts
in ``<sweep>/mlartifacts``) has no server to look at it with: this module starts
one, ``python -m mlflow server`` from the same environment, bound to 127.0.0.1
unless told otherwise, and stops it (its whole process group) on Ctrl-C. A sweep
tracked on an MLflow server already has a UI: nothing is started, its URL is
all there is to give.

Only the standard library is imported here (``wrnsweep --help`` stays fast);
MLflow runs in the child process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

# Stores ``mlflow server --backend-store-uri`` can open; http(s) URIs are servers already.
SERVER_SCHEMES = ("http", "https")
STORE_SCHEMES = ("sqlite", "file", "postgresql", "mysql", "mssql")
STARTUP_TIMEOUT = 120.0  # s; the server imports MLflow and migrates an old database first
STOP_TIMEOUT = 15.0  # s between asking the server to stop and killing its process group
POLL_INTERVAL = 0.25  # s between health probes while the server starts


def is_server(tracking_uri: str) -> bool:
    """True for an MLflow tracking server (http or https), which has a UI of its own."""
    return urlsplit(tracking_uri).scheme in SERVER_SCHEMES


def browse_host(host: str) -> str:
    """The host to put in a URL for a server bound to ``host`` (a wildcard is not one)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def experiment_url(base_url: str, experiment_id: str | None) -> str:
    """The UI page of experiment ``experiment_id``'s runs (the experiment list without one).

    MLflow 3 opens an experiment in its GenAI workspace (traces); the sweep's
    parent and trial runs are on the "Model training" side, which
    ``workflowType=machine_learning`` selects. Credentials in ``base_url`` are
    left out: the URL is printed.
    """
    parts = urlsplit(base_url)
    netloc = parts.netloc.rpartition("@")[2]
    base = urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/")
    if not experiment_id:
        return f"{base}/#/experiments"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def check_store(tracking_uri: str) -> None:
    """Refuse a store a UI cannot open, before anything starts.

    Raises ``ValueError`` for an unsupported scheme and for a SQLite file that
    does not exist (``mlflow server`` would create an empty one and show nothing).
    """
    scheme = urlsplit(tracking_uri).scheme
    if scheme and scheme.split("+")[0] not in STORE_SCHEMES:
        raise ValueError(f"tracking URI {tracking_uri!r}: cannot serve a UI for a "
                         f"'{scheme}' store; must be one of http(s), {', '.join(STORE_SCHEMES)}")
    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        raise ValueError(f"tracking URI {tracking_uri!r}: no such SQLite database {db}")


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URI (``sqlite:////abs`` is absolute)."""
    prefix = "sqlite:///"
    return Path(tracking_uri[len(prefix):]) if tracking_uri.startswith(prefix) else None


def artifact_root(tracking_uri: str) -> str | None:
    """Artifact root of the embedded store: ``mlartifacts/`` beside ``mlflow.db``.

    Experiments keep the root they were created with; this is only the default
    for new ones, so that the server never writes into ``./mlruns`` of the cwd.
    """
    db = sqlite_path(tracking_uri)
    return (db.parent / "mlartifacts").resolve().as_uri() if db is not None else None


def check_port_free(host: str, port: int) -> None:
    """Raise ``ValueError`` naming ``--port`` / ``--host`` when the server could not bind.

    ``SO_REUSEADDR`` as the server sets it: a port in TIME_WAIT is free, one
    with a listener is not.
    """
    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise ValueError(f"--host {host!r}: not an address of this machine ({err})") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            raise ValueError(f"--port {port}: cannot listen on {host}:{port} "
                             f"({err.strerror or err}); is another server using it? "
                             "Pick another --port") from None


def server_command(tracking_uri: str, *, host: str, port: int) -> list[str]:
    """``python -m mlflow server`` for the store, one worker: a UI for one person."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
           "--host", host, "--port", str(port), "--workers", "1",
           "--uvicorn-opts", "--no-access-log"]  # the terminal shows errors, not every request
    root = artifact_root(tracking_uri)
    if root is not None:
        # Runs' artifacts are local files the server reads directly; no proxy needed.
        cmd += ["--default-artifact-root", root, "--no-serve-artifacts"]
    return cmd


def server_env() -> dict[str, str]:
    """The child's environment: no GenAI job runner (one more process, unused by sweeps)."""
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.pop("MLFLOW_TRACKING_URI", None)  # the server's store is --backend-store-uri alone
    return env


def healthy(base_url: str, timeout: float = 2.0) -> bool:
    """True once ``GET /health`` answers 200."""
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def wait_until_up(proc: subprocess.Popen[bytes], base_url: str, *,
                  timeout: float = STARTUP_TIMEOUT) -> bool:
    """Poll ``/health`` until it answers (True) or ``timeout`` passes (False).

    Raises ``RuntimeError`` if the server process exits first.
    """
    deadline = time.monotonic() + timeout
    while not healthy(base_url):
        code = proc.poll()
        if code is not None:
            raise RuntimeError(f"mlflow server exited with code {code} before answering "
                               "(its messages are above)")
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_INTERVAL)
    return True


def stop(proc: subprocess.Popen[bytes], *, timeout: float = STOP_TIMEOUT) -> None:
    """Stop the server: SIGTERM to ``mlflow server`` (it forwards it to uvicorn), then
    SIGKILL to whatever of its process group is left after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    with suppress(ProcessLookupError, PermissionError):  # the group is gone already
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def running_server(cmd: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``cmd`` in a process group of its own; stop it on the way out, whatever happens.

    SIGINT and SIGTERM raise ``KeyboardInterrupt`` while it runs, even where
    SIGINT was inherited ignored (a script's background job), so Ctrl-C and
    ``kill`` stop the server the same way and leave nothing behind.
    """
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # A session of its own: Ctrl-C reaches this process only, which then stops the
        # server in order (SIGTERM, wait, then the group) instead of racing it.
        proc = subprocess.Popen(cmd, env=server_env(), start_new_session=True)
        try:
            yield proc
        finally:
            for sig in previous:  # a second Ctrl-C or kill: the same stop, bounded
                signal.signal(sig, signal.SIG_IGN)
            stop(proc)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(tracking_uri: str, experiment_id: str | None, *, host: str, port: int,
          echo: Callable[[str], None] = print) -> int:
    """Run the UI for a local store until Ctrl-C (0) or until the server dies (its code).

    The store and port are checked first (``ValueError``); ``RuntimeError`` if
    the server exits before it answers.
    """
    check_store(tracking_uri)
    check_port_free(host, port)
    base_url = f"http://{browse_host(host)}:{port}"
    echo(f"starting the MLflow UI for {tracking_uri} on {host}:{port} ...")
    try:
        with running_server(server_command(tracking_uri, host=host, port=port)) as proc:
            if not wait_until_up(proc, base_url):
                echo(f"the server is not answering after {STARTUP_TIMEOUT:.0f} s; "
                     "still waiting on it")
            echo(f"MLflow UI: {experiment_url(base_url, experiment_id)}")
            echo("press Ctrl-C to stop it")
            return proc.wait()
    except KeyboardInterrupt:
        echo("MLflow UI stopped")
        return 0
