"""Which MLflow run is which Tune trial: the run map of a round, on disk and in memory.

A round's map (``mlflow-runs.json``, ``mlflow-runs.extend-N.json``, ...) holds
one :class:`RunEntry` per trial: its run, how far MLflow has its epochs, what
Tune last reported, and how it ended. :class:`orchestrator.tracking.SweepTracker`
owns the entries while a round runs (it is the only writer); after the round,
:func:`reconcile_runs` closes what a killed driver left open, and the status a
run ends with, and how a pruned one is shown, are defined here once
(:meth:`RunEntry.outcome`, :func:`status_label`).

No Ray and no MLflow import: the pieces are tested on their own.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainables.result import EpochResult

# How a run the scheduler stopped is tagged, and shown ("PRUNED@3").
PRUNED_TAG = "wrnsweep.pruned"
STOPPED_AT_TAG = "wrnsweep.stopped_at_epoch"
DIVERGED_TAG = "wrnsweep.diverged"
PRUNED = "PRUNED"


def status_label(status: str, tags: dict[str, str]) -> str:
    """A run's status as ``best`` and ``report`` show it: MLflow's, or PRUNED@<epoch>."""
    if tags.get(PRUNED_TAG) == "true":
        return f"{PRUNED}@{tags.get(STOPPED_AT_TAG, '?')}"
    return status


def status_kind(label: str) -> str:
    """The status without the epoch: FINISHED, FAILED, KILLED, RUNNING or PRUNED."""
    return label.split("@", 1)[0]


@dataclass
class RunEntry:
    """One trial's MLflow run as the tracker knows it."""

    run_id: str | None = None
    last_epoch: int = 0  # the last epoch MLflow has (writes move it, in order)
    best: float | None = None  # best value of the search metric so far
    seen_epoch: int = 0  # the last epoch Tune reported (decides the final status)
    total_epochs: int | None = None  # the epochs the trial was configured for
    diverged: bool = False
    status: str | None = None  # MLflow status once the trial ended
    retries: int = 0  # attempts Tune retried from a checkpoint
    # Epochs received but not yet in MLflow: epoch -> metric values (replayed on resume).
    pending: dict[str, dict[str, float]] = field(default_factory=dict)
    # This driver queued the run's creation (never saved: a queue dies with its driver).
    create_queued: bool = field(default=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("create_queued")
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunEntry:
        """An entry as saved (keys it does not know, from an older map, are dropped)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"create_queued"}
        return cls(**{k: v for k, v in data.items() if k in known})

    def outcome(self, *, errored: bool) -> tuple[str, dict[str, str]]:
        """MLflow status and tags of a trial that ended, from what was logged of it."""
        if errored or self.diverged:
            return "FAILED", ({DIVERGED_TAG: "true"} if self.diverged else {})
        last = EpochResult(epoch=max(self.seen_epoch, self.last_epoch),
                           total_epochs=self.total_epochs or 0)
        if last.stopped_early:
            return "KILLED", {PRUNED_TAG: "true", STOPPED_AT_TAG: str(last.epoch)}
        return "FINISHED", {}


def journal_path(path: str | os.PathLike[str]) -> Path:
    """The journal beside a run map: ``mlflow-runs.json`` -> ``mlflow-runs.journal``."""
    return Path(path).with_suffix(".journal")


def load_run_map(path: str | os.PathLike[str]) -> dict[str, RunEntry]:
    """A round's run map (trial id -> entry); {} if none.

    The map on disk is the snapshot plus, while a driver runs or after one was
    killed, the changes in its journal (see :class:`RunMap`): both are read.
    """
    path = Path(path)
    raw: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    journal = journal_path(path)
    if journal.exists():
        for line in journal.read_text().splitlines():
            try:
                raw.update(json.loads(line))
            except ValueError:
                continue  # the last line, cut short by a kill in mid-write
    return {trial_id: RunEntry.from_json(data) for trial_id, data in raw.items()}


class RunMap:
    """A round's trial -> run map on disk: a JSON snapshot plus a journal of changes.

    Rewriting the whole map on every change costs O(trials) per result, O(n^2)
    over a sweep: at 1000 trials that was a quarter of the driver's time. So a
    change appends the trial's whole entry as one line to ``<map>.journal``
    (before the change is acted on: once the line is written, a SIGKILL of the
    driver cannot lose it), and :meth:`snapshot` rewrites the map (atomically,
    reusing the text of the entries that did not change) and empties the
    journal; the tracker does that at most once a second. :func:`load_run_map`
    reads both; the snapshot alone (``mlflow-runs.json``) is at most about a
    second behind. Not thread-safe: the tracker holds its lock around each call.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.journal = journal_path(self.path)
        self.entries = load_run_map(self.path)
        self._text: dict[str, str] = {}  # trial id -> its entry as JSON, as last written
        self._dirty: set[str] = set(self.entries)
        self._fd: int | None = None

    def _json(self, trial_id: str) -> str:
        return json.dumps(self.entries[trial_id].to_json(), sort_keys=True)

    def record(self, trial_id: str) -> None:
        """Make the current state of ``trial_id``'s entry durable (one journal line)."""
        line = f"{{{json.dumps(trial_id)}: {self._json(trial_id)}}}\n"
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        data = line.encode()
        while data:  # one write(2) in practice; O_APPEND keeps concurrent lines whole
            data = data[os.write(self._fd, data):]
        self._dirty.add(trial_id)

    def snapshot(self) -> bool:
        """Rewrite the map from memory and empty the journal; False if nothing changed."""
        if not self._dirty:
            return False
        for trial_id in self._dirty:
            if trial_id in self.entries:
                self._text[trial_id] = self._json(trial_id)
        self._dirty.clear()
        body = ",\n".join(f"{json.dumps(t)}: {self._text[t]}" for t in self.entries)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("{\n" + body + "\n}\n")
        tmp.replace(self.path)  # atomic: a SIGKILL leaves the old or the new map, never half
        # Everything in the journal is in the map now (a journal left by a killed
        # driver too: its lines, older than the map, must not be applied again).
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
        else:
            self.journal.unlink(missing_ok=True)
        return True

    def close(self) -> None:
        """Final snapshot; the journal goes."""
        self.snapshot()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.journal.unlink(missing_ok=True)


def reconcile_runs(client: Any, runs: dict[str, RunEntry], outcomes: dict[str, str],
                   submit: Callable[[Callable[[], Any]], None]) -> int:
    """Terminate trial runs still RUNNING after a round; the number fixed.

    A driver killed between a trial's last result and its completion hook leaves
    the run RUNNING; once the resumed round is over, the map and Tune's outcome
    (``outcomes``: trial id -> "error" or "ok") say how it ended. ``submit``
    queues each MLflow write (``BufferedWriter.submit``: in order, retried).
    """
    fixed = 0
    for trial_id, entry in runs.items():
        run_id = entry.run_id
        if run_id is None:
            continue  # never reached MLflow (tracking was down the whole time)
        if trial_id not in outcomes:
            # Started after Tune's last experiment snapshot before a driver crash: Tune
            # no longer knows the trial and ran a fresh one instead. Soft-delete its run
            # (`mlflow runs restore` brings it back) so the sweep shows each trial once.
            submit(lambda run_id=run_id: _drop_orphan(client, run_id))
            fixed += 1
            continue
        if client.get_run(run_id).info.status != "RUNNING":
            continue
        status, tags = entry.outcome(errored=outcomes[trial_id] == "error")

        def close(run_id: str = run_id, status: str = status,
                  tags: dict[str, str] = tags) -> None:
            for k, v in tags.items():
                client.set_tag(run_id, k, v)
            client.set_terminated(run_id, status=status)

        submit(close)
        fixed += 1
    return fixed


def _drop_orphan(client: Any, run_id: str) -> None:
    client.set_tag(run_id, "wrnsweep.orphaned", "true")
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status="KILLED")
    client.delete_run(run_id)
