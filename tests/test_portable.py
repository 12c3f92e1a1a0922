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
import sqlite3
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
    from orchestrator.store import mlflow_client, new_folder_store

    home = tmp_path / "runs" / "p"
    home.mkdir(parents=True)
    new_folder_store(home / "mlflow.db")
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
    default = client.get_experiment("0").artifact_location  # MLflow's Default, moved too
    assert default == (moved / "mlartifacts" / "0").as_uri()
    [run] = client.search_runs([exp.experiment_id])
    assert run.info.artifact_uri.startswith((moved / "mlartifacts").as_uri() + "/")
    local = client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path))
    assert Path(local).read_text() == "hello"
    assert not store.exists()  # nothing was written at the old place


def _schema(db: Path) -> tuple[list, list, list]:
    """Tables and indexes with the lines of their SQL (as a set: two stores MLflow makes
    list a table's constraints in different orders); the alembic revision; the
    experiments but their artifact locations."""
    con = sqlite3.connect(db)
    try:
        return (sorted((kind, name, table, sorted(line.strip(" ,") for line in
                                                  (sql or "").splitlines()))
                       for kind, name, table, sql in
                       con.execute("select type, name, tbl_name, sql from sqlite_master")),
                con.execute("select version_num from alembic_version").fetchall(),
                con.execute("select experiment_id, name, lifecycle_stage from experiments")
                .fetchall())
    finally:
        con.close()


def test_a_new_folder_store_is_the_one_mlflow_makes_copied_from_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.store import mlflow_client, new_folder_store

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    theirs = tmp_path / "mlflow" / "mlflow.db"  # made by MLflow itself, as before
    theirs.parent.mkdir()
    mlflow_client(f"sqlite:///{theirs}").search_experiments()
    first, second = (tmp_path / name / "mlflow.db" for name in ("first", "second"))
    for db in (first, second):
        db.parent.mkdir()
        new_folder_store(db)
        assert _schema(db) == _schema(theirs)
    [cached] = (tmp_path / "cache" / "wrnsweep" / "mlflow-stores").iterdir()
    assert _schema(cached) == _schema(theirs)

    # The second store is a copy of the cached one: a row put there shows up in a third.
    con = sqlite3.connect(cached)
    con.execute("insert into experiment_tags (key, value, experiment_id) values ('c', 'x', 0)")
    con.commit()
    con.close()
    third = tmp_path / "third" / "mlflow.db"
    third.parent.mkdir()
    new_folder_store(third)
    client = mlflow_client(f"sqlite:///{third}")
    assert client.get_experiment("0").tags == {"c": "x"}

    # MLflow reads and writes the copy; its Default experiment lies inside the folder.
    client = mlflow_client(f"sqlite:///{second}")
    assert client.get_experiment("0").artifact_location == (
        second.parent / "mlartifacts" / "0").as_uri()
    run = client.create_run(client.create_experiment("e")).info.run_id
    client.log_metric(run, "val_acc", 0.5, step=1)
    client.create_registered_model("m")
    assert [m.value for m in client.get_metric_history(run, "val_acc")] == [0.5]
    assert client.get_registered_model("m").name == "m"
    assert sorted(p.name for p in second.parent.iterdir()) == ["mlflow.db"]  # no partial

    # A cached file that is not a store (truncated, overwritten) is made again.
    cached.write_bytes(b"not a database")
    fourth = tmp_path / "fourth" / "mlflow.db"
    fourth.parent.mkdir()
    new_folder_store(fourth)
    assert _schema(fourth) == _schema(theirs) == _schema(cached)


def test_a_new_folder_store_without_a_writable_cache_is_made_by_mlflow(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.store import mlflow_client, new_folder_store

    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))
    db = tmp_path / "p" / "mlflow.db"
    db.parent.mkdir()
    new_folder_store(db)
    client = mlflow_client(f"sqlite:///{db}")
    assert client.get_experiment("0").artifact_location == (
        db.parent / "mlartifacts" / "0").as_uri()
    assert client.search_experiments()[0].name == "Default"
