"""``wrnsweep confirm``: the search's best configurations trained again over seeds.

The end-to-end tests run a smoke-sized search on the real digits images (Ray
Tune, Optuna, a SQLite MLflow store; the cheapest network, so that the test
costs what the command does, not what a network does), then ``confirm --top 2 --seeds 3
--epochs 2`` through the installed command, and read everything back with
MlflowClient: six child runs, their tags, the parent's statistics against
numpy's over the six runs' metrics, the champion's version and alias, ``best``
and ``report``. One more copy of the finished sweep is confirmed by a driver
killed with SIGKILL mid-round and then resumed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.confirm import (
    Chosen,
    ConfirmInputError,
    ConfirmSpec,
    champion_config,
    describe,
    jobs,
    median_seed,
    paper_error,
    seeds_for,
    state_of,
)
from tests._cluster import trial_progress, wait_for
from tests._meta import sweep_meta

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "tests" / "sweeps" / "confirm.yaml"
WRNSWEEP = str(Path(sys.executable).with_name("wrnsweep"))


def wrnsweep(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([WRNSWEEP, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**os.environ, "RAY_ADDRESS": ""})


# -- the pure parts ------------------------------------------------------------------------
def test_statistics_are_numpys() -> None:
    values = [0.91, 0.935, 0.9, 0.92, 0.928]
    got = describe(values)
    assert got["n"] == 5
    assert got["mean"] == pytest.approx(np.mean(values), abs=1e-12)
    assert got["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    assert got["median"] == pytest.approx(np.median(values), abs=1e-12)
    assert (got["min"], got["max"]) == (min(values), max(values))
    assert describe([0.5])["std"] == 0.0 and describe([]) == {"n": 0}


def test_champion_is_the_best_mean_validation_and_its_median_seed() -> None:
    summaries = [{"label": "c1", "val_acc": {"n": 3, "mean": 0.90}},
                 {"label": "c2", "val_acc": {"n": 3, "mean": 0.93}}]
    assert champion_config(summaries, "train") == "c2"
    assert champion_config(summaries, "train+val") == "c1"  # no validation: search's first
    runs = [{"seed": 4, "best_val_acc": 0.95, "train_loss": 0.2},
            {"seed": 5, "best_val_acc": 0.91, "train_loss": 0.3},
            {"seed": 6, "best_val_acc": 0.92, "train_loss": 0.1}]
    assert median_seed(runs, "train")["seed"] == 6  # 0.92 is the median
    assert median_seed(runs, "train+val")["seed"] == 4  # loss 0.2 is the median
    tie = [{"seed": 7, "best_val_acc": 0.9}, {"seed": 3, "best_val_acc": 0.9}]
    assert median_seed(tie, "train")["seed"] == 3


def test_seeds_never_repeat_the_search_and_jobs_cover_every_pair() -> None:
    assert seeds_for(3, 3) == [4, 5, 6]
    chosen = [Chosen("c1", "r1", 0.9, {"arch": "resnet", "depth": 8, "lr": 0.1}),
              Chosen("c2", "r2", 0.8, {"arch": "resnet", "depth": 14, "lr": 0.05})]
    state = state_of(ConfirmSpec(top=2, seeds=2, epochs=7), "confirm-1", chosen, [4, 5])
    todo = jobs(state)
    assert [(j["wrnsweep.confirm"], j["seed"]) for j in todo] == [
        ("c1", 4), ("c1", 5), ("c2", 4), ("c2", 5)]
    assert all(j["epochs"] == 7 and j["train_on"] == "train" for j in todo)
    assert {j["wrnsweep.confirm_source"] for j in todo} == {"r1", "r2"}


def test_paper_error_for_the_same_configuration_only() -> None:
    wrn = paper_error({"arch": "wrn", "depth": 28, "width": 10, "dropout": 0.3}, "cifar10")
    assert wrn is not None and (wrn["label"], wrn["error"]) == ("WRN-28-10", 3.89)
    assert paper_error({"arch": "wrn", "depth": 28, "width": 10, "dropout": 0.3},
                       "cifar100")["error"] == 18.85
    # Another dropout is another configuration; digits has no paper.
    assert paper_error({"arch": "wrn", "depth": 28, "width": 10}, "cifar10") is None
    assert paper_error({"arch": "wrn", "depth": 28, "width": 10, "dropout": 0.3},
                       "digits") is None


@pytest.mark.parametrize(("spec", "message"), [
    (ConfirmSpec(top=0), "--top must be >= 1, got 0"),
    (ConfirmSpec(seeds=0), "--seeds must be >= 1, got 0"),
    (ConfirmSpec(epochs=0), "--epochs must be >= 1, got 0"),
    (ConfirmSpec(train_on="test"), "--train-on must be train or train+val, got 'test'"),
])
def test_spec_refuses_bad_settings(spec: ConfirmSpec, message: str) -> None:
    with pytest.raises(ConfirmInputError, match=re.escape(message)):
        spec.check()


def test_a_run_s_params_give_back_its_training_config() -> None:
    """The configuration confirm re-trains is the search trial's, read from its MLflow
    params (every resolved recipe value), the seed aside."""
    from orchestrator.config import load_sweep
    from orchestrator.confirm_round import config_from_params
    from orchestrator.tracking import run_params
    from trainables.config import TrainConfig

    cfg = load_sweep(REPO / "search_spaces" / "all.yaml")
    for trial in ({"arch": "wrn", "wrn.depth": 16, "wrn.width": 4, "wrn.dropout": 0.3,
                   "lr": 0.05, "milestones": [0.3, 0.6, 0.8], "epochs": 20, "seed": 0},
                  {"arch": "diracnet", "diracnet.depth": 28, "diracnet.width": 2, "lr": 0.1,
                   "seed": 0}):
        flat = {k.split(".")[-1]: v for k, v in trial.items()}
        back = config_from_params(run_params(trial), cfg)
        want = TrainConfig.from_dict({**cfg.dataset_options(), **flat, "seed": 9})
        assert TrainConfig.from_dict({**back, "seed": 9}) == want


def test_a_seed_changes_the_run_and_the_same_seed_repeats_it_on_cpu() -> None:
    """Same seed: the same numbers, bit for bit; another seed: other initial weights and
    batches, and the same validation and test images."""
    import torch

    from trainables.config import TrainConfig
    from trainables.data import load_splits
    from trainables.engine import Trainer, train

    splits = load_splits("digits")
    base = {"arch": "resnet", "depth": 8, "dataset": "digits", "epochs": 1, "batch_size": 64,
            "device": "cpu", "num_threads": 1}
    runs = [train(TrainConfig.from_dict({**base, "seed": s}), splits=splits)
            for s in (4, 4, 5)]
    numbers = [(r["best_val_acc"], r["test_acc"]) for r in runs]
    assert numbers[0] == numbers[1]
    # The trained weights, not the accuracies: after one epoch both seeds' networks may
    # still answer one class for every image (0.1 and 0.1037 for seeds 4 and 5 alike with
    # the versions of constraints.txt), and equal accuracies say nothing about the run.
    weights = [list(r["trainer"].model.state_dict().values()) for r in runs]
    assert all(torch.equal(x, y) for x, y in zip(weights[0], weights[1], strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(weights[0], weights[2], strict=True))
    a, b = (Trainer(TrainConfig.from_dict({**base, "seed": s}), splits=splits) for s in (4, 5))
    assert not all(np.array_equal(x, y) for x, y in zip(
        a.model.state_dict().values(), b.model.state_dict().values(), strict=True))
    again = load_splits("digits")  # the split takes no run seed: always the same images
    assert torch.equal(again.val.images, splits.val.images)
    assert torch.equal(again.test.labels, splits.test.labels)


def test_train_plus_val_trains_on_every_training_image_and_reports_no_validation() -> None:
    from trainables.config import TrainConfig
    from trainables.data import load_splits
    from trainables.engine import Trainer

    splits = load_splits("digits")
    trainer = Trainer(TrainConfig.from_dict({"arch": "resnet", "depth": 8, "dataset": "digits",
                                             "epochs": 1, "train_on": "train+val",
                                             "num_threads": 1}), splits=splits)
    assert trainer.train_loader._n == len(splits.train.labels) + len(splits.val.labels)
    metrics = trainer.run_epoch().metrics
    assert "val_acc" not in metrics and "train_loss" in metrics
    with pytest.raises(ValueError, match="train_on must be one of train, train"):
        TrainConfig.from_dict({"arch": "resnet", "train_on": "test"})


# -- the command -----------------------------------------------------------------------------
def test_bad_confirm_input_exits_2_with_one_line(tmp_path: Path) -> None:
    not_a_sweep = tmp_path / "not-a-sweep"
    not_a_sweep.mkdir()
    cases = [
        (["confirm", str(not_a_sweep), "--top", "0"], "--top must be >= 1, got 0"),
        (["confirm", str(not_a_sweep), "--seeds", "0"], "--seeds must be >= 1, got 0"),
        (["confirm", str(not_a_sweep), "--train-on", "test"], "--train-on must be train or"),
        (["confirm", str(tmp_path / "nowhere")], "no such sweep folder"),
        (["confirm", str(not_a_sweep)], "not a wrnsweep sweep folder"),
    ]
    for args, want in cases:
        ran = wrnsweep(*args, cwd=tmp_path)
        assert ran.returncode == 2, (args, ran.stderr)
        assert len(ran.stderr.splitlines()) == 1 and want in ran.stderr, (args, ran.stderr)
        assert "Traceback" not in ran.stderr
    assert list(not_a_sweep.iterdir()) == []


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke-sized search finished on digits (tests/sweeps/confirm.yaml: ResNet-8 at
    three learning rates, two epochs); a copy is kept for the kill test."""
    work = tmp_path_factory.mktemp("confirm")
    ran = wrnsweep("launch", str(SWEEP), "--storage", str(work / "runs"), cwd=work)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    shutil.copytree(work / "runs" / "confirm", work / "pristine" / "confirm")
    return work


