"""Cluster use on a real local Ray cluster: job submission and fault tolerance.

Each test starts its own cluster (`ray start --head`, plus `ray start --address`
for a second node) and asserts the end state where a user reads it: exit codes,
the Jobs API, Tune's trial folders and MLflow (runs, epochs, registry).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests._cluster import (
    LocalCluster,
    can_unshare_mounts,
    env,
    pids_with,
    trial_progress,
    wait_for,
)
from tests._meta import sweep_meta

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "tests" / "sweeps"
WRNSWEEP = str(Path(sys.executable).with_name("wrnsweep"))

pytestmark = pytest.mark.slow


def wrnsweep(*args: str, cwd: Path, timeout: float = 900,
             extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([WRNSWEEP, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env(**(extra_env or {})))


def mlflow_state(home: Path):
    from mlflow import MlflowClient

    meta = sweep_meta(home)
    client = MlflowClient(tracking_uri=meta["tracking_uri"], registry_uri=meta["tracking_uri"])
    runs = client.search_runs(
        [meta["experiment_id"]],
        filter_string=f"tags.`mlflow.parentRunId` = '{meta['parent_run_id']}'")
    return client, meta, runs


def assert_complete(home: Path, num_trials: int, epochs: int | None = None) -> list:
    """The end state every fault test asks for."""
    client, meta, runs = mlflow_state(home)
    trial_ids = [r.data.tags["wrnsweep.trial_id"] for r in runs]
    assert len(runs) == num_trials and len(set(trial_ids)) == num_trials
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        last = int(run.data.metrics.get("epoch", 0))
        assert steps == list(range(1, last + 1)), (run.info.run_name, steps)
        if epochs is not None and run.info.status == "FINISHED":
            assert last == epochs
    assert client.get_run(meta["parent_run_id"]).info.status == "FINISHED"
    assert client.get_model_version_by_alias(meta["registered_model"], "champion")
    return runs


@pytest.fixture
def cluster(tmp_path: Path, request):
    made: list[LocalCluster] = []

    def make(**node_env: str) -> LocalCluster:
        made.append(LocalCluster(tmp_path, **node_env))
        return made[-1]

    yield make
    for c in made:
        c.stop()


def test_submit_follow_runs_the_smoke_sweep_and_jobs_manage_it(tmp_path: Path,
                                                                cluster) -> None:
    head = cluster().start_head(num_cpus=2)
    # A path with spaces and a `;`: the entrypoint must quote it, not run `rm`.
    odd = tmp_path / "my sweeps; touch INJECTED"
    odd.mkdir()
    sweep = odd / "smoke; touch INJECTED.yaml"
    shutil.copy(REPO / "search_spaces" / "smoke.yaml", sweep)
    storage = odd / "runs"

    bad = wrnsweep("submit", str(SWEEPS.parent / "bad_sweeps" / "unknown_scheduler.yaml"),
                   "--address", head.jobs_address, cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    listed = wrnsweep("jobs", "list", "--address", head.jobs_address, "--json", cwd=tmp_path)
    assert listed.returncode == 0 and json.loads(listed.stdout) == []  # nothing submitted

    result = wrnsweep("submit", str(sweep), "--address", head.jobs_address, "--follow",
                      "--storage", str(storage), "--num-samples", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SUCCEEDED" in result.stdout
    assert "registered 2 version(s) of 'smoke'" in result.stdout
    assert not list(tmp_path.rglob("INJECTED"))

    runs = assert_complete(storage / "smoke", num_trials=3)  # --num-samples reached it
    assert max(r.data.metrics.get("best_val_acc", 0) for r in runs) > 0.5  # chance: 0.1

    job_id = next(line.split()[2] for line in result.stdout.splitlines()
                  if line.startswith("submitted job "))
    status = wrnsweep("jobs", "status", job_id, "--address", head.jobs_address, cwd=tmp_path)
    assert f"{job_id}: SUCCEEDED" in status.stdout
    logs = wrnsweep("jobs", "logs", job_id, "--address", head.jobs_address, cwd=tmp_path)
    assert "registered 2 version(s)" in logs.stdout
    listed = json.loads(wrnsweep("jobs", "list", "--address", head.jobs_address, "--json",
                                 cwd=tmp_path).stdout)
    assert [(j["job_id"], j["sweep"]) for j in listed] == [(job_id, "smoke")]
    stop = wrnsweep("jobs", "stop", job_id, "--address", head.jobs_address, cwd=tmp_path)
    assert "was not running" in stop.stdout


def test_a_head_whose_job_agent_lost_its_port_is_named_in_the_submit_error(
        tmp_path: Path, cluster) -> None:
    """A head whose dashboard agent could not bind its HTTP port takes no job, ever:
    ``submit`` retries for ``--agent-wait`` seconds, then exits 1 with Ray's message and
    the likely cause and fix, without a traceback, and nothing is submitted."""
    with socket.socket() as held:  # what another Ray on the machine does to port 52365
        held.bind(("127.0.0.1", 0))
        held.listen()
        head = cluster().start_head(num_cpus=1, agent_port=held.getsockname()[1])
        result = wrnsweep("submit", str(REPO / "search_spaces" / "smoke.yaml"), "--address",
                          head.jobs_address, "--agent-wait", "15", cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "No available agent to submit job" in result.stderr
    assert "(retried for 15 s)" in result.stderr
    assert "ray start --head --dashboard-agent-listen-port" in result.stderr
    listed = wrnsweep("jobs", "list", "--address", head.jobs_address, "--json", cwd=tmp_path)
    assert listed.returncode == 0 and json.loads(listed.stdout) == []


def test_failing_trials_retry_from_their_last_checkpoint(tmp_path: Path, cluster) -> None:
    head = cluster(WRNSWEEP_FAIL_AT_EPOCH="3").start_head(num_cpus=1)
    head.add_worker(num_cpus=1)
    result = wrnsweep("launch", str(SWEEPS / "faults.yaml"), "--address", head.address,
                      "--storage", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = assert_complete(tmp_path / "runs" / "faults", num_trials=3, epochs=6)
    client, _, _ = mlflow_state(tmp_path / "runs" / "faults")
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["wrnsweep.retries"] == "1"  # failed once, then resumed
        errors = [a.path for a in client.list_artifacts(run.info.run_id, "errors")]
        assert errors == ["errors/attempt-1.txt"]


def test_a_trial_that_keeps_failing_ends_failed_and_the_sweep_goes_on(tmp_path: Path,
                                                                       cluster) -> None:
    head = cluster(WRNSWEEP_FAIL_AT_EPOCH="2", WRNSWEEP_FAIL_ALWAYS="1",
                   WRNSWEEP_FAIL_ARCH="wrn").start_head(num_cpus=1)
    head.add_worker(num_cpus=1)
    result = wrnsweep("launch", str(SWEEPS / "keeps_failing.yaml"), "--address", head.address,
                      "--storage", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = assert_complete(tmp_path / "runs" / "keeps-failing", num_trials=4)
    client, _, _ = mlflow_state(tmp_path / "runs" / "keeps-failing")
    by_arch: dict[str, set[str]] = {}
    for run in runs:
        by_arch.setdefault(run.data.params["arch"], set()).add(run.info.status)
        if run.data.params["arch"] == "wrn":
            text = client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path))
            assert "injected failure before epoch 2" in Path(text).read_text()
            assert run.data.tags["wrnsweep.retries"] == "1"  # max_failures: 1
    assert by_arch == {"wrn": {"FAILED"}, "resnet": {"FINISHED"}}
    # Tune agrees: the wrn trials are errors, the others finished.
    errors = list((tmp_path / "runs" / "keeps-failing").glob("wrn-*/error.txt"))
    assert errors


def test_killed_worker_node_trial_resumes_on_the_other_node(tmp_path: Path, cluster) -> None:
    head = cluster().start_head(num_cpus=1)
    worker = head.add_worker(num_cpus=1)
    runs_file = tmp_path / "runs" / "faults" / "mlflow-runs.json"
    driver = subprocess.Popen(
        [WRNSWEEP, "launch", str(SWEEPS / "faults.yaml"), "--address", head.address,
         "--storage", str(tmp_path / "runs")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
    # Both slots busy (one trial per node) and both mid-trial: then kill the worker node.
    wait_for(lambda: sum(0 < e < 6 for e in trial_progress(runs_file).values()) >= 2, 300,
             "two trials running")
    head.kill_node(worker)
    out, _ = driver.communicate(timeout=900)
    assert driver.returncode == 0, out[-4000:]
    runs = assert_complete(tmp_path / "runs" / "faults", num_trials=3, epochs=6)
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert any(r.data.tags.get("wrnsweep.retries") == "1" for r in runs)


def test_job_driver_killed_with_sigkill_then_resumed(tmp_path: Path, cluster) -> None:
    head = cluster().start_head(num_cpus=1)
    head.add_worker(num_cpus=1)
    storage = tmp_path / "runs"
    home = storage / "faults"
    submitted = wrnsweep("submit", str(SWEEPS / "faults.yaml"), "--address",
                         head.jobs_address, "--storage", str(storage), cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    wait_for(lambda: sum(e >= 1 for e in trial_progress(home / "mlflow-runs.json").values())
             >= 2, 300, "two trials with a logged epoch")
    drivers = pids_with("orchestrator.cli", "launch", python_only=True)
    assert len(drivers) == 1, drivers
    os.kill(drivers[0], signal.SIGKILL)
    wait_for(lambda: not pids_with("orchestrator.cli", "launch", python_only=True), 60,
             "the driver to die")

    resumed = wrnsweep("resume", str(home), "--address", head.address, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert_complete(home, num_trials=3, epochs=6)


@pytest.mark.skipif(not can_unshare_mounts(), reason="needs private mount namespaces "
                    "(unshare --mount, root) to give one node a filesystem of its own")
def test_storage_that_a_node_cannot_see_is_refused_before_launch(tmp_path: Path,
                                                                  cluster) -> None:
    head = cluster().start_head(num_cpus=1)
    storage = tmp_path / "runs"
    head.add_worker(num_cpus=1, hide=storage)  # this node sees an empty tmpfs there
    result = wrnsweep("launch", str(SWEEPS / "faults.yaml"), "--address", head.address,
                      "--storage", str(storage), cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"storage_path {storage} is not shared: 1 of 2 nodes cannot see it" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (storage / "faults").exists()  # nothing started
