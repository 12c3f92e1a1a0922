"""What every test shares: a signing key of the test session's own, never the user's."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def signing_key_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """XDG_CONFIG_HOME for every wrnsweep the tests run (in process and as subprocesses).

    Launching a sweep signs its folder under ``$XDG_CONFIG_HOME/wrnsweep/trust.key``
    (:mod:`orchestrator.trust`); the tests use a key of their own, so they neither
    create nor use the key of the user who runs them.
    """
    home = tmp_path_factory.mktemp("config")
    before = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = str(home)
    yield home
    if before is None:
        os.environ.pop("XDG_CONFIG_HOME", None)
    else:
        os.environ["XDG_CONFIG_HOME"] = before
