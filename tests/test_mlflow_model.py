"""Registered versions are MLflow models: MLflow's loader and server run them, their
numbers describe their weights, and tampered files are refused without being run.

A real MLflow SQLite store in tmp. Two quick trials on scikit-learn's real digits
(ResNet-8 and WRN-10-1, 2 epochs on CPU, through ``trainables.engine.Trainer``) are
logged as the sweep's tracking callback logs trials (params; metrics per epoch at
step = epoch) and registered with ``orchestrator.registry.register``, as
``sweep.finish`` registers a sweep's best: the ResNet with its best-validation
checkpoint, the WRN with its epoch-1 checkpoint (not its last epoch), each with the
trial's last-epoch test accuracy as ``Candidate.test_acc``, which must not be what
the version says.
"""

from __future__ import annotations

import json
import pickle
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pytest
import torch

from orchestrator.registry import (
    CHAMPION,
    Candidate,
    UnsafeModelError,
    load_model,
    load_pyfunc,
    register,
)
from tests._cluster import env, free_port, wait_for
from trainables.config import TrainConfig
from trainables.data import Splits, load_splits
from trainables.engine import Trainer

pytestmark = pytest.mark.slow  # MLflow's schema migrations, 4 short epochs, a model server

NAME = "digits"
EPOCHS = 2
TOL = 1e-4  # max abs logit difference: folding and onnxruntime's fp32 rounding, ~1e-6
WRNSWEEP = str(Path(sys.executable).with_name("wrnsweep"))
SERVE_TIMEOUT = 180  # s: `mlflow models serve` imports MLflow, FastAPI, onnxruntime


@dataclass
class Trial:
    run_id: str
    arch: str
    states: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # epoch -> weights
    val_acc: dict[int, float] = field(default_factory=dict)
    registered_epoch: int = 0
    last_test_acc: float = 0.0


@dataclass
class Registered:
    uri: str
    client: Any
    experiment_id: str
    splits: Splits
    trials: dict[str, Trial]  # by run id
    candidates: list[Candidate]
    versions: list[Any]


def _train(client: Any, experiment_id: str, splits: Splits, arch: str,
           hparams: dict[str, Any]) -> tuple[Trial, TrainConfig]:
    from mlflow.entities import Metric, Param

    cfg = TrainConfig.from_dict({"arch": arch, **hparams, "dataset": "digits",
                                 "epochs": EPOCHS, "batch_size": 64, "lr": 0.05,
                                 "device": "cpu", "num_threads": 1})
    run = client.create_run(experiment_id, run_name=f"{arch}-trial",
                            tags={"wrnsweep.sweep": NAME, "wrnsweep.trial_id": arch})
    trial = Trial(run.info.run_id, arch)
    client.log_batch(trial.run_id, params=[Param(k, str(v)) for k, v in cfg.to_dict().items()])
    trainer = Trainer(cfg, splits=splits)
    for _ in range(EPOCHS):
        result = trainer.run_epoch()
        now = int(time.time() * 1000)
        client.log_batch(trial.run_id, metrics=[Metric(k, float(v), now, trainer.epoch)
                                                for k, v in result.metrics.items()])
        trial.val_acc[trainer.epoch] = result.metrics["val_acc"]
        trial.states[trainer.epoch] = {k: v.detach().clone()
                                       for k, v in trainer.model.state_dict().items()}
    trial.last_test_acc = trainer.test_accuracy()
    return trial, cfg


def _candidate(trial: Trial, cfg: TrainConfig, epoch: int) -> Candidate:
    trial.registered_epoch = epoch
    state = {"model": trial.states[epoch], "config": cfg.to_dict(), "num_classes": 10,
             "epoch": epoch}
    return Candidate(trial.run_id, trial.arch, trial.val_acc[epoch], cfg.to_dict(), state,
                     trial.last_test_acc)


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Registered:
    from orchestrator.store import mlflow_client

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    client = mlflow_client(uri)
    experiment_id = client.create_experiment(NAME, artifact_location=(root / "art").as_uri())
    splits = load_splits("digits")
    threads = torch.get_num_threads()
    try:
        resnet, resnet_cfg = _train(client, experiment_id, splits, "resnet", {"depth": 8})
        wrn, wrn_cfg = _train(client, experiment_id, splits, "wrn", {"depth": 10, "width": 1})
    finally:
        torch.set_num_threads(threads)  # Trainer set it for the process
    best = max(resnet.val_acc, key=lambda e: (resnet.val_acc[e], -e))
    candidates = sorted([_candidate(resnet, resnet_cfg, best), _candidate(wrn, wrn_cfg, 1)],
                        key=lambda c: -c.score)
    versions = register(client, NAME, candidates, metric="val_acc",
                        sweep_run_ids={resnet.run_id, wrn.run_id})
    return Registered(uri, client, experiment_id, splits,
                      {t.run_id: t for t in (resnet, wrn)}, candidates, versions)


