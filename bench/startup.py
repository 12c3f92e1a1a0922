"""Start-up: ``wrnsweep --help``, and ``wrnsweep launch`` up to the first reported epoch.

1. ``help_s``: the median wall time of 5 runs of ``wrnsweep --help`` (a fresh
   process each, the console script as installed), after one unmeasured run that
   warms the page cache.
2. ``first_epoch_s``: ``wrnsweep launch search_spaces/smoke.yaml --storage TMP``
   as a user runs it (a local Ray of its own, the embedded SQLite MLflow store,
   the digits data set), from process start to the arrival of its first progress
   line for an epoch (``... epoch 1/4 val_acc ...``, printed by the driver when
   Tune hands it the first result; the output is read as it comes, unbuffered).
   Then the driver gets SIGINT (as Ctrl-C), which stops the sweep; the benchmark
   waits for it to exit, ends any process of the run still alive (each inherits
   a marker in its environment; ended by pid) and removes the temporary folder.
   Median of 3 runs.
3. One more run, instrumented, for the breakdown: the same command in a Python
   that wraps the stages of ``orchestrator.sweep.launch`` with timestamps
   (dataset, searcher, ``ray.init``, cluster check, MLflow store and parent run,
   Tuner up to the first trial's start, that is its worker process up with the
   trainable's imports, then the first epoch itself), with ``-X importtime`` for
   the time the driver spends importing each top-level package (inside the
   stages above, where each is first imported).

4. The read-only commands: ``validate_s`` (``wrnsweep validate smoke.yaml``) and
   ``best_s`` (``wrnsweep best`` on a smoke sweep run to the end first), medians
   of 5 fresh processes after a warm-up; and ``mlflow_import_s``, the median of
   ``python -c "import mlflow"``, the floor under ``best`` (it reads MLflow).

Every run uses ``RAY_ADDRESS=local`` and ``RAY_TMPDIR`` in a temporary folder, so
it starts a Ray of its own and never touches another process's cluster.

The machine may be shared (other developers run Ray tests here): the CPU share
of other processes during each launch is printed, and runs during which they
took more than 10% of the cores are flagged; their times are not comparable.

Usage: ``.venv/bin/python bench/startup.py [--runs 3] [--keep]`` from the
repository root (about 4 minutes). The last line is ``help_s=X first_epoch_s=Y
validate_s=V best_s=B mlflow_import_s=M``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._common import machine_busy_seconds, machine_lines  # noqa: E402  (needs REPO on sys.path)

SMOKE = REPO / "search_spaces" / "smoke.yaml"
WRNSWEEP = Path(sys.executable).with_name("wrnsweep")
EPOCH_LINE = re.compile(r" epoch \d+/\d+ ")  # orchestrator.progress.ConsoleProgress
STAMP = re.compile(r"STARTUP (\S+) (\d+\.\d+)")  # printed by BOOTSTRAP
FIRST_EPOCH_TIMEOUT_S = 600
EXIT_TIMEOUT_S = 120  # after SIGINT
BUSY_SHARE = 0.10
CORES = len(os.sched_getaffinity(0))

# Runs `wrnsweep` in this interpreter with timestamps around the stages of launch.
# Nothing is imported ahead of what the CLI imports itself, except that the tracker
# and the progress callback are patched once `_fit` starts (they are imported by then).
BOOTSTRAP = r"""
import functools, sys, time

def stamp(name):
    sys.stdout.write(f"STARTUP {name} {time.time():.6f}\n")  # one write: threads may stamp
    sys.stdout.flush()

stamp("python")
import orchestrator.sweep as sweep

def wrap(owner, name, label, before=None):
    original = getattr(owner, name)
    @functools.wraps(original)
    def timed(*args, **kwargs):
        if before is not None:
            before()
        stamp(label + ":start")
        try:
            return original(*args, **kwargs)
        finally:
            stamp(label + ":end")
    setattr(owner, name, timed)

def first_call(owner, name, label):
    original = getattr(owner, name)
    seen = []
    @functools.wraps(original)
    def timed(*args, **kwargs):
        if not seen:
            seen.append(1)
            stamp(label)
        return original(*args, **kwargs)
    setattr(owner, name, timed)

def patch_hooks():
    from orchestrator.tracking import SweepTracker
    first_call(SweepTracker, "on_trial_start", "trial_start")

for name, label in [("launch", "launch"), ("_load_splits", "dataset"), ("_start_ray", "ray"),
                    ("_check_cluster", "cluster"), ("_start_tracking", "mlflow")]:
    wrap(sweep, name, label)
