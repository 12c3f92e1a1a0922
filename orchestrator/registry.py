"""The model registry: register a sweep's best checkpoints, load them back safely.

A registered version is a folder of two files in the trial's MLflow run,
``model/model.safetensors`` (the state_dict) and ``model/config.json`` (the
builder's arguments plus input shape and normalisation). Loading rebuilds the
network with ``trainables.models.build_model`` and loads the tensors: no pickle
anywhere, so a model file cannot run code (``mlflow.pytorch`` pickles the module).

Stages are deprecated in MLflow 3: the best version gets the alias
``champion`` and is loaded as ``models:/NAME@champion``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHAMPION = "champion"
MODEL_DIR = "model"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class Candidate:
    """A trial worth registering: its run, best score and best checkpoint's state."""

    run_id: str
    trial_id: str
    score: float
    config: dict[str, Any]
    state: dict[str, Any]  # engine checkpoint (model state_dict, config, num_classes, ...)
    test_acc: float | None


def model_card(state: dict[str, Any]) -> dict[str, Any]:
    """What a loader needs besides the weights: builder arguments and input handling."""
    from trainables.config import TrainConfig
    from trainables.data import DATASETS

    cfg = TrainConfig.from_dict(state["config"])
    spec = DATASETS[cfg.dataset]
    return {
        "arch": cfg.arch,
        "num_classes": int(state["num_classes"]),
        "hparams": cfg.model_hparams(),
        "input_shape": [3, 32, 32],
        "mean": list(spec.mean),
        "std": list(spec.std),
        "dataset": cfg.dataset,
        "epoch": int(state["epoch"]),
        "train_config": cfg.to_dict(),
    }


def write_model_folder(state: dict[str, Any], folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state["model"].items()}
    save_file(tensors, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(model_card(state), indent=2) + "\n")
    return folder


def register(client: Any, name: str, candidates: list[Candidate], *,
             metric: str, sweep_run_ids: set[str] | frozenset[str] = frozenset()) -> list[Any]:
    """Register ``candidates`` (best first) as versions of ``name``; alias the first.

    A run registered before (an extended sweep registers again after each round)
    keeps its version, re-ranked, rather than getting a duplicate; a version of one
    of ``sweep_run_ids`` (the sweep's trials) that is no longer among the candidates
    loses its ``rank`` tag, so no two versions claim the same rank.

    Returns the created ModelVersion objects in the same order.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise
    versions = []
    for rank, cand in enumerate(candidates, start=1):
        existing = client.search_model_versions(f"name='{name}' and run_id='{cand.run_id}'")
        if existing:  # registered by an earlier round of an extended sweep: rank it again
            client.set_model_version_tag(name, existing[0].version, "rank", str(rank))
            versions.append(existing[0])
            continue
        with tempfile.TemporaryDirectory() as tmp:
            write_model_folder(cand.state, Path(tmp) / MODEL_DIR)
            client.log_artifacts(cand.run_id, str(Path(tmp) / MODEL_DIR), MODEL_DIR)
        source = f"{client.get_run(cand.run_id).info.artifact_uri.rstrip('/')}/{MODEL_DIR}"
        card = model_card(cand.state)
        tags = {
            metric: f"{cand.score:.6g}",
            "test_acc": "n/a" if cand.test_acc is None else f"{cand.test_acc:.6g}",
            "arch": card["arch"],
            "config": json.dumps(card["hparams"], sort_keys=True),
            "trial_id": cand.trial_id,
            "rank": str(rank),
        }
        version = client.create_model_version(name, source, run_id=cand.run_id, tags=tags)
        versions.append(version)
    chosen = {cand.run_id for cand in candidates}
    for stale in _versions_of(client, name, sweep_run_ids - chosen):
        if "rank" in (stale.tags or {}):
            client.delete_model_version_tag(name, stale.version, "rank")
    if versions:
        client.set_registered_model_alias(name, CHAMPION, versions[0].version)
    return versions


def _versions_of(client: Any, name: str, run_ids: set[str]) -> list[Any]:
    """The versions of ``name`` made from any of ``run_ids``."""
    if not run_ids:
        return []
    return [v for v in client.search_model_versions(f"name='{name}'", max_results=10_000)
            if v.run_id in run_ids]


def resolve_source(uri: str, tracking_uri: str | None) -> str:
    """The artifact location behind ``models:/NAME@alias`` or ``models:/NAME/VERSION``.

    Resolved through a client whose registry is the tracking store: MLflow's own
    ``models:/`` handling consults the process-wide default registry instead.
    """
    if not uri.startswith("models:/"):
        return uri
    from orchestrator.tracking import mlflow_client

    if tracking_uri is None:
        import mlflow

        tracking_uri = mlflow.get_tracking_uri()
    client = mlflow_client(tracking_uri)
    name, sep, alias = uri[len("models:/"):].partition("@")
    if sep:
        return client.get_model_version_by_alias(name, alias).source
    name, _, version = name.rpartition("/")
    if not name or not version:
        raise ValueError(f"model URI must be models:/NAME@ALIAS or models:/NAME/VERSION, "
                         f"got {uri!r}")
    return client.get_model_version(name, version).source


def load_model(uri: str, *, tracking_uri: str | None = None) -> tuple[Any, dict[str, Any]]:
    """``(nn.Module in eval mode on CPU, model card)`` from a registry URI or folder.

    ``uri`` may be ``models:/NAME@alias``, ``models:/NAME/VERSION``, ``runs:/ID/model``
    or a local folder holding the two files.
    """
    from safetensors.torch import load_file

    from trainables.models import build_model

    folder = Path(uri)
    if not folder.is_dir():
        import mlflow.artifacts

        folder = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=resolve_source(uri, tracking_uri), tracking_uri=tracking_uri))
    card = json.loads((folder / CONFIG_FILE).read_text())
    model = build_model(card["arch"], num_classes=card["num_classes"], **card["hparams"])
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return model.eval(), card
