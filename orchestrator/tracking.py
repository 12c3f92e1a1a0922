"""MLflow tracking: one writer on the driver, a parent run per sweep, a child run per trial.

Workers never talk to MLflow: Tune hands every result to the driver, and
:class:`SweepTracker` (a ``tune.Callback``) writes it. That is what makes a
driver-local SQLite store work on a cluster and keeps tracking credentials off
the workers.

What the stock ``MLflowLoggerCallback`` gets wrong and this module does instead:

* nesting: each trial run carries ``mlflow.parentRunId`` of the sweep's run;
* resume: the trial -> run id map (and the last epoch logged) is kept in a JSON
  file beside the experiment (changes journaled at once, see :class:`RunMap`),
  so after ``Tuner.restore`` an interrupted trial continues its own run: no
  second run, none left RUNNING, no epoch twice;
* statuses: FINISHED, FAILED (error or divergence, with the error as an
  artifact), KILLED for trials the scheduler stopped, tagged ``wrnsweep.pruned``;
* an unreachable tracking server does not stop training: every write goes
  through :class:`BufferedWriter`, which retries with back-off, keeps order, and
  says so on the terminal once;
* scale: the cost of a result does not grow with the number of trials (the map
  is journaled, not rewritten, per change), and with a tracking server Tune's
  event loop never waits on the network (the writes run on the writer's thread).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune

from orchestrator.leaderboard import best_key
from orchestrator.runmap import RunEntry, RunMap
from orchestrator.store import (  # noqa: F401  (re-exported: one definition, in store)
    GPU_TAG,
    PARENT_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    ensure_experiment,
    error_line,
    git_commit,
    is_local_store,
    local_store_path,
    mlflow_client,
)
from trainables.result import EpochResult, better

log = logging.getLogger(__name__)

# Parameters every trial run gets besides the model hyperparameters, under the same
# names for every architecture (so the MLflow compare view lines them up).
TRAINING_PARAMS = (
    "dataset", "epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay",
    "milestones", "gamma", "warmup_epochs", "label_smoothing", "seed",
)


def run_param_names() -> tuple[str, ...]:
    """arch, every registered family's hyperparameters, then the training params."""
    from trainables.models.registry import hparam_names

    return ("arch", *hparam_names(), *TRAINING_PARAMS)
# Config keys with this prefix become run tags (config_tags).
TAG_KEY_PREFIX = "wrnsweep."

# How often the run map's snapshot is rewritten (seconds); changes are journaled at once.
SNAPSHOT_S = 1.0


class BufferedWriter:
    """Ordered MLflow writes that survive a tracking server going away.

    ``submit(op)`` queues a write. A failing write stays at the head, later ones
    wait behind it, and it is retried with exponential back-off (capped at
    ``max_delay`` seconds: 10 by default, so writes resume within about 10 s of the
    server's return; a try costs one request, refused at once by a server that is
    down, or at most ``MLFLOW_HTTP_REQUEST_TIMEOUT`` where it hangs: 10 s, set by
    :func:`orchestrator.store.tracking_env`). Nothing is dropped; ``close`` blocks until everything
    is written or ``deadline`` seconds have passed, and says whether it all was.

    Without ``background`` the queue is written by the caller, in ``submit`` and
    ``flush`` (retries wait for the next call). With it, a daemon thread writes
    it, so the caller never waits for the writes: worth it when they wait on a
    network (a tracking server), not when they are CPU work in this process (a
    SQLite store: ~5 ms of SQLAlchemy per call, which a thread cannot run beside
    Tune's event loop, the GIL allows one at a time; handing the GIL back and
    forth made a 1000-trial sweep ~15% slower, bench/scale.py).
    """

    def __init__(self, *, max_delay: float = 10.0, echo: Callable[[str], None] = print,
                 background: bool = False) -> None:
        self.pending: deque[Callable[[], Any]] = deque()
        self.max_delay = max_delay
        self.echo = echo
        self.delay = 0.0
        self.next_try = 0.0
        self.warned = False
        self.background = background
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False

    def submit(self, op: Callable[[], Any]) -> None:
        with self._cond:
            self.pending.append(op)
            if self.background:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, daemon=True,
                                                    name="wrnsweep-mlflow-writer")
                    self._thread.start()
                self._cond.notify_all()
                return
        self.flush()

    def flush(self) -> bool:
        """Write what is queued, in this thread; False while the store is unreachable.

        With ``background`` only the writer thread calls it.
        """
        if time.monotonic() < self.next_try:
            return False
        while True:
            with self._cond:
                if not self.pending:
                    break
                op = self.pending[0]
            try:
                op()
            except Exception as err:  # MlflowException, requests' ConnectionError, ...
                self.delay = min(self.max_delay, max(0.5, self.delay * 2))
                self.next_try = time.monotonic() + self.delay
                if not self.warned:
                    self.echo(f"MLflow tracking unreachable ({type(err).__name__}); training "
                              f"goes on, {len(self.pending)} write(s) buffered and retried")
                    self.warned = True
                return False
            with self._cond:
                self.pending.popleft()
                self._cond.notify_all()  # close() waits for the queue to empty
        if self.warned:
            self.echo("MLflow tracking reachable again; buffered writes flushed")
            self.warned = False
        self.delay = 0.0
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                now = time.monotonic()
                if not self.pending or now < self.next_try:
                    self._cond.wait(self.next_try - now if self.pending else None)
                    continue
            self.flush()

    def close(self, deadline: float = 300.0) -> bool:
        end = time.monotonic() + deadline
        if not self.background:
            while not self.flush():
                if time.monotonic() > end:
                    return False
                time.sleep(min(1.0, max(0.0, self.next_try - time.monotonic())))
            return True
        with self._cond:
            while self.pending and self._thread is not None and time.monotonic() < end:
                self._cond.wait(min(1.0, max(0.0, end - time.monotonic())))
            done = not self.pending
            # Stop the thread even with writes left (the store stayed down): what they
            # carry is in the run map, and a `resume` writes it.
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, end - time.monotonic()))
        return done


