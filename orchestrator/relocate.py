"""Tune state restored in a sweep folder that has moved since it was written.

Ray Tune re-points the trials it restores at the experiment's new place
(``TuneController._restore_trials``), but not the experiment that its restored
search generator keeps for new trials: a trial suggested after the restore gets
the storage of the old place and fails in its worker ("Unable to set up cluster
storage"), or would write there. :class:`TrialsHere` wraps the restored
scheduler's ``on_trial_add`` (the hook Tune calls for every trial it adds, before
the trial starts) and gives each such trial the storage of where the folder is
now, with Tune's own ``Trial.set_storage``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any


class TrialsHere:
    """``scheduler.on_trial_add`` that first moves the trial's storage to ``experiment_path``."""

    def __init__(self, experiment_path: str, on_trial_add: Callable[[Any, Any], Any]) -> None:
        self.storage_fs_path = str(Path(experiment_path).parent)
        self.experiment_dir_name = Path(experiment_path).name
        self.on_trial_add = on_trial_add

    def __call__(self, tune_controller: Any, trial: Any) -> Any:
        storage = trial.storage
        if (storage.storage_fs_path, storage.experiment_dir_name) != (
                self.storage_fs_path, self.experiment_dir_name):
            here = copy.copy(storage)
            here.storage_fs_path = self.storage_fs_path
            here.experiment_dir_name = self.experiment_dir_name
            trial.set_storage(here)
        return self.on_trial_add(tune_controller, trial)


def trials_here(scheduler: Any, experiment_path: str) -> Any:
    """``scheduler`` (Tune's FIFO when None) adding every trial at ``experiment_path``."""
    if scheduler is None:
        from ray.tune.schedulers import FIFOScheduler

        scheduler = FIFOScheduler()
    scheduler.on_trial_add = TrialsHere(experiment_path, scheduler.on_trial_add)
    return scheduler
