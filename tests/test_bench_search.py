"""bench/search_efficiency.py --quick: the whole path, and curves made of the real runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_which_trial_reached_the_target_and_the_fewest_epochs_one_trial_needed() -> None:
    """Two trials logged interleaved: a (0.5, 0.9) and b (0.7, 0.95, 0.97); curve order
    a1 b1 a2 b2 b3. Target 0.94: b's second epoch (the curve's 4th point) reaches it."""
    sys.path.insert(0, str(ROOT))
    from bench.search_efficiency import RunRecord

    record = RunRecord("default", 0, curve=[0.5, 0.7, 0.9, 0.95, 0.97],
                       values={"a": [0.5, 0.9], "b": [0.7, 0.95, 0.97]},
                       started=["a", "b"], curve_runs=["a", "b", "a", "b", "b"])
    assert record.epochs_to(0.94) == (4, True)
    assert record.trial_reaching(0.94) == 2 and record.fewest_epochs(0.94) == 2
    assert record.trial_reaching(0.85) == 1 and record.fewest_epochs(0.85) == 2
    assert record.trial_reaching(0.99) is None and record.fewest_epochs(0.99) is None


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A folder under /tmp: Ray's socket paths below a work folder must stay under 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="eff-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_quick_search_efficiency_counts_the_epochs_the_runs_logged(tmp_path: Path, capsys,
                                                                    short_tmp: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from bench import search_efficiency

    png, workdir = tmp_path / "curves.png", short_tmp
    out = search_efficiency.main(["--quick", "--png", str(png), "--workdir", str(workdir)])
    printed = capsys.readouterr().out
    last = printed.strip().splitlines()[-1]
    assert "seed 0: random_fifo #" in printed  # which trial reached the target, per arm
    assert last.startswith("default_epochs_ratio=") and last.endswith("seeds=1")
    assert {r.arm for r in out["records"]} == {"random_fifo", "default"}
    for record in out["records"]:
        # every epoch of every trial, as MLflow holds it: its val_acc history and, read
        # separately, each run's last "epoch" metric (3 trials x at most 2 epochs)
        assert record.epochs == sum(record.histories.values())
        assert record.epochs == sum(record.last_epochs.values())
        assert len(record.histories) == 3 and 3 <= record.epochs <= 6
        assert record.curve == sorted(record.curve)  # a best-so-far never drops
    fifo = next(r for r in out["records"] if r.arm == "random_fifo")
    assert fifo.epochs == 6  # FIFO runs every trial to its end
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --workdir, a second invocation as a user runs it: a finished arm is read back, an
    # interrupted one (its parent run not FINISHED) is run again at the same path
    from orchestrator.manifest import Manifest
    from orchestrator.store import mlflow_client

    fifo_home = workdir / "runs" / "eff-random_fifo-0"
    old_parent = Manifest.load(fifo_home).parent_run_id
    client = mlflow_client(Manifest.load(fifo_home).tracking_uri)
    client.set_terminated(old_parent, status="KILLED")
    assert client.get_run(old_parent).info.status == "KILLED"
    again = subprocess.run([sys.executable, str(ROOT / "bench" / "search_efficiency.py"),
                            "--quick", "--png", str(png), "--workdir", str(workdir)],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    seeds = [line for line in again.stdout.splitlines() if line.startswith("seed 0 ")]
    assert len(seeds) == 2 and "(read back)" not in seeds[0] and "(read back)" in seeds[1]
    assert "random_fifo  epochs    6" in seeds[0]  # read from the new store
    assert Manifest.load(fifo_home).parent_run_id != old_parent
