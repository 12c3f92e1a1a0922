"""bench/search_efficiency.py --quick: the whole path, and curves made of the real runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_search_efficiency_counts_the_epochs_the_runs_logged(tmp_path: Path,
                                                                    capsys) -> None:
    sys.path.insert(0, str(ROOT))
    from bench import search_efficiency

    png = tmp_path / "curves.png"
    out = search_efficiency.main(["--quick", "--png", str(png)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
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
