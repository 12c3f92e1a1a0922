"""The searcher and scheduler factories against the known Optuna / Ray Tune traps.

Real Optuna and the real (subclassed) ``OptunaSearch``. Most tests drive the
searcher the way Tune does (``suggest``, ``on_trial_result``, ``on_trial_complete``);
one (slow) runs a real local Ray Tune with ASHA and reads the saved study back from
its journal. See ``/work/shared/PITFALLS.md`` for the traps.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from ray.tune.execution.placement_groups import resource_dict_to_pg_factory
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from orchestrator.config import MilestoneSpace, SweepConfig, load_sweep, parse_sweep
from orchestrator.search import (
    JOURNAL_FILE,
    TRIAL_ATTR,
    HonestOptunaSearch,
    arch_grace_period,
    asha_rungs,
    create_scheduler,
    create_searcher,
    default_grace_period,
    describe_schedule,
    grace_period,
    n_startup_trials,
    planned_epochs,
)
from orchestrator.space import define_by_run, milestones_from_unit, recipe_points
from orchestrator.sweep import resources_fn
from trainables.config import TrainConfig
from trainables.models import check_hparams
from trainables.models.registry import names
from trainables.trainable import trial_config

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "search_spaces"

TWO_ARCH = """\
name: two-arch
dataset: synthetic
architectures:
  wrn:
    depth: {choices: [10, 16, 22]}
    width: {low: 1, high: 4}
    dropout: {low: 0.0, high: 0.5}
  resnet:
    depth: {choices: [8, 14, 20, 32]}
    shortcut: {choices: [A, B]}
recipe:
  epochs: 5
  lr: {low: 0.02, high: 0.2, log: true}
search: {num_samples: 30, max_concurrent: 4, seed: 3}
"""


def _cfg(text: str) -> SweepConfig:
    return parse_sweep(text, "t.yaml")


def _searcher(cfg: SweepConfig) -> tuple[ConcurrencyLimiter, HonestOptunaSearch, int]:
    limiter, num_samples = create_searcher(cfg, study_name=cfg.name)
    assert isinstance(limiter, ConcurrencyLimiter)
    assert isinstance(limiter.searcher, HonestOptunaSearch)
    return limiter, limiter.searcher, num_samples


def _result(value: float, epoch: int, total: int, metric: str = "val_acc",
            **extra: Any) -> dict[str, Any]:
    """A result dict as the trainable reports it (Tune adds training_iteration)."""
    return {metric: value, "training_iteration": epoch, "epoch": epoch,
            "total_epochs": total, **extra}


def _run(limiter: Any, n: int, score: Callable[[dict[str, Any]], float],
         total: int = 5) -> list[dict[str, Any]]:
    """Suggest, report and complete ``n`` trials one after another; the configs."""
    configs = []
    for i in range(n):
        trial_id = f"trial_{i:03d}"
        config = limiter.suggest(trial_id)
        assert config is not None, f"no suggestion for trial {i}"
        value = score(config)
        for epoch in range(1, total + 1):
            limiter.on_trial_result(trial_id, _result(value * epoch / total, epoch, total))
        limiter.on_trial_complete(trial_id, _result(value, total, total))
        configs.append(config)
    return configs


def _build(config: dict[str, Any]) -> TrainConfig:
    """What the trainable does with a suggestion, up to building the model."""
    cfg = TrainConfig.from_dict(trial_config(config))
    check_hparams(cfg.arch, **cfg.model_hparams())
    return cfg


def _state(searcher: OptunaSearch, trial_id: str) -> optuna.trial.FrozenTrial:
    number = searcher._ot_trials[trial_id].number
    return searcher._ot_study.get_trials(deepcopy=False)[number]


def _score(config: dict[str, Any]) -> float:
    """A deterministic score with structure TPE can model."""
    arch = config["arch"]
    return 0.5 + 0.01 * config[f"{arch}.depth"] + (0.1 if arch == "wrn" else 0.0)


# ------------------------------------------------------------------ 1. namespacing


@pytest.mark.parametrize("source", ["inline", "all.yaml"])
def test_conditional_space_is_namespaced_and_buildable(source: str) -> None:
    """30 TPE trials over several architectures: each suggestion carries only its own
    architecture's keys, Optuna never sees one name with two distributions, and every
    suggestion builds through the trainable's own conversion."""
    cfg = _cfg(TWO_ARCH) if source == "inline" else load_sweep(SPACES / source)
    limiter, searcher, _ = _searcher(cfg)
    configs = _run(limiter, 30, _score)
    archs = set(cfg.arch_names())
    assert {c["arch"] for c in configs} == archs  # every branch was explored
    for config in configs:
        arch = config["arch"]
        namespaced = {k.partition(".")[0] for k in config if "." in k}
        assert namespaced == {arch}, config
        train = _build(config)
        assert train.arch == arch
        assert train.model_hparams()["depth"] == config[f"{arch}.depth"]
    for trial in searcher._ot_study.get_trials(deepcopy=False):
        arch = trial.params["arch"]
        assert all(name == "arch" or name.startswith(f"{arch}.") for name in trial.params)
        assert trial.state == TrialState.COMPLETE