def _images(splits: Splits, n: int) -> np.ndarray:
    """The first ``n`` test images as the contract has them: uint8 RGB (n, 32, 32, 3)."""
    return splits.test.images[:n].permute(0, 2, 3, 1).contiguous().numpy()


def _logits(model: torch.nn.Module, card: dict[str, Any], images: np.ndarray) -> np.ndarray:
    """The unfolded network on raw images, normalised as the card says: the reference."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()  # (N, 3, 32, 32)
    mean = torch.tensor(card["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(card["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((x / 255 - mean) / std).numpy()


def _model_id(version: Any) -> str:
    assert version.source.startswith("models:/m-"), version.source
    return version.source[len("models:/"):]


def _folder(client: Any, version: Any) -> Path:
    """The local folder of a version's logged model (a file: artifact store here)."""
    location = client.get_logged_model(_model_id(version)).artifact_location
    return Path(url2pathname(urlparse(location).path))


# -- the numbers -----------------------------------------------------------------------------
def test_each_version_is_tagged_with_the_test_accuracy_of_exactly_its_weights(
        registered: Registered) -> None:
    """The engine's own evaluation of each version's weights on the test split equals
    its ``test_acc`` tag, and the weights are the chosen epoch's, which the tag names:
    never the trial's last-epoch test accuracy on other weights."""
    client, splits = registered.client, registered.splits
    versions = client.search_model_versions(f"name='{NAME}'")
    assert len(versions) == 2
    epochs = set()
    for version in versions:
        trial = registered.trials[version.run_id]
        model, card = load_model(f"models:/{NAME}/{version.version}",
                                 tracking_uri=registered.uri)
        chosen = trial.states[trial.registered_epoch]
        assert all(torch.equal(v, chosen[k]) for k, v in model.state_dict().items())

        trainer = Trainer(TrainConfig.from_dict({**card["train_config"], "device": "cpu"}),
                          splits=splits)
        trainer.model.load_state_dict(model.state_dict())
        accuracy = trainer.test_accuracy()
        tags = version.tags
        assert tags["test_acc"] == repr(accuracy), (tags["test_acc"], accuracy)
        correct = round(accuracy * len(splits.test))
        assert tags["test_correct"] == f"{correct}/{len(splits.test)}"
        assert tags["epoch"] == str(card["epoch"]) == str(trial.registered_epoch)
        assert tags["epochs"] == str(EPOCHS)
        assert tags["val_acc"] == repr(trial.val_acc[trial.registered_epoch])
        epochs.add(trial.registered_epoch)

        # The logged model carries the same numbers, at the checkpoint's epoch.
        logged = client.get_logged_model(_model_id(version))
        metrics = {m.key: m for m in logged.metrics}
        assert metrics["test_acc"].value == accuracy
        assert metrics["test_acc"].step == trial.registered_epoch
        assert metrics["val_acc"].value == trial.val_acc[trial.registered_epoch]
        assert logged.source_run_id == version.run_id and str(logged.status) == "READY"

        # The description says what it is: arch, hyperparameters, accuracies, size,
        # sweep and trial, and the fold check.
        text = version.description
        for needle in (card["arch"], "depth=", f"{int(tags['params']):,} parameters",
                       f"epoch {trial.registered_epoch} of {EPOCHS}", f"sweep {NAME}",
                       f"trial {trial.arch}", f"{accuracy:.4f}", "max abs logit difference"):
            assert needle in text, (needle, text)
        assert float(tags["fold_max_abs_diff"]) <= TOL
    assert min(epochs) < EPOCHS  # a checkpoint before the last epoch is among them


