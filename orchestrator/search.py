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

And one of TPE at scale: each suggestion reads every finished trial several
times in Python (about 4 ms per suggestion at 100 trials, 13 ms at 300, 28 ms
at 1000 on one core here, growing linearly: quadratic over a sweep).
:class:`CappedTPESampler` models at most :data:`TPE_HISTORY` finished trials:
all of them up to that, beyond it the best :data:`TPE_KEEP_BEST` and the most
recent rest. TPE's "good" density uses at most the best 25 trials (Optuna's
default ``gamma``), so it is the same as without the cap; only the "bad"
density forgets the oldest, least good trials (which TPE's default weights
already count less). The Optuna study itself keeps every trial.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from orchestrator.config import SweepConfig
from orchestrator.space import define_by_run, grid_points, grid_space, starting_points

# Reported by the trainable with every result, so the searcher can tell a trial
# that ran to the end from one the scheduler stopped.
EPOCH_KEY = "epoch"
TOTAL_EPOCHS_KEY = "total_epochs"

# Finished trials TPE models at most (see the module docstring): ~14 ms per
# suggestion at 500 on one core here, whatever the size of the sweep.
TPE_HISTORY = 500
# Of those, the best (by value) are always kept: Optuna's default gamma puts at
# most 25 trials in TPE's "good" density.
TPE_KEEP_BEST = 25
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class _StudyView:
    """The study as the sampler sees it: finished trials outside ``keep`` left out."""

    def __init__(self, study: Any, keep: frozenset[int]) -> None:
        self._study = study
        self._keep = keep

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states: Any = None,
                    use_cache: bool = False) -> list[Any]:
        trials = self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
        return [t for t in trials if t.number in self._keep or not t.state.is_finished()]


class CappedTPESampler(optuna.samplers.TPESampler):
    """Optuna's TPE over at most ``max_history`` finished trials (see the module docstring).

    Up to ``max_history`` finished trials it is exactly :class:`optuna.samplers.TPESampler`.
    """

    def __init__(self, *, max_history: int = TPE_HISTORY, keep_best: int = TPE_KEEP_BEST,
                 **kwargs: Any) -> None:
        if not 0 <= keep_best < max_history:
            raise ValueError(f"keep_best must be in [0, max_history), but got {keep_best=} "
                             f"and {max_history=}")
        super().__init__(**kwargs)
        self._max_history = max_history
        self._keep_best = keep_best
        self._keep: frozenset[int] = frozenset()
        self._keep_for = -1  # the number of finished trials ``_keep`` was chosen among

    def _view(self, study: Any) -> Any:
        finished = study._get_trials(deepcopy=False, states=_FINISHED, use_cache=False)
        if len(finished) <= self._max_history:
            return study
        if self._keep_for != len(finished):
            complete = [t for t in finished if t.state == TrialState.COMPLETE]
            complete.sort(key=lambda t: t.value,
                          reverse=study.direction == optuna.study.StudyDirection.MAXIMIZE)
            best = {t.number for t in complete[: self._keep_best]}
            recent = [t.number for t in finished if t.number not in best]
            self._keep = frozenset(best).union(
                recent[len(recent) - (self._max_history - len(best)):])
            self._keep_for = len(finished)
        return _StudyView(study, self._keep)

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return super().infer_relative_search_space(self._view(study), trial)

    def sample_relative(self, study: Any, trial: Any, search_space: dict[str, Any]) -> dict:
        return super().sample_relative(self._view(study), trial, search_space)

    def sample_independent(self, study: Any, trial: Any, param_name: str,
                           param_distribution: Any) -> Any:
        return super().sample_independent(self._view(study), trial, param_name,
                                          param_distribution)


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

    from ray.tune.search import ConcurrencyLimiter

    # `group` (sampling each conditional branch jointly) is flagged experimental
    # but has been stable since Optuna 2.8; the study log line repeats ours.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    search = cfg.search
    num_samples = search.num_samples
    points = starting_points(cfg)
    if search.algorithm == "tpe":
        sampler: Any = CappedTPESampler(
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