def test_unnamespaced_depth_is_the_pitfall() -> None:
    """The trap the namespacing avoids: one name ``depth`` with per-arch choices makes
    Optuna raise as soon as both branches have been sampled."""

    def space(trial: Any) -> dict[str, Any]:
        arch = trial.suggest_categorical("arch", ["wrn", "resnet"])
        choices = [10, 16] if arch == "wrn" else [8, 14]
        return {"arch": arch, "depth": trial.suggest_categorical("depth", choices)}

    stock = OptunaSearch(space=space, metric="val_acc", mode="max",
                         sampler=optuna.samplers.RandomSampler(seed=0), study_name="pitfall")
    with pytest.raises(ValueError, match="dynamic value space"):
        for i in range(20):
            stock.suggest(str(i))
            stock.on_trial_complete(str(i), {"val_acc": 0.5})


# --------------------------------------------------------- 2. architecture rules


def test_int_depth_range_on_its_step_is_always_buildable() -> None:
    """``depth: {low: 16, high: 40, step: 6}`` only ever samples WRN depths 6n+4."""
    cfg = _cfg("""\
name: steps
architectures:
  wrn: {depth: {low: 16, high: 40, step: 6}, width: 1}
recipe: {epochs: 3}
search: {num_samples: 25, algorithm: random}
""")
    limiter, _, _ = _searcher(cfg)
    depths = [c["wrn.depth"] for c in _run(limiter, 25, _score, total=3)]
    assert set(depths) <= {16, 22, 28, 34, 40}
    assert all((d - 4) % 6 == 0 for d in depths)
    assert len(set(depths)) >= 3  # it did explore the range


# ------------------------------------------------------------------- 3. naming


def test_study_is_named_after_the_sweep(tmp_path: Path) -> None:
    """The stock default merges sweeps into one study "optuna" on a shared database;
    ours names each study after its sweep, so two sweeps give two studies."""
    a = _cfg(TWO_ARCH)
    b = _cfg(TWO_ARCH.replace("name: two-arch", "name: other-sweep"))
    names = {_searcher(c)[1]._ot_study.study_name for c in (a, b)}
    assert names == {"two-arch", "other-sweep"}

    # The pitfall: the stock searcher on one RDB storage, twice, without a name.
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    for c in (a, b):
        OptunaSearch(space=define_by_run(c), metric="val_acc", mode="max", storage=storage)
    assert optuna.get_all_study_names(storage) == ["optuna"]


# ----------------------------------------------------------- 4. honest pruning

HONEST = """\
name: honest
architectures:
  wrn: {depth: 10, width: 1}
recipe:
  epochs: 5
  lr: {low: 0.02, high: 0.2, log: true}
search: {algorithm: random, num_samples: 8}
"""


def test_stopped_trial_is_pruned_finished_and_diverged_are_complete() -> None:
    """A trial stopped at epoch 2 of 5 is PRUNED with its last intermediate value; one
    run to the end is COMPLETE; a diverged one is COMPLETE at 0.0 (an outcome, not a
    stop); one that raised is FAIL."""
    limiter, searcher, _ = _searcher(_cfg(HONEST))
    for trial_id in ("stopped", "finished", "diverged", "error"):
        assert limiter.suggest(trial_id) is not None

    limiter.on_trial_result("stopped", _result(0.3, 1, 5))
    limiter.on_trial_result("stopped", _result(0.4, 2, 5))
    limiter.on_trial_complete("stopped", _result(0.4, 2, 5))

    for epoch in range(1, 6):
        limiter.on_trial_result("finished", _result(0.1 * epoch + 0.4, epoch, 5))
    limiter.on_trial_complete("finished", _result(0.9, 5, 5))

    diverged = _result(0.0, 1, 5, diverged=1, val_loss=1e6)
    limiter.on_trial_result("diverged", diverged)
    limiter.on_trial_complete("diverged", diverged)

    limiter.on_trial_complete("error", None, error=True)

    stopped = _state(searcher, "stopped")
    assert stopped.state == TrialState.PRUNED
    assert stopped.value == pytest.approx(0.4)
    assert stopped.intermediate_values == {1: 0.3, 2: 0.4}
    finished = _state(searcher, "finished")
    assert (finished.state, finished.value) == (TrialState.COMPLETE, pytest.approx(0.9))
    div = _state(searcher, "diverged")
    assert (div.state, div.value) == (TrialState.COMPLETE, 0.0)
    assert _state(searcher, "error").state == TrialState.FAIL
    # A second completion (Tune may send one after a restore) changes nothing.
    limiter.on_trial_complete("stopped", _result(0.4, 2, 5))
    assert _state(searcher, "stopped").state == TrialState.PRUNED


def test_stock_optuna_search_records_a_stopped_trial_as_complete() -> None:
    """The pitfall itself: stock OptunaSearch tells Optuna the truncated score as a
    finished trial, so TPE would treat epoch-2 accuracy like a final one."""
    cfg = _cfg(HONEST)
    stock = OptunaSearch(space=define_by_run(cfg), metric="val_acc", mode="max",
                         sampler=optuna.samplers.RandomSampler(seed=0), study_name="stock")
    stock.suggest("stopped")
    stock.on_trial_result("stopped", _result(0.3, 1, 5))
    stock.on_trial_result("stopped", _result(0.4, 2, 5))
    stock.on_trial_complete("stopped", _result(0.4, 2, 5))
    assert _state(stock, "stopped").state == TrialState.COMPLETE


