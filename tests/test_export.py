"""``orchestrator.export``: folded inference exports of every family, checked end to end.

Each family is trained for a few SGD steps on random data, its BN statistics are
re-estimated and its BN affines perturbed (a few steps barely move gamma off 1,
which would hide a fold that forgot it), and the model is written as a registry
model folder. The exports are then read back with the consumers' own loaders
(``torch.jit.load``, onnxruntime, safetensors) and compared with the unfolded
model on inputs the exporter never saw.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from orchestrator import export
from orchestrator.export import FORMATS, Affine, export_model, fold_for_inference
from orchestrator.registry import Candidate, load_model, register, write_model_folder
from trainables.config import TrainConfig
from trainables.models import build_model
from trainables.models.diracnet import DiracConv2d

TOL = 1e-4  # max abs logit difference: fp32 rounding through ~10 layers is ~1e-6


@dataclass(frozen=True)
class Case:
    id: str
    arch: str
    hparams: dict[str, Any]
    folded_bn: int  # BNs merged into the conv before them
    affine_bn: int  # BNs after a residual add / before the head: fixed Affine


CASES = [
    # stem + 3 blocks x (bn1, bn2): all after a conv
    Case("resnet8-A", "resnet", {"depth": 8, "shortcut": "A"}, 7, 0),
    # ... plus the two option-B projection BNs
    Case("resnet8-B", "resnet", {"depth": 8, "shortcut": "B"}, 9, 0),
    # 3 x bn2 fold into conv1; 3 x bn1 (the first reads the stem output that is also
    # the identity skip) and the final BN become Affine
    Case("wrn10-1", "wrn", {"depth": 10, "width": 1, "dropout": 0.3}, 3, 4),
    # 3 x (bn2, bn3) + the first block's bn1 into the stem conv (its shortcut is a
    # projection, so nothing else reads the stem output); 2 x bn1 + final are Affine
    Case("preact11", "preact_resnet", {"depth": 11}, 7, 3),
    # the same with the stride on the 3x3 conv instead of the first 1x1 conv
    Case("preact11-3x3", "preact_resnet", {"depth": 11, "stride_on": "conv3x3"}, 7, 3),
    # stem BN + 6 Dirac layers' BNs, all folded by trainables.models.diracnet.fold
    Case("dirac10-v1", "diracnet", {"depth": 10, "width": 1, "variant": "v1"}, 7, 0),
    Case("dirac10-v2", "diracnet", {"depth": 10, "width": 1, "variant": "v2"}, 7, 0),
]
EXT = {"torchscript": "ts", "onnx": "onnx", "state_dict": "safetensors"}


def _trained(case: Case) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(case.arch, num_classes=10, **case.hparams)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(3):
        x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DiracConv2d):  # make the learned kernel matter next to delta
                m.beta.uniform_(0.3, 1.0)
        # Statistics of the network as it now is (as after training): estimated after
        # beta moved, or the eval-mode activations grow layer after layer in a
        # DiracNet (no skip to hold them) and fp32 rounding alone exceeds TOL.
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for bn in bns:  # cumulative average: running stats equal the data's
            bn.reset_running_stats()
            bn.momentum = None
        for _ in range(2):
            model(torch.randn(32, 3, 32, 32))
        for bn in bns:
            bn.momentum = 0.1
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
    return model.eval()


def _state(case: Case, model: nn.Module) -> dict[str, Any]:
    config = TrainConfig.from_dict({"arch": case.arch, "epochs": 1, **case.hparams})
    return {"model": model.state_dict(), "config": config.to_dict(), "num_classes": 10,
            "epoch": 1}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {c.id: write_model_folder(_state(c, _trained(c)), root / c.id) for c in CASES}


def _fresh_batch() -> torch.Tensor:
    # Not the exporter's check batches: another seed and a batch size of 5.
    return torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(123)) * 1.5


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fold_removes_bn_and_matches(case: Case, folders: dict[str, Path]) -> None:
    model, card = load_model(str(folders[case.id]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # fold must use the running statistics and leave the mode alone
    folded = fold_for_inference(model, card)
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    kinds = {type(m) for m in folded.modules()}
    assert nn.BatchNorm2d not in kinds
    assert DiracConv2d not in kinds
    assert not folded.training
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bn == case.folded_bn + case.affine_bn
    assert sum(isinstance(m, Affine) for m in folded.modules()) == case.affine_bn

    x = _fresh_batch()
    with torch.no_grad():
        diff = (folded(x) - model.eval()(x)).abs().max().item()
    assert diff <= TOL


def _reload(path: Path, fmt: str, case: Case, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Logits for ``x`` and the metadata, through the consumer's own loader."""
    if fmt == "torchscript":
        extra = {"wrnsweep.json": ""}
        module = torch.jit.load(str(path), _extra_files=extra)
        graph = str(module.inlined_graph)
        assert "batch_norm" not in graph and "DiracConv2d" not in graph
        with torch.no_grad():
            return module(x), json.loads(extra["wrnsweep.json"])
    if fmt == "onnx":
        onnx = pytest.importorskip("onnx")
        ort = pytest.importorskip("onnxruntime")
        proto = onnx.load(str(path))
        assert proto.opset_import[0].version == 17
        assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}
        meta = json.loads({p.key: p.value for p in proto.metadata_props}["wrnsweep"])
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0]), meta
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["wrnsweep"])
    model = build_model(meta["arch"], num_classes=meta["num_classes"], **meta["hparams"])
    model.load_state_dict(load_file(str(path)))  # the unfolded architecture, BN intact
    with torch.no_grad():
        return model.eval()(x), meta


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_export_reloads_and_matches(case: Case, fmt: str, folders: dict[str, Path],
                                    tmp_path: Path) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnx")
    out = tmp_path / "sub" / f"model.{EXT[fmt]}"
    result = export_model(str(folders[case.id]), out, fmt=fmt)

    assert result.path == out and out.is_file()
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no partial file left
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file the user writes
    assert result.format == fmt
    assert 0 <= result.max_abs_diff <= TOL
    if fmt == "state_dict":  # the unfolded weights: nothing folded
        assert (result.folded_bn, result.affine_bn) == (0, 0)
    else:
        assert (result.folded_bn, result.affine_bn) == (case.folded_bn, case.affine_bn)

    model, card = load_model(str(folders[case.id]))
    x = _fresh_batch()
    logits, meta = _reload(out, fmt, case, x)
    with torch.no_grad():
        assert (logits - model(x)).abs().max().item() <= TOL

    assert meta == result.card
    assert meta["arch"] == case.arch and meta["hparams"] == card["hparams"]
    assert meta["input_shape"] == [3, 32, 32]
    assert meta["mean"] == card["mean"] and meta["std"] == card["std"]
    assert meta["normalise"] == "x = (x/255 - mean)/std per channel"
    assert meta["export"]["format"] == fmt


