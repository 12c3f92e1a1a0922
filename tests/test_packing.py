"""``resources: auto`` (GPU share from the memory estimate) and the OOM escalation.

The escalation test runs a real sweep on a real local Ray that declares one GPU
(Ray schedules fractional GPUs by count; torch sees none here, so the trials
train on the CPU) with ``WRNSWEEP_OOM_BELOW_SHARE`` making a trial with too
small a share raise CUDA's out-of-memory error, as a real one would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import parse_sweep
from orchestrator.packing import AutoResources, GiB, corner_configs, estimate_bytes, is_oom
from orchestrator.sweep import resources_fn
from tests._meta import sweep_meta

REPO = Path(__file__).resolve().parents[1]
WRNSWEEP = str(Path(sys.executable).with_name("wrnsweep"))

AUTO_SWEEP = """\
name: packing
dataset: {name: synthetic, synthetic_size: 256}
architectures:
  resnet:
    depth: {choices: [8, 14]}
  wrn:
    depth: 10
    width: {low: 1, high: 2}
recipe: {epochs: 2, batch_size: 64, lr: 0.05}
search: {num_samples: 1, max_concurrent: 1, seed: 0}
scheduler: {name: fifo}
resources: {default: auto}
ray: {gpu_memory_gib: 16, max_failures: 1}
tracking: {top_k: 1}
"""


def test_auto_share_follows_the_estimate() -> None:
    """Small ResNets pack eight to a GPU; WRN-28-10 needs more of a small GPU; a larger
    batch needs more; the share is the smallest that holds the estimate with headroom."""
    small_gpu = AutoResources(16 * GiB, estimator=estimate_bytes)
    resnet20 = small_gpu.packing({"arch": "resnet", "depth": 20, "dataset": "cifar10"})
    wrn = small_gpu.packing({"arch": "wrn", "depth": 28, "width": 10, "dataset": "cifar10"})
    wrn_big = small_gpu.packing({"arch": "wrn", "depth": 28, "width": 10,
                                 "dataset": "cifar10", "batch_size": 512})
    assert resnet20.share == 0.125
    assert resnet20.total_bytes < wrn.total_bytes < wrn_big.total_bytes
    assert wrn.share == 0.25 and wrn_big.share == 1.0
    for p in (resnet20, wrn, wrn_big):
        assert p.share * 16 * GiB * 0.8 >= p.total_bytes  # fits with 20 % headroom
        assert p.share == 0.125 or (p.share / 2) * 16 * GiB * 0.8 < p.total_bytes  # smallest
    # An 80 GiB GPU takes even WRN-28-10 at batch 128 eight to a GPU (~2.7 GiB each).
    assert AutoResources(80 * GiB, estimator=estimate_bytes)(
        {"arch": "wrn", "depth": 28, "width": 10, "dataset": "cifar10"}) == {
            "cpu": 1.0, "gpu": 0.125}


def test_auto_estimates_once_per_configuration() -> None:
    calls: list[str] = []

    def estimator(tcfg) -> int:
        calls.append(tcfg.arch)
        return 3 * GiB

    auto = AutoResources(16 * GiB, estimator=estimator)
    for _ in range(3):
        assert auto({"arch": "resnet", "depth": 20}) == {"cpu": 1.0, "gpu": 0.25}
    assert auto({"arch": "resnet", "depth": 32}) == {"cpu": 1.0, "gpu": 0.25}
    assert calls == ["resnet", "resnet"]  # one per configuration, then the cache


def test_resources_fn_auto_with_and_without_gpus() -> None:
    cfg = parse_sweep(AUTO_SWEEP, "auto.yaml")
    without = resources_fn(cfg, cluster_has_gpu=False)
    assert without({"arch": "resnet", "resnet.depth": 8}) == {"cpu": 1.0, "gpu": 0.0}
    with_gpu = resources_fn(cfg, cluster_has_gpu=True, gpu_memory_bytes=16 * GiB)
    assert with_gpu({"arch": "resnet", "resnet.depth": 8, "dataset": "synthetic",
                     "synthetic_size": 256, "batch_size": 64}) == {"cpu": 1.0, "gpu": 0.125}


def test_corner_configs_span_the_space() -> None:
    cfg = parse_sweep(AUTO_SWEEP, "auto.yaml")
    corners = corner_configs(cfg, "wrn")
    assert sorted(c["width"] for c in corners) == [1, 2]
    assert all(c["depth"] == 10 and c["batch_size"] == 64 for c in corners)
    assert sorted(c["depth"] for c in corner_configs(cfg, "resnet")) == [8, 14]


def test_dry_run_shows_estimate_and_share(tmp_path) -> None:
    sweep = tmp_path / "auto.yaml"
    sweep.write_text(AUTO_SWEEP)
    result = subprocess.run([WRNSWEEP, "launch", str(sweep), "--dry-run"], capture_output=True,
                            text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("architecture")]
    assert len(lines) == 2
    assert all("estimated peak" in line and "GiB -> 0.125 GPU" in line
               and "16 GiB GPUs" in line for line in lines), lines
    assert not (tmp_path / "runs").exists()  # a dry run starts nothing


def test_is_oom_reads_the_latest_failure() -> None:
    text = ("Failure # 1 (occurred at ...)\ntorch.OutOfMemoryError: CUDA out of memory.\n"
            "Failure # 2 (occurred at ...)\nValueError: something else\n")
    assert not is_oom(text)
    assert is_oom(text + "Failure # 3 (occurred at ...)\ntorch.OutOfMemoryError: CUDA out\n")


@pytest.mark.slow
def test_oom_retries_with_the_next_share(tmp_path) -> None:
    """A trial whose share is too small goes 1/8 -> 1/4 -> 1/2 and finishes, from its
    checkpoint, without using up ``max_failures`` (1 here, and two OOMs happen)."""
    import ray
    from mlflow import MlflowClient
    from ray import tune

    from orchestrator.config import load_sweep
    from orchestrator.sweep import launch, make_manifest

    sweep = tmp_path / "auto.yaml"
    sweep.write_text(AUTO_SWEEP.replace("  resnet:\n    depth: {choices: [8, 14]}\n", "")
                     .replace("width: {low: 1, high: 2}", "width: 1"))
    cfg = load_sweep(sweep)
    plan = make_manifest(cfg, sweep_file=str(sweep), storage=str(tmp_path / "runs"))
    lines: list[str] = []
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
             runtime_env={"env_vars": {"WRNSWEEP_OOM_BELOW_SHARE": "0.5"}})
    try:
        summary = launch(cfg, plan, echo=lines.append)
    finally:
        ray.shutdown()
    assert summary["errors"] == 0
    assert any("CUDA out of memory at 0.125 GPU; retrying with 0.25" in x for x in lines)
    assert any("CUDA out of memory at 0.25 GPU; retrying with 0.5" in x for x in lines)

    [trial] = tune.ExperimentAnalysis(plan.experiment_path).trials
    assert trial.status == "TERMINATED"
    assert trial.placement_group_factory.required_resources["GPU"] == 0.5
    meta = sweep_meta(Path(plan.home))
    client = MlflowClient(tracking_uri=meta["tracking_uri"])
    [run] = client.search_runs(
        [meta["experiment_id"]],
        filter_string=f"tags.`mlflow.parentRunId` = '{meta['parent_run_id']}'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["wrnsweep.gpu"] == "0.5"
    assert run.data.tags["wrnsweep.retries"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2]
    first = client.download_artifacts(run.info.run_id, "errors/attempt-1.txt", str(tmp_path))
    assert "OutOfMemoryError" in Path(first).read_text()
