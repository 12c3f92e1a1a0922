"""`wrnsweep train`: one configuration without Ray, driven as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WRNSWEEP = str(Path(sys.executable).with_name("wrnsweep"))


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([WRNSWEEP, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


def test_train_writes_metrics_and_checkpoint_then_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--arch", "wrn", "--depth", "10", "--width", "1", "--dropout", "0.3",
            "--dataset", "synthetic", "--batch-size", "64", "--device", "cpu", "--out", str(out)]
    first = run(*args, "--epochs", "2")
    assert first.returncode == 0, first.stderr
    assert "epoch   1/2" in first.stdout and "epoch   2/2" in first.stdout
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert {"train_loss", "val_acc", "lr", "images_per_second"} <= set(lines[0])
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2

    # Same options, more epochs, --resume: a mismatched config is refused ...
    mismatch = run(*args, "--epochs", "3", "--resume")
    assert mismatch.returncode == 2
    assert "written by another configuration" in mismatch.stderr
    assert "Traceback" not in mismatch.stderr


def test_bad_input_exits_2_with_the_rule_and_no_traceback(tmp_path: Path) -> None:
    result = run("train", "--arch", "wrn", "--depth", "27", "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert "WRN depth must be 6n+4 (10, 16, 22, 28, ...), got depth=27" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()  # nothing started
    result = run("train", "--arch", "wrn", "--depth", "16", "--milestones", "0.5,x")
    assert result.returncode == 2
    assert "--milestones" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--arch", "wrn", "--momentum", "1.5"], "momentum must be in [0, 1), got momentum=1.5"),
    (["--arch", "wrn", "--threads", "0"], "num_threads must be >= 1, got num_threads=0"),
    (["--arch", "resnet", "--dropout", "0.3"],
     "--dropout is not a hyperparameter of resnet (resnet takes depth, width, shortcut, init)"),
    (["--arch", "wrn", "--momentum", "0"], "nesterov needs momentum > 0, got momentum=0"),
], ids=["momentum", "threads", "foreign-hparam", "nesterov-without-momentum"])
def test_bad_training_settings_are_refused(tmp_path: Path, args: list[str], message: str) -> None:
    """The same bounds as sweep files (trainables.config.RECIPE_BOUNDS), nothing written."""
    result = run("train", *args, "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"Error: {message}"]
    assert not (tmp_path / "x").exists()


def test_an_out_folder_with_a_run_needs_resume_or_force(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--arch", "resnet", "--depth", "8", "--dataset", "digits",
            "--batch-size", "64", "--device", "cpu", "--threads", "1", "--epochs", "2",
            "--out", str(out)]
    assert run(*args).returncode == 0
    before = (out / "metrics.jsonl").read_text()
    best = max(json.loads(x)["val_acc"] for x in before.splitlines())

    again = run(*args)  # the same command twice would mix two runs in one folder
    assert again.returncode == 2
    assert "--resume continues it, --force starts over" in again.stderr
    assert "Traceback" not in again.stderr
    assert (out / "metrics.jsonl").read_text() == before

    # Resuming a finished run trains nothing and reports the run's own best.
    finished = run(*args, "--resume")
    assert finished.returncode == 0, finished.stderr
    assert f"best val_acc {best:.4f}" in finished.stdout
    assert (out / "metrics.jsonl").read_text() == before

    forced = run(*args[:-4], "--epochs", "1", "--out", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1]


def test_missing_cifar_is_a_clear_error(tmp_path: Path) -> None:
    result = run("train", "--arch", "resnet", "--depth", "20", "--dataset", "cifar10",
                 "--data-root", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2, result.stderr
    assert "download" in result.stderr.lower()
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option", [
    "--arch", "--depth", "--width", "--dropout", "--shortcut", "--variant", "--dataset",
    "--data-root", "--download", "--epochs", "--batch-size", "--lr", "--momentum", "--nesterov",
    "--weight-decay", "--milestones", "--gamma", "--warmup-epochs", "--label-smoothing",
    "--seed", "--device", "--amp", "--channels-last", "--compile", "--threads", "--out",
    "--resume", "--force", "--init", "--stride-on",
])
def test_help_documents_every_option(option: str) -> None:
    from click.testing import CliRunner

    from orchestrator.cli import main

    result = CliRunner().invoke(main, ["train", "--help"])
    assert result.exit_code == 0
    assert option in result.output
