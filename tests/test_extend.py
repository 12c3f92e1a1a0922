"""`wrnsweep extend`: more trials for a finished sweep, same Optuna study, same parent run.

Real Ray, Optuna and a SQLite MLflow store; everything is read back from the
sweep folder (the study's Optuna journal) and through MlflowClient. The signing
key (orchestrator.trust) lives in a config folder of this module's own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests._meta import FinishedSweep, sweep_meta

REPO = Path(__file__).resolve().parents[1]
WRNSWEEP = str(Path(sys.executable).with_name("wrnsweep"))

pytestmark = pytest.mark.slow


def wrnsweep(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([WRNSWEEP, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env={**os.environ, "RAY_ADDRESS": ""})


def study_of(home: Path):
    """The sweep's Optuna study, read from its journal (JSON lines: no pickle)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    meta = sweep_meta(home)
    storage = JournalStorage(JournalFileBackend(str(home / "optuna-journal.jsonl")))
    return optuna.load_study(study_name=meta["name"], storage=storage)


@pytest.fixture(scope="module")
def extended(two_arch_sweep: FinishedSweep, tmp_path_factory) -> dict:
    """A copy of the session's finished 5-trial two_arch sweep, extended by 2 trials."""
    work = tmp_path_factory.mktemp("extend")
    launched = two_arch_sweep.launch
    home = two_arch_sweep.copy_to(work)
    before = [(t.number, t.params, t.state) for t in study_of(home).trials]
    result = wrnsweep("extend", str(home), "--num-samples", "2", cwd=work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"home": home, "before": before, "result": result, "work": work,
            "launched": launched}


def _best_so_far(stdout: str) -> list[float]:
    """The "best val_acc V" of each progress line."""
    return [float(v) for v in re.findall(r"\| best val_acc ([0-9.]+) \(", stdout)]


def test_extend_progress_counts_the_earlier_rounds_best(extended) -> None:
    """The extension's "best so far" starts from the launch's best, not from nothing."""
    launch_best = _best_so_far(extended["launched"].stdout)[-1]
    shown = _best_so_far(extended["result"].stdout)
    assert shown and min(shown) >= launch_best, (launch_best, shown)


def test_extend_adds_trials_to_the_same_parent_run(extended) -> None:
    from mlflow import MlflowClient

    home = extended["home"]
    meta = sweep_meta(home)
    assert meta["num_samples"] == 7 and meta["rounds"] == ("extend-1",)
    client = MlflowClient(tracking_uri=meta["tracking_uri"], registry_uri=meta["tracking_uri"])
    runs = client.search_runs(
        [meta["experiment_id"]],
        filter_string=f"tags.`mlflow.parentRunId` = '{meta['parent_run_id']}'")
    assert len(runs) == 7
    assert len({r.data.tags["wrnsweep.trial_id"] for r in runs}) == 7
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs)
    # Only one parent run in the experiment, finished again, with the new total.
    parents = [r for r in client.search_runs([meta["experiment_id"]])
               if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [meta["parent_run_id"]]
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["wrnsweep.num_samples"] == "7"
    assert parents[0].data.metrics["trials"] == 7


def test_extend_continues_the_optuna_study(extended) -> None:
    home, before = extended["home"], extended["before"]
    after = study_of(home).trials
    assert len(before) == 5 and len(after) == 7
    # The first five trials are the launch's, unchanged: the study went on, not anew.
    assert [(t.number, t.params, t.state) for t in after[:5]] == before
    assert all(t.state.is_finished() for t in after)
    # The searcher's state is JSON beside the journal: nothing of it is a pickle.
    assert not list(home.rglob("searcher-state-*.pkl"))
    assert list(home.glob("searcher-state-*.json")) and list(
        (home / "extend-1").glob("searcher-state-*.json"))


def test_extend_registers_across_rounds_without_duplicates(extended) -> None:
    from mlflow import MlflowClient

    home = extended["home"]
    meta = sweep_meta(home)
    client = MlflowClient(tracking_uri=meta["tracking_uri"], registry_uri=meta["tracking_uri"])
    versions = client.search_model_versions(f"name='{meta['registered_model']}'")
    run_ids = [v.run_id for v in versions]
    assert len(run_ids) == len(set(run_ids))  # a run registered in round 1 is not registered again
    # The ranks are those of the last ranking: 1..top_k once each; a version that fell
    # out of the top-k carries no rank.
    ranks = sorted(int(v.tags["rank"]) for v in versions if "rank" in v.tags)
    assert ranks == list(range(1, meta["top_k"] + 1)), [(v.version, v.tags) for v in versions]
    champion = client.get_model_version_by_alias(meta["registered_model"], "champion")
    best = max(client.search_runs(
        [meta["experiment_id"]],
        filter_string=f"tags.`mlflow.parentRunId` = '{meta['parent_run_id']}'"),
        key=lambda r: r.data.metrics.get("best_val_acc", -1.0))
    assert champion.run_id == best.info.run_id

    board = wrnsweep("best", str(home), "--json", cwd=extended["work"])
    assert board.returncode == 0, board.stderr
    assert len(json.loads(board.stdout)) == 7


def test_extend_rejects_bad_input(tmp_path) -> None:
    missing = wrnsweep("extend", str(tmp_path / "nope"), "--num-samples", "2", cwd=tmp_path)
    assert missing.returncode == 2 and "no such sweep folder" in missing.stderr
    assert "Traceback" not in missing.stderr
    zero = wrnsweep("extend", str(tmp_path), "--num-samples", "0", cwd=tmp_path)
    assert zero.returncode == 2 and "--num-samples must be >= 1" in zero.stderr
    not_sweep = wrnsweep("extend", str(tmp_path), "--num-samples", "1", cwd=tmp_path)
    assert not_sweep.returncode == 2 and "not a wrnsweep sweep folder" in not_sweep.stderr
