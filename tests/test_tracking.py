"""The tracker's run map and writer on their own: a real SQLite MLflow store, no Ray.

The trials are stand-ins carrying what the tracker reads of a Tune trial (id and
config); the full path (real Tune, a SIGKILLed driver, a tracking server that
goes away) is in test_sweep_e2e.py and test_tracking_server.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from orchestrator.runmap import RunEntry, RunMap, journal_path, load_run_map
from orchestrator.tracking import BufferedWriter, SweepTracker, is_local_store, mlflow_client

CONFIG = {"arch": "resnet", "resnet.depth": 8, "lr": 0.1, "epochs": 2, "dataset": "synthetic"}


def test_a_change_is_on_disk_before_the_snapshot(tmp_path: Path) -> None:
    runs = RunMap(tmp_path / "mlflow-runs.json")
    runs.entries["t1"] = RunEntry(run_id="r1", last_epoch=1)
    runs.record("t1")
    assert not (tmp_path / "mlflow-runs.json").exists()
    assert load_run_map(tmp_path / "mlflow-runs.json") == {
        "t1": RunEntry(run_id="r1", last_epoch=1)}
    runs.entries["t1"].last_epoch = 2
    runs.record("t1")
    assert runs.snapshot()
    assert json.loads((tmp_path / "mlflow-runs.json").read_text())["t1"]["last_epoch"] == 2
    assert journal_path(tmp_path / "mlflow-runs.json").read_text() == ""
    assert not runs.snapshot()  # nothing changed since
    runs.close()
    assert not journal_path(tmp_path / "mlflow-runs.json").exists()


def test_a_killed_writer_loses_no_change(tmp_path: Path) -> None:
    """SIGKILL right after record(): the change is in the journal, read back by the next map."""
    script = (
        "import os, signal, sys\n"
        "from orchestrator.runmap import RunEntry, RunMap\n"
        "runs = RunMap(sys.argv[1])\n"
        "runs.entries['t1'] = RunEntry(run_id='r1', last_epoch=1)\n"
        "runs.record('t1')\n"
        "runs.snapshot()\n"
        "runs.entries['t1'].pending = {'2': {'val_acc': 0.5}}\n"
        "runs.record('t1')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    path = tmp_path / "mlflow-runs.json"
    proc = subprocess.run([sys.executable, "-c", script, str(path)], cwd=Path(__file__).parents[1],
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not json.loads(path.read_text())["t1"].get("pending")  # the snapshot is behind
    assert load_run_map(path)["t1"].pending == {"2": {"val_acc": 0.5}}


def test_a_journal_older_than_the_map_is_not_applied_again(tmp_path: Path) -> None:
    path = tmp_path / "mlflow-runs.json"
    old = RunMap(path)
    old.entries["t1"] = RunEntry(run_id="r1", last_epoch=1)
    old.record("t1")  # a driver killed here leaves this line behind
    new = RunMap(path)  # the resumed driver
    new.entries["t1"].last_epoch = 3
    new.snapshot()
    assert load_run_map(path)["t1"].last_epoch == 3


def test_a_line_cut_short_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "mlflow-runs.json"
    journal_path(path).write_text('{"t1": {"run_id": "r1", "last_epoch": 1}}\n{"t1": {"ru')
    assert load_run_map(path) == {"t1": RunEntry(run_id="r1", last_epoch=1)}


def test_background_writer_keeps_order_retries_and_warns_once() -> None:
    lines: list[str] = []
    done: list[int] = []
    failures = [2]
    writer = BufferedWriter(background=True, echo=lines.append, max_delay=0.2)

    def op(i: int) -> Any:
        def write() -> None:
            if i == 1 and failures[0]:
                failures[0] -= 1
                raise ConnectionError("tracking server down")
            done.append(i)
        return write

    for i in range(5):
        writer.submit(op(i))
    assert writer.close(deadline=30)
    assert done == [0, 1, 2, 3, 4]
    assert [line.split(" (")[0] for line in lines] == [
        "MLflow tracking unreachable", "MLflow tracking reachable again; buffered writes flushed"]


def test_background_writer_gives_up_at_the_deadline() -> None:
    def down() -> None:
        raise ConnectionError("tracking server down")

    writer = BufferedWriter(background=True, echo=lambda line: None, max_delay=0.1)
    writer.submit(down)
    start = time.monotonic()
    assert not writer.close(deadline=1)
    assert time.monotonic() - start < 10
    assert writer.pending  # kept: what it carries is in the run map for `resume`


def test_writes_run_in_the_loop_for_a_local_store_only() -> None:
    assert is_local_store("sqlite:////tmp/x/mlflow.db")
    assert is_local_store("/tmp/mlruns") and is_local_store("file:///tmp/mlruns")
    assert not is_local_store("http://127.0.0.1:5000")
    assert not is_local_store("https://mlflow.example.org")


def _tracker(tmp_path: Path) -> tuple[SweepTracker, Any, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow_client(uri)
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "a").as_uri())
    parent = client.create_run(experiment).info.run_id
    tracker = SweepTracker(tracking_uri=uri, experiment_id=experiment, parent_run_id=parent,
                           state_file=str(tmp_path / "mlflow-runs.json"), metric="val_acc",
                           mode="max", sweep_name="t")
    return tracker, client, parent


def _result(epoch: int, val_acc: float) -> dict[str, Any]:
    return {"epoch": epoch, "total_epochs": 2, "val_acc": val_acc, "val_loss": 1 - val_acc,
            "lr": 0.1, "train_loss": 1.0, "num_params": 100}


def test_tracker_logs_each_trial_and_leaves_a_complete_map(tmp_path: Path) -> None:
    tracker, client, parent = _tracker(tmp_path)
    trials = [SimpleNamespace(trial_id=f"t{i}", config=dict(CONFIG)) for i in range(3)]
    for trial in trials:
        tracker.on_trial_start(0, trials, trial)
        for epoch in (1, 2):
            tracker.on_trial_result(0, trials, trial, _result(epoch, 0.1 * epoch))
        tracker.on_trial_result(0, trials, trial, _result(1, 0.1))  # a replayed epoch
        tracker.on_trial_complete(0, trials, trial)
    tracker.on_experiment_end(trials)

    runs = load_run_map(tmp_path / "mlflow-runs.json")
    assert not journal_path(tmp_path / "mlflow-runs.json").exists()
    assert set(runs) == {"t0", "t1", "t2"}
    for trial_id, entry in runs.items():
        run = client.get_run(entry.run_id)
        assert run.info.status == "FINISHED" and entry.last_epoch == 2
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.tags["wrnsweep.trial_id"] == trial_id
        assert run.data.params["depth"] == "8"
        steps = [m.step for m in client.get_metric_history(entry.run_id, "val_acc")]
        assert steps == [1, 2]
        assert not entry.pending
    assert not tracker._logged  # nothing kept per finished run


def test_tracker_replays_what_a_killed_driver_had_not_written(tmp_path: Path) -> None:
    tracker, client, _ = _tracker(tmp_path)
    trial = SimpleNamespace(trial_id="t0", config=dict(CONFIG))
    tracker.on_trial_start(0, [trial], trial)
    tracker.on_trial_result(0, [trial], trial, _result(1, 0.3))
    run_id = tracker.runs["t0"].run_id
    # The driver received epoch 2 and died before MLflow had it: the journal says so.
    runs = RunMap(tmp_path / "mlflow-runs.json")
    runs.entries["t0"].pending = {"2": {"val_acc": 0.4, "epoch": 2}}
    runs.record("t0")

    resumed = SweepTracker(tracking_uri=tracker.tracking_uri, experiment_id=tracker.experiment_id,
                           parent_run_id=tracker.parent_run_id, state_file=tracker.state_file,
                           metric="val_acc", mode="max", sweep_name="t")
    assert resumed.runs["t0"].last_epoch == 2  # replayed on first use
    resumed.on_trial_result(0, [trial], trial, _result(2, 0.4))  # Tune reports it again
    resumed.on_trial_complete(0, [trial], trial)
    resumed.on_experiment_end([trial])
    assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [1, 2]
    assert client.get_run(run_id).info.status == "FINISHED"


class _LostAnswers:
    """A real MLflow client whose first ``create_run`` and first metric write reach the
    store and then fail, as when a tracking server stops after taking a request and
    before answering it (seen in the outage test of test_tracking_server.py: a step
    logged twice)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.to_lose = {"create_run", "log_batch"}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def _lose(self, call: str) -> None:
        if call in self.to_lose:
            self.to_lose.discard(call)
            raise ConnectionError(f"{call}: the answer was lost")

    def create_run(self, *args: Any, **kwargs: Any) -> Any:
        run = self._client.create_run(*args, **kwargs)
        self._lose("create_run")
        return run

    def log_batch(self, run_id: str, metrics: Any = (), **kwargs: Any) -> None:
        self._client.log_batch(run_id, metrics=metrics, **kwargs)
        if metrics:
            self._lose("log_batch")


