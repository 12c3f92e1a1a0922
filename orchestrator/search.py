"""Searcher and scheduler factories (string-keyed, lazy imports, as Ray Tune does).

Four traps of OptunaSearch and ASHA are handled here:

* its default study name is the constant "optuna" with ``load_if_exists=True``,
  so two sweeps on one storage would merge: the study is named after the sweep;
* a trial stopped early by ASHA reaches Optuna as COMPLETE with its truncated
  score, which misleads TPE: :class:`HonestOptunaSearch` tells such a trial as
  PRUNED at the epoch it reached. Optuna 5's TPE ranks pruned trials below the
  complete ones, by how far they got, then by their last intermediate value;
* Tune never hands the searcher the result that made its scheduler stop a trial
  (``tune_controller.py``: "Only updating search alg if the trial is not to be
  stopped"): it arrives only as the ``result`` of ``on_trial_complete`` (Tune's
  ``trial.last_result``). :class:`HonestOptunaSearch` records it there as the
  trial's intermediate value at that epoch before telling Optuna, so a trial
  stopped at rung r holds every epoch's value up to r (before, a trial stopped at
  its first rung held none, and TPE ranked it as the worst possible);
* with many concurrent trials, TPE's random start-up can eat a small budget, so
  ``n_startup_trials`` defaults to a quarter of the budget (at most 10), and it
  begins at the papers' configuration of each architecture, the nearest the space
  holds (:func:`orchestrator.space.recipe_points`; ``search.recipe_start``).

ASHA's first rung, by default, comes one epoch after the first learning-rate
drop, at most half-way (:func:`default_grace_period`): on short schedules the
metric before the drop says little about the final one (issue 15, 48 trials on
digits, 8 epochs: rank correlation of val_acc with the trial's final best 0.14
after epoch 1, 0.85 after epoch 4), and ASHA at grace 1 stopped the eventual
winner after its first epoch in 2 of 3 sweeps. A sweep file's ``grace_period``
still wins. What the defaults save is measured by ``bench/search_efficiency.py``
(README, "Search efficiency"; 5 seeds on digits): a quarter fewer epochs than random
search with FIFO (96 against 128), the same median final best (0.9852), and an
epochs-to-target ratio of 0.54 against it (random search with ASHA: 0.64), not the
0.33 the benchmark asks for: the papers' configurations win early in one seed of
five, and in two the defaults never reach the target.

The study lives in an Optuna journal (``optuna-journal.jsonl`` in the sweep
folder: JSON lines, one per change, appended as they happen), not in a pickle:
``resume`` and ``extend`` read it back without running any code from the folder
(see :mod:`orchestrator.trust` for what Tune itself unpickles), and ``wrnsweep
dashboard`` serves it with optuna-dashboard (:func:`dashboard_app`). Each Optuna
trial carries its Tune trial id as the user attribute ``wrnsweep.trial_id``, the
tag of the trial's MLflow run. The state Tune saves for the searcher
(``searcher-state-*.json``) is plain JSON too: which Tune trial is which Optuna
trial. A restored sampler starts from an RNG seeded by the sweep's seed and the
number of trials so far (:func:`restored_seed`): the same folder restores the
same way, and an extension does not replay the launch's draws.

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

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from orchestrator.config import MilestoneSpace, SweepConfig
from orchestrator.space import (
    define_by_run,
    grid_points,
    grid_space,
    mean_first_milestone,
    starting_points,
)
from trainables.result import EpochResult

# Finished trials TPE models at most (see the module docstring): ~14 ms per
# suggestion at 500 on one core here, whatever the size of the sweep.
TPE_HISTORY = 500
# Of those, the best (by value) are always kept: Optuna's default gamma puts at
# most 25 trials in TPE's "good" density.
TPE_KEEP_BEST = 25
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# The study's journal in the sweep folder (one per sweep: every round adds to it).
JOURNAL_FILE = "optuna-journal.jsonl"
# The Optuna user attribute holding the Tune trial id: the MLflow run's wrnsweep.trial_id tag.
TRIAL_ATTR = "wrnsweep.trial_id"
_STATE_FORMAT = 1  # of the searcher-state JSON file


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


def restored_seed(seed: int | None, n_trials: int) -> int | None:
    """The seed of a sampler restored over a study of ``n_trials`` trials (None: unseeded)."""
    if seed is None:
        return None
    digest = hashlib.sha256(f"wrnsweep-sampler:{seed}:{n_trials}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


@dataclass(frozen=True)
class SamplerSpec:
    """How to build the sweep's sampler, so that a restore can build it again, re-seeded."""

    algorithm: str  # tpe, random or grid
    seed: int | None
    n_startup_trials: int = 10  # TPE's random warm-up
    grid_size: int = 0  # grid: the number of points

    def build(self, seed: int | None) -> optuna.samplers.BaseSampler:
        if self.algorithm == "tpe":
            # multivariate + group: model the joint distribution per conditional branch.
            return CappedTPESampler(seed=seed, n_startup_trials=self.n_startup_trials,
                                    multivariate=True, group=True, constant_liar=True)
        if self.algorithm == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if self.algorithm == "grid":
            return optuna.samplers.GridSampler({"grid_point": list(range(self.grid_size))},
                                               seed=seed)
        raise ValueError(f"search.algorithm must be one of ['tpe', 'random', 'grid'], "
                         f"got {self.algorithm!r}")