def run_params(config: dict[str, Any]) -> dict[str, str]:
    """Resolved trial configuration (paper defaults filled in) as MLflow params."""
    from trainables.config import TrainConfig
    from trainables.trainable import trial_config

    cfg = TrainConfig.from_dict(trial_config(config))
    values = cfg.to_dict()
    out: dict[str, str] = {}
    for name in run_param_names():
        if name not in values:  # a hyperparameter of another family
            out[name] = "n/a"
        elif name == "milestones":
            out[name] = ",".join(f"{m:g}" for m in cfg.milestones)
        else:
            out[name] = str(values[name])
    return out


def run_name(config: dict[str, Any], trial_id: str) -> str:
    """``arch-depth-width-trialid``, e.g. ``wrn-28-10-3f2a1_00004``."""
    from trainables.config import TrainConfig
    from trainables.trainable import trial_config

    cfg = TrainConfig.from_dict(trial_config(config))
    size = [str(cfg.model[k]) for k in ("depth", "width") if k in cfg.model]
    return "-".join([cfg.arch, *size, trial_id])


def config_tags(config: dict[str, Any]) -> dict[str, str]:
    """Tags a trial's config asks for: its ``wrnsweep.*`` keys (a confirm run's
    configuration and seed), which the trainable ignores (``trial_config``)."""
    return {k: str(v) for k, v in config.items() if k.startswith(TAG_KEY_PREFIX)}


def _trial_gpus(trial: Any) -> str:
    """The GPUs (a fraction under ``resources: auto``) a trial holds, as a tag value."""
    try:
        return f"{float(trial.placement_group_factory.required_resources.get('GPU', 0)):g}"
    except AttributeError:  # a stand-in trial without resources
        return "0"


