"""A sweep folder's plan as the tests read it: through the one loader the commands use."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any


def sweep_meta(home: str | Path) -> dict[str, Any]:
    """wrnsweep.json resolved at the folder's present location (absolute paths)."""
    from orchestrator.sweep import Plan

    return asdict(Plan.load(home))
