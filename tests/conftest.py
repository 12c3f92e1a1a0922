"""What every test shares: a signing key and a cache of the test session's own, never
the user's."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._meta import FinishedSweep

TWO_ARCH = Path(__file__).resolve().parent / "sweeps" / "two_arch.yaml"


def _session_folder(variable: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh folder as environment ``variable`` for the test session, then as before."""
    home = tmp_path_factory.mktemp(variable.lower())
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
    test session there, not read from or written to the user's cache."""
    yield from _session_folder("XDG_CACHE_HOME", tmp_path_factory)


@pytest.fixture(scope="session")
def two_arch_sweep(tmp_path_factory: pytest.TempPathFactory) -> FinishedSweep:
    """tests/sweeps/two_arch.yaml launched once per test session (about a minute on 2
    cores); the end-to-end modules each take a copy instead of launching it again.
    Nobody changes this folder itself."""
    work = tmp_path_factory.mktemp("two_arch")
    wrnsweep = str(Path(sys.executable).with_name("wrnsweep"))
    launch = subprocess.run([wrnsweep, "launch", str(TWO_ARCH), "--storage", str(work / "runs")],
                            capture_output=True, text=True, cwd=work, timeout=600,
                            env={**os.environ, "RAY_ADDRESS": ""})
    assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
    return FinishedSweep(work / "runs" / "e2e", launch)
