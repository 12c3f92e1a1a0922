"""The Ray function trainable under a real local Ray: one two-epoch trial."""

from __future__ import annotations

import pytest

from trainables.trainable import trial_config


def test_namespaced_keys_are_stripped_for_the_sampled_arch() -> None:
    config = {"arch": "wrn", "wrn.depth": 16, "resnet.depth": 20, "lr": 0.1, "depth": 99}
    assert trial_config(config) == {"arch": "wrn", "depth": 16, "lr": 0.1}


@pytest.mark.slow
def test_two_epoch_trial_reports_every_epoch_with_a_checkpoint(tmp_path) -> None:
    ray = pytest.importorskip("ray")
    from ray import tune

    from trainables.data import load_splits
    from trainables.engine import load_checkpoint
    from trainables.trainable import train_trial

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        splits = load_splits("synthetic", synthetic_size=256)
        trainable = tune.with_resources(tune.with_parameters(train_trial, splits=splits),
                                        {"cpu": 2})
        tuner = tune.Tuner(
            trainable,
            param_space={"arch": "wrn", "wrn.depth": 10, "wrn.width": 1, "wrn.dropout": 0.0,
                         "dataset": "synthetic", "synthetic_size": 256, "epochs": 2,
                         "batch_size": 64, "device": "cpu"},
            run_config=tune.RunConfig(storage_path=str(tmp_path), name="one-trial"),
        )
        results = tuner.fit()
    finally:
        ray.shutdown()
    assert results.num_errors == 0
    result = results[0]
    history = result.metrics_dataframe
    assert list(history["epoch"]) == [1, 2]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds",
            "images_per_second", "num_params"} <= set(history.columns)
    assert history["test_acc"].isna().tolist() == [True, False]  # only at the end
    assert 0.0 <= result.metrics["test_acc"] <= 1.0
    assert result.metrics["num_params"] == 77_850  # WRN-10-1, 10 classes
    with result.checkpoint.as_directory() as folder:
        state = load_checkpoint(folder)
    assert state["epoch"] == 2
    assert state["config"]["depth"] == 10
    assert state["config"]["num_threads"] == 2  # the trial's CPUs, not every core
