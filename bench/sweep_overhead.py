"""Sweep overhead: how close a small CPU sweep comes to the throughput of its bare epochs.

Workload: 8 trials x 5 epochs of a CIFAR ResNet-8 on the ``synthetic`` dataset,
2 trials at a time on 2 CPUs (1 CPU per trial), FIFO (no early stopping), TPE over
the learning rate. ``synthetic_size`` (default 512 training images, 256 validation
images by data.py's ``max(256, S // 8)`` rule) makes one epoch about 1 s on one core.

1. ``epoch_seconds_one_core``: measured in this process with the project's own
   ``trainables.engine.Trainer`` on one thread (``num_threads=1``, CPU): one warm-up
   epoch, then 3 timed ``run_epoch()`` calls (training plus the validation pass, as
   in both arms' trials); once before the arms and once after, the median of the
   6 samples (the machine's speed drifts by 10-20 % over minutes).
2. ``ideal_seconds = trials x epochs x epoch_seconds_one_core / 2 slots``: perfectly
   packed trials, no start-up, no bookkeeping.
3. Two arms, each a complete fresh process that starts its own local Ray (2 CPUs):

   * wrnsweep: ``wrnsweep launch SWEEP.yaml --storage TMP/runs`` on a generated
     sweep file (resnet depth 8, lr searched, FIFO, top_k 1), as a user runs it:
     Ray, MLflow (embedded SQLite), a checkpoint per epoch, registry of the best.
   * plain: Ray Tune + OptunaSearch + MLflowLoggerCallback written by hand the way
     the Ray docs show: a function trainable that loads the same synthetic tensors
     into a ``TensorDataset``/``DataLoader`` (batch 128, shuffle) inside the trial,
     builds the same model (``trainables.models.build_model``), trains SGD
     (momentum 0.9, constant lr, no augmentation), validates, and reports each
     epoch with a checkpoint (``tempfile`` + ``torch.save`` +
     ``Checkpoint.from_directory``, as the docs do). It does not call
     ``torch.set_num_threads`` (a typical user does not); the threads torch
     actually used in a trial are printed. Ray Tune defaults otherwise
     (``reuse_actors=False``, default verbosity).

   ``fraction = ideal_seconds / wall_seconds``. The final line is based on the
   Tuner.fit window, from just before the Tuner is built (wrnsweep: its
   ``tracking:`` line; plain: a marker) to Tune's final "Wrote the latest version
   of all result files" log line: on that basis the plain arm measures what the
   issue reports for it (about 0.43), on the whole-command basis (process start to
   exit: imports, Ray start-up and shut-down, MLflow store creation, for wrnsweep
   model registration; ``--basis whole``) about 0.3. Plain's fit window includes
   its MLflow store creation (the stock callback creates the store in its setup),
   wrnsweep's does not (it creates it before the Tuner). The table shows both
   bases, splits each arm into pre-fit / fit / post-fit, and the fit window into
   the trials' own time (Tune's ``time_total_s`` summed over trials, per slot) and
   idle slot time (actor start-up, imports, gaps between trials).

4. The CPU budget of the fit window: the CPU seconds the arm's processes used in
   it, against the ``2 x fit`` available and the ``2 x ideal`` the epochs alone
   need, and what a fraction of 0.85 would leave for everything else.

Both arms run with ``RAY_ADDRESS=local`` and ``RAY_TMPDIR`` in a temporary folder:
``ray.init()`` without an address otherwise joins whatever cluster another process
on the machine started (``/tmp/ray/ray_current_cluster``). Each arm's Ray belongs
to its process and stops with it; the temporary folder is removed at the end.

The CPU may be shared with other work: each arm's processes are told apart by an
environment variable they all inherit, and the CPU seconds of the arm and of all
other processes during it are printed; an arm during which other processes took
more than 5% of the cores is flagged, its numbers are not comparable. Another
process running ``ray stop`` kills every Ray on the machine, this benchmark's too
(the arm then fails with Ray's error).

Usage: ``.venv/bin/python bench/sweep_overhead.py [--synthetic-size 512]
[--basis fit|whole] [--only wrnsweep|plain] [--keep]`` from the repository root,
about 3 minutes on 2 idle cores. The last line is
``wrnsweep_fraction=X plain_fraction=Y ratio=Z`` (ratio = wrnsweep / plain).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._common import machine_busy_seconds, machine_lines  # noqa: E402  (needs REPO on sys.path)

TRIALS = 8
EPOCHS = 5
SLOTS = 2  # CPUs, one trial per CPU
ARCH, DEPTH = "resnet", 8
DEFAULT_SYNTHETIC_SIZE = 512  # ~1 s per epoch (train + val) on one core of this machine
LR_LOW, LR_HIGH = 0.01, 0.3
BUSY_SHARE = 0.05  # other processes' CPU share above which an arm's numbers are flagged
ARM_TIMEOUT_S = 600  # a sweep that takes longer than this is broken, not slow
TARGET = 0.85  # issue 3: wrnsweep's fraction of ideal throughput

# The "Tuner.fit only" window ends at this line, logged by Tune when fit() is done.
FIT_END = "Wrote the latest version of all result files"
PLAIN_FIT_START = "BENCH fit_start"
WRNSWEEP_FIT_START = "tracking: "  # printed by `wrnsweep launch` just before the Tuner


# -- the measurement of one epoch ----------------------------------------------------------
def epoch_seconds_one_core(synthetic_size: int) -> tuple[float, list[float]]:
    """Median seconds of ``Trainer.run_epoch()`` on one thread, after one warm-up epoch."""
    from trainables.config import TrainConfig
    from trainables.engine import Trainer

    cfg = TrainConfig.from_dict({
        "arch": ARCH, "depth": DEPTH, "dataset": "synthetic", "synthetic_size": synthetic_size,
        # Epochs only sets the lr schedule here (1 warm-up + 3 timed run_epoch calls).
        "epochs": EPOCHS + 4, "num_threads": 1, "device": "cpu",
    })
    trainer = Trainer(cfg)
    trainer.run_epoch()  # warm-up: first-call allocations, lazy init of kernels
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        trainer.run_epoch()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples


# -- the two arms --------------------------------------------------------------------------
def sweep_yaml(name: str, synthetic_size: int) -> str:
    return textwrap.dedent(f"""\
        # Generated by bench/sweep_overhead.py
        name: {name}
        dataset: {{name: synthetic, synthetic_size: {synthetic_size}}}
        architectures:
          {ARCH}:
            depth: {DEPTH}
        recipe:
          epochs: {EPOCHS}
          lr: {{low: {LR_LOW}, high: {LR_HIGH}, log: true}}
        search:
          algorithm: tpe
          num_samples: {TRIALS}
          max_concurrent: {SLOTS}
          seed: 0
        scheduler:
          name: fifo
        resources:
          default: {{cpu: 1, gpu: 0}}
        tracking:
          top_k: 1
        """)


# The hand-written baseline, as a Ray Tune user writes it from the docs. Kept as
# plain as possible on purpose: what the project is compared against is what
# people do without it, not a tuned baseline.
PLAIN_SCRIPT = '''\
import os
import sys
import tempfile

import ray
import torch
import torch.nn.functional as F
from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch
from torch.utils.data import DataLoader, TensorDataset

SYNTHETIC_SIZE, EPOCHS, TRIALS = (int(a) for a in sys.argv[1:4])
WORKDIR, LR_LOW, LR_HIGH = sys.argv[4], float(sys.argv[5]), float(sys.argv[6])


def train_cifar(config):
    from trainables.data import load_splits
    from trainables.models import build_model

    # The user loads the data inside the trainable.
    splits = load_splits("synthetic", synthetic_size=SYNTHETIC_SIZE)
    mean = torch.tensor(splits.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(splits.spec.std).view(1, 3, 1, 1)

    def dataset(split):
        return TensorDataset((split.images.float() / 255 - mean) / std, split.labels)

    train_loader = DataLoader(dataset(splits.train), batch_size=128, shuffle=True, drop_last=True)
    val_loader = DataLoader(dataset(splits.val), batch_size=1024)
    model = build_model("resnet", num_classes=10, depth=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9,
                                weight_decay=1e-4)
    for epoch in range(EPOCHS):
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        model.eval()
        correct, total, val_loss = 0, 0, 0.0
        with torch.no_grad():
            for x, y in val_loader:
                logits = model(x)
                val_loss += F.cross_entropy(logits, y, reduction="sum").item()
                correct += (logits.argmax(1) == y).sum().item()
                total += len(y)
        with tempfile.TemporaryDirectory() as folder:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "epoch": epoch}, os.path.join(folder, "checkpoint.pt"))
            tune.report({"val_acc": correct / total, "val_loss": val_loss / total,
                         "epoch": epoch + 1, "torch_threads": torch.get_num_threads()},
                        checkpoint=tune.Checkpoint.from_directory(folder))


if __name__ == "__main__":
    ray.init(num_cpus=2)
    searcher = ConcurrencyLimiter(OptunaSearch(metric="val_acc", mode="max", seed=0),
                                  max_concurrent=2)
    print("BENCH fit_start", flush=True)
    tuner = tune.Tuner(
        tune.with_resources(train_cifar, {"cpu": 1}),
        param_space={"lr": tune.loguniform(LR_LOW, LR_HIGH)},
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=TRIALS),
        run_config=tune.RunConfig(
            name="plain", storage_path=os.path.join(WORKDIR, "plain_runs"),
            callbacks=[MLflowLoggerCallback(
                tracking_uri="sqlite:///" + os.path.join(WORKDIR, "plain.db"),
                experiment_name="plain")],
        ),
    )
    results = tuner.fit()
    print("BENCH fit_end", flush=True)
    best = results.get_best_result(metric="val_acc", mode="max")
    threads = sorted({int(r.metrics.get("torch_threads", 0)) for r in results})
    print(f"BENCH best val_acc={best.metrics['val_acc']:.4f} lr={best.config['lr']:.4g} "
          f"errors={results.num_errors} torch_threads={threads}", flush=True)
'''


@dataclass
class ArmResult:
    """One arm's process: wall time, the Tuner.fit window and its trials' busy time."""

    name: str
    wall_seconds: float
    returncode: int
    fit_start: float | None = None  # seconds after the process started
    fit_end: float | None = None
    trial_seconds: float = 0.0  # sum over trials of Tune's time_total_s
    trials: int = 0
    cpu_arm: float | None = None  # CPU seconds of the arm's processes (Ray's included)
    cpu_others: float | None = None  # CPU seconds of every other process meanwhile
    cpu_fit: float | None = None  # CPU seconds of the arm's processes in the fit window
    lines: list[str] = field(default_factory=list)

    @property
    def fit_seconds(self) -> float | None:
        if self.fit_start is None or self.fit_end is None:
            return None
        return self.fit_end - self.fit_start


class CpuMonitor(threading.Thread):
    """CPU seconds of one arm's processes and of everything else on the machine.

    The machine may be shared: CPU taken by other processes during an arm slows
    its trials, and that is not the arm's overhead. Every process of an arm
    (driver, Ray's daemons, trial workers) inherits ``marker`` in its environment.
    /proc is searched for new ones every second and the known ones are read five
    times a second (what a process uses in its last 0.2 s is missed); "others" is
    the machine's busy time (/proc/stat) minus the arm's. Linux only; elsewhere
    both stay None.
    """

    def __init__(self, marker: str) -> None:
        super().__init__(daemon=True)
        self.marker = marker.encode()
        self.stop = threading.Event()
        self.cpu: dict[tuple[int, int], float] = {}  # (pid, start time) -> CPU seconds
        self.seen: set[tuple[int, int]] = set()  # every process looked at once
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.busy0 = machine_busy_seconds()
        self.series: list[tuple[float, float]] = []  # (perf_counter, the arm's CPU seconds)

    def _read(self, pid: int) -> tuple[tuple[int, int], float] | None:
        try:
            rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None  # ended meanwhile
        # (pid, start time): pids get reused. utime, stime: fields 14 and 15.
        return (pid, int(rest[19])), (int(rest[11]) + int(rest[12])) / self.hz

    def _discover(self) -> None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            read = self._read(int(entry.name))
            if read is None or read[0] in self.seen:
                continue
            self.seen.add(read[0])
            try:
                if self.marker in Path(entry.path, "environ").read_bytes():
                    self.cpu[read[0]] = read[1]
            except OSError:
                pass  # ended meanwhile, or not ours to read

    def _update(self) -> None:
        for key in list(self.cpu):
            read = self._read(key[0])
            if read is not None and read[0] == key:
                self.cpu[key] = read[1]

    def run(self) -> None:
        tick = 0
        while not self.stop.wait(0.2):
            if tick % 5 == 0:
                self._discover()
            self._update()
            self.series.append((time.perf_counter(), sum(self.cpu.values())))
            tick += 1

    def cpu_at(self, when: float) -> float | None:
        """The arm's CPU seconds at ``when`` (a perf_counter value): the last reading before."""
        before = [cpu for t, cpu in self.series if t <= when]
        return before[-1] if before else None

    def finish(self) -> tuple[float | None, float | None]:
        self.stop.set()
        self.join()
        busy1 = machine_busy_seconds()
        if self.busy0 is None or busy1 is None:
            return None, None
        arm = sum(self.cpu.values())
        return arm, max(0.0, busy1 - self.busy0 - arm)


def run_arm(name: str, cmd: list[str], *, cwd: Path, env: dict[str, str],
            fit_start: str, log: Path) -> ArmResult:
    """Run ``cmd`` to the end; wall seconds and the Tuner.fit window from its output.

    Lines are timestamped here, as they arrive (children run unbuffered), so the
    fit window needs nothing from the child but lines it prints anyway.
    """
    stamped: list[tuple[float, str]] = []
    monitor = CpuMonitor(f"SWBENCH_ARM={env['SWBENCH_ARM']}")
    monitor.start()
    start = time.perf_counter()
    # Own session: on a timeout the whole tree (the arm's Ray too) can be ended.
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            stamped.append((time.perf_counter() - start, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        returncode = proc.wait(timeout=ARM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the driver's Ray shuts its local cluster down on it.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        returncode = proc.wait()
        stamped.append((time.perf_counter() - start, f"bench: killed after {ARM_TIMEOUT_S} s"))
    wall = time.perf_counter() - start
    cpu_arm, cpu_others = monitor.finish()
    reader.join(timeout=10)
    result = ArmResult(name, wall, returncode, cpu_arm=cpu_arm, cpu_others=cpu_others,
                       lines=[line for _, line in stamped])
    for t, line in stamped:
        if result.fit_start is None and line.startswith(fit_start):
            result.fit_start = t
        elif result.fit_start is not None and result.fit_end is None and FIT_END in line:
            result.fit_end = t
    if result.fit_start is not None and result.fit_end is not None:
        begin, end = (monitor.cpu_at(start + t) for t in (result.fit_start, result.fit_end))
        if begin is not None and end is not None:
            result.cpu_fit = end - begin
    log.write_text("".join(f"{t:8.3f} {line}\n" for t, line in stamped))
    return result


def add_trial_seconds(result: ArmResult, storage: Path) -> None:
    """Sum Tune's ``time_total_s`` of every trial under ``storage``.

    It runs from the start of the trial function (data loading and model
    building included) to its last report, in the worker: the fit window minus
    this over the slots is time in which a slot ran no trial (actor start-up,
    imports, waiting for the driver).
    """
    for path in storage.rglob("result.json"):
        last = None
        for line in path.read_text().splitlines():
            if line.strip():
                last = line
        if last is not None:
            result.trial_seconds += float(json.loads(last).get("time_total_s", 0.0))
            result.trials += 1


def child_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    # Start a fresh local Ray in each arm. With RAY_ADDRESS unset, ray.init() joins
    # the cluster named in <tmp>/ray/ray_current_cluster if another process on the
    # machine started one; a private RAY_TMPDIR hides it and keeps Ray's session
    # folders in our temporary folder.
    env["RAY_ADDRESS"] = "local"
    env["RAY_TMPDIR"] = str(workdir / "ray")
    env["PYTHONUNBUFFERED"] = "1"  # lines arrive when printed: the fit window is exact
    env.pop("MLFLOW_TRACKING_URI", None)  # wrnsweep would use it instead of its SQLite
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# -- report ----------------------------------------------------------------------------------
def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _tail(result: ArmResult, n: int = 15) -> str:
    """The last lines of an arm's output that say something (Ray's daemon chatter left out)."""
    useful = [line for line in result.lines if line.strip() and "(raylet)" not in line]
    errors = [line for line in useful if "Error" in line or "error" in line][-5:]
    return "\n".join([*useful[-n:], "errors:", *errors] if errors else useful[-n:])


def warm_page_cache() -> None:
    """Import what the arms import, so neither arm pays for reading it from disk first."""
    import mlflow  # noqa: F401
    import optuna  # noqa: F401
    from ray import tune  # noqa: F401


def arm_seconds(result: ArmResult, basis: str) -> float:
    """Wall seconds of an arm on the final line's basis (``whole`` or ``fit``)."""
    if basis == "whole":
        return result.wall_seconds
    if result.fit_seconds is None:
        sys.exit(f"{result.name}: no Tuner.fit window found in its output")
    return result.fit_seconds


def others_share(result: ArmResult) -> float | None:
    """Fraction of the cores other processes used while the arm ran."""
    if result.cpu_others is None:
        return None
    return result.cpu_others / (SLOTS * result.wall_seconds)


def is_disturbed(result: ArmResult) -> bool:
    share = others_share(result)
    return share is not None and share > BUSY_SHARE


def cpu_text(result: ArmResult) -> str:
    share = others_share(result)
    if result.cpu_arm is None or result.cpu_others is None or share is None:
        return "CPU use not measured"
    text = (f"CPU seconds: arm {result.cpu_arm:.1f}, other processes {result.cpu_others:.1f} "
            f"({share:.0%} of the {SLOTS} cores)")
    if is_disturbed(result):
        text += " -- disturbed: other processes took CPU from the trials"
    return text


def print_table(results: dict[str, ArmResult], ideal: float, epoch_s: float) -> None:
    header = (f"{'arm':<9} {'whole s':>8} {'fraction':>8} | {'pre-fit':>7} {'fit s':>6} "
              f"{'fraction':>8} {'post-fit':>8} | {'trial s/slot':>12} {'idle slot s':>11} "
              f"{'epoch x':>7}")
    print(header)
    print("-" * len(header))
    for arm, r in results.items():
        fit = r.fit_seconds
        busy = r.trial_seconds / SLOTS
        slowdown = r.trial_seconds / (TRIALS * EPOCHS * epoch_s)
        if fit is None or r.fit_start is None or r.fit_end is None:
            middle = f"{'n/a':>7} {'n/a':>6} {'n/a':>8} {'n/a':>8}"
            idle = "n/a"
        else:
            middle = (f"{r.fit_start:7.1f} {fit:6.1f} {ideal / fit:8.3f} "
                      f"{r.wall_seconds - r.fit_end:8.1f}")
            idle = f"{fit - busy:.1f}"
        print(f"{arm:<9} {r.wall_seconds:8.1f} {ideal / r.wall_seconds:8.3f} | {middle} | "
              f"{busy:12.1f} {idle:>11} {slowdown:7.2f}")
    print("whole: process start to exit (the final line is based on it); pre-fit: to the "
          "Tuner (imports,\nray.init, wrnsweep's MLflow set-up); fit: Tuner built to Tune's "
          "final state write;\npost-fit: to exit (registry, leaderboard, Ray shut-down); "
          f"trial s/slot: sum of the {TRIALS} trials'\nTune time_total_s / {SLOTS} slots; idle "
          "slot s: fit minus that (actor start-up, imports, gaps);\nepoch x: trial seconds / "
          "(trials x epochs x epoch_seconds_one_core), 1.00 = epochs as fast as alone")


def print_cpu_budget(results: dict[str, ArmResult], ideal: float, target: float) -> None:
    """Where the fit window's CPU went, against what the target would leave.

    A fit window of W seconds offers SLOTS x W CPU seconds; the epochs alone need
    SLOTS x ideal of them. At ``fraction = target`` (W = ideal / target) that leaves
    SLOTS x ideal x (1/target - 1) CPU seconds for everything else: starting each
    slot's worker (Python, Ray, torch imports), Tune, MLflow, Ray's daemons.
    """
    spare = SLOTS * ideal * (1 / target - 1)
    print(f"CPU in the fit window (the epochs alone need {SLOTS * ideal:.1f} CPU s; at "
          f"fraction {target} the rest may take {spare:.1f} CPU s):")
    for arm, r in results.items():
        if r.cpu_fit is None or r.fit_seconds is None:
            print(f"  {arm}: not measured")
            continue
        print(f"  {arm}: {r.cpu_fit:.1f} CPU s of {SLOTS * r.fit_seconds:.1f} available "
              f"({r.cpu_fit / (SLOTS * r.fit_seconds):.0%} busy); beyond the epochs: "
              f"{r.cpu_fit - SLOTS * ideal:.1f} CPU s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--synthetic-size", type=int, default=DEFAULT_SYNTHETIC_SIZE,
                        help="training images of the synthetic set (default %(default)s: "
                             "about 1 s per epoch on one core here)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary folder (sweep outputs, logs) and print it")
    parser.add_argument("--only", choices=("wrnsweep", "plain"),
                        help="run one arm only (for profiling; no final line)")
    parser.add_argument("--basis", choices=("whole", "fit"), default="fit",
                        help="wall time of the final line: the Tuner.fit window (default; "
                             "the basis of the issue's 0.43 for plain) or the whole command")
    args = parser.parse_args(argv)

    for line in machine_lines():
        print(line)
    print(f"load average before: {load_average()}")

    # The one-core epoch is measured before and after the arms and the median of all
    # samples taken: this machine's speed drifts by 10-20 % over minutes.
    _, before = epoch_seconds_one_core(args.synthetic_size)
    print(f"epoch seconds alone on one core, before the arms: "
          f"{', '.join(f'{x:.3f}' for x in before)} ({ARCH}-{DEPTH}, "
          f"synthetic_size={args.synthetic_size})")
    warm_page_cache()

    # Short path: Ray's unix sockets live under RAY_TMPDIR and must stay < 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="swbench-", dir="/tmp" if os.path.isdir("/tmp")
                                    else None))
    results: dict[str, ArmResult] = {}
    try:
        env = child_env(workdir)
        name = f"bench-{os.getpid()}-{int(time.time())}"
        sweep_file = workdir / "sweep.yaml"
        sweep_file.write_text(sweep_yaml(name, args.synthetic_size))
        plain_file = workdir / "plain_sweep.py"
        plain_file.write_text(PLAIN_SCRIPT)
        wrnsweep_bin = Path(sys.executable).with_name("wrnsweep")
        arms = {
            "wrnsweep": ([str(wrnsweep_bin), "launch", str(sweep_file),
                          "--storage", str(workdir / "runs")], WRNSWEEP_FIT_START,
                         workdir / "runs"),
            "plain": ([sys.executable, str(plain_file), str(args.synthetic_size), str(EPOCHS),
                       str(TRIALS), str(workdir), str(LR_LOW), str(LR_HIGH)], PLAIN_FIT_START,
                      workdir / "plain_runs"),
        }
        for arm, (cmd, fit_start, storage) in arms.items():
            if args.only and arm != args.only:
                continue
            # Inherited by every process of the arm: how CpuMonitor tells them apart.
            arm_env = {**env, "SWBENCH_ARM": f"{arm}-{os.getpid()}"}
            result = run_arm(arm, cmd, cwd=workdir, env=arm_env, fit_start=fit_start,
                             log=workdir / f"{arm}.log")
            if result.returncode != 0:
                # e.g. `ray stop` run by another process on the machine kills every Ray.
                sys.exit(f"{arm} arm failed (exit {result.returncode}):\n{_tail(result)}")
            add_trial_seconds(result, storage)
            if result.trials != TRIALS:
                sys.exit(f"{arm} arm ran {result.trials} trials, not {TRIALS}:\n{_tail(result)}")
            results[arm] = result
            print(f"{arm}: {result.wall_seconds:.1f} s whole command; {cpu_text(result)}")
        info = [line for line in results.get("plain", ArmResult("", 0, 0)).lines
                if line.startswith("BENCH best")]
        if info:
            print(f"plain arm: {info[0][len('BENCH '):]}")
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    _, after = epoch_seconds_one_core(args.synthetic_size)
    print("epoch seconds alone on one core, after the arms: "
          f"{', '.join(f'{x:.3f}' for x in after)}")
    epoch_s = statistics.median(before + after)
    ideal = TRIALS * EPOCHS * epoch_s / SLOTS

    print()
    print(f"trials={TRIALS} epochs={EPOCHS} slots={SLOTS} "
          f"epoch_seconds_one_core={epoch_s:.3f} ideal_seconds={ideal:.1f}")
    print_table(results, ideal, epoch_s)
    print_cpu_budget(results, ideal, TARGET)
    print(f"load average after: {load_average()}")
    if len(results) == 2:
        ours = ideal / arm_seconds(results["wrnsweep"], args.basis)
        plain = ideal / arm_seconds(results["plain"], args.basis)
        disturbed = [r.name for r in results.values() if is_disturbed(r)]
        if disturbed:
            print(f"note: other processes took CPU during {', '.join(disturbed)}: "
                  "not comparable, run again on an idle machine")
        print(f"final line basis: {args.basis}")
        print(f"wrnsweep_fraction={ours:.3f} plain_fraction={plain:.3f} ratio={ours / plain:.2f}")


if __name__ == "__main__":
    main()
