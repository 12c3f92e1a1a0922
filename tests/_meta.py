"""A sweep folder's manifest as the tests read it: through the one loader the commands use."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any


def sweep_meta(home: str | Path) -> dict[str, Any]:
    """wrnsweep.json resolved at the folder's present location (absolute paths)."""
    from orchestrator.manifest import Manifest

    return asdict(Manifest.load(home))