def test_the_stopping_result_reaches_the_study_through_on_trial_complete() -> None:
    """Tune's own order: the result on which ASHA stops a trial never reaches
    ``on_trial_result``, only ``on_trial_complete`` (as the trial's last result). A
    trial stopped at its first rung still holds its value there; one stopped at
    epoch 3 holds epochs 1-3; a trial ASHA ends at max_t holds its last epoch too;
    each study trial names its Tune trial (the MLflow run's tag)."""
    limiter, searcher, _ = _searcher(_cfg(HONEST))
    for trial_id in ("first-rung", "third", "to-the-end"):
        assert limiter.suggest(trial_id) is not None

    limiter.on_trial_complete("first-rung", _result(0.2, 1, 5))
    for epoch in (1, 2):
        limiter.on_trial_result("third", _result(0.1 * epoch, epoch, 5))
    limiter.on_trial_complete("third", _result(0.3, 3, 5))
    for epoch in range(1, 5):
        limiter.on_trial_result("to-the-end", _result(0.1 * epoch, epoch, 5))
    limiter.on_trial_complete("to-the-end", _result(0.8, 5, 5))

    first = _state(searcher, "first-rung")
    assert (first.state, first.intermediate_values) == (TrialState.PRUNED, {1: 0.2})
    third = _state(searcher, "third")
    assert third.state == TrialState.PRUNED
    assert third.intermediate_values == pytest.approx({1: 0.1, 2: 0.2, 3: 0.3})
    end = _state(searcher, "to-the-end")
    assert (end.state, end.value) == (TrialState.COMPLETE, 0.8)
    assert end.intermediate_values == pytest.approx({1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 5: 0.8})
    assert [_state(searcher, t).user_attrs[TRIAL_ATTR]
            for t in ("first-rung", "third", "to-the-end")] == ["first-rung", "third",
                                                                 "to-the-end"]


def test_an_epoch_reported_again_is_told_once(recwarn: pytest.WarningsRecorder) -> None:
    """A trial resumed from a checkpoint reports epochs the study holds, and Tune
    repeats a finished trial's last result: Optuna keeps the first value, and is not
    asked again (it would warn for each)."""
    limiter, searcher, _ = _searcher(_cfg(HONEST))
    limiter.suggest("t")
    for epoch in (1, 2, 1, 2, 3):
        limiter.on_trial_result("t", _result(0.1 * epoch + (0.05 if epoch < 3 else 0), epoch, 5))
    limiter.on_trial_complete("t", _result(0.3, 3, 5))
    assert _state(searcher, "t").intermediate_values == pytest.approx({1: 0.15, 2: 0.25,
                                                                       3: 0.3})
    assert not [w for w in recwarn if "already reported" in str(w.message)]


def _epochs_trainable(config: dict[str, Any]) -> None:
    """Reports as trainables.trainable does (EpochResult: epoch, total_epochs, val_acc),
    with a val_acc that rises each epoch towards a level set by the sampled lr."""
    from ray import tune

    from trainables.result import EpochResult

    total = config["epochs"]
    level = 1.0 / (1.0 + abs(math.log10(config["wrn.lr"]) + 1.0))  # best at lr = 0.1
    for epoch in range(1, total + 1):
        tune.report(EpochResult(epoch=epoch, total_epochs=total,
                                metrics={"val_acc": level * epoch / total}).report())


class _CountingSearch(HonestOptunaSearch):
    """Counts the results Tune hands ``on_trial_result`` (at module level: Tune pickles it)."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.results_seen[trial_id] = self.results_seen.get(trial_id, 0) + 1
        super().on_trial_result(trial_id, result)


ASHA_STUDY = """\
name: asha-study
architectures:
  wrn: {depth: 10, width: 1}
recipe:
  epochs: 6
  lr: {low: 0.001, high: 10.0, log: true}