# -- MLflow's own tools ----------------------------------------------------------------------
def test_mlflow_loads_the_champion_and_predicts_as_load_model(
        registered: Registered, monkeypatch: pytest.MonkeyPatch) -> None:
    """``mlflow.pyfunc.load_model("models:/NAME@champion")`` (onnxruntime, no wrnsweep
    code) predicts what the project's loader predicts, on real digits images; the
    model has MLflow's parts: flavors, signature, input example, a logged model linked
    to its trial's run with params and metrics."""
    import mlflow
    import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", registered.uri)
    uri = f"models:/{NAME}@{CHAMPION}"
    images = _images(registered.splits, 64)

    served = mlflow.pyfunc.load_model(uri).predict(images)["logits"]
    model, card = load_model(uri, tracking_uri=registered.uri)
    reference = _logits(model, card, images)
    assert served.shape == (64, 10) and served.dtype == np.float32
    assert (served.argmax(1) == reference.argmax(1)).all()
    assert np.abs(served - reference).max() <= TOL
    checked = load_pyfunc(uri, tracking_uri=registered.uri).predict(images)["logits"]
    assert np.array_equal(checked, served)

    info = mlflow.models.get_model_info(uri)
    assert set(info.flavors) == {"python_function", "onnx"}
    assert info.flavors["python_function"]["loader_module"] == "mlflow.onnx"
    inputs, outputs = info.signature.inputs.inputs, info.signature.outputs.inputs
    assert [(s.name, s.type, s.shape) for s in inputs] == [
        ("images", np.dtype("uint8"), (-1, 32, 32, 3))]
    assert [(s.name, s.type, s.shape) for s in outputs] == [
        ("logits", np.dtype("float32"), (-1, 10))]
    assert info.saved_input_example_info["type"] == "ndarray"

    champion = registered.client.get_model_version_by_alias(NAME, CHAMPION)
    logged = registered.client.get_logged_model(_model_id(champion))
    assert logged.name == "model" and logged.source_run_id == champion.run_id
    assert logged.params["lr"] == "0.05" and logged.params["arch"] == card["arch"]
    run = registered.client.get_run(champion.run_id)
    assert logged.model_id in {o.model_id for o in run.outputs.model_outputs}
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [
        {"name": NAME, "version": str(champion.version)}]
    # runs:/RUN/model finds the run's logged model too.
    again, _ = load_model(f"runs:/{champion.run_id}/model", tracking_uri=registered.uri)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _cli_env() -> dict[str, str]:
    return {k: v for k, v in env().items() if k not in ("MLFLOW_TRACKING_URI",
                                                        "MLFLOW_REGISTRY_URI")}


def test_wrnsweep_serve_answers_invocations_on_localhost(registered: Registered,
                                                         tmp_path: Path) -> None:
    """``wrnsweep serve models:/NAME@champion`` runs a real ``mlflow models serve`` on
    127.0.0.1 only; POST /invocations with raw images answers the project loader's
    logits; SIGINT stops it (exit 0) and frees the port."""
    from tests.test_ui_browser import http_ok, listening_addresses

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([WRNSWEEP, "serve", f"models:/{NAME}@{CHAMPION}", "--port",
                                 str(port), "--tracking-uri", registered.uri],
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env=_cli_env())
    try:
        def up() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            return http_ok(f"{base}/health")

        wait_for(up, SERVE_TIMEOUT, "wrnsweep serve to answer /health")
        images = _images(registered.splits, 16)
        reply = _post(f"{base}/invocations", {"inputs": images.tolist()})
        served = np.asarray(reply["predictions"]["logits"], dtype=np.float32)
        model, card = load_model(f"models:/{NAME}@{CHAMPION}", tracking_uri=registered.uri)
        reference = _logits(model, card, images)
        assert served.shape == (16, 10)
        assert (served.argmax(1) == reference.argmax(1)).all()
        assert np.abs(served - reference).max() <= TOL
        assert set(listening_addresses(port)) == {"127.0.0.1"}
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "model server stopped" in text and "Traceback" not in text, text[-3000:]
    assert listening_addresses(port) == []
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()


