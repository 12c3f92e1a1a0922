"""End to end: `wrnsweep launch` / `resume` / `best` on real Ray, Optuna and a SQLite MLflow.

Every assertion reads results back from where a user would look: MlflowClient
(runs, metric histories, registry) and the files of the sweep folder. The
signing key (orchestrator.trust) lives in a config folder of this module's own.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests._meta import FinishedSweep, sweep_meta

REPO = Path(__file__).resolve().parents[1]
TWO_ARCH = REPO / "tests" / "sweeps" / "two_arch.yaml"
WRNSWEEP = str(Path(sys.executable).with_name("wrnsweep"))

pytestmark = pytest.mark.slow


def wrnsweep(*args: str, cwd: Path, timeout: float = 600,
             **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([WRNSWEEP, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**os.environ, "RAY_ADDRESS": "", **env})


def client_for(home: Path):
    from mlflow import MlflowClient

    meta = sweep_meta(home)
    uri = meta["tracking_uri"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri), meta


def child_runs(client, meta) -> list:
    return client.search_runs(
        [meta["experiment_id"]],
        filter_string=f"tags.`mlflow.parentRunId` = '{meta['parent_run_id']}'",
        max_results=1000)


def epoch_steps(client, run_id: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, "val_acc")]


@pytest.fixture(scope="module")
def finished_sweep(two_arch_sweep: FinishedSweep,
                   tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """This module's copy of the session's finished two_arch sweep, and its launch."""
    return two_arch_sweep.copy_to(tmp_path_factory.mktemp("launch")), two_arch_sweep.launch


def test_launch_tracks_every_trial_under_one_parent(finished_sweep) -> None:
    home, result = finished_sweep
    client, meta = client_for(home)
    parent = client.get_run(meta["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["ray.address"] == "local"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep.yaml", "resolved_config.json"} <= artifacts

    runs = child_runs(client, meta)
    assert len(runs) == 5
    assert {r.data.params["arch"] for r in runs} == {"wrn", "resnet"}
    assert len({r.data.tags["wrnsweep.trial_id"] for r in runs}) == 5
    for run in runs:
        params, tags = run.data.params, run.data.tags
        # Same param names for every architecture, "n/a" where one does not apply.
        assert {"arch", "depth", "width", "dropout", "shortcut", "variant", "lr",
                "milestones", "weight_decay", "gamma", "epochs"} <= set(params)
        assert run.info.run_name == (f"{params['arch']}-{params['depth']}-{params['width']}-"
                                     f"{tags['wrnsweep.trial_id']}")
        if params["arch"] == "resnet":
            assert params["dropout"] == "n/a"
            assert (params["weight_decay"], params["milestones"]) == ("0.0001", "0.5,0.75")
        else:
            assert params["shortcut"] == "n/a"
            assert params["nesterov"] == "True"
        steps = epoch_steps(client, run.info.run_id)
        last = int(run.data.metrics["epoch"])
        assert steps == list(range(1, last + 1))  # every epoch once, with step=epoch
        assert run.data.metrics["num_params"] > 0
        if tags.get("wrnsweep.pruned") == "true":
            assert run.info.status == "KILLED"
            assert last < 3
        else:
            assert run.info.status == "FINISHED"
            assert last == 3
            assert 0.0 <= run.data.metrics["test_acc"] <= 1.0
    assert "registered 2 version(s) of 'e2e'" in result.stdout


def test_registered_champion_loads_without_pickle_and_predicts(finished_sweep) -> None:
    from orchestrator.registry import load_model

    home, _ = finished_sweep
    client, meta = client_for(home)
    versions = client.search_model_versions("name = 'e2e'")
    assert len(versions) == 2
    champion = client.get_model_version_by_alias("e2e", "champion")
    assert champion.tags["rank"] == "1"
    best_run = client.get_run(champion.run_id)
    assert float(champion.tags["val_acc"]) == pytest.approx(
        best_run.data.metrics["best_val_acc"], rel=1e-5)
    others = [v for v in versions if v.version != champion.version]
    assert float(others[0].tags["val_acc"]) <= float(champion.tags["val_acc"])

    model, card = load_model("models:/e2e@champion", tracking_uri=meta["tracking_uri"])
    assert card["arch"] == best_run.data.params["arch"]
    assert card["mean"] and card["input_shape"] == [3, 32, 32]
    from trainables.data import Loader, load_splits

    splits = load_splits("synthetic", synthetic_size=256)
    loader = Loader(splits.val, splits.spec, batch_size=512, train=False)
    x, y = next(iter(loader))
    assert len(y) == len(splits.val)  # the whole validation split in one batch
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    # The registered weights are the best checkpoint's: they score exactly its val_acc.
    assert accuracy == pytest.approx(float(champion.tags["val_acc"]), abs=1e-6)
    assert accuracy > 0.15  # chance is 0.1


def test_best_prints_the_leaderboard_from_mlflow(finished_sweep) -> None:
    home, _ = finished_sweep
    table = wrnsweep("best", str(home), cwd=home)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split()[:3] == ["rank", "run", "arch"]
    rows = json.loads(wrnsweep("best", str(home), "--top", "2", "--json", cwd=home).stdout)
    assert [r["rank"] for r in rows] == [1, 2]
    assert rows[0]["best_val_acc"] >= rows[1]["best_val_acc"]  # the score under its name
    _, meta = client_for(home)
    by_name = wrnsweep("best", "e2e", "--tracking-uri", meta["tracking_uri"], "--json",
                       cwd=home)
    assert json.loads(by_name.stdout) == json.loads(
        wrnsweep("best", str(home), "--json", cwd=home).stdout)
    # A tracking URI exported for other work does not redirect a sweep folder's leaderboard.
    elsewhere = wrnsweep("best", str(home), "--json", cwd=home,
                         MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert json.loads(elsewhere.stdout) == json.loads(by_name.stdout)


def test_export_of_the_champion_folds_and_checks(finished_sweep) -> None:
    home, _ = finished_sweep
    _, meta = client_for(home)
    out = home / "champion.onnx"
    result = wrnsweep("export", "models:/e2e@champion", "--out", str(out), "--format", "onnx",
                      "--tracking-uri", meta["tracking_uri"], cwd=home)
    assert result.returncode == 0, result.stderr
    assert "max abs difference vs the unfolded model" in result.stdout
    assert out.stat().st_size > 0
    missing = wrnsweep("export", "models:/e2e@nope", "--out", str(out),
                       "--tracking-uri", meta["tracking_uri"], cwd=home)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_a_moved_and_copied_sweep_folder_is_its_own(finished_sweep, tmp_path: Path) -> None:
    """A sweep folder moved (and renamed), then copied elsewhere with the moved one
    deleted: best, report, ui, export and extend on the copy read and write only the
    copy; neither earlier location is created again."""
    import shutil
    import urllib.request

    from tests._cluster import free_port, wait_for

    original = tmp_path / "cluster" / "e2e"
    shutil.copytree(finished_sweep[0], original, symlinks=True)
    moved = tmp_path / "laptop" / "e2e-moved"
    moved.parent.mkdir()
    original.rename(moved)
    copy = tmp_path / "archive" / "paper-sweep"
    shutil.copytree(moved, copy, symlinks=True)
    shutil.rmtree(moved)
    work = tmp_path / "work"
    work.mkdir()

    board = wrnsweep("best", str(copy), "--json", cwd=work)
    assert board.returncode == 0, board.stderr
    assert len(json.loads(board.stdout)) == 5
    client, meta = client_for(copy)
    assert meta["home"] == str(copy) and meta["tracking_uri"] == f"sqlite:///{copy}/mlflow.db"
    assert client.get_experiment(meta["experiment_id"]).artifact_location == (
        (copy / "mlartifacts").as_uri())

    report = wrnsweep("report", str(copy), cwd=work)
    assert report.returncode == 0, report.stderr
    logged = {a.path for a in client.list_artifacts(meta["parent_run_id"], "report")}
    assert "report/report.html" in logged
    assert list((copy / "mlartifacts").rglob("report.html"))  # in the copy's own store

    champion = work / "champion.onnx"
    exported = wrnsweep("export", "models:/e2e@champion", "--out", str(champion),
                        "--tracking-uri", f"sqlite:///{copy}/mlflow.db", cwd=work)
    assert exported.returncode == 0, exported.stderr
    assert champion.stat().st_size > 0

    port = free_port()
    with (work / "ui.log").open("w") as log:
        ui = subprocess.Popen([WRNSWEEP, "ui", str(copy), "--port", str(port)], cwd=work,
                              stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "RAY_ADDRESS": ""})
    try:
        api = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow"

        def listed() -> bool:
            assert ui.poll() is None, (work / "ui.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{api}/artifacts/list?run_id="
                                            f"{meta['parent_run_id']}&path=report",
                                            timeout=5) as response:
                    return "report/report.html" in response.read().decode()
            except OSError:
                return False

        wait_for(listed, 120, "the UI's REST API to list the report's artifacts")
    finally:
        ui.send_signal(signal.SIGINT)
        ui.wait(timeout=60)

    extended = wrnsweep("extend", str(copy), "--num-samples", "1", cwd=work)
    assert extended.returncode == 0, extended.stdout[-2000:] + extended.stderr[-2000:]
    assert len(child_runs(client, meta)) == 6
    assert (copy / "extend-1").is_dir()
    assert not original.exists() and not moved.exists()


def test_launching_the_same_sweep_again_is_refused(finished_sweep) -> None:
    home, _ = finished_sweep
    again = wrnsweep("launch", str(TWO_ARCH), "--storage", str(home.parent), cwd=home)
    assert again.returncode == 2
    assert "wrnsweep resume" in again.stderr and "Traceback" not in again.stderr


def _tune_files(home: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of every file of the sweep folder but the SQLite store."""
    return {str(p.relative_to(home)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in home.rglob("*") if p.is_file() and not p.name.startswith("mlflow.db")}


def test_resume_of_a_finished_sweep_changes_nothing(finished_sweep) -> None:
    """Nothing to resume: exit 0 and say so; no Ray, no registration, the parent run's
    end time and the registry's versions as they were, no file of the folder touched."""
    home, _ = finished_sweep
    client, meta = client_for(home)

    def versions() -> list[tuple[Any, ...]]:
        return sorted((v.version, v.run_id, tuple(sorted(v.aliases)),
                       tuple(sorted(v.tags.items())))
                      for v in client.search_model_versions("name = 'e2e'"))

    parent, before, files = client.get_run(meta["parent_run_id"]), versions(), _tune_files(home)
    resumed = wrnsweep("resume", str(home), cwd=home.parent)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "nothing to resume" in resumed.stdout
    assert "resuming" not in resumed.stdout and "registered" not in resumed.stdout
    after = client.get_run(meta["parent_run_id"])
    assert (after.info.status, after.info.end_time) == ("FINISHED", parent.info.end_time)
    assert after.data.metrics == parent.data.metrics
    assert versions() == before
    assert _tune_files(home) == files


class _CreatesFile:
    """Unpickling this calls open(path, "w"): the file appears if anything unpickles it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_tune_state_not_written_here_is_refused_until_trusted(finished_sweep,
                                                              tmp_path: Path) -> None:
    """A tuner.pkl that this user's wrnsweep did not write is refused before anything
    unpickles it (its payload would create a file); a harmless change too, until
    --trust, after which the folder is signed and resumes as before."""
    home, _ = finished_sweep
    tuner = home / "tuner.pkl"
    original, marker = tuner.read_bytes(), tmp_path / "pwned"
    try:
        tuner.write_bytes(pickle.dumps(_CreatesFile(marker)))
        refused = wrnsweep("resume", str(home), cwd=home.parent)
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
        assert f"{tuner}: changed since this user's wrnsweep signed it" in refused.stderr
        assert f"`wrnsweep resume --trust {home}`" in refused.stderr
        assert "Traceback" not in refused.stdout + refused.stderr
        assert not marker.exists()

        # The same state plus a byte that unpickling ignores: still not what was signed.
        tuner.write_bytes(original + b"\n")
        assert wrnsweep("resume", str(home), cwd=home.parent).returncode == 2
        trusted = wrnsweep("resume", "--trust", str(home), cwd=home.parent)
        assert trusted.returncode == 0, trusted.stdout[-2000:] + trusted.stderr[-2000:]
        assert "nothing to resume" in trusted.stdout
        again = wrnsweep("resume", str(home), cwd=home.parent)  # signed by --trust
        assert again.returncode == 0, again.stderr[-2000:]
    finally:
        tuner.write_bytes(original)  # its signature is kept beside the newer one
    assert wrnsweep("resume", str(home), cwd=home.parent).returncode == 0


def _wait_for(condition, timeout: float, what: str) -> None:
    """Poll a real condition (not a fixed sleep) until it holds or time runs out."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_sweep_killed_with_sigkill_resumes_to_completion(tmp_path: Path) -> None:
    """Mid-sweep, the Ray that `launch` started listens on the loopback interface only
    (the listening TCP sockets of the driver and every process under it: GCS, raylet,
    agents, workers); then the driver is SIGKILLed and `resume` completes the sweep."""
    from tests._cluster import descendants, is_loopback, listening_sockets

    runs_file = tmp_path / "runs" / "e2e" / "mlflow-runs.json"
    driver = subprocess.Popen(
        [WRNSWEEP, "launch", str(TWO_ARCH), "--storage", str(tmp_path / "runs")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, env={**os.environ, "RAY_ADDRESS": ""})

    def mid_sweep() -> bool:
        if driver.poll() is not None:
            raise AssertionError("the sweep ended before it could be killed")
        try:
            runs = json.loads(runs_file.read_text())
        except (OSError, ValueError):
            return False
        return len(runs) >= 2 and any(r["last_epoch"] >= 1 for r in runs.values())

    _wait_for(mid_sweep, 300, "two trials with a logged epoch")
    sockets = listening_sockets({driver.pid} | descendants(driver.pid))
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started
    driver.wait(timeout=60)
    assert {"gcs_server", "raylet"} <= {name for name, _, _ in sockets}, sockets
    exposed = [s for s in sockets if not is_loopback(s[1])]
    assert not exposed, f"listening beyond the loopback interface: {exposed}"

    _assert_resumes_to_completion(tmp_path / "runs" / "e2e")


def _assert_resumes_to_completion(home: Path) -> None:
    """`wrnsweep resume` ends an interrupted sweep: num_samples runs, none twice or left RUNNING."""
    client, meta = client_for(home)
    assert client.get_run(meta["parent_run_id"]).info.status == "RUNNING"

    resumed = wrnsweep("resume", str(home), cwd=home.parent)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    runs = child_runs(client, meta)
    trial_ids = [r.data.tags["wrnsweep.trial_id"] for r in runs]
    assert len(runs) == 5 and len(set(trial_ids)) == 5  # num_samples, no duplicates
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert client.get_run(meta["parent_run_id"]).info.status == "FINISHED"
    for run in runs:
        last = int(run.data.metrics["epoch"])
        assert epoch_steps(client, run.info.run_id) == list(range(1, last + 1))
    assert client.get_model_version_by_alias("e2e", "champion") is not None


def test_ctrl_c_saves_the_sweep_for_resume_without_finishing_it(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the terminal's process group): exit 130 with the resume command,
    no traceback, nothing registered, runs left RUNNING; `resume` then completes it,
    in the folder moved to another place under another name."""
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as stdout_file, err.open("w") as stderr_file:
        driver = subprocess.Popen(
            [WRNSWEEP, "launch", str(TWO_ARCH), "--storage", str(tmp_path / "runs")],
            cwd=tmp_path, stdout=stdout_file, stderr=stderr_file, text=True,
            start_new_session=True, env={**os.environ, "RAY_ADDRESS": "",
                                         "PYTHONUNBUFFERED": "1"})

    def first_epoch() -> bool:  # a progress line, as printed
        if driver.poll() is not None:
            raise AssertionError("the sweep ended before it could be interrupted:\n"
                                 + out.read_text()[-2000:] + err.read_text()[-2000:])
        return " epoch 1/" in out.read_text()

    _wait_for(first_epoch, 300, "a trial's first epoch")
    os.killpg(driver.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
    driver.wait(timeout=120)
    stdout, stderr = out.read_text(), err.read_text()

    assert driver.returncode == 130, stdout[-2000:] + stderr[-3000:]
    assert "interrupted" in stderr and "wrnsweep resume" in stderr
    assert "Traceback" not in stdout + stderr
    assert "registered" not in stdout  # finish() did not run
    home = tmp_path / "runs" / "e2e"
    client, meta = client_for(home)
    assert not client.search_registered_models(f"name = '{meta['registered_model']}'")
    # The interrupted folder moves (renamed) before it is resumed: it resumes there.
    moved = tmp_path / "elsewhere" / "e2e-interrupted"
    moved.parent.mkdir()
    home.rename(moved)
    _assert_resumes_to_completion(moved)
    assert not home.exists()