search: {algorithm: random, num_samples: 12, max_concurrent: 1, seed: 0}
scheduler: {name: asha, grace_period: 1, reduction_factor: 2}
"""


@pytest.mark.slow
def test_a_trial_stopped_by_asha_at_rung_r_has_its_values_up_to_r_in_the_saved_study(
        tmp_path: Path) -> None:
    """A real Tune run with ASHA (rungs at epochs 1, 2, 4 of 6) and the sweep's searcher
    on a journal; the saved study, opened afresh with Optuna, holds for every trial
    exactly the values Tune recorded for it, epoch by epoch, up to the epoch it stopped
    at: pruned trials at a rung (the first rung included), complete ones to the end.
    Tune itself withheld each stopping result from ``on_trial_result``."""
    import tempfile

    import ray
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from ray import tune

    cfg = _cfg(ASHA_STUDY)
    journal = tmp_path / JOURNAL_FILE
    limiter, num_samples = create_searcher(cfg, study_name=cfg.name, journal=str(journal))
    limiter.searcher.__class__ = _CountingSearch
    limiter.searcher.results_seen = {}
    # A temp dir of its own (Ray's sockets need a short path; no other Ray shares it).
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    try:
        results = tune.Tuner(
            _epochs_trainable,
            tune_config=tune.TuneConfig(search_alg=limiter, scheduler=create_scheduler(cfg),
                                        num_samples=num_samples, metric="val_acc",
                                        mode="max", reuse_actors=True),
            run_config=tune.RunConfig(storage_path=str(tmp_path / "runs"), name="asha",
                                      verbose=0),
        ).fit()
    finally:
        ray.shutdown()
    assert results.num_errors == 0 and len(results) == 12

    study = optuna.load_study(study_name=cfg.name,
                              storage=JournalStorage(JournalFileBackend(str(journal))))
    by_tune_id = {t.user_attrs[TRIAL_ATTR]: t for t in study.trials}
    assert len(by_tune_id) == len(study.trials) == 12
    stops = []
    for result in results:
        history = result.metrics_dataframe
        tune_id, last = result.metrics["trial_id"], int(history["epoch"].max())
        trial = by_tune_id[tune_id]
        assert list(history["epoch"]) == list(range(1, last + 1))
        assert trial.intermediate_values == pytest.approx(
            dict(zip(history["epoch"].astype(int), history["val_acc"], strict=True)))
        if last < 6:
            assert trial.state == TrialState.PRUNED and last in (1, 2, 4), (last, trial)
            assert trial.value == pytest.approx(history["val_acc"].iloc[-1])
            stops.append(last)
        else:
            assert trial.state == TrialState.COMPLETE
        # Tune's side of it: ASHA stopped every trial (at a rung, or at max_t), and that
        # result went to on_trial_complete only.
        assert limiter.searcher.results_seen.get(tune_id, 0) == last - 1
    assert 1 in stops and any(r > 1 for r in stops), stops  # both kinds of rung


# --------------------------------------------------------- 5. starting points


def _shipped_point_files() -> list[Any]:
    params = []
    for path in sorted(SPACES.glob("*.yaml")):
        params.append(pytest.param(path, id=path.name))
    return params


@pytest.mark.parametrize("path", _shipped_point_files())
def test_points_to_evaluate_come_first_with_their_values(path: Path) -> None:
    """Every starting point of a shipped file is suggested first, in order, with each
    value the point gives (namespaced by its architecture), and builds."""
    cfg = load_sweep(path)
    points = cfg.search.points_to_evaluate
    assert points, f"{path.name} has no starting points"
    limiter, _, _ = _searcher(cfg)
    configs = _run(limiter, len(points), _score)
    for point, config in zip(points, configs, strict=True):
        arch = point.get("arch", cfg.arch_names()[0])
        assert config["arch"] == arch
        for name, value in point.items():
            if name != "arch":
                assert config[f"{arch}.{name}"] == value, (name, config)
        _build(config)


def test_smoke_first_suggestion_is_its_starting_point() -> None:
    """smoke.yaml's WRN-16-2, dropout 0.3, lr 0.1 is the first trial, with namespaced keys."""
    limiter, _, _ = _searcher(load_sweep(SPACES / "smoke.yaml"))
    first = limiter.suggest("first")
    assert first["arch"] == "wrn"
    assert {k: first[k] for k in ("wrn.depth", "wrn.width", "wrn.dropout", "wrn.lr")} == {
        "wrn.depth": 16, "wrn.width": 2, "wrn.dropout": 0.3, "wrn.lr": 0.1}


def test_single_architecture_point_needs_no_arch() -> None:
    """With one architecture, a point without ``arch`` is enqueued and honoured."""
    cfg = _cfg("""\
name: single
architectures:
  wrn: {depth: {choices: [10, 16, 22]}, width: {low: 1, high: 4}}
recipe: {epochs: 3, lr: {low: 0.02, high: 0.2, log: true}}
search:
  num_samples: 4
  points_to_evaluate:
    - {depth: 22, width: 3, lr: 0.05}
""")
    limiter, _, _ = _searcher(cfg)
    first = limiter.suggest("first")
    assert first["arch"] == "wrn"
    assert (first["wrn.depth"], first["wrn.width"], first["wrn.lr"]) == (22, 3, 0.05)


def _digits(search: str = "") -> SweepConfig:
    """tests/sweeps/papers.yaml (the bench's digits space) with more ``search`` keys."""
    text = (ROOT / "tests" / "sweeps" / "papers.yaml").read_text()
    return _cfg(text.replace("seed: 0}", f"seed: 0{search}}}"))


def _milestones(config: dict[str, Any]) -> list[float]:
    arch = config["arch"]
    space = _digits().params_for(arch)["milestones"]
    assert isinstance(space, MilestoneSpace)
    u = [config[f"{arch}.milestone_u{i + 1}"] for i in range(space.count)]
    return milestones_from_unit(u, space)


def test_tpe_starts_at_each_architectures_paper_configuration() -> None:
    """With no points_to_evaluate, TPE's first trials are the papers' headline
    configurations nearest in the space: WRN-28-10 with dropout 0.3 (Zagoruyko &
    Komodakis, section 4: lr 0.1, drops at 30/60/80 % of training) -> WRN-16-2, dropout
    0.3, milestones cut to the space's two; ResNet-20 (He et al., section 4.2: lr 0.1,
    drops at 50/75 %) as it is. Each builds; the third trial is TPE's own."""
    limiter, _, _ = _searcher(_digits())
    first, second, third = _run(limiter, 3, _score, total=8)
    assert {k: first[k] for k in ("arch", "wrn.depth", "wrn.width", "wrn.dropout", "wrn.lr")} \
        == {"arch": "wrn", "wrn.depth": 16, "wrn.width": 2, "wrn.dropout": 0.3, "wrn.lr": 0.1}
    assert _milestones(first) == pytest.approx([0.3, 0.6])
    assert (second["arch"], second["resnet.depth"], second["resnet.lr"]) == ("resnet", 20, 0.1)
    assert _milestones(second) == pytest.approx([0.5, 0.75])
    for config in (first, second):
        _build(config)
    assert third.get("wrn.lr", third.get("resnet.lr")) != 0.1


@pytest.mark.parametrize("search", [", algorithm: random", ", recipe_start: false",
                                    ", points_to_evaluate: [{arch: resnet, depth: 8}]"],
                         ids=["random", "opted-out", "own-points"])