def _client(home: Path):
    from mlflow import MlflowClient

    meta = sweep_meta(home)
    return MlflowClient(tracking_uri=meta["tracking_uri"],
                        registry_uri=meta["tracking_uri"]), meta


def _confirm_runs(client, meta) -> list:
    return client.search_runs(
        [meta["experiment_id"]],
        filter_string=f"tags.`mlflow.parentRunId` = '{meta['parent_run_id']}' and "
                      "tags.`wrnsweep.confirm_round` = 'confirm-1'", max_results=100)


@pytest.mark.slow
def test_confirm_top_2_with_3_seeds(searched: Path) -> None:
    home = searched / "runs" / "confirm"
    client, meta = _client(home)
    search_board = json.loads(wrnsweep("best", str(home), "--json", cwd=searched).stdout)
    before = client.get_model_version_by_alias("confirm", "champion")

    ran = wrnsweep("confirm", str(home), "--top", "2", "--seeds", "3", "--epochs", "2",
                   cwd=searched)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "Traceback" not in ran.stderr

    runs = _confirm_runs(client, meta)
    pairs = sorted((r.data.tags["wrnsweep.confirm"], int(r.data.tags["wrnsweep.confirm_seed"]))
                   for r in runs)
    # The search seed is 3: the confirm seeds are 4, 5, 6.
    assert pairs == [(c, s) for c in ("c1", "c2") for s in (4, 5, 6)]
    assert all(r.info.status == "FINISHED" for r in runs)
    sources = {r.data.tags["wrnsweep.confirm"]: r.data.tags["wrnsweep.confirm_source"]
               for r in runs}
    assert sources == {"c1": search_board[0]["run_id"], "c2": search_board[1]["run_id"]}
    for run in runs:  # per-epoch metrics, and the search run's configuration
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2]
        source = client.get_run(sources[run.data.tags["wrnsweep.confirm"]]).data.params
        assert run.data.params["lr"] == source["lr"]
        assert run.data.params["seed"] == run.data.tags["wrnsweep.confirm_seed"]

    parent = client.get_run(meta["parent_run_id"])
    assert parent.info.status == "FINISHED"
    summary = json.loads(parent.data.tags["wrnsweep.confirm.summary"])
    for label in ("c1", "c2"):
        mine = [r for r in runs if r.data.tags["wrnsweep.confirm"] == label]
        test = np.array([r.data.metrics["test_acc"] for r in mine])
        val = np.array([r.data.metrics["best_val_acc"] for r in mine])
        m = parent.data.metrics
        key = f"confirm/confirm-1/{label}"
        assert m[f"{key}/test_acc_n"] == 3
        assert m[f"{key}/test_acc_mean"] == pytest.approx(test.mean(), abs=1e-9)
        assert m[f"{key}/test_acc_std"] == pytest.approx(test.std(ddof=1), abs=1e-9)
        assert m[f"{key}/test_acc_median"] == pytest.approx(np.median(test), abs=1e-9)
        assert m[f"{key}/test_error_mean"] == pytest.approx(100 * (1 - test).mean(), abs=1e-7)
        assert m[f"{key}/val_acc_mean"] == pytest.approx(val.mean(), abs=1e-9)
        assert (m[f"{key}/test_acc_min"], m[f"{key}/test_acc_max"]) == pytest.approx(
            (test.min(), test.max()))

    # The champion: the configuration with the best mean val_acc, its median seed.
    means = {c["label"]: c["val_acc"]["mean"] for c in summary["configs"]}
    best_label = max(means, key=lambda k: means[k])
    assert summary["champion"] == best_label
    champion = client.get_model_version_by_alias("confirm", "champion")
    assert champion.version != before.version
    chosen = client.get_run(champion.run_id)
    assert chosen.data.tags["wrnsweep.confirm"] == best_label
    mine = [r for r in runs if r.data.tags["wrnsweep.confirm"] == best_label]
    vals = sorted(r.data.metrics["best_val_acc"] for r in mine)
    assert chosen.data.metrics["best_val_acc"] == vals[1]  # the median of three
    assert champion.tags["confirm.n"] == "3"
    assert float(champion.tags["confirm.test_acc_mean"]) == pytest.approx(
        np.mean([r.data.metrics["test_acc"] for r in mine]))

    shown = wrnsweep("best", str(home), cwd=searched)
    assert "confirmed (confirm-1): top 2 configurations of the search, 3 seeds each" in \
        shown.stdout
    board = json.loads(wrnsweep("best", str(home), "--json", cwd=searched).stdout)
    assert [r["run_id"] for r in board] == [r["run_id"] for r in search_board]
    assert board[0]["confirm"]["test_acc"]["n"] == 3
    reported = wrnsweep("report", str(home), cwd=searched)
    assert reported.returncode == 0, reported.stderr[-2000:]
    page = (home / "report" / "report.html").read_text()
    assert "Confirmed over seeds" in page and "test error over seeds" in page
    assert (home / "report" / "confirm.png").stat().st_size > 1000


