"""Search efficiency: how much training the search spends to find a good network.

Every arm is wrnsweep's real path: a generated sweep file run with ``wrnsweep
launch FILE --storage TMP`` (its own local Ray, the embedded SQLite MLflow store),
then read back from MLflow with ``MlflowClient``, never from the bench's own
bookkeeping:

* the **anytime curve** of a run: every epoch of every trial in the order the
  driver logged it (the MLflow timestamp of its ``val_acc``), against the best
  ``val_acc`` seen so far; its x axis is epochs spent, the budget that training
  time is proportional to on a fixed machine;
* per arm and seed: the **final best** (the last point of the curve), the epochs
  spent, the **epochs to reach the target** and the test accuracy of the model the
  sweep chose (its registered champion's ``test_acc`` tag).

The target is the baseline's median final best over the seeds, less one
validation image (the resolution of the metric: 1/270 on digits); the baseline is
random search with FIFO (every trial to its end), the blind way to try
configurations. ``epochs_ratio`` of an arm is the geometric mean over seeds of its
epochs to the target divided by the baseline's median epochs to the target; a
seed in which an arm never reaches the target counts with the epochs it spent
(a lower bound, marked ``>``), so the ratio can only flatter a failing arm less
than it would with an infinite count and the table says how many seeds reached it.

Also printed, per seed: which trial (in start order) first reached the target in
each arm, and the fewest epochs any one trial of the seed needed to reach it alone,
a floor under every arm's ratio (a searcher whose very first trial were the seed's
fastest configuration would still spend that many epochs).

Arms: ``random_fifo`` (baseline), ``random_asha`` (random search, the default
ASHA), ``default`` (the sweep file says nothing about search algorithm or
scheduler: what a user gets).

Spaces: ``digits`` (WRN {10,16} x {1,2} with dropout and CIFAR ResNet {8,14,20},
lr log-uniform in [0.003, 1], two searched LR milestones, on scikit-learn's 8x8
digits) and ``all`` (the four families of ``all.yaml`` at smoke scale); the
dataset can be switched to ``synthetic``.

Usage: ``.venv/bin/python bench/search_efficiency.py [--seeds 5] [--trials 16]
[--epochs 8] [--space digits|all] [--dataset digits|synthetic [--synthetic-size N]]
[--png FILE] [--workdir DIR]``; ``--quick`` (1 seed, 3 trials of 2 epochs, baseline and default
only) checks the whole path in about two minutes. At full size one arm and seed
takes 8-16 minutes on 2 shared cores (about 9 epochs a minute), so the 5-seed
run takes hours: ``--workdir DIR`` keeps the sweeps there and reads back every
arm and seed that finished there before, so the benchmark can be run in parts
(and summarised again without training). The last line is
``default_epochs_ratio=X random_asha_epochs_ratio=Y seeds=N``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._common import machine_lines  # noqa: E402  (needs REPO on sys.path)

WRNSWEEP = Path(sys.executable).with_name("wrnsweep")
# Validation images per dataset: one image is the smallest step of val_acc.
VAL_IMAGES = {"digits": 270, "synthetic": 256}
ARMS: dict[str, dict[str, Any]] = {
    "random_fifo": {"search": {"algorithm": "random"}, "scheduler": {"name": "fifo"}},
    "random_asha": {"search": {"algorithm": "random"}, "scheduler": {"name": "asha"}},
    "default": {"search": {}, "scheduler": None},
}
BASELINE = "random_fifo"

SPACES: dict[str, dict[str, Any]] = {
    "digits": {
        "wrn": {"depth": {"choices": [10, 16]}, "width": {"choices": [1, 2]},
                "dropout": {"choices": [0.0, 0.3]}},
        "resnet": {"depth": {"choices": [8, 14, 20]}},
    },
    "all": {
        "wrn": {"depth": {"choices": [10, 16]}, "width": {"choices": [1, 2]}},
        "resnet": {"depth": {"choices": [8, 14]}},
        "preact_resnet": {"depth": {"choices": [11, 20]}},
        "diracnet": {"depth": {"choices": [10, 16]}},
    },
}


def sweep_file(space: str, arm: str, *, seed: int, trials: int, epochs: int,
               dataset: str, synthetic_size: int | None = None) -> dict[str, Any]:
    """The sweep file of one arm and seed (a dict, written as JSON: YAML reads it).
    ``synthetic_size``: training images of the synthetic set (its default if None)."""
    search = {"num_samples": trials, "max_concurrent": 2, "metric": "val_acc", "seed": seed,
              **ARMS[arm]["search"]}
    doc: dict[str, Any] = {
        "name": f"eff-{arm}-{seed}",
        "dataset": (dataset if synthetic_size is None
                    else {"name": dataset, "synthetic_size": synthetic_size}),
        "architectures": SPACES[space],
        "recipe": {"epochs": epochs, "batch_size": 64,
                   "lr": {"low": 0.003, "high": 1.0, "log": True},
                   "milestones": {"count": 2, "low": 0.2, "high": 0.9, "min_gap": 0.1}},
        "search": search,
        "resources": {"default": {"cpu": 1, "gpu": 0}},
        "tracking": {"top_k": 1},
    }
    if ARMS[arm]["scheduler"] is not None:
        doc["scheduler"] = ARMS[arm]["scheduler"]
    return doc


@dataclass
class RunRecord:
    """One arm and seed, as read back from MLflow."""

    arm: str
    seed: int
    curve: list[float] = field(default_factory=list)  # best val_acc after each epoch spent
    histories: dict[str, int] = field(default_factory=dict)  # run id -> val_acc points
    last_epochs: dict[str, int] = field(default_factory=dict)  # run id -> its "epoch" metric
    test_acc: float | None = None  # the champion's tag
    values: dict[str, list[float]] = field(default_factory=dict)  # run id -> val_acc per epoch
    lrs: dict[str, float] = field(default_factory=dict)  # run id -> its learning rate
    curve_runs: list[str] = field(default_factory=list)  # the run of each point of the curve

    @property
    def final_best(self) -> float:
        return self.curve[-1] if self.curve else 0.0

    @property
    def epochs(self) -> int:
        return len(self.curve)

    @property
    def started(self) -> list[str]:
        """The run ids in the order their first epoch was logged."""
        return list(dict.fromkeys(self.curve_runs))

    def trial_reaching(self, target: float) -> int | None:
        """Which trial (1-based, in the order they started) first reaches ``target``
        in the anytime curve; None if none does."""
        spent, reached = self.epochs_to(target)
        return self.started.index(self.curve_runs[spent - 1]) + 1 if reached else None

    def reaching(self, target: float) -> dict[str, int]:
        """The trials that reach ``target`` on their own: run id -> the epoch they do."""
        return {run: next(i for i, v in enumerate(vals, 1) if v >= target - 1e-12)
                for run, vals in self.values.items() if max(vals, default=0) >= target - 1e-12}

    def fewest_epochs(self, target: float) -> int | None:
        """The fewest epochs any one trial of this run needed to reach ``target`` on its
        own (None if no trial reached it): what an arm spends at the least even if its
        first trial were that configuration."""
        return min(self.reaching(target).values(), default=None)

    def epochs_to(self, target: float) -> tuple[int, bool]:
        """Epochs spent when the best first reaches ``target`` (or all of them, False)."""
        for i, best in enumerate(self.curve, start=1):
            if best >= target - 1e-12:
                return i, True
        return self.epochs, False


def sweep_text(doc: dict[str, Any]) -> str:
    """The sweep file written for ``doc`` (launch keeps a copy as ``sweep.yaml``)."""
    return json.dumps(doc, indent=2)


def run_sweep(doc: dict[str, Any], workdir: Path) -> Path:
    """``wrnsweep launch`` of ``doc`` in ``workdir``; the sweep folder."""
    path = workdir / f"{doc['name']}.yaml"
    path.write_text(sweep_text(doc))
    env = dict(os.environ)
    # A Ray of its own (never another process's cluster), sockets on a short path.
    env.update(RAY_ADDRESS="local", RAY_TMPDIR=str(workdir / "ray"))
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([str(WRNSWEEP), "launch", str(path), "--storage",
                           str(workdir / "runs")], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{doc['name']}: launch failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return workdir / "runs" / doc["name"]


def _tracking(home: Path) -> tuple[dict[str, Any], Any]:
    """The sweep's manifest (``wrnsweep.json``, as every command reads it) and a client
    of its MLflow store."""
    import dataclasses

    from orchestrator.manifest import Manifest
    from orchestrator.store import mlflow_client

    manifest = Manifest.load(home)
    return dataclasses.asdict(manifest), mlflow_client(manifest.tracking_uri)


def finished_sweep(home: Path, doc: dict[str, Any]) -> bool:
    """Whether ``home`` holds ``doc``'s sweep run to its end (parent run FINISHED).

    ``--workdir`` reads such a sweep back instead of running it again: the benchmark
    takes hours at its full size on 2 cores, so it can be run in parts. The store is
    read in a child process: MLflow keeps one SQLAlchemy engine per store URI for the
    life of a process, so had this process opened a store that is then deleted and
    run again at the same path (an interrupted run), it would go on reading the
    deleted database through that engine's open connection.
    """
    if not (home / "wrnsweep.json").is_file() or not (home / "sweep.yaml").is_file():
        return False
    if (home / "sweep.yaml").read_text() != sweep_text(doc):
        return False  # the same arm and seed at another size or on another space
    check = ("import sys; sys.path.insert(0, sys.argv[1]); "
             "from bench.search_efficiency import parent_finished; "
             "sys.exit(0 if parent_finished(sys.argv[2]) else 1)")
    return subprocess.run([sys.executable, "-c", check, str(REPO), str(home)],
                          capture_output=True).returncode == 0


def parent_finished(home: str | Path) -> bool:
    """Whether the sweep in ``home`` has a parent run and MLflow says it FINISHED."""
    meta, client = _tracking(Path(home))
    return bool(meta.get("parent_run_id")) and (
        client.get_run(meta["parent_run_id"]).info.status == "FINISHED")


def read_record(home: Path, arm: str, seed: int) -> RunRecord:
    """The anytime curve and the champion's test accuracy, from the sweep's MLflow store."""
    from orchestrator.store import PARENT_TAG

    meta, client = _tracking(home)
    runs = client.search_runs([meta["experiment_id"]],
                              filter_string=f"tags.`{PARENT_TAG}` = '{meta['parent_run_id']}'",
                              max_results=5000)
    points = []  # (logged at, run, epoch, val_acc)
    record = RunRecord(arm, seed)
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "val_acc")
        record.histories[run.info.run_id] = len(history)
        record.last_epochs[run.info.run_id] = int(run.data.metrics.get("epoch", 0))
        record.lrs[run.info.run_id] = float(run.data.params.get("lr", "nan"))
        points += [(m.timestamp, run.info.run_id, m.step, m.value) for m in history]
    best = -math.inf
    for _, run_id, _, value in sorted(points):
        best = max(best, value)
        record.curve.append(best)
        record.curve_runs.append(run_id)
    for _, run_id, _, value in sorted(points, key=lambda p: (p[1], p[2])):
        record.values.setdefault(run_id, []).append(value)
    champion = client.get_model_version_by_alias(meta["registered_model"], "champion")
    test = (champion.tags or {}).get("test_acc")
    record.test_acc = float(test) if test not in (None, "n/a") else None
    return record


def geometric_mean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


@dataclass
class ArmSummary:
    arm: str
    epochs_to_target: list[tuple[int, bool]]
    final_bests: list[float]
    epochs: list[int]
    test_accs: list[float | None]
    ratio: float = math.nan


def summarise(records: list[RunRecord], target: float) -> dict[str, ArmSummary]:
    by_arm: dict[str, list[RunRecord]] = {}
    for r in records:
        by_arm.setdefault(r.arm, []).append(r)
    out = {arm: ArmSummary(arm, [r.epochs_to(target) for r in rs], [r.final_best for r in rs],
                           [r.epochs for r in rs], [r.test_acc for r in rs])
           for arm, rs in by_arm.items()}
    base = statistics.median(e for e, _ in out[BASELINE].epochs_to_target)
    for s in out.values():
        s.ratio = geometric_mean([e / base for e, _ in s.epochs_to_target])
    return out


def print_why(records: list[RunRecord], target: float) -> None:
    """Per seed: which trial reached the target first in each arm, and the fewest epochs
    any one trial of the seed (any arm) needed to reach it alone. The latter bounds
    every arm from below: an arm reaches the target after at least that many epochs
    even if its very first trial is that configuration, so no searcher's ratio can go
    under ``floor``, the geometric mean of those epochs over the baseline's median."""
    base = statistics.median(r.epochs_to(target)[0] for r in records if r.arm == BASELINE)
    print("\nfirst trial to reach the target (in start order), per seed and arm; "
          "fewest epochs one trial needed")
    fewest_per_seed = []
    for seed in sorted({r.seed for r in records}):
        runs = [r for r in records if r.seed == seed]
        fewest = min((f for r in runs if (f := r.fewest_epochs(target)) is not None),
                     default=None)
        if fewest is not None:
            fewest_per_seed.append(fewest)
        hits = "  ".join(f"{r.arm} #{r.trial_reaching(target) or '-'} "
                         f"({r.epochs_to(target)[0]} epochs)" for r in runs)
        print(f"seed {seed}: {hits}  fewest {fewest if fewest is not None else '-'}")
    if fewest_per_seed:
        floor = geometric_mean([f / base for f in fewest_per_seed])
        print(f"floor: any arm's epochs ratio >= {floor:.3f} (one trial alone, the "
              f"seed's fastest configuration, against the baseline's median {base:.0f})")
    print_rarity([r for r in records if r.arm == BASELINE], target)