class SweepTracker(tune.Callback):
    """Writes every Tune trial into its own MLflow child run of the sweep's run.

    Tune calls the hooks on its event loop; they update the run map (journaled at
    once, snapshotted about once a second) and queue the MLflow writes on a
    :class:`BufferedWriter`: written on the loop for a local store (SQLite, files),
    on the writer's thread for a tracking server, whose calls wait on the network
    (``_lock`` guards the map then).
    """

    def __init__(self, *, tracking_uri: str, experiment_id: str, parent_run_id: str,
                 state_file: str, metric: str, mode: str, sweep_name: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.state_file = state_file
        self.metric = metric
        self.mode = mode
        self.sweep_name = sweep_name
        self._client: Any = None
        self._writer: BufferedWriter | None = None
        self._map: RunMap | None = None
        self._lock = threading.RLock()  # the map: Tune's loop and the writer thread
        self._snapshot_at = 0.0  # time.monotonic() of the last snapshot
        self._queued: dict[str, int] = {}  # trial id -> last epoch queued by this driver
        self._logged: dict[str, set[int]] = {}  # run id -> epochs MLflow has (open runs)
        # Trials whose create_run was sent without an answer: the store may hold the run.
        self._create_tried: set[str] = set()

    # Tune pickles callbacks into the experiment state (for Tuner.restore):
    # keep only the settings, rebuild client, buffer, lock and map on first use.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_client=None, _writer=None, _map=None, _lock=None, _queued={},
                     _logged={}, _create_tried=set())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = mlflow_client(self.tracking_uri)
        return self._client

    @property
    def writer(self) -> BufferedWriter:
        if self._writer is None:
            self._writer = BufferedWriter(background=not is_local_store(self.tracking_uri))
        return self._writer

    @property
    def runs(self) -> dict[str, RunEntry]:
        """trial id -> its run's entry; journaled after each change."""
        return self._run_map().entries

    def _run_map(self) -> RunMap:
        with self._lock:
            if self._map is None:
                self._map = RunMap(self.state_file)
                self._replay_pending()
            return self._map

    def _replay_pending(self) -> None:
        """Queue again the epochs an earlier driver received but could not write.

        Tune may have checkpointed past them, so no trial will report them again.
        """
        assert self._map is not None
        for trial_id, entry in self._map.entries.items():
            if entry.run_id is None:
                continue
            for epoch in sorted(entry.pending, key=int):
                values = entry.pending[epoch]
                self.writer.submit(lambda t=trial_id, e=entry, v=values, n=int(epoch):
                                   self._log_epoch(t, e, v, n))

    def _save(self, trial_id: str) -> None:
        """Journal ``trial_id``'s entry (the caller holds ``_lock``)."""
        self._run_map().record(trial_id)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        """Snapshot the run map now and then (Tune calls this about 10 times a second)."""
        if time.monotonic() - self._snapshot_at < SNAPSHOT_S:
            return
        self._snapshot_at = time.monotonic()
        with self._lock:
            if self._map is not None:
                self._map.snapshot()

    # -- runs ----------------------------------------------------------------------
    # Every MLflow call goes through the writer queue, run creation included: the
    # queue runs in order, so the ops queued after a create read the run id it set,
    # and a tracking server that is down at trial start delays nothing but MLflow.
    def _ensure_run(self, trial: Any) -> RunEntry:
        with self._lock:
            entry = self.runs.get(trial.trial_id)
            if entry is None:
                entry = RunEntry()
                self.runs[trial.trial_id] = entry
                self._save(trial.trial_id)
            if entry.run_id is not None or entry.create_queued:
                return entry
            entry.create_queued = True
        name, params = run_name(trial.config, trial.trial_id), run_params(trial.config)
        tags = {GPU_TAG: _trial_gpus(trial), **config_tags(trial.config)}
        self.writer.submit(lambda: self._create_run(trial.trial_id, entry, name, params,
                                                    str(trial.config.get("arch")), tags))
        return entry

    def tag_trial(self, trial: Any, key: str, value: str) -> None:
        """Set a tag on a trial's run, in order with its other writes."""
        entry = self._ensure_run(trial)
        self.writer.submit(lambda: self.client.set_tag(entry.run_id, key, value))

    def _create_run(self, trial_id: str, entry: RunEntry, name: str,
                    params: dict[str, str], arch: str, tags: dict[str, str]) -> None:
        from mlflow.entities import Param

        if entry.run_id is None:
            # A retry after a create whose answer was lost (a server stopped between
            # taking the request and answering) looks for that run before making another.
            run_id = self._run_of(trial_id) if trial_id in self._create_tried else None
            if run_id is None:
                self._create_tried.add(trial_id)
                run_id = self.client.create_run(
                    self.experiment_id, run_name=name,
                    tags={PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial_id,
                          SWEEP_TAG: self.sweep_name, "arch": arch, **tags},
                ).info.run_id
                self._logged[run_id] = set()  # a new run: no metric history to read
            self._create_tried.discard(trial_id)
            with self._lock:
                entry.run_id = run_id
                entry.create_queued = False
                self._save(trial_id)
        self.client.log_batch(entry.run_id,
                              params=[Param(k, v) for k, v in params.items()])

    def _run_of(self, trial_id: str) -> str | None:
        """The run this sweep made for ``trial_id``, if the store has one."""
        found = self.client.search_runs(
            [self.experiment_id], max_results=1,
            filter_string=(f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' "
                           f"and tags.`{TRIAL_TAG}` = '{trial_id}'"))
        return found[0].info.run_id if found else None

    def _log_metrics(self, entry: RunEntry, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(entry.run_id, metrics=[Metric(k, float(v), now, step)
                                                        for k, v in values.items()])

    # -- Tune hooks ------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ensure_run(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        entry = self._ensure_run(trial)
        parsed = EpochResult.parse(result)
        epoch = parsed.epoch
        with self._lock:
            # A trial retried or resumed from a checkpoint reports some epochs again:
            # queue each epoch once per driver (MLflow itself is checked in _log_epoch).
            if epoch <= max(entry.last_epoch, self._queued.get(trial.trial_id, 0)):
                return
            self._queued[trial.trial_id] = epoch
            values = dict(parsed.metrics)
            if self.metric in result and better(result[self.metric], entry.best, self.mode):
                entry.best = result[self.metric]
            if entry.best is not None:
                values[best_key(self.metric)] = entry.best
            values["epoch"] = epoch
            if parsed.num_params is not None:
                values["num_params"] = parsed.num_params
            if parsed.test_acc is not None:
                values["test_acc"] = parsed.test_acc
            entry.seen_epoch = epoch  # what Tune reported: decides the final status
            entry.pending[str(epoch)] = values  # until MLflow has it
            entry.total_epochs = parsed.total_epochs or None
            entry.diverged = parsed.diverged
            self._save(trial.trial_id)
        self.writer.submit(lambda: self._log_epoch(trial.trial_id, entry, values, epoch))

    def _log_epoch(self, trial_id: str, entry: RunEntry, values: dict[str, float],
                   epoch: int) -> None:
        """Write one epoch unless MLflow already has it; then record it in the map.

        ``last_epoch`` in the map only moves after MLflow took the write, so a
        driver killed with writes still queued logs them after ``resume``; and the
        steps MLflow already holds (read once per run and driver) are never sent
        twice, even if the driver died between a write and the map update.
        """
        run_id = entry.run_id
        if run_id not in self._logged:
            history = self.client.get_metric_history(run_id, "epoch")
            self._logged[run_id] = {int(m.step) for m in history}
        if epoch not in self._logged[run_id]:
            try:
                self._log_metrics(entry, values, epoch)
            except Exception:
                # The store may have taken the batch and lost only its answer: the retry
                # reads the history again rather than send this epoch twice (one batch
                # is one transaction, so its "epoch" step tells).
                self._logged.pop(run_id, None)
                raise
            self._logged[run_id].add(epoch)
        with self._lock:
            entry.last_epoch = max(entry.last_epoch, epoch)
            entry.pending.pop(str(epoch), None)
            self._save(trial_id)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A failed attempt that Tune retries from the last checkpoint."""
        entry = self._ensure_run(trial)
        with self._lock:
            entry.retries += 1
            self._save(trial.trial_id)
            retries = str(entry.retries)
        message = _error_text(trial)
        self.writer.submit(lambda: self._note_retry(entry, retries, message))

    def _note_retry(self, entry: RunEntry, retries: str, message: str) -> None:
        self.client.set_tag(entry.run_id, "wrnsweep.retries", retries)
        self.client.log_text(entry.run_id, message, f"errors/attempt-{retries}.txt")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self._lock:
            entry = self.runs.get(trial.trial_id)
            if entry is None:
                return
            status, tags = entry.outcome(errored=False)
            entry.status = status
            self._save(trial.trial_id)
        self._queued.pop(trial.trial_id, None)
        self.writer.submit(lambda: self._finish(entry, status, tags))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        entry = self._ensure_run(trial)
        with self._lock:
            entry.status = "FAILED"
            self._save(trial.trial_id)
        self._queued.pop(trial.trial_id, None)
        message = _error_text(trial)
        last_line = message.strip().splitlines()[-1][:250] if message.strip() else "error"

        def fail() -> None:
            self.client.log_text(entry.run_id, message, "error.txt")
            self._finish(entry, "FAILED", {"wrnsweep.error": last_line})

        self.writer.submit(fail)

    def _finish(self, entry: RunEntry, status: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(entry.run_id,
                                  tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(entry.run_id, status=status)
        self._logged.pop(entry.run_id, None)  # the run is over: no more epochs

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if not self.writer.close():
            log.error("MLflow writes still pending after 300 s; the tracking store is down")
        with self._lock:
            if self._map is not None:
                self._map.close()


def _error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        return Path(path).read_text()
    return str(getattr(trial, "error_msg", None) or "the trial failed without an error message")


