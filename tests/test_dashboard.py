"""``wrnsweep dashboard``: optuna-dashboard over a sweep's Optuna journal, through its API.

The server runs as ``wrnsweep dashboard DIR --port P`` in a subprocess on a free
port of 127.0.0.1; each test waits for it by polling, asks the API what the page
would show (``/api/studies``, ``/api/studies/<id>`` with its trials and intermediate
values, ``/api/studies/<id>/param_importances``) and stops it with SIGTERM. The fast
test serves a journal written by the sweep's searcher driven as Tune drives it; the
slow one the session's real sweep (``wrnsweep launch``, TPE and ASHA), compared with its
MLflow runs.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests._meta import sweep_meta

ROOT = Path(__file__).resolve().parents[1]
WRNSWEEP = str(Path(sys.executable).with_name("wrnsweep"))
STARTUP_S = 90.0  # optuna-dashboard's import and a first read of the journal, on a busy machine


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _request(url: str, method: str = "GET") -> tuple[int, Any]:
    req = urllib.request.Request(url, method=method, data=b"{}" if method != "GET" else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


@contextmanager
def dashboard(folder: Path, port: int) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``wrnsweep dashboard folder --port port``; its base URL once the API answers."""
    proc = subprocess.Popen([WRNSWEEP, "dashboard", str(folder), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if _request(f"{base}/api/studies")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "the dashboard did not answer"
            time.sleep(0.3)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _study_detail(base: str) -> tuple[dict[str, Any], dict[str, Any]]:
    status, studies = _request(f"{base}/api/studies")
    assert status == 200
    [study] = studies["study_summaries"]
    status, detail = _request(f"{base}/api/studies/{study['study_id']}")
    assert status == 200
    return study, detail


def _by_tune_id(detail: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for trial in detail["trials"]:
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        out[attrs["wrnsweep.trial_id"]] = trial
    return out


def _curve(trial: dict[str, Any]) -> dict[int, float]:
    return {v["step"]: v["value"] for v in trial["intermediate_values"]}


# ------------------------------------------------------------------ a written journal
SWEEP = """\
name: dash
architectures:
  wrn: {depth: 10, width: {choices: [1, 2]}}
recipe:
  epochs: 4
  lr: {low: 0.01, high: 1.0, log: true}
search: {algorithm: random, num_samples: 6, seed: 1}
"""


def _write_journal(folder: Path) -> dict[str, list[float]]:
    """Six trials told as Tune tells them: ASHA's stopping result only on completion."""
    from orchestrator.config import parse_sweep
    from orchestrator.search import JOURNAL_FILE, create_searcher

    cfg = parse_sweep(SWEEP, "dash.yaml")
    limiter, _ = create_searcher(cfg, study_name="dash", journal=str(folder / JOURNAL_FILE))
    curves = {"t0": [0.2, 0.5, 0.7, 0.9], "t1": [0.1], "t2": [0.3, 0.6, 0.8, 0.85],
              "t3": [0.15, 0.3], "t4": [0.25, 0.55, 0.72, 0.8], "t5": [0.1]}
    for trial_id, values in curves.items():
        limiter.suggest(trial_id)
        for epoch, value in enumerate(values[:-1], start=1):
            limiter.on_trial_result(trial_id, {"val_acc": value, "epoch": epoch,
                                               "total_epochs": 4,
                                               "training_iteration": epoch})
        limiter.on_trial_complete(trial_id, {"val_acc": values[-1], "epoch": len(values),
                                             "total_epochs": 4,
                                             "training_iteration": len(values)})
    (folder / "wrnsweep.json").write_text(json.dumps({"name": "dash"}))
    return curves


def test_dashboard_serves_the_journal_read_only(tmp_path: Path) -> None:
    """Trials, states, every epoch's value (pruned ones up to their stop), the link to
    the MLflow run and importances come through the API; a request that would change
    the study gets 403 and changes nothing; SIGTERM stops it with exit code 0."""
    from orchestrator.search import JOURNAL_FILE

    curves = _write_journal(tmp_path)
    journal = (tmp_path / JOURNAL_FILE).read_bytes()
    port = _free_port()
    with dashboard(tmp_path, port) as (base, proc):
        study, detail = _study_detail(base)
        assert study["study_name"] == "dash" and study["directions"] == ["maximize"]
        trials = _by_tune_id(detail)
        assert set(trials) == set(curves)
        for trial_id, values in curves.items():
            trial = trials[trial_id]
            assert _curve(trial) == dict(enumerate(values, start=1))
            assert trial["state"] == ("Complete" if len(values) == 4 else "Pruned")
        status, importances = _request(f"{base}/api/studies/{study['study_id']}"
                                       "/param_importances")
        assert status == 200
        assert {i["name"] for i in importances["param_importances"][0]} == {
            "wrn.lr", "wrn.width"}
        sid = study["study_id"]
        for method, path in [("DELETE", f"/api/studies/{sid}"), ("POST", "/api/studies"),
                             ("POST", f"/api/studies/{sid}/rename"),
                             ("PUT", f"/api/studies/{sid}/note"),
                             ("POST", f"/api/trials/{trials['t0']['trial_id']}/tell")]:
            assert _request(base + path, method)[0] == 403, (method, path)
        with urllib.request.urlopen(f"{base}/dashboard", timeout=30) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    out = proc.stdout.read() if proc.stdout else ""
    assert f"http://127.0.0.1:{port}/dashboard/studies/{sid}" in out
    assert (tmp_path / JOURNAL_FILE).read_bytes() == journal  # untouched
    with pytest.raises(ConnectionRefusedError):  # nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_dashboard_refuses_what_it_cannot_serve(tmp_path: Path) -> None:
    """No folder, no journal, a port in use: exit 2, one line, nothing served."""
    missing = subprocess.run([WRNSWEEP, "dashboard", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no such sweep folder" in missing.stderr
    empty = subprocess.run([WRNSWEEP, "dashboard", str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2 and "no Optuna study (optuna-journal.jsonl)" in empty.stderr
    assert not (tmp_path / "optuna-journal.jsonl").exists()  # nothing created

    _write_journal(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = subprocess.run([WRNSWEEP, "dashboard", str(tmp_path), "--port",
                                str(busy.getsockname()[1])],
                               capture_output=True, text=True, timeout=60)
    assert taken.returncode == 2 and "cannot serve on 127.0.0.1" in taken.stderr
    assert "Traceback" not in missing.stderr + empty.stderr + taken.stderr


# ------------------------------------------------------------------ a real sweep
@pytest.mark.slow
def test_dashboard_of_a_real_sweep_matches_its_mlflow_runs(two_arch_sweep, tmp_path: Path
                                                           ) -> None:
    """The session's sweep run by ``wrnsweep launch`` (tests/sweeps/two_arch.yaml: TPE
    over two architectures, ASHA at epochs 1 and 2 of 3): the dashboard shows one trial
    per MLflow run, linked by the run's wrnsweep.trial_id tag, with the run's val_acc at
    every epoch it logged as the intermediate values, PRUNED exactly where MLflow
    tagged the run pruned, the run's lr as the parameter of its architecture and, for a
    trial that ran to the end, its last val_acc as the value."""
    from mlflow import MlflowClient

    home = two_arch_sweep.copy_to(tmp_path)
    meta = sweep_meta(home)
    client = MlflowClient(tracking_uri=meta["tracking_uri"])
    runs = client.search_runs([meta["experiment_id"]], filter_string=(
        f"tags.`mlflow.parentRunId` = '{meta['parent_run_id']}'"))
    assert len(runs) == 5

    with dashboard(home, _free_port()) as (base, _):
        study, detail = _study_detail(base)
        status, importances = _request(f"{base}/api/studies/{study['study_id']}"
                                       "/param_importances")
    assert study["study_name"] == "e2e"
    trials = _by_tune_id(detail)
    assert set(trials) == {r.data.tags["wrnsweep.trial_id"] for r in runs}
    pruned, complete_params = 0, []
    for run in runs:
        trial = trials[run.data.tags["wrnsweep.trial_id"]]
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id,
                                                                      "val_acc")}
        assert _curve(trial) == pytest.approx(history), run.info.run_name
        arch = run.data.params["arch"]
        [lr] = [p for p in trial["params"] if p["name"] == f"{arch}.lr"]
        assert float(lr["param_external_value"]) == pytest.approx(float(run.data.params["lr"]))
        if run.data.tags.get("wrnsweep.pruned") == "true":
            pruned += 1
            assert trial["state"] == "Pruned" and max(history) in (1, 2)
        else:
            assert trial["state"] == "Complete" and max(history) == 3
            assert trial["values"] == [pytest.approx(history[3])]
            complete_params.append({p["name"] for p in trial["params"]})
    assert pruned >= 1  # the case the study used to hold without its last value
    assert status == 200
    rated = {i["name"]: i["importance"] for i in importances["param_importances"][0]}
    common = set.intersection(*complete_params) if len(complete_params) > 1 else set()
    every = set().union(*({p["name"] for p in t["params"]} for t in trials.values()))
    # Optuna rates the parameters every completed trial has (none with fewer than two);
    # where it rates none (two completed trials of two architectures share only `arch`),
    # optuna-dashboard 0.21 shares 1 equally over every parameter of any trial
    # (optuna_dashboard/_importance.py).
    assert set(rated) <= common or (
        set(rated) == every and max(rated.values()) == pytest.approx(min(rated.values()))), (
        rated, common, every)