def test_a_write_whose_answer_was_lost_is_not_made_twice(tmp_path: Path) -> None:
    """The retry of a create and of an epoch that the store took finds them there: one
    run for the trial, each step once."""
    tracker, client, parent = _tracker(tmp_path)
    lossy = _LostAnswers(client)
    tracker._client = lossy
    trial = SimpleNamespace(trial_id="t0", config=dict(CONFIG))
    tracker.on_trial_start(0, [trial], trial)
    for epoch in (1, 2):
        tracker.on_trial_result(0, [trial], trial, _result(epoch, 0.1 * epoch))
    tracker.on_trial_complete(0, [trial], trial)
    tracker.on_experiment_end([trial])
    assert not lossy.to_lose  # both answers were lost
    (run,) = client.search_runs([tracker.experiment_id],
                                filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert run.info.run_id == tracker.runs["t0"].run_id
    assert run.info.status == "FINISHED"
    for key in ("val_acc", "epoch"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2]


def test_tracker_pickles_without_its_lock_writer_or_map(tmp_path: Path) -> None:
    import pickle

    tracker, _, _ = _tracker(tmp_path)
    trial = SimpleNamespace(trial_id="t0", config=dict(CONFIG))
    tracker.on_trial_start(0, [trial], trial)
    copy = pickle.loads(pickle.dumps(tracker))
    assert copy._map is None and copy._writer is None
    assert isinstance(copy._lock, type(threading.RLock()))
    assert copy.runs["t0"].run_id == tracker.runs["t0"].run_id  # read from disk
    tracker.on_experiment_end([trial])


def test_a_result_costs_the_same_at_any_sweep_size(tmp_path: Path) -> None:
    """The map is journaled per change, not rewritten: bytes written per result stay flat."""
    runs = RunMap(tmp_path / "mlflow-runs.json")
    sizes = []
    for i in range(200):
        runs.entries[f"t{i}"] = RunEntry(run_id=f"r{i}", last_epoch=1, best=0.5)
        before = os.path.getsize(runs.journal) if runs.journal.exists() else 0
        runs.record(f"t{i}")
        sizes.append(os.path.getsize(runs.journal) - before)
    assert max(sizes) - min(sizes) <= 8  # the id's digits
