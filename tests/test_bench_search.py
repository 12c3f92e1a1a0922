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


def test_which_trial_reached_the_target_and_the_fewest_epochs_one_trial_needed(
        capsys) -> None:
    """Two trials logged interleaved: a (0.5, 0.9) and b (0.7, 0.95, 0.97); curve order
    a1 b1 a2 b2 b3. Target 0.94: b's second epoch (the curve's 4th point) reaches it."""
    sys.path.insert(0, str(ROOT))
    from bench.search_efficiency import RunRecord, print_rarity

    record = RunRecord("random_fifo", 0, curve=[0.5, 0.7, 0.9, 0.95, 0.97],
                       values={"a": [0.5, 0.9], "b": [0.7, 0.95, 0.97]},
                       lrs={"a": 0.01, "b": 1.0}, curve_runs=["a", "b", "a", "b", "b"])
    assert record.started == ["a", "b"]
    assert record.epochs_to(0.94) == (4, True)
    assert record.trial_reaching(0.94) == 2 and record.fewest_epochs(0.94) == 2
    assert record.trial_reaching(0.85) == 1 and record.fewest_epochs(0.85) == 2
    assert record.trial_reaching(0.99) is None and record.fewest_epochs(0.99) is None
    assert record.reaching(0.85) == {"a": 2, "b": 2}

    print_rarity([record], 0.94)  # b alone, at epoch 2, in the top band (lr 1 included)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "baseline trials reaching the target alone: 1 of 2, after 2-2 epochs"
    assert "[0.003, 0.03): 0 of 1" in lines[1] and "[0.4, 1): 1 of 1" in lines[1]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A folder under /tmp: Ray's socket paths below a work folder must stay under 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="eff-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# An arm's folder as an interrupted run leaves it: the same sweep file, a manifest and a
# store whose parent run never finished. Made in a child process, as the run it stands
# for was: this process must not hold the store open when the bench deletes it.
INTERRUPTED = """\
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from bench.search_efficiency import sweep_file, sweep_text
from orchestrator.config import parse_sweep
from orchestrator.sweep import _start_tracking, make_manifest
doc = sweep_file("digits", "random_fifo", seed=0, trials=3, epochs=2, dataset="digits")
storage = Path(sys.argv[2])
home = storage / doc["name"]
home.mkdir(parents=True)
(home / "sweep.yaml").write_text(sweep_text(doc))
cfg = parse_sweep(sweep_text(doc), str(home / "sweep.yaml"))
manifest = _start_tracking(cfg, make_manifest(cfg, sweep_file=str(home / "sweep.yaml"),
                                              storage=str(storage)))
manifest.save()
print(manifest.parent_run_id)
"""


@pytest.mark.slow
def test_quick_search_efficiency_counts_the_epochs_the_runs_logged(tmp_path: Path, capsys,
                                                                    short_tmp: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from bench import search_efficiency
    from orchestrator.manifest import Manifest

    png, workdir = tmp_path / "curves.png", short_tmp
    # --workdir over a baseline folder that an interrupted run left: run again, not read
    made = subprocess.run([sys.executable, "-c", INTERRUPTED, str(ROOT), str(workdir / "runs")],
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    fifo_home = workdir / "runs" / "eff-random_fifo-0"
    assert Manifest.load(fifo_home).parent_run_id == made.stdout.strip()

    out = search_efficiency.main(["--quick", "--png", str(png), "--workdir", str(workdir)])
    printed = capsys.readouterr().out
    last = printed.strip().splitlines()[-1]
    assert "seed 0: random_fifo #" in printed  # which trial reached the target, per arm
    assert last.startswith("default_epochs_ratio=") and last.endswith("seeds=1")
    assert "(read back)" not in printed
    assert Manifest.load(fifo_home).parent_run_id != made.stdout.strip()
    assert {r.arm for r in out["records"]} == {"random_fifo", "default"}
    for record in out["records"]:
        # every epoch of every trial, as MLflow holds it: its val_acc history and, read
        # separately, each run's last "epoch" metric (3 trials x at most 2 epochs)
        assert record.epochs == sum(record.histories.values())
        assert record.epochs == sum(record.last_epochs.values())
        assert len(record.histories) == 3 and 3 <= record.epochs <= 6
        assert record.curve == sorted(record.curve)  # a best-so-far never drops
    fifo = next(r for r in out["records"] if r.arm == "random_fifo")
    assert fifo.epochs == 6  # FIFO runs every trial to its end (read from the new store)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Again over the same folder: both arms finished there, so both are read back and
    # give the same records without training.
    again = search_efficiency.main(["--quick", "--png", str(png), "--workdir", str(workdir)])
    seeds = [line for line in capsys.readouterr().out.splitlines() if line.startswith("seed 0 ")]
    assert len(seeds) == 2 and all("(read back)" in line for line in seeds)
    assert [r.curve for r in again["records"]] == [r.curve for r in out["records"]]
