"""`wrnsweep report` on a real finished sweep (Ray, Optuna, SQLite MLflow), read back
from the files it writes and from MlflowClient; plus its pure parts on their own.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.report import (
    GPU_TAG,
    PAPER_POINTS,
    Trial,
    arch_importance,
    gpu_share,
    numeric_params,
    pareto_front,
    plot_pareto,
    reference_points,
    run_hours,
)
from tests._meta import sweep_meta

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "tests" / "sweeps" / "report.yaml"
WRNSWEEP = str(Path(sys.executable).with_name("wrnsweep"))

pytestmark = pytest.mark.slow


def wrnsweep(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([WRNSWEEP, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**env, "RAY_ADDRESS": ""})


@pytest.fixture(scope="module")
def reported(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A finished 5-trial sweep of two architectures, then `wrnsweep report` on its folder."""
    work = tmp_path_factory.mktemp("report")
    launch = wrnsweep("launch", str(SWEEP), "--storage", str(work / "runs"), cwd=work)
    assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
    home = work / "runs" / "report"
    result = wrnsweep("report", str(home), cwd=work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return home, result


def mlflow_view(home: Path) -> tuple[object, dict, list]:
    from mlflow import MlflowClient

    meta = sweep_meta(home)
    client = MlflowClient(tracking_uri=meta["tracking_uri"])
    runs = client.search_runs(
        [meta["experiment_id"]],
        filter_string=f"tags.`mlflow.parentRunId` = '{meta['parent_run_id']}'")
    return client, meta, runs


def report_data(home: Path) -> dict:
    return json.loads((home / "report" / "report.json").read_text())


def assert_png(data: bytes) -> None:
    """A decodable PNG of a real figure: not tiny, not one flat colour."""
    from PIL import Image

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.width >= 300 and image.height >= 200
    extrema = image.convert("L").getextrema()
    assert extrema[0] < extrema[1]


# -- the command on a real sweep ---------------------------------------------------------------
def test_html_is_self_contained_and_names_every_run(reported) -> None:
    home, result = reported
    page_path = home / "report" / "report.html"
    assert f"report written to {page_path}" in result.stdout
    page = page_path.read_text()
    _, _, runs = mlflow_view(home)
    assert len(runs) == 5
    for run in runs:
        assert run.info.run_name in page
    # Nothing fetched from elsewhere: no script, no stylesheet link, images inline.
    assert "<script" not in page and "<link" not in page
    sources = re.findall(r'<img[^>]* src="([^"]+)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert len(sources) == len(list((home / "report").glob("*.png")))
    for src in sources:
        assert_png(base64.b64decode(src.split(",", 1)[1]))
    assert "GPU-hours" in page and "Pareto front" in page


def test_every_png_beside_the_html_is_a_real_image(reported) -> None:
    home, _ = reported
    data = report_data(home)
    pngs = sorted(p.name for p in (home / "report").glob("*.png"))
    assert pngs == sorted(data["figures"].values())
    assert set(data["figures"]) == {"curves", "pareto", "parallel_wrn", "parallel_resnet",
                                    "importance"}
    for name in pngs:
        assert_png((home / "report" / name).read_bytes())


def test_learning_curves_hold_every_epoch_of_every_run(reported) -> None:
    home, _ = reported
    client, _, runs = mlflow_view(home)
    curves = {t["run_id"]: t["curve"] for t in report_data(home)["trials"]}
    assert set(curves) == {r.info.run_id for r in runs}
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "val_acc")
        expected = sorted([m.step, m.value] for m in history)
        assert curves[run.info.run_id] == expected
        assert [step for step, _ in expected] == [1, 2]  # FIFO: every trial to the end


def test_pareto_front_and_gpu_hours_of_the_sweep(reported) -> None:
    home, _ = reported
    data = report_data(home)
    trials = [t for t in data["trials"] if t["val_acc"] is not None and t["num_params"]]
    assert len(trials) == 5
    front = [t for t in trials if t["name"] in data["pareto_front"]]
    assert front

    def dominates(a: dict, b: dict) -> bool:
        return (a["num_params"] <= b["num_params"] and a["val_acc"] >= b["val_acc"]
                and (a["num_params"] < b["num_params"] or a["val_acc"] > b["val_acc"]))

    for t in trials:
        beaten = any(dominates(o, t) for o in trials)
        assert beaten == (t not in front), t["name"]
    best = max(trials, key=lambda t: t["val_acc"])
    smallest = min(trials, key=lambda t: (t["num_params"], -t["val_acc"]))
    assert best in front and smallest in front
    # No run has the wrnsweep.gpu tag (a CPU sweep): wall time counted, 0 GPU-hours.
    for t in data["trials"]:
        assert t["hours"] > 0 and t["gpus"] == 0 and t["gpu_hours"] == 0


def test_importances_are_numbers_or_a_note(reported) -> None:
    home, _ = reported
    page = (home / "report" / "report.html").read_text()
    results = {r["arch"]: r for r in report_data(home)["importances"]}
    assert set(results) == {"wrn", "resnet"}
    for result in results.values():
        assert result["note"]
        if result["values"] is None:
            continue
        values = result["values"]
        assert all(0.0 <= v <= 1.0 for v in values.values())
        assert math.isclose(sum(values.values()), 1.0, rel_tol=1e-6)
        assert "seed" not in values
        for name, value in values.items():
            assert re.search(rf"<td class=\"l\">{name}</td><td>{value:.3f}</td>", page)
    # Four wrn starting points ran to the end and lr is searched: wrn has numbers.
    assert results["wrn"]["trials"] >= 2 and "lr" in results["wrn"]["values"]


def test_no_paper_points_for_a_synthetic_sweep(reported) -> None:
    home, _ = reported
    data = report_data(home)
    assert data["dataset"] == "synthetic" and data["references"] == []
    assert "this sweep&#x27;s dataset is synthetic" in (home / "report" / "report.html").read_text()


def test_parent_run_has_the_report_artifacts(reported) -> None:
    home, _ = reported
    client, meta, _ = mlflow_view(home)
    logged = {a.path for a in client.list_artifacts(meta["parent_run_id"], "report")}
    local = {f"report/{p.name}" for p in (home / "report").iterdir()}
    assert logged == local
    assert {"report/report.html", "report/report.json", "report/learning_curves.png"} <= logged


def test_report_by_sweep_name_with_gpu_hours_from_the_tag(reported, tmp_path) -> None:
    home, _ = reported
    client, meta, runs = mlflow_view(home)
    half = runs[0].info.run_id
    client.set_tag(half, GPU_TAG, "0.5")  # as a trial with half a GPU is tagged
    out = tmp_path / "by-name"
    result = wrnsweep("report", "report", "--tracking-uri", meta["tracking_uri"],
                      "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    page = (out / "report.html").read_text()
    assert all(r.info.run_name in page for r in runs)
    data = json.loads((out / "report.json").read_text())
    assert data["parent_run_id"] == meta["parent_run_id"]
    for trial in data["trials"]:
        info = client.get_run(trial["run_id"]).info
        hours = (info.end_time - info.start_time) / 3.6e6
        assert trial["hours"] == pytest.approx(hours)
        assert trial["gpu_hours"] == pytest.approx(hours * (0.5 if info.run_id == half else 0))


@pytest.mark.parametrize("make_folder", [False, True], ids=["missing", "not-a-sweep"])
def test_bad_target_exits_2_without_traceback(tmp_path, make_folder: bool) -> None:
    target = tmp_path / "nowhere"
    if make_folder:
        target.mkdir()
    result = wrnsweep("report", str(target), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    expected = "not a wrnsweep sweep folder" if make_folder else "no such sweep folder"
    assert expected in result.stderr and str(target) in result.stderr
    assert not (target / "report").exists()


# -- the pure parts ----------------------------------------------------------------------------
def test_pareto_front_keeps_exactly_the_non_dominated_points() -> None:
    points = [(1.0, 0.5), (2.0, 0.6), (2.0, 0.4), (3.0, 0.6), (0.5, 0.3), (1.0, 0.5)]
    # (2, 0.4) and (3, 0.6) are dominated; the two equal (1, 0.5) both stay.
    assert pareto_front(points) == [4, 0, 5, 1]
    assert pareto_front([]) == []
    rng = random.Random(0)
    for _ in range(200):
        pts = [(float(rng.randint(1, 6)), rng.randint(0, 5) / 5) for _ in range(rng.randint(1, 9))]
        front = set(pareto_front(pts))
        for i, (p, a) in enumerate(pts):
            dominated = any(q <= p and b >= a and (q < p or b > a) for q, b in pts)
            assert (i in front) == (not dominated)


_ids = itertools.count()


def _trial(arch: str, score: float | None, *, status: str = "FINISHED", **params: str) -> Trial:
    base = {"arch": arch, "depth": "10", "width": "1", "dropout": "0.0", "lr": "0.1",
            "milestones": "0.3,0.6,0.8", "seed": "0", "shortcut": "n/a"}
    return Trial(rank=0, run_id=f"run{next(_ids)}", name=f"{arch}-x", arch=arch,
                 status=status, params={**base, **params}, num_params=1000, val_acc=score,
                 test_acc=None, gpus=0.0, hours=0.1, curve=[(1, score)] if score else [])


def test_importances_explain_why_there_are_none() -> None:
    one = arch_importance("wrn", [_trial("wrn", 0.5), _trial("wrn", 0.6, status="KILLED")])
    assert one.values is None and "at least 2" in one.note and "1 trial(s) not finished" in one.note
    same = arch_importance("wrn", [_trial("wrn", 0.5), _trial("wrn", 0.6)])
    assert same.values is None and "same numeric hyperparameters" in same.note
    tied = arch_importance("wrn", [_trial("wrn", 0.5, lr="0.1"), _trial("wrn", 0.5, lr="0.2")])
    assert tied.values is None and "scored the same" in tied.note


def test_importances_from_a_rebuilt_study() -> None:
    rng = random.Random(1)
    trials = []
    for _ in range(12):
        lr, depth = 10 ** rng.uniform(-2, 0), rng.choice([10, 16, 22])
        # The score depends on lr only: fANOVA must say so.
        trials.append(_trial("wrn", 0.9 - abs(math.log10(lr) + 1) / 3, lr=str(lr),
                             depth=str(depth), milestones="0.3,0.6,0.8"))
    result = arch_importance("wrn", trials)
    assert result.values is not None and result.trials == 12
    assert set(result.values) == {"lr", "depth"}
    assert max(result.values, key=result.values.get) == "lr"
    assert "constant, so not assessed" in result.note and "milestone_1" in result.note


def test_numeric_params_split_milestones_and_skip_the_rest() -> None:
    params = {"depth": "16", "dropout": "n/a", "lr": "0.05", "nesterov": "True",
              "shortcut": "A", "milestones": "0.5,0.75", "seed": "3"}
    assert numeric_params(params) == {"depth": 16.0, "lr": 0.05, "milestone_1": 0.5,
                                      "milestone_2": 0.75}


def test_gpu_hours_come_from_the_gpu_tag() -> None:
    assert gpu_share({GPU_TAG: "0.5"}) == 0.5
    assert gpu_share({}) == 0.0  # a CPU trial
    assert gpu_share({GPU_TAG: "lots"}) == 0.0
    assert run_hours(1_000, 1_000 + 7_200_000) == 2.0
    assert run_hours(1_000, None, now_ms=1_000 + 3_600_000) == 1.0  # still RUNNING


def test_paper_points_only_for_cifar_with_our_zoo_counts(tmp_path) -> None:
    assert reference_points("synthetic") == [] and reference_points(None) == []
    c10 = {r["label"]: r for r in reference_points("cifar10")}
    assert len(c10) == 12  # every registry row with a reported CIFAR-10 error
    assert c10["ResNet-1202"]["test_error"] == 7.93  # He et al. 2015, Table 6
    assert c10["WRN-28-10"]["params"] == 36_479_194 and c10["WRN-28-10"]["test_error"] == 3.89
    assert c10["ResNet-20"]["params"] == 269_722 and c10["ResNet-110"]["test_error"] == 6.43
    assert c10["DiracNet-28-10"]["test_acc"] == pytest.approx(0.9525)
    c100 = {r["label"]: r for r in reference_points("cifar100")}
    assert set(c100) == {"WRN-28-10", "WRN-16-8", "pre-act ResNet-164", "pre-act ResNet-1001"}
    assert c100["WRN-28-10"]["test_error"] == 18.85

    # The stored counts are what our zoo builds, for 100 classes as well (the 10-class
    # counts are the ones tests/test_zoo.py pins). Pre-act ResNet-1001 is skipped:
    # seconds to build even on the meta device; ResNet-164 checks the same formula.
    import torch

    from trainables.models import build_model, count_params

    for point in PAPER_POINTS:
        if point.label != "pre-act ResNet-1001":
            with torch.device("meta"):
                model = build_model(point.arch, num_classes=100, **point.hparams)
            assert count_params(model) == point.params_for(100), point.label

    # The reference stars are drawn with the sweep's points.
    trials = [_trial("wrn", 0.93), _trial("resnet", 0.91)]
    trials[1].num_params = 300_000
    path = plot_pareto(trials, [t.run_id for t in trials], list(c10.values()),
                       tmp_path / "pareto.png")
    assert path is not None
    assert_png(path.read_bytes())
