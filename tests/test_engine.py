"""The Ray-free engine: schedule, exact resume, learning, divergence, checkpoints."""

from __future__ import annotations

import pytest
import torch

from trainables.config import TrainConfig
from trainables.data import load_splits
from trainables.engine import Trainer, load_checkpoint, lr_at, save_checkpoint, train

SMALL = dict(arch="resnet", depth=8, dataset="synthetic", synthetic_size=512, batch_size=64,
             device="cpu", num_threads=2)


@pytest.fixture(scope="module")
def splits():
    return load_splits("synthetic", synthetic_size=512)


def test_wrn_paper_schedule() -> None:
    cfg = TrainConfig.from_dict(dict(arch="wrn", depth=28, width=10, epochs=200))
    assert cfg.milestone_epochs() == [60, 120, 160]
    rates = [lr_at(e, cfg) for e in (0, 59, 60, 119, 120, 159, 160, 199)]
    assert rates == pytest.approx([0.1, 0.1, 0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008])


def test_resnet_paper_recipe_is_the_default() -> None:
    cfg = TrainConfig.from_dict(dict(arch="resnet", depth=110, epochs=164))
    assert (cfg.nesterov, cfg.weight_decay, cfg.gamma) == (False, 1e-4, 0.1)
    assert cfg.milestone_epochs() == [82, 123]
    assert lr_at(81, cfg) == pytest.approx(0.1)
    assert lr_at(82, cfg) == pytest.approx(0.01)
    assert lr_at(123, cfg) == pytest.approx(0.001)
    wrn = TrainConfig.from_dict(dict(arch="wrn", depth=16))
    assert (wrn.nesterov, wrn.weight_decay, wrn.gamma) == (True, 5e-4, 0.2)


def test_warmup_rises_linearly_from_a_tenth() -> None:
    cfg = TrainConfig.from_dict(dict(arch="wrn", depth=16, epochs=100, warmup_epochs=4))
    assert [lr_at(e, cfg) for e in range(5)] == pytest.approx([0.01, 0.0325, 0.055, 0.0775, 0.1])


def test_config_round_trips_and_rejects_bad_values() -> None:
    cfg = TrainConfig.from_dict(dict(arch="diracnet", depth=16, variant="v1", lr=0.05))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.model_hparams() == {"depth": 16, "width": 1, "variant": "v1", "init": "fan_in"}
    with pytest.raises(ValueError, match=r"milestones must be strictly increasing .* got "
                                         r"milestones=\[0.6, 0.3\]"):
        TrainConfig.from_dict(dict(arch="wrn", depth=16, milestones=[0.6, 0.3]))
    with pytest.raises(ValueError, match=r"lr must be > 0, got lr=-0\.1"):
        TrainConfig.from_dict(dict(arch="wrn", depth=16, lr=-0.1))


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_resume_from_checkpoint_gives_identical_weights(splits, tmp_path) -> None:
    """Train 3 epochs straight vs 1 epoch, checkpoint to disk, reload, 2 more epochs.

    WRN with dropout: the dropout masks come from the global RNG, so this also
    proves that the RNG state travels with the checkpoint.
    """
    cfg = TrainConfig.from_dict({**SMALL, "arch": "wrn", "depth": 10, "width": 1,
                                 "dropout": 0.3, "epochs": 3})
    straight = Trainer(cfg, splits=splits)
    for _ in range(3):
        straight.run_epoch()

    first = Trainer(cfg, splits=splits)
    first.run_epoch()
    save_checkpoint(first.state_dict(), tmp_path)
    torch.manual_seed(1234)  # disturb the global RNG: the checkpoint must restore it
    resumed = Trainer(cfg, splits=splits)
    resumed.load_state_dict(load_checkpoint(tmp_path))
    assert resumed.epoch == 1
    while resumed.epoch < cfg.epochs:
        resumed.run_epoch()

    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"


def test_learns_synthetic_set_well_above_chance() -> None:
    cfg = TrainConfig.from_dict({**SMALL, "synthetic_size": 1024, "epochs": 4, "lr": 0.05,
                                 "milestones": [0.75]})
    splits = load_splits("synthetic", synthetic_size=1024)
    epochs: list[dict[str, float]] = []
    summary = train(cfg, splits=splits, on_epoch=lambda e, m, t: epochs.append(m))
    assert summary["status"] == "finished"
    assert [set(m) for m in epochs] == [{"train_loss", "train_acc", "val_loss", "val_acc", "lr",
                                         "epoch_seconds", "images_per_second"}] * 4
    assert all(0.0 <= m["val_acc"] <= 1.0 for m in epochs)
    assert summary["best_val_acc"] > 0.7  # chance is 0.1
    assert summary["test_acc"] > 0.7


def test_divergence_ends_with_a_status_not_a_crash(splits) -> None:
    """A NaN loss (here: a poisoned weight, as after an lr blow-up) ends training cleanly."""
    cfg = TrainConfig.from_dict({**SMALL, "epochs": 3})
    trainer = Trainer(cfg, splits=splits)
    with torch.no_grad():
        trainer.model.fc.weight[0, 0] = float("nan")
    assert trainer.run_epoch().diverged
    summary = train(cfg, splits=splits, state=trainer.state_dict())
    assert summary["status"] == "diverged"
    assert summary["epochs"] == 0
    assert summary["test_acc"] is None


def test_checkpoint_loads_without_unpickling_code(splits, tmp_path) -> None:
    cfg = TrainConfig.from_dict({**SMALL, "epochs": 1})
    trainer = Trainer(cfg, splits=splits)
    trainer.run_epoch()
    path = save_checkpoint(trainer.state_dict(), tmp_path)
    state = torch.load(path, weights_only=True)  # raises if anything needs unpickling
    assert state["epoch"] == 1
    assert TrainConfig.from_dict(state["config"]) == cfg


def test_cpu_run_honours_thread_count(splits) -> None:
    before = torch.get_num_threads()
    try:
        Trainer(TrainConfig.from_dict({**SMALL, "num_threads": 1}), splits=splits)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_compile_replays_cuda_graphs_and_trains_as_eager_does() -> None:
    """``compile: true`` on CUDA is torch.compile with CUDA graphs; its epochs (train,
    validation with a last partial batch, test) match eager ones from the same seed up
    to bf16 noise. Run on an H200: losses within 0.002, val_acc within one image
    (bench/results/h200-compile_epochs.log)."""
    recipe = dict(arch="resnet", depth=8, dataset="synthetic", synthetic_size=2_000,
                  batch_size=128, epochs=3, device="cuda")
    data = load_splits("synthetic", synthetic_size=2_000)
    graphs = Trainer(TrainConfig.from_dict({**recipe, "compile": True}), splits=data)
    eager = Trainer(TrainConfig.from_dict(recipe), splits=data)
    one_image = 1 / len(data.val.labels)
    for _ in range(3):
        a, b = graphs.run_epoch().metrics, eager.run_epoch().metrics
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=0.01)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=0.02)
        assert abs(a["val_acc"] - b["val_acc"]) <= 3 * one_image
    assert graphs.evaluate(graphs.test_loader)[1] == pytest.approx(
        eager.evaluate(eager.test_loader)[1], abs=0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_uses_bf16_autocast_and_channels_last(splits) -> None:
    cfg = TrainConfig.from_dict({**SMALL, "device": "cuda", "epochs": 1})
    trainer = Trainer(cfg, splits=splits)
    assert trainer.autocast_dtype == torch.bfloat16
    assert trainer.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert trainer.run_epoch().metrics["val_acc"] >= 0
