"""The model registry across rankings: versions, ranks and the champion alias.

A real MLflow SQLite store; the models are real (tiny) ResNets, registered as an
extended sweep does after each round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orchestrator.registry import CHAMPION, Candidate, register
from trainables.config import TrainConfig
from trainables.models import build_model

pytestmark = pytest.mark.slow  # MLflow's schema migrations on a new SQLite store: ~10 s


def _state() -> dict[str, Any]:
    model = build_model("resnet", num_classes=10, depth=8)
    config = TrainConfig(arch="resnet", model={"depth": 8}, epochs=1)
    return {"model": model.state_dict(), "config": config.to_dict(), "num_classes": 10,
            "epoch": 1}


def test_a_new_ranking_moves_ranks_and_champion_without_duplicates(tmp_path: Path) -> None:
    """Round 1 ranks runs A, B; round 2 ranks C, B. C gets a new version, rank 1 and the
    champion alias; B keeps its version, re-ranked 2; A keeps its version but no rank."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    a, b, c = (client.create_run(exp).info.run_id for _ in range(3))
    state = _state()

    def cand(run_id: str, score: float) -> Candidate:
        return Candidate(run_id, run_id[:8], score, {}, state, None)

    everything = {a, b, c}
    register(client, "m", [cand(a, 0.6), cand(b, 0.5)], metric="val_acc",
             sweep_run_ids=everything)
    register(client, "m", [cand(c, 0.7), cand(b, 0.5)], metric="val_acc",
             sweep_run_ids=everything)

    versions = {v.run_id: v for v in client.search_model_versions("name='m'")}
    assert set(versions) == {a, b, c} and len(client.search_model_versions("name='m'")) == 3
    assert "rank" not in versions[a].tags
    assert versions[c].tags["rank"] == "1" and versions[b].tags["rank"] == "2"
    assert client.get_model_version_by_alias("m", CHAMPION).run_id == c