LR_BANDS = (0.003, 0.03, 0.06, 0.15, 0.4, 1.0)  # over the benchmark's lr range [0.003, 1]


def print_rarity(baseline: list[RunRecord], target: float) -> None:
    """How many of the baseline's trials (every one run to its end) reach the target
    on their own, by learning-rate band, and after how many epochs: how likely any
    one trial, however chosen, is to reach it."""
    trials: list[tuple[float, int | None]] = []  # (lr, the epoch it reaches the target)
    for r in baseline:
        reached = r.reaching(target)  # once per sweep, not once per trial
        trials += [(r.lrs.get(run, math.nan), reached.get(run)) for run in r.values]
    hits = [epoch for _, epoch in trials if epoch is not None]
    spread = f", after {min(hits)}-{max(hits)} epochs" if hits else ""
    print(f"baseline trials reaching the target alone: {len(hits)} of {len(trials)}{spread}")
    bands = []
    for low, high in itertools.pairwise(LR_BANDS):
        mine = [epoch for lr, epoch in trials
                if low <= lr < high or (high == LR_BANDS[-1] and lr == high)]
        bands.append(f"[{low:g}, {high:g}): {sum(e is not None for e in mine)} of {len(mine)}")
    print("  by lr: " + "  ".join(bands))


def plot(records: list[RunRecord], target: float, path: Path) -> None:
    """The anytime curves, one colour per arm, the target as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = {"random_fifo": "tab:gray", "random_asha": "tab:blue", "default": "tab:red"}
    seen: set[str] = set()
    for r in records:
        label = None if r.arm in seen else r.arm
        seen.add(r.arm)
        ax.plot(range(1, r.epochs + 1), r.curve, color=colours.get(r.arm, "tab:green"),
                alpha=0.7, label=label)
    ax.axhline(target, color="black", linestyle="--", linewidth=1,
               label="target (baseline median best - 1 image)")
    # Zoomed on the target: every arm climbs from chance within a few epochs, and the
    # differences that matter are a few validation images near the top.
    top = max((r.final_best for r in records), default=1.0)
    ax.set_ylim(max(0.0, target - 0.04), min(1.0, top + 0.01))
    ax.set_xlabel("epochs spent (all trials, in the order they ran)")
    ax.set_ylabel("best val_acc so far")
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--space", choices=sorted(SPACES), default="digits")
    parser.add_argument("--dataset", choices=sorted(VAL_IMAGES), default="digits")
    parser.add_argument("--synthetic-size", type=int, default=None,
                        help="training images of the synthetic set (default: its 2048)")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms")
    parser.add_argument("--png", type=Path, default=Path("search_efficiency.png"))
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 3 trials of 2 epochs, baseline and default only")
    parser.add_argument("--keep", action="store_true", help="keep the sweep folders")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="run (and keep) the sweeps in this folder; an arm and seed "
                             "finished there before is read back, not run again")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.trials, args.epochs, args.arms = 1, 3, 2, f"{BASELINE},default"
    if args.synthetic_size is not None and args.dataset != "synthetic":
        parser.error("--synthetic-size needs --dataset synthetic")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if BASELINE not in arms:
        parser.error(f"--arms must include the baseline {BASELINE}")
    for line in machine_lines(("torch", "ray", "optuna", "mlflow")):
        print(line)
    size = f" synthetic_size={args.synthetic_size}" if args.synthetic_size else ""
    print(f"space={args.space} dataset={args.dataset}{size} trials={args.trials} "
          f"epochs={args.epochs} seeds={args.seeds} arms={','.join(arms)}")

    if args.workdir is not None:
        args.keep = True
        # A short path: Ray's socket paths under RAY_TMPDIR must stay under 107 bytes.
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="eff-", dir="/tmp"))
    records = []
    try:
        for seed in range(args.seeds):
            for arm in arms:
                doc = sweep_file(args.space, arm, seed=seed, trials=args.trials,
                                 epochs=args.epochs, dataset=args.dataset,
                                 synthetic_size=args.synthetic_size)
                home = workdir / "runs" / doc["name"]
                reused = args.workdir is not None and finished_sweep(home, doc)
                if not reused:
                    shutil.rmtree(home, ignore_errors=True)  # an interrupted run: again
                    home = run_sweep(doc, workdir)
                record = read_record(home, arm, seed)
                records.append(record)
                print(f"seed {seed} {arm:<12} epochs {record.epochs:>4}  final best "
                      f"{record.final_best:.4f}  test_acc {record.test_acc}"
                      + ("  (read back)" if reused else ""), flush=True)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    baseline_bests = [r.final_best for r in records if r.arm == BASELINE]
    best = statistics.median(baseline_bests)
    target = best - 1 / VAL_IMAGES[args.dataset]
    summary = summarise(records, target)
    exact = summarise(records, best)  # the baseline's median best itself, not one image less
    print(f"\ntarget: {target:.4f} (baseline median final best {best:.4f} less one "
          "validation image)")
    print(f"{'arm':<12} {'epochs to target':>17} {'reached':>8} {'to best':>8} {'reached':>8} "
          f"{'final best':>11} {'test_acc':>9} {'epochs':>7} {'ratio':>6}   (medians over seeds)")
    for s in summary.values():
        med = statistics.median(e for e, _ in s.epochs_to_target)
        reached = sum(ok for _, ok in s.epochs_to_target)
        to_best = exact[s.arm].epochs_to_target
        tests = [t for t in s.test_accs if t is not None]
        print(f"{s.arm:<12} {med:>17.0f} {reached:>5}/{len(s.epochs_to_target):<2} "
              f"{statistics.median(e for e, _ in to_best):>8.0f} "
              f"{sum(ok for _, ok in to_best):>5}/{len(to_best):<2} "
              f"{statistics.median(s.final_bests):>11.4f} "
              f"{statistics.median(tests) if tests else math.nan:>9.4f} "
              f"{statistics.median(s.epochs):>7.0f} {s.ratio:>6.2f}")
    if "default" in summary:
        final = statistics.median(summary["default"].final_bests)
        print(f"default median final best {final:.4f} "
              f"{'>=' if final >= target - 1e-12 else '<'} target {target:.4f}")
    print_why(records, target)
    plot(records, target, args.png)
    print(f"figure: {args.png}")
    ratios = {arm: summary[arm].ratio for arm in summary}
    print(" ".join(f"{arm}_epochs_ratio={ratios[arm]:.3f}" for arm in ("default", "random_asha")
                   if arm in ratios) + f" seeds={args.seeds}")
    return {"records": records, "summary": summary, "target": target}


if __name__ == "__main__":
    main()