def test_no_recipe_start_for_random_search_an_opt_out_or_a_files_own_points(
        search: str) -> None:
    """Random search stays blind (the benchmark's baseline), ``recipe_start: false``
    turns the start off, and a file's own points replace it."""
    cfg = _digits(search)
    assert not cfg.search.starts_at_recipe
    limiter, _, _ = _searcher(cfg)
    first = limiter.suggest("first")
    assert first.get(f"{first['arch']}.lr") != 0.1
    if "points" in search:
        assert (first["arch"], first["resnet.depth"]) == ("resnet", 8)


@pytest.mark.parametrize(("low", "high", "count", "expected"), [
    (0.2, 0.9, 2, [0.3, 0.6]),  # the first two: the paper's schedule for longest
    (0.4, 0.9, 2, [0.6, 0.8]),  # 0.3 is out of bounds: the next subset the space holds
    (0.2, 0.9, 3, [0.3, 0.6, 0.8]),  # the paper's own
    (0.2, 0.9, 4, None),  # more than the paper has: drawn
    (0.85, 0.95, 1, None),  # none of the paper's in bounds: drawn
])
def test_recipe_milestones_are_cut_to_the_count_the_space_holds(
        low: float, high: float, count: int, expected: list[float] | None) -> None:
    cfg = _cfg(f"""\
name: cut
architectures:
  wrn: {{depth: {{choices: [10, 16]}}}}
recipe:
  epochs: 8
  milestones: {{count: {count}, low: {low}, high: {high}, min_gap: 0.05}}
""")
    (point,) = recipe_points(cfg)
    assert point.get("milestones") == expected


def test_recipe_point_is_snapped_into_ranges() -> None:
    """Ranges: clamped to their bounds and put on their step; a string the choices
    lack is left to the sampler."""
    cfg = _cfg("""\
name: ranges
architectures:
  wrn: {depth: {low: 10, high: 40, step: 6}, width: {low: 1, high: 4}}
  resnet: {depth: {choices: [8, 14]}, shortcut: {choices: [B]}}
recipe:
  epochs: 8
  lr: {low: 0.2, high: 1.0, log: true}
  weight_decay: {low: 0.0001, high: 0.001, log: true}
""")
    wrn, resnet = recipe_points(cfg)
    assert wrn == {"arch": "wrn", "depth": 28, "width": 4, "lr": 0.2, "weight_decay": 5e-4}
    assert resnet == {"arch": "resnet", "depth": 14, "lr": 0.2, "weight_decay": 1e-4}


# ------------------------------------------------------------------ 6. milestones

SEARCHED = MilestoneSpace(count=3, low=0.2, high=0.9, min_gap=0.05)


def _assert_milestones(ms: list[float], spec: MilestoneSpace) -> None:
    assert len(ms) == spec.count
    assert all(spec.low <= m <= spec.high for m in ms), ms
    # 1e-9: float noise of a subtraction, far below any gap that matters.
    assert all(b - a >= spec.min_gap - 1e-9 for a, b in itertools.pairwise(ms)), ms
    assert all(b > a for a, b in itertools.pairwise(ms)), ms


def _unit_vectors(count: int) -> list[list[float]]:
    rng = random.Random(0)
    corners = [list(c) for c in itertools.product([0.0, 1.0], repeat=count)]
    return corners + [[0.5] * count] + [[rng.random() for _ in range(count)]
                                        for _ in range(2000)]


@pytest.mark.parametrize("spec", [
    SEARCHED,
    MilestoneSpace(count=1, low=0.1, high=0.9, min_gap=0.05),
    MilestoneSpace(count=5, low=0.1, high=0.5, min_gap=0.1),  # no freedom left
    MilestoneSpace(count=3, low=0.2, high=0.3, min_gap=0.05),  # free < 0 by float noise
], ids=["3-in-0.2-0.9", "1", "5-tight", "3-tight"])
def test_milestones_from_unit_are_increasing_in_range_and_apart(spec: MilestoneSpace) -> None:
    """Any u in [0, 1]^count, extremes included, maps to valid milestones."""
    for u in _unit_vectors(spec.count):
        ms = milestones_from_unit(u, spec)
        _assert_milestones(ms, spec)
        TrainConfig(arch="wrn", model={"depth": 16}, milestones=tuple(ms))


@pytest.mark.parametrize("searched", [
    "{count: 3, low: 0.2, high: 0.9, min_gap: 0.00003}",
    "{count: 2, low: 0.00004, high: 0.5, min_gap: 0.05}",
], ids=["tiny-gap", "tiny-low"])
def test_milestones_survive_tiny_gaps_and_bounds(searched: str) -> None:
    """Specs the validator accepts (0 < low, min_gap > 0) still give valid milestones."""
    cfg = _cfg(f"name: t\narchitectures: {{wrn: {{depth: 10}}}}\n"
               f"recipe: {{milestones: {searched}}}\n")
    spec = cfg.params_for("wrn")["milestones"]
    assert isinstance(spec, MilestoneSpace)
    for u in ([0.0] * spec.count, [1.0] * spec.count):
        ms = milestones_from_unit(u, spec)
        _assert_milestones(ms, spec)
        TrainConfig(arch="wrn", model={"depth": 16}, milestones=tuple(ms))


