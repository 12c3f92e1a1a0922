"""The steps after a round, without Ray: rank (what may be registered, in what order) and
reconcile (what a killed driver left open), on a real SQLite MLflow store."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from orchestrator.runmap import (
    RunEntry,
    load_run_map,
    reconcile_runs,
    status_kind,
    status_label,
)
from orchestrator.store import mlflow_client
from orchestrator.sweep import rank


def _row(run: str, status: str, score: float | None) -> dict:
    return {"run_id": run, "status": status, "best_val_acc": score}


def test_rank_keeps_the_leaderboard_order_and_only_what_may_be_registered() -> None:
    rows = [_row("a", "FINISHED", 0.9), _row("b", "FAILED", 0.95), _row("c", "PRUNED@2", 0.8),
            _row("d", "RUNNING", 0.7), _row("e", "FINISHED", math.nan),
            _row("f", "FINISHED", None), _row("g", "KILLED", 0.6), _row("h", "FINISHED", 0.5)]
    assert [r["run_id"] for r in rank(rows, "val_acc")] == ["a", "c", "h"]
    loss = [{"run_id": "x", "status": "FINISHED", "best_val_loss": 0.3}]
    assert [r["run_id"] for r in rank(loss, "val_loss")] == ["x"]
    assert rank(loss, "val_acc") == []  # no score under that metric's name


@pytest.mark.parametrize(("entry", "errored", "status", "tags"), [
    (RunEntry(run_id="r", last_epoch=4, total_epochs=4), False, "FINISHED", {}),
    (RunEntry(run_id="r", last_epoch=2, seen_epoch=3, total_epochs=8), False, "KILLED",
     {"wrnsweep.pruned": "true", "wrnsweep.stopped_at_epoch": "3"}),
    (RunEntry(run_id="r", last_epoch=2, total_epochs=8, diverged=True), False, "FAILED",
     {"wrnsweep.diverged": "true"}),
    (RunEntry(run_id="r", last_epoch=1, total_epochs=8), True, "FAILED", {}),
])
def test_how_a_run_ends_is_decided_once(entry: RunEntry, errored: bool, status: str,
                                        tags: dict[str, str]) -> None:
    assert entry.outcome(errored=errored) == (status, tags)
    shown = status_label(status, tags)
    assert status_kind(shown) == ("PRUNED" if tags.get("wrnsweep.pruned") else status)


def test_status_labels() -> None:
    assert status_label("KILLED", {"wrnsweep.pruned": "true",
                                   "wrnsweep.stopped_at_epoch": "3"}) == "PRUNED@3"
    assert status_label("FINISHED", {}) == "FINISHED"
    assert status_kind("PRUNED@3") == "PRUNED" and status_kind("FAILED") == "FAILED"


def test_an_older_map_loads_into_typed_entries(tmp_path: Path) -> None:
    path = tmp_path / "mlflow-runs.json"
    path.write_text('{"t1": {"run_id": "r1", "last_epoch": 2, "best": 0.5, '
                    '"create_queued": true, "something_old": 1}}')
    assert load_run_map(path) == {"t1": RunEntry(run_id="r1", last_epoch=2, best=0.5)}
    assert load_run_map(path)["t1"].create_queued is False  # a queue dies with its driver


def test_reconcile_closes_what_a_killed_driver_left_open(tmp_path: Path) -> None:
    client = mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("p", artifact_location=(tmp_path / "a").as_uri())

    def run(status: str = "RUNNING") -> str:
        run_id = client.create_run(exp).info.run_id
        if status != "RUNNING":
            client.set_terminated(run_id, status=status)
        return run_id

    runs = {
        "pruned": RunEntry(run_id=run(), last_epoch=2, seen_epoch=2, total_epochs=4),
        "ended": RunEntry(run_id=run("FINISHED"), last_epoch=4, total_epochs=4),
        "errored": RunEntry(run_id=run(), last_epoch=1, total_epochs=4),
        "finished": RunEntry(run_id=run(), last_epoch=3, seen_epoch=4, total_epochs=4),
        "orphan": RunEntry(run_id=run(), last_epoch=1, total_epochs=4),
        "never_tracked": RunEntry(),
    }
    outcomes = {"pruned": "ok", "ended": "ok", "errored": "error", "finished": "ok",
                "never_tracked": "ok"}  # Tune no longer knows "orphan"
    fixed = reconcile_runs(client, runs, outcomes, lambda write: write())
    assert fixed == 4
    got = {t: client.get_run(e.run_id) for t, e in runs.items() if e.run_id}
    assert got["pruned"].info.status == "KILLED"
    assert got["pruned"].data.tags["wrnsweep.stopped_at_epoch"] == "2"
    assert got["ended"].info.status == "FINISHED"
    assert got["errored"].info.status == "FAILED"
    assert got["finished"].info.status == "FINISHED"  # Tune saw its last epoch
    assert got["orphan"].info.lifecycle_stage == "deleted"
    assert got["orphan"].data.tags["wrnsweep.orphaned"] == "true"
    assert not [r for r in client.search_runs([exp]) if r.info.status == "RUNNING"]
    rest = {t: e for t, e in runs.items() if t != "orphan"}
    assert reconcile_runs(client, rest, outcomes, lambda write: write()) == 0  # all closed
