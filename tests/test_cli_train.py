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
    "--resume",
])
def test_help_documents_every_option(option: str) -> None:
    from click.testing import CliRunner

    from orchestrator.cli import main

    result = CliRunner().invoke(main, ["train", "--help"])
    assert result.exit_code == 0
    assert option in result.output