@pytest.mark.slow
def test_confirm_killed_mid_round_resumes_without_duplicates(searched: Path) -> None:
    home = searched / "pristine" / "confirm"
    runs_file = home / "mlflow-runs.confirm-1.json"
    driver = subprocess.Popen(
        [WRNSWEEP, "confirm", str(home), "--top", "2", "--seeds", "2", "--epochs", "1"],
        cwd=searched, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, env={**os.environ, "RAY_ADDRESS": ""})

    def mid_round() -> bool:
        if driver.poll() is not None:
            raise AssertionError("the confirm round ended before it could be killed")
        return any(epoch >= 1 for epoch in trial_progress(runs_file).values())

    wait_for(mid_round, 300, "a confirm run with a logged epoch")
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started
    driver.wait(timeout=60)
    client, meta = _client(home)
    assert client.get_run(meta["parent_run_id"]).info.status == "RUNNING"

    resumed = wrnsweep("resume", str(home), cwd=searched)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    runs = _confirm_runs(client, meta)
    pairs = sorted((r.data.tags["wrnsweep.confirm"], r.data.tags["wrnsweep.confirm_seed"])
                   for r in runs)
    assert pairs == [("c1", "4"), ("c1", "5"), ("c2", "4"), ("c2", "5")]  # none twice
    assert not [r for r in runs if r.info.status == "RUNNING"]
    parent = client.get_run(meta["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["confirm/confirm-1/c1/test_acc_n"] == 2
    assert parent.data.metrics["confirm/confirm-1/c2/test_acc_n"] == 2
    again = wrnsweep("resume", str(home), cwd=searched)
    assert again.returncode == 0 and "nothing to resume" in again.stdout
