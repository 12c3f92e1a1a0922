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


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy since boot (/proc/stat; None elsewhere).

    Its growth over an interval, less a benchmark's own processes, is what other work
    took from the machine meanwhile.
    """
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def machine_lines(packages: tuple[str, ...] = ("torch", "ray", "optuna", "mlflow")) -> list[str]:
    """Two header lines: cores, CPU and OS; Python and the versions of ``packages``."""
    versions = " ".join(f"{pkg}={metadata.version(pkg)}" for pkg in packages)
    return [f"machine: nproc={len(os.sched_getaffinity(0))} cpu={cpu_model()!r} "
            f"{platform.system()} {platform.machine()}",
            f"python={platform.python_version()} {versions}"]
