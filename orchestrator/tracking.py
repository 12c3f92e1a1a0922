"""MLflow tracking: one writer on the driver, a parent run per sweep, a child run per trial.

Workers never talk to MLflow: Tune hands every result to the driver, and
:class:`SweepTracker` (a ``tune.Callback``) writes it. That is what makes a
driver-local SQLite store work on a cluster and keeps tracking credentials off
the workers.

What the stock ``MLflowLoggerCallback`` gets wrong and this module does instead:

* nesting: each trial run carries ``mlflow.parentRunId`` of the sweep's run;
* resume: the trial -> run id map (and the last epoch logged) is kept in a JSON
  file beside the experiment, so after ``Tuner.restore`` an interrupted trial
  continues its own run: no second run, none left RUNNING, no epoch twice;
* statuses: FINISHED, FAILED (error or divergence, with the error as an
  artifact), KILLED for trials the scheduler stopped, tagged ``wrnsweep.pruned``;
* an unreachable tracking server does not stop training: every write goes
  through :class:`BufferedWriter`, which retries with back-off, keeps order, and
  says so on the terminal once.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune

from orchestrator.search import EPOCH_KEY, TOTAL_EPOCHS_KEY

log = logging.getLogger(__name__)

# Parameters every trial run gets, under the same names for every architecture
# (so the MLflow compare view lines them up). Model hyperparameters an
# architecture does not have are logged as "n/a".
RUN_PARAMS = (
    "arch", "depth", "width", "dropout", "shortcut", "variant", "dataset", "epochs",
    "batch_size", "lr", "momentum", "nesterov", "weight_decay", "milestones", "gamma",
    "warmup_epochs", "label_smoothing", "seed",
)
EPOCH_METRICS = (
    "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_second",
)
PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "wrnsweep.trial_id"
SWEEP_TAG = "wrnsweep.sweep"
GPU_TAG = "wrnsweep.gpu"  # GPUs the trial holds (a fraction with resources: auto)


class BufferedWriter:
    """Ordered MLflow writes that survive a tracking server going away.

    ``submit(op)`` queues a write and flushes the queue; a failing write stays
    at the head, later ones wait behind it, and the next ``submit`` or
    ``flush`` retries (with exponential back-off between attempts, capped at
    ``max_delay`` seconds). Nothing is dropped; ``close`` blocks until
    everything is written or ``deadline`` seconds have passed.
    """

    def __init__(self, *, max_delay: float = 30.0, echo: Callable[[str], None] = print) -> None:
        self.pending: list[Callable[[], Any]] = []
        self.max_delay = max_delay
        self.echo = echo
        self.delay = 0.0
        self.next_try = 0.0
        self.warned = False

    def submit(self, op: Callable[[], Any]) -> None:
        self.pending.append(op)
        self.flush()

    def flush(self) -> bool:
        """Write what is queued; False while the store is unreachable."""
        if time.monotonic() < self.next_try:
            return False
        while self.pending:
            try:
                self.pending[0]()
            except Exception as err:  # MlflowException, requests' ConnectionError, ...
                self.delay = min(self.max_delay, max(0.5, self.delay * 2))
                self.next_try = time.monotonic() + self.delay
                if not self.warned:
                    self.echo(f"MLflow tracking unreachable ({type(err).__name__}); training "
                              f"goes on, {len(self.pending)} write(s) buffered and retried")
                    self.warned = True
                return False
            self.pending.pop(0)
        if self.warned:
            self.echo("MLflow tracking reachable again; buffered writes flushed")
            self.warned = False
        self.delay = 0.0
        return True

    def close(self, deadline: float = 300.0) -> bool:
        end = time.monotonic() + deadline
        while not self.flush():
            if time.monotonic() > end:
                return False
            time.sleep(min(1.0, max(0.0, self.next_try - time.monotonic())))
        return True


def mlflow_client(tracking_uri: str) -> Any:
    """A client whose model registry is the tracking store itself.

    Without an explicit ``registry_uri`` MLflow falls back to a process-wide
    default (``sqlite:///mlflow.db`` in the working directory), so versions
    would be registered somewhere other than where the runs are.
    """
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def git_commit(cwd: str | os.PathLike[str] | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=cwd, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def ensure_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created (with its artifact root) if missing."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def run_params(config: dict[str, Any]) -> dict[str, str]:
    """Resolved trial configuration (paper defaults filled in) as MLflow params."""
    from trainables.config import MODEL_HPARAMS, TrainConfig
    from trainables.trainable import trial_config

    cfg = TrainConfig.from_dict(trial_config(config))
    values = cfg.to_dict()
    out: dict[str, str] = {}
    for name in RUN_PARAMS:
        model_only = name in {"dropout", "shortcut", "variant", "width"}
        if model_only and name not in MODEL_HPARAMS[cfg.arch]:
            out[name] = "n/a"
        elif name == "milestones":
            out[name] = ",".join(f"{m:g}" for m in cfg.milestones)
        else:
            out[name] = str(values[name])
    return out


def run_name(config: dict[str, Any], trial_id: str) -> str:
    """``arch-depth-width-trialid``, e.g. ``wrn-28-10-3f2a1_00004``."""
    from trainables.trainable import trial_config

    values = trial_config(config)
    return f"{values.get('arch')}-{values.get('depth')}-{values.get('width', 1)}-{trial_id}"


def _trial_gpus(trial: Any) -> str:
    """The GPUs (a fraction under ``resources: auto``) a trial holds, as a tag value."""
    try:
        return f"{float(trial.placement_group_factory.required_resources.get('GPU', 0)):g}"
    except AttributeError:  # a stand-in trial without resources
        return "0"


def load_run_map(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """A sweep round's run map (trial id -> MLflow run id, epochs logged); {} if none."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {}


class SweepTracker(tune.Callback):
    """Writes every Tune trial into its own MLflow child run of the sweep's run."""

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
        self._state: dict[str, dict[str, Any]] | None = None
        self._queued: dict[str, int] = {}  # trial id -> last epoch queued by this driver
        self._logged: dict[str, set[int]] = {}  # run id -> epochs MLflow has

    # Tune pickles callbacks into the experiment state (for Tuner.restore):
    # keep only the settings, rebuild client, buffer and map on first use.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_client=None, _writer=None, _state=None, _queued={}, _logged={})
        return state

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = mlflow_client(self.tracking_uri)
        return self._client

    @property
    def writer(self) -> BufferedWriter:
        if self._writer is None:
            self._writer = BufferedWriter()
        return self._writer

    @property
    def runs(self) -> dict[str, dict[str, Any]]:
        """trial id -> {"run_id", "last_epoch", "best"}; persisted after each change."""
        if self._state is None:
            self._state = load_run_map(self.state_file)
            for entry in self._state.values():
                entry.pop("create_queued", None)  # a queue that died with the old driver
            self._replay_pending()
        return self._state

    def _replay_pending(self) -> None:
        """Queue again the epochs an earlier driver received but could not write.

        Tune may have checkpointed past them, so no trial will report them again.
        """
        assert self._state is not None
        for entry in self._state.values():
            if entry.get("run_id") is None:
                continue
            for epoch in sorted(entry.get("pending", {}), key=int):
                values = entry["pending"][epoch]
                self.writer.submit(lambda e=entry, v=values, n=int(epoch):
                                   self._log_epoch(e, v, n))

    def _save(self) -> None:
        path = Path(self.state_file)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.runs, indent=1, sort_keys=True))
        tmp.replace(path)  # atomic: a SIGKILL leaves the old or the new map, never half

    # -- runs ----------------------------------------------------------------------
    # Every MLflow call goes through the writer queue, run creation included: the
    # queue runs in order, so the ops queued after a create read the run id it set,
    # and a tracking server that is down at trial start delays nothing but MLflow.
    def _ensure_run(self, trial: Any) -> dict[str, Any]:
        entry = self.runs.get(trial.trial_id)
        if entry is None:
            entry = {"run_id": None, "last_epoch": 0, "best": None}
            self.runs[trial.trial_id] = entry
            self._save()
        if entry["run_id"] is None and not entry.get("create_queued"):
            entry["create_queued"] = True
            name, params = run_name(trial.config, trial.trial_id), run_params(trial.config)
            gpus = _trial_gpus(trial)
            self.writer.submit(lambda: self._create_run(trial.trial_id, entry, name, params,
                                                        str(trial.config.get("arch")), gpus))
        return entry

    def tag_trial(self, trial: Any, key: str, value: str) -> None:
        """Set a tag on a trial's run, in order with its other writes."""
        entry = self._ensure_run(trial)
        self.writer.submit(lambda: self.client.set_tag(entry["run_id"], key, value))

    def _create_run(self, trial_id: str, entry: dict[str, Any], name: str,
                    params: dict[str, str], arch: str, gpus: str = "0") -> None:
        from mlflow.entities import Param

        if entry["run_id"] is None:
            run = self.client.create_run(
                self.experiment_id, run_name=name,
                tags={PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial_id,
                      SWEEP_TAG: self.sweep_name, "arch": arch, GPU_TAG: gpus},
            )
            entry["run_id"] = run.info.run_id
            entry.pop("create_queued", None)
            self._save()
        self.client.log_batch(entry["run_id"],
                              params=[Param(k, v) for k, v in params.items()])

    def _log_metrics(self, entry: dict[str, Any], values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(entry["run_id"], metrics=[Metric(k, float(v), now, step)
                                                        for k, v in values.items()])

    def _better(self, value: float, best: float | None) -> bool:
        return best is None or (value > best if self.mode == "max" else value < best)

    # -- Tune hooks ------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ensure_run(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        entry = self._ensure_run(trial)
        epoch = int(result.get(EPOCH_KEY, result.get("training_iteration", 0)))
        # A trial retried or resumed from a checkpoint reports some epochs again:
        # queue each epoch once per driver (MLflow itself is checked in _log_epoch).
        if epoch <= max(entry["last_epoch"], self._queued.get(trial.trial_id, 0)):
            return
        self._queued[trial.trial_id] = epoch
        values = {k: result[k] for k in EPOCH_METRICS if k in result}
        if self.metric in result and self._better(result[self.metric], entry["best"]):
            entry["best"] = result[self.metric]
        if entry["best"] is not None:
            values[f"best_{self.metric}"] = entry["best"]
        values["epoch"] = epoch
        for key in ("num_params", "test_acc"):
            if result.get(key) is not None:
                values[key] = result[key]
        entry["seen_epoch"] = epoch  # what Tune reported: decides the final status
        entry.setdefault("pending", {})[str(epoch)] = values  # until MLflow has it
        entry["total_epochs"] = result.get(TOTAL_EPOCHS_KEY)
        entry["diverged"] = bool(result.get("diverged"))
        self._save()
        self.writer.submit(lambda: self._log_epoch(entry, values, epoch))

    def _log_epoch(self, entry: dict[str, Any], values: dict[str, float], epoch: int) -> None:
        """Write one epoch unless MLflow already has it; then record it in the map.

        ``last_epoch`` in the map only moves after MLflow took the write, so a
        driver killed with writes still queued logs them after ``resume``; and the
        steps MLflow already holds (read once per run and driver) are never sent
        twice, even if the driver died between a write and the map update.
        """
        run_id = entry["run_id"]
        if run_id not in self._logged:
            history = self.client.get_metric_history(run_id, "epoch")
            self._logged[run_id] = {int(m.step) for m in history}
        if epoch not in self._logged[run_id]:
            self._log_metrics(entry, values, epoch)
            self._logged[run_id].add(epoch)
        entry["last_epoch"] = max(entry["last_epoch"], epoch)
        entry.get("pending", {}).pop(str(epoch), None)
        self._save()

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A failed attempt that Tune retries from the last checkpoint."""
        entry = self._ensure_run(trial)
        entry["retries"] = entry.get("retries", 0) + 1
        self._save()
        retries, message = str(entry["retries"]), _error_text(trial)
        self.writer.submit(lambda: self._note_retry(entry, retries, message))

    def _note_retry(self, entry: dict[str, Any], retries: str, message: str) -> None:
        self.client.set_tag(entry["run_id"], "wrnsweep.retries", retries)
        self.client.log_text(entry["run_id"], message, f"errors/attempt-{retries}.txt")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        entry = self.runs.get(trial.trial_id)
        if entry is None:
            return
        status, tags = outcome(entry, errored=False)
        entry["status"] = status
        self._save()
        self.writer.submit(lambda: self._finish(entry, status, tags))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        entry = self._ensure_run(trial)
        entry["status"] = "FAILED"
        self._save()
        message = _error_text(trial)
        last_line = message.strip().splitlines()[-1][:250] if message.strip() else "error"

        def fail() -> None:
            self.client.log_text(entry["run_id"], message, "error.txt")
            self._finish(entry, "FAILED", {"wrnsweep.error": last_line})

        self.writer.submit(fail)

    def _finish(self, entry: dict[str, Any], status: str, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(entry["run_id"], k, v)
        self.client.set_terminated(entry["run_id"], status=status)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if not self.writer.close():
            log.error("MLflow writes still pending after 300 s; the tracking store is down")


def outcome(entry: dict[str, Any], *, errored: bool) -> tuple[str, dict[str, str]]:
    """MLflow status and tags of a trial that ended, from what was logged of it."""
    if errored or entry.get("diverged"):
        return "FAILED", ({"wrnsweep.diverged": "true"} if entry.get("diverged") else {})
    seen = max(entry.get("seen_epoch", 0), entry["last_epoch"])
    if seen < (entry.get("total_epochs") or 0):
        return "KILLED", {"wrnsweep.pruned": "true", "wrnsweep.stopped_at_epoch": str(seen)}
    return "FINISHED", {}


def _error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        return Path(path).read_text()
    return str(getattr(trial, "error_msg", None) or "the trial failed without an error message")


def reconcile_runs(client: Any, runs: dict[str, dict[str, Any]], outcomes: dict[str, str],
                   writer: BufferedWriter) -> int:
    """Terminate trial runs still RUNNING after the sweep; the number fixed.

    A driver killed between a trial's last result and its completion hook leaves
    the run RUNNING; once the resumed sweep is over, the map and Tune's outcome
    (``outcomes``: trial id -> "error" or "ok") say how it ended.
    """
    fixed = 0
    for trial_id, entry in runs.items():
        if entry.get("run_id") is None:
            continue  # never reached MLflow (tracking was down the whole time)
        if trial_id not in outcomes:
            # Started after Tune's last experiment snapshot before a driver crash: Tune
            # no longer knows the trial and ran a fresh one instead. Soft-delete its run
            # (`mlflow runs restore` brings it back) so the sweep shows each trial once.
            writer.submit(lambda run_id=entry["run_id"]: _drop_orphan(client, run_id))
            fixed += 1
            continue
        if client.get_run(entry["run_id"]).info.status != "RUNNING":
            continue
        status, tags = outcome(entry, errored=outcomes.get(trial_id) == "error")

        def close(run_id: str = entry["run_id"], status: str = status,
                  tags: dict[str, str] = tags) -> None:
            for k, v in tags.items():
                client.set_tag(run_id, k, v)
            client.set_terminated(run_id, status=status)

        writer.submit(close)
        fixed += 1
    writer.close()
    return fixed


def _drop_orphan(client: Any, run_id: str) -> None:
    client.set_tag(run_id, "wrnsweep.orphaned", "true")
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status="KILLED")
    client.delete_run(run_id)