wrap(sweep, "_fit", "fit", before=patch_hooks)
from orchestrator.cli import main
sys.argv = ["wrnsweep", *sys.argv[1:]]
main()
"""


@dataclass
class Launch:
    """One ``wrnsweep launch`` up to its first epoch."""

    first_epoch_s: float | None = None
    exit_s: float | None = None  # from SIGINT to the driver's exit
    returncode: int | None = None
    others_share: float | None = None
    stamps: dict[str, float] = field(default_factory=dict)  # seconds after process start
    lines: list[tuple[float, str]] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


def marked_pids(marker: bytes) -> dict[int, float]:
    """pid -> CPU seconds of every process whose environment holds ``marker``."""
    hz = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if marker not in Path(entry.path, "environ").read_bytes():
                continue
            rest = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            found[int(entry.name)] = (int(rest[11]) + int(rest[12])) / hz
        except (OSError, IndexError):
            continue
    return found


def end_leftovers(marker: bytes) -> int:
    """End the run's processes still alive (Ray's daemons, workers), by pid."""
    pids = [pid for pid in marked_pids(marker) if pid != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()
                    and "zombie" not in _state(pid)]
            if not pids:
                return 0
            time.sleep(0.2)
    return len(pids)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n")[0]
    except (OSError, IndexError):
        return "zombie"


def run_launch(workdir: Path, *, instrumented: bool, tag: str) -> Launch:
    marker = f"STARTUP_BENCH={os.getpid()}-{tag}"
    env = dict(os.environ)
    env.update(RAY_ADDRESS="local", RAY_TMPDIR=str(workdir / "ray"), PYTHONUNBUFFERED="1",
               STARTUP_BENCH=marker.split("=", 1)[1])
    env.pop("MLFLOW_TRACKING_URI", None)
    args = ["launch", str(SMOKE), "--storage", str(workdir / "runs")]
    cmd = ([sys.executable, "-X", "importtime", "-c", BOOTSTRAP, *args] if instrumented
           else [str(WRNSWEEP), *args])
    out = Launch()
    first = threading.Event()
    busy0 = machine_busy_seconds()
    cpu_seen: dict[int, float] = {}
    start_wall = time.time()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            t = time.perf_counter() - start
            out.lines.append((t, line.rstrip("\n")))
            for name, when in STAMP.findall(line):
                out.stamps[name] = float(when) - start_wall
            if out.first_epoch_s is None and EPOCH_LINE.search(line):
                out.first_epoch_s = t
                first.set()

    def read_stderr() -> None:
        assert proc.stderr is not None
        out.stderr.extend(line.rstrip("\n") for line in proc.stderr)

    readers = [threading.Thread(target=read_stdout, daemon=True),
               threading.Thread(target=read_stderr, daemon=True)]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + FIRST_EPOCH_TIMEOUT_S
    while not first.is_set() and proc.poll() is None and time.monotonic() < deadline:
        cpu_seen.update(marked_pids(marker.encode() + b"\0"))
        first.wait(0.5)
    wall = time.perf_counter() - start
    busy1 = machine_busy_seconds()
    if busy0 is not None and busy1 is not None:
        mine = sum(cpu_seen.values())
        out.others_share = max(0.0, busy1 - busy0 - mine) / (CORES * wall)
    if proc.poll() is None:
        stop = time.perf_counter()
        proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune stops the trials, the driver exits
        try:
            proc.wait(timeout=EXIT_TIMEOUT_S)
            out.exit_s = time.perf_counter() - stop
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    out.returncode = proc.returncode
    for reader in readers:
        reader.join(timeout=10)
    left = end_leftovers(marker.encode() + b"\0")
    if left:
        print(f"warning: {left} process(es) of run {tag} could not be ended")
    return out


def time_command(cmd: list[str], runs: int = 5, **kwargs: object) -> tuple[float, list[float]]:
    """Median wall time of ``cmd`` over ``runs`` fresh processes, after one warm-up run."""
    subprocess.run(cmd, capture_output=True, check=True, **kwargs)  # page cache
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True, **kwargs)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples


def time_help(runs: int = 5) -> tuple[float, list[float]]:
    return time_command([str(WRNSWEEP), "--help"], runs)


def finished_smoke_sweep(workdir: Path) -> Path:
    """``wrnsweep launch smoke.yaml`` run to the end in ``workdir``: the sweep folder."""
    env = dict(os.environ)
    env.update(RAY_ADDRESS="local", RAY_TMPDIR=str(workdir / "ray"))
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run([str(WRNSWEEP), "launch", str(SMOKE), "--storage", str(workdir / "runs")],
                   cwd=workdir, env=env, capture_output=True, check=True, timeout=1800)
    return workdir / "runs" / "smoke"


def time_read_only(runs: int = 5) -> dict[str, tuple[float, list[float]]]:
    """``validate``, ``best`` on a finished smoke sweep, and MLflow's own import (the floor)."""
    out = {"validate_s": time_command([str(WRNSWEEP), "validate", str(SMOKE)], runs),
           "mlflow_import_s": time_command([sys.executable, "-c", "import mlflow"], runs)}
    workdir = Path(tempfile.mkdtemp(prefix="startup-best-", dir="/tmp"))
    try:
        home = finished_smoke_sweep(workdir)
        out["best_s"] = time_command([str(WRNSWEEP), "best", str(home)], runs, cwd=workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def import_times(stderr: list[str], top: int = 8) -> list[tuple[str, float]]:
    """Seconds the driver spent importing each top-level package (``-X importtime``).

    Lines read ``import time: SELF | CUMULATIVE | NAME`` (microseconds). The self
    times of all modules of a package are summed: each import is counted once,
    in its own package (optuna's in optuna even when orchestrator.search imports it).
    """
    totals: dict[str, float] = {}
    for line in stderr:
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        own, _, name = line[len("import time:"):].split("|", 2)
        package = name.strip().split(".")[0]
        totals[package] = totals.get(package, 0.0) + int(own) / 1e6
    return sorted(totals.items(), key=lambda kv: kv[1], reverse=True)[:top]


def breakdown(run: Launch) -> list[tuple[str, float]]:
    """Consecutive stages of the instrumented run, in seconds."""
    s = run.stamps
    points = [
        ("python, CLI, sweep file check (imports torch), plan", "launch:start"),
        ("Optuna and Ray Tune imports (orchestrator.search)", "dataset:start"),
        ("dataset (scikit-learn's digits)", "dataset:end"),
        ("searcher", "ray:start"),
        ("ray.init (a local Ray of 2 CPUs)", "ray:end"),
        ("cluster check, sweep folder", "mlflow:start"),
        ("MLflow (import, SQLite schema, parent run)", "mlflow:end"),
        ("Tuner, first trial's worker process up", "trial_start"),
    ]
    rows, last = [], 0.0
    for label, key in points:
        if key not in s:
            return rows
        rows.append((label, s[key] - last))
        last = s[key]
    if run.first_epoch_s is not None:
        rows.append(("first epoch in the trial (data, model, training)", run.first_epoch_s - last))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="plain launches (median)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    args = parser.parse_args(argv)
    for line in machine_lines(("torch", "ray", "optuna", "mlflow", "click")):
        print(line)

    help_s, samples = time_help()
    print(f"wrnsweep --help: median {help_s:.3f} s of {', '.join(f'{s:.3f}' for s in samples)}")
    read_only = time_read_only()
    for key, label in (("validate_s", "wrnsweep validate smoke.yaml"),
                       ("best_s", "wrnsweep best (finished smoke sweep)"),
                       ("mlflow_import_s", "python -c 'import mlflow' (the floor of best)")):
        median, runs = read_only[key]
        print(f"{label}: median {median:.3f} s of {', '.join(f'{s:.3f}' for s in runs)}")

    firsts = []
    for i in range(args.runs + 1):
        instrumented = i == args.runs
        # Short path: Ray's unix sockets live under RAY_TMPDIR and must stay < 108 bytes.
        workdir = Path(tempfile.mkdtemp(prefix="startup-", dir="/tmp" if os.path.isdir("/tmp")
                                        else None))
        try:
            run = run_launch(workdir, instrumented=instrumented, tag=str(i))
        finally:
            if args.keep:
                print(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
        if run.first_epoch_s is None:
            tail = "\n".join(line for _, line in run.lines[-20:])
            err = "\n".join(run.stderr[-20:])
            sys.exit(f"run {i}: no epoch reported (exit {run.returncode}):\n{tail}\n{err}")
        share = run.others_share
        flag = " -- disturbed" if share is not None and share > BUSY_SHARE else ""
        kind = "instrumented" if instrumented else "plain"
        exit_text = "n/a" if run.exit_s is None else f"{run.exit_s:.1f} s"
        print(f"launch {i} ({kind}): first epoch at {run.first_epoch_s:.2f} s; stopped by SIGINT "
              f"in {exit_text}; other processes used "
              f"{'n/a' if share is None else f'{share:.0%}'} of the cores{flag}")
        if not instrumented:
            firsts.append(run.first_epoch_s)
            continue
        print()
        print("where start-up goes (instrumented run, seconds)")
        for label, seconds in breakdown(run):
            print(f"  {label:<50} {seconds:6.2f}")
        print(f"  {'total to the first epoch':<50} {run.first_epoch_s:6.2f}")
        print("driver imports by package (-X importtime, own time of its modules; inside the "
              "stages above)")
        for package, seconds in import_times(run.stderr):
            print(f"  {package:<50} {seconds:6.2f}")
    first_epoch_s = statistics.median(firsts)
    print()
    print(f"first epoch: median {first_epoch_s:.2f} s of "
          f"{', '.join(f'{s:.2f}' for s in firsts)} (plain runs)")
    print(f"help_s={help_s:.3f} first_epoch_s={first_epoch_s:.2f} "
          f"validate_s={read_only['validate_s'][0]:.3f} best_s={read_only['best_s'][0]:.3f} "
          f"mlflow_import_s={read_only['mlflow_import_s'][0]:.3f}")


if __name__ == "__main__":
    main()
