"""What every test shares: a signing key and a cache of the test run's own, never the
user's, and the run's one launch of tests/sweeps/two_arch.yaml."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._meta import FinishedSweep

TWO_ARCH = Path(__file__).resolve().parent / "sweeps" / "two_arch.yaml"


def _run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This test run's folder, shared by its pytest-xdist workers (the README's test
    command runs two): a worker's base temp dir is ``.../pytest-N/popen-gwK``."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _session_folder(variable: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The run's folder for environment ``variable`` (one for all workers: a sweep one
    worker launched is signed with the key the others check), then as before."""
    home = _run_root(tmp_path_factory) / variable.lower()
    home.mkdir(exist_ok=True)
    before = os.environ.get(variable)
    os.environ[variable] = str(home)
    yield home
    if before is None:
        os.environ.pop(variable, None)
    else:
        os.environ[variable] = before


@pytest.fixture(scope="session", autouse=True)
def signing_key_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """XDG_CONFIG_HOME for every wrnsweep the tests run (in process and as subprocesses).

    Launching a sweep signs its folder under ``$XDG_CONFIG_HOME/wrnsweep/trust.key``
    (:mod:`orchestrator.trust`); the tests use a key of their own, so they neither
    create nor use the key of the user who runs them.
    """
    yield from _session_folder("XDG_CONFIG_HOME", tmp_path_factory)


@pytest.fixture(scope="session", autouse=True)
def cache_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """XDG_CACHE_HOME for every wrnsweep the tests run: the empty MLflow store each new
    sweep folder copies (:func:`orchestrator.store.new_folder_store`) is made once per
    test run there, not read from or written to the user's cache."""
    yield from _session_folder("XDG_CACHE_HOME", tmp_path_factory)


@pytest.fixture(scope="session")
def two_arch_sweep(tmp_path_factory: pytest.TempPathFactory) -> FinishedSweep:
    """tests/sweeps/two_arch.yaml launched once per test run (about a minute on 2 cores;
    the first xdist worker to need it launches it, the other waits and reads it); the
    end-to-end modules each take a copy instead of launching it again. Nobody changes
    this folder itself."""
    from filelock import FileLock

    work = _run_root(tmp_path_factory) / "two_arch"
    record = work / "launch.json"  # what the launch printed, for the other worker
    with FileLock(str(work) + ".lock"):
        if not record.is_file():
            shutil.rmtree(work, ignore_errors=True)  # what a failed launch left
            work.mkdir()
            wrnsweep = str(Path(sys.executable).with_name("wrnsweep"))
            launch = subprocess.run(
                [wrnsweep, "launch", str(TWO_ARCH), "--storage", str(work / "runs")],
                capture_output=True, text=True, cwd=work, timeout=600,
                env={**os.environ, "RAY_ADDRESS": ""})
            assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
            record.write_text(json.dumps({"args": launch.args, "stdout": launch.stdout,
                                          "stderr": launch.stderr}))
    printed = json.loads(record.read_text())
    launch = subprocess.CompletedProcess(printed["args"], 0, printed["stdout"],
                                         printed["stderr"])
    return FinishedSweep(work / "runs" / "e2e", launch)