class HonestOptunaSearch(OptunaSearch):
    """OptunaSearch that reports scheduler-stopped trials to Optuna as PRUNED.

    With ``journal`` (a file path), the study lives in Optuna's journal file
    storage and the saved searcher state is JSON (see the module docstring). The
    study is opened on first use, not when the searcher is built: building one
    writes nothing, and ``extend`` restores the study before any trial is asked
    for, so the starting points are enqueued only into a new study. Without
    ``journal`` the study is in memory and cannot be restored.
    """

    # Searcher.save_to_dir / restore_from_dir name the state file after this.
    CKPT_FILE_TMPL = "searcher-state-{}.json"

    def __init__(self, *args: Any, journal: str | None = None,
                 sampler_spec: SamplerSpec | None = None, **kwargs: Any) -> None:
        self._journal = journal
        self._sampler_spec = sampler_spec
        # Tune trials whose Optuna trial was already finished in the journal when it
        # was restored (the driver died after telling Optuna, before Tune's snapshot):
        # Tune runs them again, Optuna keeps what it was told.
        self._settled: set[str] = set()
        # Tune trial id -> the last epoch whose value the study holds: each epoch is told
        # once (a trial resumed from a checkpoint reports some epochs again, and Tune
        # repeats a finished trial's last result).
        self._last_step: dict[str, int] = {}
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode: str | list) -> None:
        self._study_mode = mode
        if self._journal is None:
            super()._setup_study(mode)
        else:
            self._ot_study = None

    def _open_study(self) -> None:
        """Open (or create) the study in the journal; starting points go into a new one."""
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        assert self._journal is not None
        self._storage = JournalStorage(JournalFileBackend(self._journal))
        exists = self._study_name in optuna.get_all_study_names(self._storage)
        points = self._points_to_evaluate
        if exists:
            self._points_to_evaluate = []  # enqueued when the study was created
        try:
            super()._setup_study(self._study_mode)
        finally:
            self._points_to_evaluate = points

    def _study(self) -> None:
        if self._ot_study is None and self._journal is not None:
            self._open_study()

    def suggest(self, trial_id: str) -> dict | None:
        self._study()
        config = super().suggest(trial_id)
        if config is not None and trial_id in self._ot_trials:
            # Links the Optuna trial (optuna-dashboard) to its MLflow run (the same tag).
            self._ot_trials[trial_id].set_user_attr(TRIAL_ATTR, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._settled or trial_id in self._completed_trials:
            return
        self._study()
        self._record(trial_id, result)

    def _record(self, trial_id: str, result: dict[str, Any]) -> None:
        """Tell Optuna the trial's metric as its intermediate value at the result's epoch.

        The step is the trial's own epoch count (``EpochResult``; Tune's
        ``training_iteration`` where a result has none), as ASHA's rungs and MLflow's
        metric steps count; an epoch the study already holds is not told again.
        """
        if isinstance(self.metric, list) or trial_id not in self._ot_trials:
            return  # Optuna keeps no intermediate values for several objectives
        value = result.get(self.metric)
        step = EpochResult.parse(result).epoch
        if value is None or step <= self._last_step.get(trial_id, 0):
            return
        self._ot_trials[trial_id].report(float(value), step)
        self._last_step[trial_id] = step

    def use_journal(self, journal: str) -> None:
        """Keep the study in ``journal`` from now on: a restored searcher whose sweep folder
        has moved since it was pickled (the study is opened at the first use)."""
        self._journal = journal

    def save(self, checkpoint_path: str) -> None:
        """The searcher's state as JSON; the study itself is in the journal."""
        if self._journal is None:
            raise NotImplementedError("an in-memory study is not saved (no journal)")
        state = {
            "format": _STATE_FORMAT,
            "study_name": self._study_name,
            # Tune trial id -> Optuna trial number (numbers are stable in the journal).
            "trials": {tid: t.number for tid, t in self._ot_trials.items()},
            "completed": sorted(self._completed_trials),
        }
        Path(checkpoint_path).write_text(json.dumps(state, indent=1) + "\n")

    def restore(self, checkpoint_path: str) -> None:
        """Continue the study from the journal, with what ``save`` wrote.

        Optuna trials left RUNNING that no saved Tune trial owns were started after
        Tune's last snapshot: Tune will not run them, so they are told FAIL (else
        TPE's constant liar would count them as running forever).
        """
        state = _read_state(checkpoint_path)
        if self._journal is None or not Path(self._journal).is_file():
            if not state["trials"]:
                return  # saved before the first trial: the study is made at the first one
            raise RuntimeError(f"no Optuna journal at {self._journal}: this searcher's "
                               "study cannot be restored")
        if state["study_name"] != self._study_name:
            raise RuntimeError(f"{checkpoint_path}: the state of study "
                               f"{state['study_name']!r}, not {self._study_name!r}")
        self._open_study()
        frozen = {t.number: t for t in self._ot_study.get_trials(deepcopy=False)}
        spec = self._sampler_spec
        if spec is not None:
            # A fresh RNG, seeded from the sweep's seed and the trials so far.
            self._sampler = spec.build(restored_seed(spec.seed, len(frozen)))
            self._ot_study.sampler = self._sampler
        owned = {}
        for tid, number in state["trials"].items():
            if number in frozen:
                # Optuna's Trial takes the storage's id of a trial, which FrozenTrial
                # holds (only) as _trial_id; the number is what the journal keeps stable.
                owned[tid] = optuna.trial.Trial(self._ot_study, frozen[number]._trial_id)
        self._ot_trials = owned
        self._completed_trials = set(state["completed"]) & set(owned)
        self._last_step = {tid: max(frozen[t.number].intermediate_values, default=0)
                           for tid, t in owned.items()}
        self._settled = {tid for tid, t in owned.items() if tid not in self._completed_trials
                         and frozen[t.number].state.is_finished()}
        mine = {t.number for t in owned.values()}
        for number, trial in frozen.items():
            if trial.state == TrialState.RUNNING and number not in mine:
                self._ot_study.tell(number, state=TrialState.FAIL)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if trial_id in self._settled:
            self._completed_trials.add(trial_id)
            return
        self._study()
        if error or not result or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result, error)
            return
        # Tune withholds the result on which its scheduler stopped the trial from
        # on_trial_result (ASHA stops at a rung, and at max_t too) and hands it here, as
        # the trial's last result: recorded first, the study holds every epoch it ran.
        self._record(trial_id, result)
        if not EpochResult.parse(result).stopped_early:
            super().on_trial_complete(trial_id, result, error)
            return
        # Values must be None for PRUNED: Optuna records the last intermediate value.
        self._ot_study.tell(self._ot_trials[trial_id], None, state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)