def test_searched_milestones_reach_the_trial() -> None:
    """Through the searcher, ``wrn.milestones`` is a valid list that TrainConfig takes."""
    cfg = _cfg("""\
name: ms
architectures:
  wrn: {depth: 10, width: 1}
recipe:
  epochs: 20
  milestones: {count: 3, low: 0.2, high: 0.9, min_gap: 0.05}
search: {num_samples: 30, seed: 1}
""")
    limiter, _, _ = _searcher(cfg)
    configs = _run(limiter, 30, lambda c: 1.0 - abs(c["wrn.milestones"][0] - 0.3))
    for config in configs:
        _assert_milestones(config["wrn.milestones"], SEARCHED)
        assert _build(config).milestones == tuple(config["wrn.milestones"])


# ------------------------------------------------------------------------ 7. grid


def test_grid_runs_each_point_exactly_once() -> None:
    """``algorithm: grid`` returns the grid size as num_samples (not the file's) and
    suggests every combination once, even with trials running concurrently."""
    cfg = _cfg("""\
name: grid
architectures:
  wrn: {depth: {choices: [10, 16]}, width: {choices: [1, 2, 4]}, dropout: 0.3}
  resnet: {depth: {choices: [8, 14]}, shortcut: {choices: [A, B]}}
recipe: {epochs: 3, lr: {choices: [0.05, 0.1]}}
search: {algorithm: grid, num_samples: 3, max_concurrent: 3}
""")
    limiter, _, num_samples = _searcher(cfg)
    expected = {("wrn", d, w, lr) for d in (10, 16) for w in (1, 2, 4) for lr in (0.05, 0.1)}
    expected |= {("resnet", d, s, lr) for d in (8, 14) for s in "AB" for lr in (0.05, 0.1)}
    assert num_samples == len(expected) == 20

    seen, running = [], []
    for i in range(num_samples):
        while len(running) == 3:  # Tune's loop: the limiter refuses a fourth trial
            assert limiter.suggest("refused") is None
            done = running.pop(0)
            limiter.on_trial_complete(done, _result(0.5, 3, 3))
        config = limiter.suggest(f"g{i}")
        arch = config["arch"]
        other = config["wrn.width"] if arch == "wrn" else config["resnet.shortcut"]
        seen.append((arch, config[f"{arch}.depth"], other, config[f"{arch}.lr"]))
        _build(config)
        running.append(f"g{i}")
    assert sorted(seen, key=str) == sorted(expected, key=str)


# -------------------------------------------------------------------- 8. TPE


@pytest.mark.parametrize(("num_samples", "expected"), [(1, 2), (6, 2), (12, 3), (32, 8),
                                                       (40, 10), (400, 10)])
