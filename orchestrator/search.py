"""Searcher and scheduler factories (string-keyed, lazy imports, as Ray Tune does).

Three traps of OptunaSearch are handled here:

* its default study name is the constant "optuna" with ``load_if_exists=True``,
  so two sweeps on one storage would merge: the study is named after the sweep;
* a trial stopped early by ASHA reaches Optuna as COMPLETE with its truncated
  score, which misleads TPE: :class:`HonestOptunaSearch` tells such a trial as
  PRUNED at its last step (its intermediate values are already in the study, and
  Optuna's TPE ranks pruned trials by how far they got);
* with many concurrent trials, TPE's random start-up can eat a small budget, so
  ``n_startup_trials`` defaults to a quarter of the budget (at most 10).
"""

from __future__ import annotations

import math
from typing import Any

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from orchestrator.config import SweepConfig
from orchestrator.space import define_by_run, grid_points, grid_space, starting_points

# Reported by the trainable with every result, so the searcher can tell a trial
# that ran to the end from one the scheduler stopped.
EPOCH_KEY = "epoch"
TOTAL_EPOCHS_KEY = "total_epochs"


class HonestOptunaSearch(OptunaSearch):
    """OptunaSearch that reports scheduler-stopped trials to Optuna as PRUNED."""

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if error or not result or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result, error)
            return
        stopped_early = (
            not result.get("diverged")
            and result.get(EPOCH_KEY, 0) < result.get(TOTAL_EPOCHS_KEY, 0)
        )
        if not stopped_early:
            super().on_trial_complete(trial_id, result, error)
            return
        # Values must be None for PRUNED: Optuna records the last intermediate value.
        self._ot_study.tell(self._ot_trials[trial_id], None, state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)


def n_startup_trials(cfg: SweepConfig) -> int:
    """TPE's random warm-up: as configured, else a quarter of the budget, 2 to 10."""
    if cfg.search.n_startup_trials is not None:
        return cfg.search.n_startup_trials
    return max(2, min(10, cfg.search.num_samples // 4))


def create_searcher(cfg: SweepConfig, *, study_name: str) -> tuple[Any, int]:
    """The Tune searcher for ``cfg`` and the number of trials it will run.

    ``algorithm`` must be one of tpe, random, grid. Grid runs every point once,
    whatever ``num_samples`` says.
    """
    import warnings

    import optuna
    from ray.tune.search import ConcurrencyLimiter

    # `group` (sampling each conditional branch jointly) is flagged experimental
    # but has been stable since Optuna 2.8; the study log line repeats ours.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    search = cfg.search
    num_samples = search.num_samples
    points = starting_points(cfg)
    if search.algorithm == "tpe":
        sampler: Any = optuna.samplers.TPESampler(
            seed=search.seed, n_startup_trials=n_startup_trials(cfg),
            # multivariate + group: model the joint distribution per conditional branch.
            multivariate=True, group=True, constant_liar=True,
        )
        space = define_by_run(cfg)
    elif search.algorithm == "random":
        sampler = optuna.samplers.RandomSampler(seed=search.seed)
        space = define_by_run(cfg)
    elif search.algorithm == "grid":
        grid = grid_points(cfg)
        sampler = optuna.samplers.GridSampler({"grid_point": list(range(len(grid)))},
                                              seed=search.seed)
        space = grid_space(grid)
        num_samples, points = len(grid), []
    else:
        raise ValueError(
            f"search.algorithm must be one of ['tpe', 'random', 'grid'], got {search.algorithm!r}"
        )
    searcher = HonestOptunaSearch(
        space=space, metric=search.metric, mode=search.mode, sampler=sampler,
        study_name=study_name, points_to_evaluate=points or None,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent), num_samples


def max_epochs(cfg: SweepConfig) -> int:
    return max(cfg.epochs_for(arch) for arch in cfg.arch_names())


def create_scheduler(cfg: SweepConfig) -> Any:
    """The trial scheduler on the epoch count (``training_iteration``)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler

    spec = cfg.scheduler
    if spec.name == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=max_epochs(cfg),
                             grace_period=spec.grace_period,
                             reduction_factor=spec.reduction_factor)
    if spec.name == "hyperband":
        return HyperBandScheduler(time_attr="training_iteration", max_t=max_epochs(cfg),
                                  reduction_factor=spec.reduction_factor)
    if spec.name == "fifo":
        return FIFOScheduler()
    raise ValueError(f"scheduler.name must be one of ['asha', 'fifo', 'hyperband'], "
                     f"got {spec.name!r}")


def asha_rungs(cfg: SweepConfig) -> list[int]:
    """Epochs at which ASHA compares trials: grace * rf^k below the maximum."""
    if cfg.scheduler.name != "asha":
        return []
    rungs, t, top = [], float(cfg.scheduler.grace_period), max_epochs(cfg)
    while t < top:
        # A rung acts once the epoch count reaches it (ASHA: iteration >= milestone).
        rungs.append(math.ceil(t - 1e-9))
        t *= cfg.scheduler.reduction_factor
    return rungs