def _read_state(path: str) -> dict[str, Any]:
    """A searcher-state file, checked field by field (it is read from the sweep folder)."""
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise RuntimeError(f"{path}: not a searcher state ({err})") from None
    ok = (isinstance(state, dict) and state.get("format") == _STATE_FORMAT
          and isinstance(state.get("study_name"), str)
          and isinstance(state.get("trials"), dict)
          and all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                  for k, v in state["trials"].items())
          and isinstance(state.get("completed"), list)
          and all(isinstance(t, str) for t in state["completed"]))
    if not ok:
        raise RuntimeError(f"{path}: not a searcher state written by this wrnsweep")
    return state


def n_startup_trials(cfg: SweepConfig) -> int:
    """TPE's random warm-up: as configured, else a quarter of the budget, 2 to 10."""
    if cfg.search.n_startup_trials is not None:
        return cfg.search.n_startup_trials
    return max(2, min(10, cfg.search.num_samples // 4))


def create_searcher(cfg: SweepConfig, *, study_name: str,
                    journal: str | None = None) -> tuple[Any, int]:
    """The Tune searcher for ``cfg`` and the number of trials it will run.

    ``algorithm`` must be one of tpe, random, grid. Grid runs every point once,
    whatever ``num_samples`` says. ``journal``: the file of the study's Optuna
    journal (a sweep's ``optuna-journal.jsonl``); without it the study is in
    memory and cannot be restored.
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
    if search.algorithm in ("tpe", "random"):
        spec = SamplerSpec(search.algorithm, search.seed, n_startup_trials=n_startup_trials(cfg))
        space = define_by_run(cfg)
    elif search.algorithm == "grid":
        grid = grid_points(cfg)
        spec = SamplerSpec("grid", search.seed, grid_size=len(grid))
        space = grid_space(grid)
        num_samples, points = len(grid), []
    else:
        raise ValueError(
            f"search.algorithm must be one of ['tpe', 'random', 'grid'], got {search.algorithm!r}"
        )
    searcher = HonestOptunaSearch(
        space=space, metric=search.metric, mode=search.mode, sampler=spec.build(spec.seed),
        study_name=study_name, points_to_evaluate=points or None, journal=journal,
        sampler_spec=spec,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent), num_samples


def max_epochs(cfg: SweepConfig) -> int:
    """The longest architecture's epochs: ASHA's ``max_t``."""
    return max(cfg.epochs_for(arch) for arch in cfg.arch_names())


def first_milestone(cfg: SweepConfig, arch: str) -> float | None:
    """The fraction of the epochs at which ``arch``'s learning rate first drops.

    The sweep's constant milestones, else the paper's (the family's recipe);
    searched milestones give the mean of their first draw. None: no drop at all.
    """
    from trainables.models.registry import get_family

    param = cfg.params_for(arch).get("milestones")
    if isinstance(param, MilestoneSpace):
        return mean_first_milestone(param)
    values = tuple(param.value) if param is not None else get_family(arch).recipe.milestones
    return float(values[0]) if values else None


def arch_grace_period(cfg: SweepConfig, arch: str) -> int:
    """The first epoch after which ``arch``'s metric says something about the final one.

    One epoch after the first learning-rate drop (the drop acts at the start of
    0-based epoch ``round(m * epochs)``, as ``TrainConfig.milestone_epochs``),
    because accuracy jumps there; at most half the epochs, so that a rung still
    saves training on a late drop (and without any drop); never inside the
    warm-up, where every lr is still climbing.
    """
    epochs = cfg.epochs_for(arch)
    warmup = int(cfg.recipe_constants(arch).get("warmup_epochs") or 0)
    half = math.ceil(epochs / 2)
    m = first_milestone(cfg, arch)
    grace = half if m is None else min(max(1, round(m * epochs)) + 1, half)
    return max(1, min(epochs, max(grace, warmup + 1)))


def default_grace_period(cfg: SweepConfig) -> int:
    """ASHA's first rung when the sweep file gives none: the earliest architecture's.

    One rung serves every architecture, and it must not be beyond any of their
    epochs (the validator's rule for an explicit ``grace_period``).
    """
    return min(arch_grace_period(cfg, arch) for arch in cfg.arch_names())


def grace_period(cfg: SweepConfig) -> int:
    """ASHA's grace period in epochs: the sweep file's ``grace_period``, else the recipe's."""
    if "grace_period" in cfg.scheduler.model_fields_set:
        return cfg.scheduler.grace_period
    return default_grace_period(cfg)


def create_scheduler(cfg: SweepConfig) -> Any:
    """The trial scheduler on the epoch count (``training_iteration``)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler

    spec = cfg.scheduler
    if spec.name == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=max_epochs(cfg),
                             grace_period=grace_period(cfg),
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
    rungs, t, top = [], float(grace_period(cfg)), max_epochs(cfg)
    while t < top:
        # A rung acts once the epoch count reaches it (ASHA: iteration >= milestone).
        rungs.append(math.ceil(t - 1e-9))
        t *= cfg.scheduler.reduction_factor
    return rungs


def planned_epochs(cfg: SweepConfig, trials: int) -> tuple[int, float]:
    """The most epochs ``trials`` trials can spend, and what ASHA spends when full.

    The most: every trial to the longest architecture's end, which FIFO does and
    ASHA may (an asynchronous rung passes on whoever beats the trials it has seen
    so far: its first trials pass unopposed). The second figure is the spend when
    each rung passes exactly 1/rf of the trials on, as a full synchronous rung does;
    equal to the first for FIFO and HyperBand (not modelled).
    """
    top = max_epochs(cfg)
    most = trials * top
    rungs = asha_rungs(cfg)
    if not rungs:
        return most, float(most)
    rf = cfg.scheduler.reduction_factor
    bounds = [*rungs, top]
    per_trial = bounds[0] + sum((b - a) / rf ** (k + 1)
                                for k, (a, b) in enumerate(itertools.pairwise(bounds)))
    return most, trials * per_trial


def describe_schedule(cfg: SweepConfig, trials: int) -> list[str]:
    """``launch --dry-run``'s scheduler lines: rungs, and the epochs the plan can spend."""
    sched = cfg.scheduler
    most, full = planned_epochs(cfg, trials)
    top = max_epochs(cfg)
    if sched.name != "asha":
        return [f"scheduler: {sched.name}",
                f"epochs: at most {most} ({trials} trials x {top})"]
    source = ("the sweep file's" if "grace_period" in sched.model_fields_set
              else "from the recipe: one epoch after the first lr drop, at most half the epochs")
    return [
        f"scheduler: ASHA on epochs, grace {grace_period(cfg)} ({source}), reduction "
        f"factor {sched.reduction_factor:g}, rungs at epochs {asha_rungs(cfg)}, max {top}",
        f"epochs: at most {most} ({trials} trials x {top}, if ASHA passes every trial on); "
        f"about {full:.0f} when each rung passes 1/{sched.reduction_factor:g} on",
    ]


# -- optuna-dashboard ------------------------------------------------------------------
# Requests the dashboard may answer: it reads the study. Its other routes create,
# rename or delete studies, tell trials and write notes, which would change the
# sweep's study under resume and extend (and, with --host, for anyone who can reach it).
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class ReadOnlyApp:
    """A WSGI app that refuses every request that could change what it serves."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("REQUEST_METHOD", "GET").upper() in _SAFE_METHODS:
            return self.app(environ, start_response)
        body = json.dumps({"reason": "wrnsweep dashboard serves the sweep's study "
                                     "read-only"}).encode()
        start_response("403 Forbidden", [("Content-Type", "application/json"),
                                          ("Content-Length", str(len(body)))])
        return [body]


def sweep_journal(home: str | Path) -> Path:
    """The Optuna journal of the sweep folder ``home``; FileNotFoundError if it has none."""
    path = Path(home) / JOURNAL_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{home}: no Optuna study ({JOURNAL_FILE}); give the folder of a sweep "
            "(`<storage>/<name>`) that has run at least one trial")
    return path


def open_journal(journal: str | Path) -> Any:
    """Optuna's storage over an existing journal file (reading it writes nothing)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(journal)))


def dashboard_app(storage: Any) -> ReadOnlyApp:
    """optuna-dashboard's WSGI app over ``storage``, read-only."""
    from optuna_dashboard import wsgi

    return ReadOnlyApp(wsgi(storage))


def _stop_serving(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the server as Ctrl-C does: socket closed, exit 0


def serve_dashboard(home: str | Path, *, host: str = "127.0.0.1", port: int = 8080,
                    echo: Any = print) -> None:
    """Serve the sweep's study with optuna-dashboard until Ctrl-C (or SIGTERM).

    Binds before anything is printed: a port in use is a ``ValueError`` (``port`` 0
    takes any free port, and the URL printed says which).
    """
    import signal
    import socket
    import socketserver
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    journal = sweep_journal(home)
    storage = open_journal(journal)
    studies = storage.get_all_studies()
    if not studies:
        raise FileNotFoundError(f"{journal}: the journal holds no study yet")
    # The sweep's study carries the sweep's name (the folder's name, unless --name).
    try:
        name = json.loads((Path(home) / "wrnsweep.json").read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        name = None  # no plan (a bare journal), or one this wrnsweep cannot read
    study = next((s for s in studies if s.study_name == name), studies[0])

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        # Threads: the page polls several routes at once; a slow one must not stall it.
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per poll of the page would bury the URL

    try:
        server = make_server(host, port, dashboard_app(storage), server_class=Server,
                             handler_class=Quiet)
    except OSError as err:
        raise ValueError(f"cannot serve on {host}:{port}: {err.strerror or err}") from None
    shown = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(
        host, f"[{host}]" if ":" in host else host)
    url = f"http://{shown}:{server.server_port}/dashboard/studies/{study._study_id}"
    echo(f"optuna-dashboard: {url} (study {study.study_name!r}, {len(studies)} in "
         f"{journal.name}; read-only; Ctrl-C stops it)")
    signal.signal(signal.SIGTERM, _stop_serving)
    try:
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