# -- tampering -------------------------------------------------------------------------------
class _CreatesFile:
    """Unpickling this opens ``path`` for writing: a stand-in for any code in a pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([WRNSWEEP, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env=_cli_env())


def test_a_version_tampered_into_a_pickle_is_refused_without_running_it(
        registered: Registered, tmp_path: Path) -> None:
    """Two versions whose files were turned into pickles after registration (the
    MLmodel switched to MLflow's pickling python-model flavor; the safetensors weights
    replaced by a pickle) are refused by every wrnsweep loader, by their registered
    digests and, in a copy without them, by what the files are; the pickle never runs."""
    import yaml

    client = registered.client
    marker = tmp_path / "pickle-ran"
    payload = pickle.dumps(_CreatesFile(marker))
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_CreatesFile(control))).close()
    assert control.exists()  # the payload is live: unpickling it does create the file

    first, second = register(client, "tampered", registered.candidates, metric="val_acc")
    flavor_folder, weights_folder = _folder(client, first), _folder(client, second)

    # 1. MLmodel: python_function now loads a cloudpickled Python model.
    (flavor_folder / "python_model.pkl").write_bytes(payload)
    mlmodel = yaml.safe_load((flavor_folder / "MLmodel").read_text())
    mlmodel["flavors"] = {"python_function": {
        "loader_module": "mlflow.pyfunc.model", "python_model": "python_model.pkl",
        "env": {"conda": "conda.yaml", "virtualenv": "python_env.yaml"},
        "python_version": mlmodel["flavors"]["python_function"]["python_version"]}}
    (flavor_folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    # 2. The fine-tuning weights: a pickle where the safetensors file was.
    (weights_folder / "extra_files" / "model.safetensors").write_bytes(payload)

    uri1, uri2 = f"models:/tampered/{first.version}", f"models:/tampered/{second.version}"
    with pytest.raises(UnsafeModelError, match="MLmodel differs from what was registered"):
        load_pyfunc(uri1, tracking_uri=registered.uri)
    with pytest.raises(UnsafeModelError, match=r"model\.safetensors differs from what was"):
        load_model(uri2, tracking_uri=registered.uri)
    # Copies without the registry's digests: refused for what the files are.
    copy1, copy2 = tmp_path / "copy1", tmp_path / "copy2"
    shutil.copytree(flavor_folder, copy1)
    shutil.copytree(weights_folder, copy2)
    with pytest.raises(UnsafeModelError, match=r"'mlflow\.pyfunc\.model'"):
        load_pyfunc(str(copy1))
    with pytest.raises(UnsafeModelError, match="not a safetensors file"):
        load_model(str(copy2))

    # The CLI: exit 2, one line, nothing started, nothing written.
    port = free_port()
    runs = {
        "serve registered": _run("serve", uri1, "--port", str(port), "--tracking-uri",
                                 registered.uri, cwd=tmp_path),
        "serve copy": _run("serve", str(copy1), "--port", str(port), cwd=tmp_path),
        "export registered": _run("export", uri2, "--out", str(tmp_path / "w.safetensors"),
                                  "--tracking-uri", registered.uri, cwd=tmp_path),
        "export copy": _run("export", str(copy2), "--out", str(tmp_path / "w.onnx"),
                            cwd=tmp_path),
    }
    for what, result in runs.items():
        assert result.returncode == 2, (what, result.stdout, result.stderr)
        assert "refused" in result.stderr and "Traceback" not in result.stderr, (what,
                                                                                 result.stderr)
    assert not (tmp_path / "w.safetensors").exists() and not (tmp_path / "w.onnx").exists()
    assert not marker.exists()


def test_an_untampered_copy_loads(registered: Registered, tmp_path: Path) -> None:
    """The checks pass a registered version's folder as it was written (a copy, as a
    user downloads one), so the refusals above are the tampering's doing."""
    champion = registered.client.get_model_version_by_alias(NAME, CHAMPION)
    copy = tmp_path / "champion"
    shutil.copytree(_folder(registered.client, champion), copy)
    model, card = load_model(str(copy))
    images = _images(registered.splits, 8)
    served = load_pyfunc(str(copy)).predict(images)["logits"]
    assert np.abs(served - _logits(model, card, images)).max() <= TOL
