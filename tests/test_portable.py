"""A sweep folder is portable: its plan names it by relative paths, its store is re-pointed.

The whole path on a real sweep (moved, renamed, copied with the original deleted,
then best / report / ui / export / extend / resume) is in ``test_sweep_e2e.py``;
here the pieces, without Ray: the plan's round trip, folders saved by older
versions (absolute paths), and the store's relocation on a real SQLite MLflow store.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from orchestrator.manifest import FORMAT, META_FILE, Manifest, ManifestError
from orchestrator.store import relocate_store


def _plan(home: Path, **fields) -> Manifest:
    values = dict(name="p", sweep_file="/somewhere/p.yaml", storage_path=str(home.parent),
                  home=str(home), tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
                  experiment="p", registered_model="p", address=None, metric="val_acc",
                  mode="max", num_samples=4, top_k=1, experiment_id="1", parent_run_id="abc")
    return Manifest(**{**values, **fields})


def test_the_plan_is_saved_with_paths_relative_to_its_folder(tmp_path: Path) -> None:
    home = tmp_path / "runs" / "p"
    _plan(home).save()
    saved = json.loads((home / META_FILE).read_text())
    assert saved["home"] == "." and saved["storage_path"] == ".."
    assert saved["tracking_uri"] == "sqlite:///./mlflow.db"
    assert [k for k, v in saved.items() if isinstance(v, str) and str(tmp_path) in v] == []

    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    home.rename(moved)
    plan = Manifest.load(moved)
    assert plan.home == str(moved) and plan.storage_path == str(moved.parent)
    assert plan.tracking_uri == f"sqlite:///{moved / 'mlflow.db'}"
    assert plan.experiment_path == str(moved)  # the folder under its present name


def test_a_server_store_and_uri_storage_stay_as_given(tmp_path: Path) -> None:
    home = tmp_path / "p"
    _plan(home, tracking_uri="http://127.0.0.1:5000", storage_path="s3://bucket/sweeps").save()
    saved = json.loads((home / META_FILE).read_text())
    assert saved["tracking_uri"] == "http://127.0.0.1:5000"
    assert saved["storage_path"] == "s3://bucket/sweeps"
    plan = Manifest.load(home)
    assert plan.experiment_path == "s3://bucket/sweeps/p"


def test_a_folder_saved_with_absolute_paths_loads_where_it_is_now(tmp_path: Path) -> None:
    """Folders written before plans were portable: paths under the old place move along."""
    old = Path("/data/cluster/runs/p")
    new = tmp_path / "copy"
    new.mkdir()
    (new / META_FILE).write_text(json.dumps({
        "name": "p", "sweep_file": "/data/cluster/p.yaml", "storage_path": str(old.parent),
        "home": str(old), "tracking_uri": f"sqlite:///{old / 'mlflow.db'}",
        "experiment": "p", "registered_model": "p", "address": None, "metric": "val_acc",
        "mode": "max", "num_samples": 4, "top_k": 1, "experiment_id": "1",
        "parent_run_id": "abc", "extra": {"rounds": ["extend-1"]}}))
    plan = Manifest.load(new)
    assert plan.home == str(new) and plan.storage_path == str(tmp_path)
    assert plan.tracking_uri == f"sqlite:///{new / 'mlflow.db'}"
    assert plan.rounds == ("extend-1",) and plan.confirm is None


def test_the_manifest_round_trips_and_is_versioned(tmp_path: Path) -> None:
    home = tmp_path / "runs" / "p"
    record = _plan(home, rounds=("extend-1", "extend-2"),
                   confirm={"round": "confirm-1", "done": True})
    record.save()
    assert json.loads((home / META_FILE).read_text())["format"] == FORMAT
    assert Manifest.load(home) == record
    with pytest.raises(Exception, match="cannot assign"):
        record.num_samples = 9  # type: ignore[misc]  # frozen: a step returns a new one
    assert record.replace(num_samples=9).num_samples == 9 and record.num_samples == 4


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "unreadable"),
    ("[1, 2]", "not a sweep record"),
    ('{"format": 99, "name": "p"}', "format 99 is newer than this wrnsweep reads"),
    ('{"format": 2, "name": "p"}', "missing"),
    ('{"format": 2, "name": "p", "colour": "red"}', "unknown field(s) colour"),
])
def test_a_broken_record_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / META_FILE).write_text(text)
    with pytest.raises(ManifestError, match=re.escape(message)):
        Manifest.load(tmp_path)


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    """A sweep folder's store as a launch makes it: artifacts under its mlartifacts/."""
    from orchestrator.store import mlflow_client

    home = tmp_path / "runs" / "p"
    home.mkdir(parents=True)
    client = mlflow_client(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.create_experiment("p", artifact_location=(home / "mlartifacts").as_uri())
    run = client.create_run(exp).info.run_id
    (tmp_path / "note.txt").write_text("hello")
    client.log_artifact(run, str(tmp_path / "note.txt"))
    return home


def test_relocation_repoints_every_artifact_location(store: Path, tmp_path: Path) -> None:
    from orchestrator.store import mlflow_client

    assert relocate_store(store / "mlflow.db") is None  # in place: nothing to do
    moved = tmp_path / "moved"
    shutil.move(store, moved)
    assert relocate_store(moved / "mlflow.db") == store
    assert relocate_store(moved / "mlflow.db") is None  # idempotent

    client = mlflow_client(f"sqlite:///{moved / 'mlflow.db'}")
    [exp] = [e for e in client.search_experiments() if e.name == "p"]
    assert exp.artifact_location == (moved / "mlartifacts").as_uri()
    [run] = client.search_runs([exp.experiment_id])
    assert run.info.artifact_uri.startswith((moved / "mlartifacts").as_uri() + "/")
    local = client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path))
    assert Path(local).read_text() == "hello"
    assert not store.exists()  # nothing was written at the old place