def test_n_startup_trials_default(num_samples: int, expected: int) -> None:
    """A quarter of the budget, between 2 and 10; the sampler gets that number."""
    cfg = _cfg(TWO_ARCH.replace("num_samples: 30", f"num_samples: {num_samples}"))
    assert n_startup_trials(cfg) == expected == max(2, min(10, num_samples // 4))
    assert _searcher(cfg)[1]._ot_study.sampler._n_startup_trials == expected


def test_tpe_sampler_settings_and_explicit_startup() -> None:
    """search.n_startup_trials wins; TPE is multivariate with constant liar, seeded."""
    cfg = _cfg(TWO_ARCH.replace("seed: 3}", "seed: 3, n_startup_trials: 0}"))
    _, searcher, num_samples = _searcher(cfg)
    sampler = searcher._ot_study.sampler
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._n_startup_trials == 0
    assert sampler._multivariate and sampler._constant_liar
    assert searcher._ot_study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert num_samples == 30

    random_cfg = _cfg(TWO_ARCH.replace("seed: 3}", "seed: 3, algorithm: random}"))
    assert isinstance(_searcher(random_cfg)[1]._ot_study.sampler, optuna.samplers.RandomSampler)


def test_loss_metric_minimises() -> None:
    """metric val_loss gives a minimising study (mode derived from the metric)."""
    cfg = _cfg(TWO_ARCH.replace("seed: 3}", "seed: 3, metric: val_loss}"))
    study = _searcher(cfg)[1]._ot_study
    assert study.direction == optuna.study.StudyDirection.MINIMIZE


# --------------------------------------------------------------- 9. scheduler


def _sched_cfg(name: str, grace: int = 2, rf: float = 3, epochs: int = 10,
               resnet_epochs: int = 30) -> SweepConfig:
    return _cfg(f"""\
name: sched
architectures:
  wrn: {{depth: 10}}
  resnet: {{depth: 8, recipe: {{epochs: {resnet_epochs}}}}}
recipe: {{epochs: {epochs}}}
scheduler: {{name: {name}, grace_period: {grace}, reduction_factor: {rf}}}
""")


def test_asha_max_t_is_the_longest_architecture() -> None:
    """ASHA on training_iteration, max_t the largest per-arch epochs (override included)."""
    sched = create_scheduler(_sched_cfg("asha"))
    assert isinstance(sched, ASHAScheduler)
    assert sched._max_t == 30
    assert sched._time_attr == "training_iteration"
    assert sched._reduction_factor == 3
    assert create_scheduler(_sched_cfg("asha", epochs=50))._max_t == 50


def test_hyperband_and_fifo() -> None:
    """hyperband -> HyperBandScheduler on epochs, fifo -> FIFOScheduler (no rungs)."""
    hb = create_scheduler(_sched_cfg("hyperband"))
    assert isinstance(hb, HyperBandScheduler)
    assert hb._max_t_attr == 30
    assert hb._time_attr == "training_iteration"
    assert isinstance(create_scheduler(_sched_cfg("fifo")), FIFOScheduler)
    assert asha_rungs(_sched_cfg("fifo")) == []


def test_asha_rungs_of_shipped_files() -> None:
    """The rungs ``launch --dry-run`` prints for the shipped sweeps."""
    assert asha_rungs(load_sweep(SPACES / "smoke.yaml")) == [2]  # grace from the recipe
    assert asha_rungs(load_sweep(SPACES / "wrn.yaml")) == [20, 60, 180]
    assert asha_rungs(load_sweep(SPACES / "resnet.yaml")) == [16, 48, 144]


@pytest.mark.parametrize(("grace", "rf", "epochs"), [
    (1, 2, 4), (2, 3, 30), (20, 3, 200), (1, 4, 100), (5, 2, 81),
    (1, 1.5, 8),
])
def test_asha_rungs_match_the_scheduler(grace: int, rf: float, epochs: int) -> None:
    """asha_rungs lists the epochs at which the real ASHA bracket compares trials
    (a rung at milestone m acts on the first result with epoch >= m; max_t excluded)."""
    cfg = _sched_cfg("asha", grace=grace, rf=rf, epochs=epochs, resnet_epochs=epochs)
    sched = create_scheduler(cfg)
    real = sorted(math.ceil(m) for m, _ in sched._brackets[0]._rungs if m < epochs)
    assert asha_rungs(cfg) == real


def _grace_cfg(recipe: str, scheduler: str = "{name: asha}", resnet: str = "") -> SweepConfig:
    return _cfg(f"""\
name: grace
architectures:
  wrn: {{depth: 10}}
{resnet}recipe: {recipe}
scheduler: {scheduler}
""")


@pytest.mark.parametrize(("recipe", "expected"), [
    # the paper's WRN drop at 0.3: epoch 2.4 -> lr drops at the start of epoch 3 (1-based)
    ("{epochs: 8}", 3),
    ("{epochs: 200}", 61),  # 60 + 1, below half the epochs
    ("{epochs: 8, milestones: [0.5, 0.75]}", 4),  # 4 + 1 = 5, capped at half: 4
    ("{epochs: 8, milestones: [0.1, 0.5]}", 2),  # drop after epoch 1: one epoch after it
    ("{epochs: 8, milestones: []}", 4),  # no drop: half the epochs
    ("{epochs: 8, warmup_epochs: 5}", 6),  # never inside the warm-up
    # searched: the mean first of 2 draws in [0.2, 0.9] 0.1 apart is 0.4: epoch 3.2
    ("{epochs: 8, milestones: {count: 2, low: 0.2, high: 0.9, min_gap: 0.1}}", 4),
    ("{epochs: 1}", 1),
    ("{epochs: 2}", 1),
])
def test_default_grace_period_follows_the_first_lr_drop(recipe: str, expected: int) -> None:
    """One epoch after the first lr drop, at most half the epochs, never in the warm-up."""
    cfg = _grace_cfg(recipe)
    assert arch_grace_period(cfg, "wrn") == default_grace_period(cfg) == expected
    assert grace_period(cfg) == expected
    assert create_scheduler(cfg)._brackets[0]._rungs[-1][0] == expected  # the first rung


def test_default_grace_period_lands_just_after_the_drop() -> None:
    """The grace is the first epoch trained at the lowered lr: the engine's own lr_at
    drops at the start of 0-based epoch grace - 1."""
    from trainables.engine import lr_at

    for epochs in (4, 8, 10, 30, 200):
        cfg = _grace_cfg(f"{{epochs: {epochs}}}")
        grace = grace_period(cfg)
        train = TrainConfig(arch="wrn", model={"depth": 10}, epochs=epochs)
        first_drop = next(e for e in range(epochs) if lr_at(e, train) < train.lr)
        assert grace == min(first_drop + 1, math.ceil(epochs / 2)), epochs


def test_sweep_file_grace_wins_and_architectures_share_the_earliest() -> None:
    """An explicit grace_period (even 1) is kept; the default is the earliest
    architecture's (one rung serves all of them); an empty section is the default."""
    assert grace_period(_grace_cfg("{epochs: 8}", "{name: asha, grace_period: 1}")) == 1
    assert grace_period(_grace_cfg("{epochs: 8}", "{}")) == 3
    both = _grace_cfg("{epochs: 8}", resnet="  resnet: {depth: 8, recipe: {epochs: 30}}\n")
    assert {a: arch_grace_period(both, a) for a in both.arch_names()} == {"wrn": 3,
                                                                          "resnet": 15}
    assert grace_period(both) == 3
    assert asha_rungs(both) == [3, 9, 27]


def test_dry_run_schedule_lines_give_the_rungs_and_the_epochs() -> None:
    """describe_schedule: ASHA's rungs and where its grace comes from, and the most
    epochs the plan can spend (every trial to the end) beside a full rung's spend."""
    cfg = _grace_cfg("{epochs: 8, milestones: {count: 2, low: 0.2, high: 0.9}}")
    lines = describe_schedule(cfg, 16)
    assert lines[0].startswith("scheduler: ASHA on epochs, grace 4 (from the recipe")
    assert "rungs at epochs [4], max 8" in lines[0]
    # 16 x 4 epochs to the rung, then a third of them 4 more.
    assert planned_epochs(cfg, 16) == (128, pytest.approx(16 * 4 + 16 / 3 * 4))
    assert lines[1] == ("epochs: at most 128 (16 trials x 8, if ASHA passes every trial on); "
                        "about 85 when each rung passes 1/3 on")
    explicit = _grace_cfg("{epochs: 8}", "{name: asha, grace_period: 1, reduction_factor: 2}")
    assert "grace 1 (the sweep file's)" in describe_schedule(explicit, 4)[0]
    assert planned_epochs(explicit, 4) == (32, pytest.approx(4 * (1 + 1 / 2 + 2 / 4 + 4 / 8)))
    fifo = _grace_cfg("{epochs: 8}", "{name: fifo}")
    assert describe_schedule(fifo, 16) == ["scheduler: fifo",
                                           "epochs: at most 128 (16 trials x 8)"]


# ---------------------------------------------------------------- 10. resources


def test_resources_per_architecture_and_auto() -> None:
    """Each architecture gets its own request (fractional GPU kept, ``default`` for the
    rest); ``auto`` asks for a GPU share only where the cluster has GPUs; Tune reads the
    dicts."""
    cfg = _cfg("""\
name: res
architectures:
  wrn: {depth: 10}
  resnet: {depth: 8}
  diracnet: {depth: 16}
  preact_resnet: {depth: 11}
resources:
  default: {cpu: 2, gpu: 0.5}
  wrn: {cpu: 8, gpu: 1}
  resnet: {cpu: 2, gpu: 0.25}
  diracnet: auto
""")
    with_gpu = resources_fn(cfg, cluster_has_gpu=True, gpu_memory_bytes=80 * 1024**3)
    without = resources_fn(cfg, cluster_has_gpu=False)
    assert with_gpu({"arch": "wrn"}) == {"cpu": 8.0, "gpu": 1.0}
    assert with_gpu({"arch": "resnet"}) == {"cpu": 2.0, "gpu": 0.25}
    assert with_gpu({"arch": "preact_resnet"}) == {"cpu": 2.0, "gpu": 0.5}
    # auto: the share the memory estimate needs (a DiracNet-16 is small: 1/8 of a GPU).
    assert with_gpu({"arch": "diracnet", "diracnet.depth": 16}) == {"cpu": 1.0, "gpu": 0.125}
    assert without({"arch": "diracnet"}) == {"cpu": 1.0, "gpu": 0.0}
    assert without({"arch": "resnet"}) == {"cpu": 2.0, "gpu": 0.25}
    assert resource_dict_to_pg_factory(with_gpu({"arch": "resnet"})).bundles == [
        {"CPU": 2.0, "GPU": 0.25}]
    # The returned dict is a copy: Tune may not alter the table through it.
    with_gpu({"arch": "wrn"})["gpu"] = 0
    assert with_gpu({"arch": "wrn"})["gpu"] == 1.0


def test_resources_default_without_section() -> None:
    """No ``resources:`` section: one CPU, no GPU, for every architecture."""
    cfg = _cfg(TWO_ARCH)
    fn = resources_fn(cfg, cluster_has_gpu=True)
    assert all(fn({"arch": a}) == {"cpu": 1.0, "gpu": 0.0} for a in cfg.arch_names())
    assert set(cfg.arch_names()) <= set(names())


# -- TPE with a capped history --------------------------------------------------------
def _capped_study(sampler: optuna.samplers.BaseSampler, n: int) -> optuna.Study:
    """``n`` trials of a 2-parameter objective, minimised, asked and told in order."""
    study = optuna.create_study(sampler=sampler, direction="minimize")
    for _ in range(n):
        trial = study.ask()
        x = trial.suggest_float("x", -5, 5)
        k = trial.suggest_categorical("k", ["a", "b", "c"])
        study.tell(trial, (x - 1) ** 2 + {"a": 0.0, "b": 0.5, "c": 1.0}[k])
    return study


def test_capped_tpe_is_plain_tpe_up_to_the_cap() -> None:
    from orchestrator.search import CappedTPESampler

    kwargs: dict[str, Any] = {"seed": 3, "n_startup_trials": 5, "multivariate": True}
    capped = _capped_study(CappedTPESampler(max_history=40, keep_best=10, **kwargs), 40)
    plain = _capped_study(optuna.samplers.TPESampler(**kwargs), 40)
    assert [t.params for t in capped.trials] == [t.params for t in plain.trials]


def test_capped_tpe_sees_the_best_and_the_most_recent_trials_only() -> None:
    from orchestrator.search import CappedTPESampler

    sampler = CappedTPESampler(max_history=20, keep_best=5, seed=0, n_startup_trials=5,
                               multivariate=True)
    study = _capped_study(sampler, 60)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    seen = sampler._view(study)._get_trials(deepcopy=False, states=finished)
    assert len(seen) == 20
    best = sorted(study.trials, key=lambda t: t.value)[:5]
    newest = study.trials[-15:]
    assert {t.number for t in seen} >= {t.number for t in best} | {t.number for t in newest}
    assert len(study.trials) == 60  # the study itself keeps every trial
    # Optimises all the same: the best is near x=1, k=a.
    assert study.best_value < 0.5


def test_capped_tpe_rejects_a_cap_below_the_best_kept() -> None:
    from orchestrator.search import CappedTPESampler

    with pytest.raises(ValueError, match="keep_best must be in"):
        CappedTPESampler(max_history=10, keep_best=10)


def test_tpe_searcher_uses_the_capped_sampler() -> None:
    from orchestrator.search import TPE_HISTORY, CappedTPESampler

    sampler = _searcher(load_sweep(SPACES / "smoke.yaml"))[1]._ot_study.sampler
    assert isinstance(sampler, CappedTPESampler)
    assert sampler._max_history == TPE_HISTORY
