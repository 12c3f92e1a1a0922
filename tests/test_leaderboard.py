"""The lines a person reads: the terminal progress of a sweep and its leaderboard.

Progress is driven with stand-in trials (Tune's callback API, no Ray cluster);
the leaderboard reads runs from a real SQLite MLflow store.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from orchestrator.leaderboard import format_table, leaderboard, param_value
from orchestrator.progress import ConsoleProgress
from orchestrator.store import PARENT_TAG, mlflow_client
from trainables.result import EpochResult


def _trial(trial_id: str, status: str = "RUNNING", **extra: Any) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, status=status, config={"arch": "wrn"},
                           last_result=extra.pop("last_result", None), **extra)


def _result(epoch: int, total: int, val_acc: float, **extra: Any) -> dict[str, Any]:
    return EpochResult(epoch=epoch, total_epochs=total, metrics={"val_acc": val_acc},
                       **extra).report()


def test_progress_lines_say_counts_epoch_score_and_best() -> None:
    lines: list[str] = []
    progress = ConsoleProgress(metric="val_acc", mode="max", num_samples=3, echo=lines.append)
    a, b = _trial("t_a"), _trial("t_b")
    progress.on_trial_result(0, [a, b], a, _result(1, 4, 0.51234))
    progress.on_trial_result(0, [a, b], b, _result(1, 4, 0.4))
    assert lines == [
        "[2 running, 0/3 done] t_a wrn epoch 1/4 val_acc 0.5123 | best val_acc 0.5123 (t_a)",
        "[2 running, 0/3 done] t_b wrn epoch 1/4 val_acc 0.4000 | best val_acc 0.5123 (t_a)",
    ]


def test_progress_best_follows_the_mode() -> None:
    lines: list[str] = []
    progress = ConsoleProgress(metric="val_loss", mode="min", num_samples=2, echo=lines.append)
    a = _trial("t_a")
    for loss in (0.9, 0.5, 0.7):
        progress.on_trial_result(0, [a], a, {**_result(1, 3, 0.5), "val_loss": loss})
    assert lines[-1].endswith("| best val_loss 0.5000 (t_a)")


@pytest.mark.parametrize(("last", "how"), [
    (_result(4, 4, 0.9), "finished"),
    (_result(2, 4, 0.6), "stopped early at epoch 2"),
    (EpochResult(epoch=3, total_epochs=4, diverged=True).report(), "diverged"),
], ids=["finished", "pruned", "diverged"])
def test_progress_says_how_a_trial_ended(last: dict[str, Any], how: str) -> None:
    lines: list[str] = []
    progress = ConsoleProgress(metric="val_acc", mode="max", num_samples=1, echo=lines.append)
    trial = _trial("t_a", status="TERMINATED", last_result=last)
    progress.on_trial_complete(0, [trial], trial)
    assert lines == [f"[0 running, 1/1 done] t_a {how}"]


def test_progress_failure_line_is_plain_text() -> None:
    lines: list[str] = []
    progress = ConsoleProgress(metric="val_acc", mode="max", num_samples=2, echo=lines.append)
    trial = _trial("t_a", status="ERROR",
                   error_msg="Traceback (most recent call last):\n  File x\nValueError: boom\n")
    progress.on_trial_error(0, [trial], trial)
    assert lines == ["[0 running, 1/2 done] t_a FAILED: ValueError: boom"]


def test_param_values_are_numbers_again() -> None:
    assert param_value("8") == 8 and isinstance(param_value("8"), int)
    assert param_value("0.08849609528383273") == pytest.approx(0.0884960952838)
    assert param_value("A") == "A"
    assert param_value("n/a") is None and param_value(None) is None


@pytest.fixture()
def store(tmp_path: Path) -> tuple[Any, SimpleNamespace]:
    """A parent run with three trial runs: two WRNs (one pruned) and a ResNet."""
    client = mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("lb", artifact_location=str(tmp_path / "art"))
    parent = client.create_run(exp, run_name="lb").info.run_id
    trials = [
        ("wrn-10-2-a", {"arch": "wrn", "depth": "10", "width": "2", "dropout": "0.3",
                        "shortcut": "n/a", "lr": "0.08849609528383273",
                        "milestones": "0.3,0.6,0.8"}, 0.91234, {}),
        ("wrn-16-1-b", {"arch": "wrn", "depth": "16", "width": "1", "dropout": "0.0",
                        "shortcut": "n/a", "lr": "0.1", "milestones": "0.5"}, 0.5,
         {"wrnsweep.pruned": "true", "wrnsweep.stopped_at_epoch": "1"}),
        ("resnet-8-1-c", {"arch": "resnet", "depth": "8", "width": "1", "dropout": "n/a",
                          "shortcut": "B", "lr": "0.05", "milestones": "0.5,0.75"}, 0.95, {}),
    ]
    for name, params, best, tags in trials:
        run = client.create_run(exp, run_name=name, tags={PARENT_TAG: parent, **tags})
        for k, v in params.items():
            client.log_param(run.info.run_id, k, v)
        client.log_metric(run.info.run_id, "best_val_acc", best)
        client.log_metric(run.info.run_id, "num_params", 123_456)
        client.log_metric(run.info.run_id, "epoch", 1 if tags else 3)
        client.set_terminated(run.info.run_id, "KILLED" if tags else "FINISHED")
    plan = SimpleNamespace(experiment_id=exp, parent_run_id=parent, metric="val_acc",
                           mode="max")
    return client, plan


def test_leaderboard_rows_are_typed_and_ranked(store: tuple[Any, SimpleNamespace]) -> None:
    client, plan = store
    rows = leaderboard(client, plan)
    assert [r["run"] for r in rows] == ["resnet-8-1-c", "wrn-10-2-a", "wrn-16-1-b"]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    first, second, third = rows
    assert first["best_val_acc"] == 0.95 and "best" not in first
    assert first["depth"] == 8 and first["shortcut"] == "B" and "dropout" not in first
    assert second["lr"] == pytest.approx(0.08849609528383273) and second["dropout"] == 0.3
    assert second["milestones"] == [0.3, 0.6, 0.8]
    assert third["status"] == "PRUNED@1"
    assert json.loads(json.dumps(rows)) == rows  # plain JSON: numbers stay numbers
    assert leaderboard(client, plan, top=1) == rows[:1]


def test_leaderboard_table_is_readable(store: tuple[Any, SimpleNamespace]) -> None:
    client, plan = store
    table = format_table(leaderboard(client, plan), "val_acc").splitlines()
    header = table[0].split()
    assert header[:3] == ["rank", "run", "arch"]
    assert header[3:8] == ["depth", "width", "dropout", "shortcut", "lr"]
    assert table[0].rstrip().endswith("best val_acc  test_acc")
    wrn = table[2].split()
    assert wrn[:8] == ["2", "wrn-10-2-a", "wrn", "10", "2", "0.3", "-", "0.0885"]
    assert wrn[8] == "0.3,0.6,0.8" and wrn[9] == "123,456" and wrn[-2] == "0.9123"
