"""The model registry across rankings (versions, ranks, the champion alias), and the
checks every loader runs on a model's files before anything in them is executed.

A real MLflow SQLite store; the models are real (tiny) ResNets, registered as an
extended sweep does after each round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.registry import (
    CHAMPION,
    Candidate,
    UnsafeModelError,
    check_model_folder,
    file_digests,
    register,
)
from trainables.config import TrainConfig
from trainables.models import build_model


def _state(data_root: Path) -> dict[str, Any]:
    model = build_model("resnet", num_classes=10, depth=8)
    # CIFAR-10 in a folder that does not hold it: the test split cannot be read.
    config = TrainConfig(arch="resnet", model={"depth": 8}, epochs=1,
                         data_root=str(data_root))
    return {"model": model.state_dict(), "config": config.to_dict(), "num_classes": 10,
            "epoch": 1}


@pytest.mark.slow  # MLflow's schema migrations on a new SQLite store: ~10 s
def test_a_new_ranking_moves_ranks_and_champion_without_duplicates(tmp_path: Path) -> None:
    """Round 1 ranks runs A, B; round 2 ranks C, B. C gets a new version, rank 1 and the
    champion alias; B keeps its version, re-ranked 2; A keeps its version but no rank.
    The test split is not readable here: each version says so instead of a test_acc."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    a, b, c = (client.create_run(exp).info.run_id for _ in range(3))
    state = _state(tmp_path / "no-cifar")

    def cand(run_id: str, score: float) -> Candidate:
        return Candidate(run_id, run_id[:8], score, {}, state, 0.99)

    everything = {a, b, c}
    warnings: list[str] = []
    register(client, "m", [cand(a, 0.6), cand(b, 0.5)], metric="val_acc",
             sweep_run_ids=everything, echo=warnings.append)
    register(client, "m", [cand(c, 0.7), cand(b, 0.5)], metric="val_acc",
             sweep_run_ids=everything, echo=warnings.append)

    versions = {v.run_id: v for v in client.search_model_versions("name='m'")}
    assert set(versions) == {a, b, c} and len(client.search_model_versions("name='m'")) == 3
    assert "rank" not in versions[a].tags
    assert versions[c].tags["rank"] == "1" and versions[b].tags["rank"] == "2"
    assert client.get_model_version_by_alias("m", CHAMPION).run_id == c
    for version in versions.values():  # never the candidate's (last-epoch) 0.99
        assert version.tags["test_acc"] == "n/a"
        assert "cifar10 test split is not readable" in version.tags["test_acc_missing"]
    assert len(warnings) == 3 and all("without test_acc" in w for w in warnings)


# -- the checks --------------------------------------------------------------------------
def _mlmodel(folder: Path, flavors: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "MLmodel").write_text(yaml.safe_dump({"flavors": flavors}))
    return folder


ONNX_FLAVORS = {"python_function": {"loader_module": "mlflow.onnx", "data": "model.onnx"},
                "onnx": {"data": "model.onnx", "providers": ["CPUExecutionProvider"]}}


def test_the_flavors_of_a_registered_model_pass(tmp_path: Path) -> None:
    check_model_folder(_mlmodel(tmp_path / "ok", ONNX_FLAVORS))


@pytest.mark.parametrize(("flavors", "message"), [
    ({**ONNX_FLAVORS, "pytorch": {"pickle_module_name": "mlflow.pytorch.pickle_module"}},
     r"flavor\(s\) \['pytorch'\]"),
    ({"python_function": {"loader_module": "mlflow.pyfunc.model",
                          "python_model": "python_model.pkl"}},
     "loaded by 'mlflow.pyfunc.model'"),
    ({**ONNX_FLAVORS, "python_function": {**ONNX_FLAVORS["python_function"], "code": "code"}},
     "brings code"),
    ({**ONNX_FLAVORS, "onnx": {**ONNX_FLAVORS["onnx"], "data": "other.bin"}},
     "loads 'other.bin'"),
    ({**ONNX_FLAVORS, "onnx": {**ONNX_FLAVORS["onnx"],
                              "onnx_session_options": {"extra_session_config": {"a": "b"}}}},
     "onnx_session_options"),
], ids=["pickling-flavor", "python-model", "code-path", "other-data", "session-options"])
def test_an_mlmodel_that_could_run_code_is_refused(tmp_path: Path, flavors: dict[str, Any],
                                                   message: str) -> None:
    with pytest.raises(UnsafeModelError, match=message):
        check_model_folder(_mlmodel(tmp_path / "m", flavors))


def test_a_file_unlike_its_digest_is_refused(tmp_path: Path) -> None:
    folder = _mlmodel(tmp_path / "m", ONNX_FLAVORS)
    (folder / "config.json").write_text("{}")
    digests = file_digests(folder)
    check_model_folder(folder, digests)
    (folder / "config.json").write_text('{"arch": "wrn"}')
    with pytest.raises(UnsafeModelError, match=r"config\.json differs from what was registered"):
        check_model_folder(folder, digests)
    (folder / "config.json").unlink()
    with pytest.raises(UnsafeModelError, match=r"config\.json is missing"):
        check_model_folder(folder, digests)


def test_onnx_custom_operators_and_external_data_are_refused(tmp_path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def save(folder: Path, graph: Any) -> Path:
        _mlmodel(folder, ONNX_FLAVORS)
        onnx.save(helper.make_model(graph), str(folder / "model.onnx"))
        return folder

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    custom = helper.make_graph([helper.make_node("Evil", ["x"], ["y"], domain="com.evil")],
                               "g", [x], [y])
    with pytest.raises(UnsafeModelError, match=r"domain 'com\.evil'"):
        check_model_folder(save(tmp_path / "custom", custom))

    weight = numpy_helper.from_array(np.ones(1, dtype=np.float32), "w")
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    weight.ClearField("raw_data")
    external = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y],
                                 initializer=[weight])
    with pytest.raises(UnsafeModelError, match="reads an external file"):
        check_model_folder(save(tmp_path / "external", external))
