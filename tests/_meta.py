"""Sweep folders as the tests read them: the manifest through the one loader the
commands use, and finished sweeps that modules share by copying."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


def sweep_meta(home: str | Path) -> dict[str, Any]:
    """wrnsweep.json resolved at the folder's present location (absolute paths)."""
    from orchestrator.manifest import Manifest

    return asdict(Manifest.load(home))


@dataclass(frozen=True)
class FinishedSweep:
    """A sweep folder launched to its end, and what its `wrnsweep launch` printed."""

    home: Path
    launch: subprocess.CompletedProcess[str]

    def copy_to(self, root: Path) -> Path:
        """A copy of the folder at ``root/runs/<name>`` for a module to change at will
        (sweep folders are portable: tests/test_sweep_e2e.py moves and copies one)."""
        copy = root / "runs" / self.home.name
        shutil.copytree(self.home, copy, symlinks=True)
        return copy