def test_bad_format_raises_and_writes_nothing(folders: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.bin"
    with pytest.raises(ValueError, match=r"format must be one of \['torchscript', 'onnx', "
                                         r"'state_dict'\], got 'pickle'"):
        export_model(str(folders["resnet8-A"]), out, fmt="pickle")
    assert not out.exists()


def test_missing_model_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no model folder"):
        export_model(str(tmp_path / "nope"), tmp_path / "m.ts")


def test_mismatch_raises_names_difference_and_writes_nothing(
        folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = export.fold_for_inference

    def broken(model: nn.Module, card: dict[str, Any]) -> nn.Module:
        folded = real(model, card)
        with torch.no_grad():
            folded.fc.bias.add_(0.01)  # a fold that is wrong by 0.01 on every logit
        return folded

    monkeypatch.setattr(export, "fold_for_inference", broken)
    out = tmp_path / "m.ts"
    with pytest.raises(RuntimeError, match=r"max abs logit difference 0\.01 > tolerance"):
        export_model(str(folders["resnet8-B"]), out)
    assert list(tmp_path.iterdir()) == []


def test_onnx_missing_gives_install_hint(folders: dict[str, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(ImportError, match="pip install onnx"):
        export_model(str(folders["wrn10-1"]), tmp_path / "m.onnx", fmt="onnx")


def test_fold_rejects_other_modules_and_wrong_card(folders: dict[str, Path]) -> None:
    with pytest.raises(TypeError, match="Linear"):
        fold_for_inference(nn.Linear(2, 2), {})
    with pytest.raises(TypeError, match=r"wrn\.fold expects a WideResNet, got BasicBlock"):
        fold_for_inference(build_model("wrn", num_classes=10, depth=10).blocks[0])
    model, _ = load_model(str(folders["wrn10-1"]))
    with pytest.raises(ValueError, match="arch='resnet'"):
        fold_for_inference(model, {"arch": "resnet"})


@pytest.mark.slow  # a real MLflow SQLite store: its schema migrations take ~10 s
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_registered_champion(folders: dict[str, Path], tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(exp)
    case = CASES[1]
    model, _ = load_model(str(folders[case.id]))
    register(client, "m", [Candidate(run.info.run_id, "t0", 0.5, {}, _state(case, model),
                                     None)], metric="val_acc")

    result = export_model("models:/m@champion", tmp_path / "champion.ts", tracking_uri=uri)

    assert result.max_abs_diff <= TOL and result.folded_bn == case.folded_bn
    assert result.card["export"]["source"] == "models:/m@champion"
    module = torch.jit.load(str(result.path))
    x = _fresh_batch()
    with torch.no_grad():
        assert (module(x) - model(x)).abs().max().item() <= TOL


class _NetWithoutFold(nn.Module):
    """A network of a family whose module (this test file) defines no ``fold``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_fold_of_a_family_without_fold_is_a_type_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """fold_for_inference names no family: it asks the model's family for its ``fold``."""
    from trainables.models import registry

    registry.get_family("wrn")  # load the built-in zoo before the registry is patched
    family = registry.Family(
        name="nofold", title="-", paper="-", module=__name__,
        hparams=(registry.HParam("depth", 1, "layers"),),
        recipe=registry.Recipe(nesterov=False, weight_decay=0.0, milestones=(0.5,), gamma=0.1,
                               source="-"))
    monkeypatch.setitem(registry._REGISTRY, "nofold", family)
    with pytest.raises(TypeError, match="defines no fold"):
        fold_for_inference(_NetWithoutFold())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fold_keeps_float64_and_is_exact(case: Case, folders: dict[str, Path]) -> None:
    """The folded network takes the model's dtype: float64 in, float64 out, exact to ~1e-12."""
    model, card = load_model(str(folders[case.id]))
    model = model.double().eval()
    folded = fold_for_inference(model, card)
    tensors = [*folded.parameters(), *folded.buffers()]
    assert {t.dtype for t in tensors} == {torch.float64}
    x = _fresh_batch().double()
    with torch.no_grad():
        want = model(x)
        diff = (folded(x) - want).abs().max().item()
    assert diff <= 1e-11 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("stride_on", ["conv1x1", "conv3x3"])
def test_fold_keeps_the_stride_where_the_model_has_it(stride_on: str) -> None:
    """Pre-act ResNet: a folded unit strides in the conv that strided in the model."""
    model = build_model("preact_resnet", num_classes=10, depth=11, stride_on=stride_on).eval()
    folded = fold_for_inference(model)
    for b, f in zip(model.blocks, folded.blocks, strict=True):
        assert [c.stride for c in (f.conv1, f.conv2, f.conv3)] == [
            c.stride for c in (b.conv1, b.conv2, b.conv3)]
    assert folded.blocks[1].conv1.stride == ((2, 2) if stride_on == "conv1x1" else (1, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["wrn", "resnet", "preact_resnet", "diracnet"])
def test_fold_keeps_the_device(arch: str) -> None:
    """A CUDA model folds into a CUDA network (nothing is built on the CPU and left there)."""
    model = build_model(arch, num_classes=10, depth={"wrn": 10, "resnet": 8,
                                                     "preact_resnet": 11, "diracnet": 10}[arch])
    model = model.cuda().eval()
    folded = fold_for_inference(model)
    assert {t.device.type for t in [*folded.parameters(), *folded.buffers()]} == {"cuda"}
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max().item() <= TOL


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_serving_graph_takes_raw_images_and_matches(case: Case,
                                                    folders: dict[str, Path]) -> None:
    """The graph a registered version serves (``serving_onnx``): uint8 RGB (N, 32, 32, 3)
    in, ``logits`` out, normalisation inside; onnxruntime's logits on random images of
    another batch size than the traced one equal the unfolded model's on the same
    images normalised as the card says, for every family."""
    import numpy as np
    import onnxruntime

    model, card = load_model(str(folders[case.id]))
    card = {**card, "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}
    graph = export.serving_onnx(model, card)
    assert (graph.folded_bn, graph.affine_bn) == (case.folded_bn, case.affine_bn)
    assert {n.op_type for n in graph.proto.graph.node}.isdisjoint({"BatchNormalization"})
    stored = {p.key: p.value for p in graph.proto.metadata_props}[export.METADATA_KEY]
    assert json.loads(stored) == card

    session = onnxruntime.InferenceSession(graph.proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    assert [(i.name, i.type, i.shape[1:]) for i in session.get_inputs()] == [
        ("images", "tensor(uint8)", [32, 32, 3])]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(7))
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    mean = torch.tensor(card["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(card["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = model((images.permute(0, 3, 1, 2).float() / 255 - mean) / std).numpy()
    assert logits.shape == (5, 10) and np.abs(logits - want).max() <= TOL
