"""What every benchmark prints first: the machine and the versions its figures belong to."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine_lines(packages: tuple[str, ...] = ("torch", "ray", "optuna", "mlflow")) -> list[str]:
    """Two header lines: cores, CPU and OS; Python and the versions of ``packages``."""
    versions = " ".join(f"{pkg}={metadata.version(pkg)}" for pkg in packages)
    return [f"machine: nproc={len(os.sched_getaffinity(0))} cpu={cpu_model()!r} "
            f"{platform.system()} {platform.machine()}",
            f"python={platform.python_version()} {versions}"]
