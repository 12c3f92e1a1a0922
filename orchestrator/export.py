"""Export a registered model for inference: BN folded away, outputs checked, metadata inside.

``wrnsweep export models:/NAME@champion --out model.ts`` loads the model through
:func:`orchestrator.registry.load_model` (any URI it accepts: ``models:/NAME@alias``,
``models:/NAME/VERSION``, ``runs:/ID/model`` or a local model folder), folds it,
checks the folded network against the original, writes one file and reads it back.

Folding (eval-mode BN is a fixed per-channel affine map ``s * y + (beta - s * mean)``)
is each family's ``fold(model)`` (the shared parts are in
:mod:`trainables.models._fold`): a BN that reads one conv's output merges into
that conv (W' = W * s, b' = beta - s * mean + s * b), a BN on a residual sum before
a ReLU becomes a constant :class:`Affine`, and a DiracNet's
``alpha * delta + beta * normalize(W)`` is materialised. The exported graph has no
BatchNorm and no running statistics; it keeps the model's dtype and device.

Formats:

* ``torchscript``: ``torch.jit.script`` of the folded network; the metadata is the
  extra file ``wrnsweep.json`` (``torch.jit.load(f, _extra_files={"wrnsweep.json": ""})``).
* ``onnx``: opset 17, input ``images`` (N, 3, 32, 32) with a dynamic batch axis,
  output ``logits``; the metadata is the ``metadata_props`` entry ``wrnsweep``.
  The written file is re-run with onnxruntime (``onnx`` and ``onnxruntime`` are
  dependencies of wrnsweep). This is the graph for other pipelines (TensorRT, an
  app that normalises itself); a registered version's own ONNX graph, which
  MLflow serves, takes raw images instead: :func:`serving_onnx`.
* ``state_dict``: a safetensors file of the *unfolded* weights (BN intact, the
  registry's format, for fine-tuning); the metadata is the safetensors header
  entry ``wrnsweep`` and rebuilds the network with ``build_model(card["arch"],
  num_classes=card["num_classes"], **card["hparams"])``.

The metadata (JSON) is the model card plus ``normalise``: inputs are RGB images of
``input_shape`` with values in [0, 255], fed as ``(x / 255 - mean) / std`` per channel.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The folding parts live with the networks (trainables.models._fold); these names
# stay importable from here for callers of the earlier export module.
from trainables.models._fold import Affine as Affine
from trainables.models._fold import FoldedBottleneck as FoldedBottleneck
from trainables.models._fold import FoldedNet as FoldedNet
from trainables.models._fold import FoldedResNetBlock as FoldedResNetBlock
from trainables.models._fold import FoldedWRNBlock as FoldedWRNBlock
from trainables.models._fold import bn_to_affine as bn_to_affine
from trainables.models._fold import fold_conv_bn as fold_conv_bn
from trainables.models._fold import stem_and_first_pre as _stem_and_first_pre  # noqa: F401

FORMATS = ("torchscript", "onnx", "state_dict")
METADATA_KEY = "wrnsweep"  # ONNX metadata_props key and safetensors header key
TORCHSCRIPT_EXTRA = "wrnsweep.json"  # extra file inside the TorchScript archive
NORMALISE = "x = (x/255 - mean)/std per channel"
ONNX_OPSET = 17  # supported by every onnxruntime since 1.14 and by TensorRT 8.6
CHECK_BATCH = 8  # images per comparison batch
CHECK_SEED = 0


@dataclass(frozen=True)
class ExportResult:
    """What was written and how closely it reproduces the unfolded model."""

    path: Path
    format: str
    max_abs_diff: float  # largest |logit difference| over the check batches, written file
    folded_bn: int  # BatchNorm2d layers merged into the conv before them
    card: dict[str, Any]  # the metadata stored in the file
    affine_bn: int = 0  # BatchNorm2d layers turned into a fixed per-channel Affine


@torch.no_grad()
def fold_for_inference(model: nn.Module, card: dict[str, Any] | None = None) -> nn.Module:
    """An eval-mode copy of ``model`` without BatchNorm (and without Dirac convs).

    The family is found from the model's class (``trainables.models.family_of``),
    and its ``fold`` does the work, so no family is named here. Outputs equal
    ``model.eval()``'s up to the model dtype's rounding; ``model`` itself is not
    changed (not even its train/eval mode). Raises ``TypeError`` for a model of no
    registered family or a family without ``fold``; ``card["arch"]``, when given,
    must agree with the model's family: a mismatch means the card belongs to
    another model (``ValueError``).
    """
    from trainables.models import family_of

    family = family_of(model)
    if card and card.get("arch", family.name) != family.name:
        raise ValueError(f"the model card says arch={card['arch']!r} "
                         f"but the model is {family.name!r}")
    return family.fold(model).eval()


def _count(module: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


def check_inputs(card: dict[str, Any]) -> list[torch.Tensor]:
    """Fixed check batches: N(0, 1) noise, and random images normalised as the card says.

    The second batch has the scale of real inputs; the first probes the whole
    range the BN statistics see. Seeded, so every export checks the same inputs.
    """
    shape = [CHECK_BATCH, *card.get("input_shape", [3, 32, 32])]
    gen = torch.Generator().manual_seed(CHECK_SEED)
    batches = [torch.randn(shape, generator=gen)]
    if "mean" in card and "std" in card:
        images = torch.randint(0, 256, shape, generator=gen).float()
        mean = torch.tensor(card["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(card["std"]).view(1, -1, 1, 1)
        batches.append((images / 255 - mean) / std)
    return batches


def _max_diff(reference: list[torch.Tensor], outputs: list[Any]) -> float:
    return max(float((torch.as_tensor(o) - r).abs().max()) for r, o in
               zip(reference, outputs, strict=True))


def _check(diff: float, tolerance: float, what: str) -> None:
    # `not diff <= tol` also rejects NaN, which `diff > tol` would let through.
    if not diff <= tolerance:
        raise RuntimeError(f"{what} differs from the unfolded model: max abs logit "
                           f"difference {diff:.3g} > tolerance {tolerance:g}; nothing written")


def _metadata(card: dict[str, Any], *, uri: str, fmt: str, folded: bool) -> dict[str, Any]:
    meta = dict(card)
    meta.setdefault("input_shape", [3, 32, 32])
    meta["normalise"] = NORMALISE
    meta["export"] = {"format": fmt, "source": uri, "folded": folded,
                      "torch": torch.__version__}
    return meta


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError as err:
        raise ImportError("--format onnx needs the 'onnx' package (pip install onnx; "
                          "onnxruntime too, to re-run the exported file)") from err
    return onnx


def _write_torchscript(folded: nn.Module, path: Path, meta_json: str,
                       batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], str]:
    # TorchScript is deprecated in favour of torch.export, but it is still the one
    # format that C++ (libtorch) and older serving stacks load; the warning says
    # nothing actionable to a user of this command.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(folded), str(path),
                       _extra_files={TORCHSCRIPT_EXTRA: meta_json})
        extra = {TORCHSCRIPT_EXTRA: ""}
        loaded = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    with torch.no_grad():
        outputs = [loaded(x) for x in batches]
    stored = extra[TORCHSCRIPT_EXTRA]
    return outputs, stored.decode() if isinstance(stored, bytes) else stored


def _write_onnx(folded: nn.Module, path: Path, meta_json: str,
                batches: list[torch.Tensor]) -> tuple[list[Any] | None, str]:
    onnx = _require_onnx()
    # Traced with a batch of 2 and checked with batches of CHECK_BATCH, so the
    # check also proves that the batch axis is really dynamic.
    example = batches[0][:2]
    with warnings.catch_warnings():
        # The TorchScript-based exporter (dynamo=False) is deprecated, but the
        # torch.export-based one needs onnxscript, starts at opset 18 and takes
        # seconds per model; this one writes opset 17 with only torch installed.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        # Option-A shortcuts slice with step 2, which the exporter reports it cannot
        # constant-fold; there is nothing constant to fold in a slice of the input.
        warnings.filterwarnings("ignore", "Constant folding", UserWarning)
        torch.onnx.export(folded, (example,), str(path), dynamo=False,
                          opset_version=ONNX_OPSET, input_names=["images"],
                          output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta_json
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    stored = {p.key: p.value for p in onnx.load(str(path)).metadata_props}[METADATA_KEY]
    try:
        import onnxruntime
    except ImportError:
        return None, stored  # checked structurally only
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [session.run(["logits"], {"images": x.numpy()})[0] for x in batches], stored


def _write_state_dict(model: nn.Module, card: dict[str, Any], path: Path, meta_json: str,
                      batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], str]:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from trainables.models import build_model

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={METADATA_KEY: meta_json})
    with safe_open(str(path), framework="pt") as f:
        stored = f.metadata()[METADATA_KEY]
    rebuilt = build_model(card["arch"], num_classes=card["num_classes"], **card["hparams"])
    rebuilt.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        return [rebuilt.eval()(x) for x in batches], stored


# -- the registered model's graph: raw images in, logits out -------------------------------
SERVING_INPUT = "images"  # (N, 32, 32, 3) uint8 RGB, as PIL / numpy / torchvision's .data hold it
SERVING_OUTPUT = "logits"  # (N, num_classes) float32, before softmax


class RawImages(nn.Module):
    """A network behind its input handling: uint8 RGB ``(N, H, W, 3)`` in, logits out.

    Normalises as :class:`trainables.data.Loader` does for evaluation, in fp32:
    ``x * 1/(255 std) - mean/std`` per channel (the same two operations in the same
    order, so the graph sees what the network saw in training and testing).
    """

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.net = net
        mean64 = torch.tensor(mean, dtype=torch.float64)
        std64 = torch.tensor(std, dtype=torch.float64)
        self.register_buffer("scale", (1.0 / (255.0 * std64)).float().view(1, -1, 1, 1))
        self.register_buffer("shift", (-mean64 / std64).float().view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (N, H, W, 3) uint8
        x = images.permute(0, 3, 1, 2).to(torch.float32)  # (N, 3, H, W)
        return self.net(x * self.scale + self.shift)  # (N, num_classes)


@dataclass(frozen=True)
class ServingGraph:
    """The registered model's ONNX graph and how it was made."""

    proto: Any  # onnx.ModelProto: RawImages(folded network), opset ONNX_OPSET
    folded_bn: int  # BatchNorm2d layers merged into the conv before them
    affine_bn: int  # BatchNorm2d layers turned into a fixed per-channel Affine


def serving_onnx(model: nn.Module, card: dict[str, Any]) -> ServingGraph:
    """The ONNX graph that a registered version serves: raw images in, logits out.

    ``model`` (eval mode, fp32, CPU) is folded (:func:`fold_for_inference`) and put
    behind :class:`RawImages` with the card's mean/std; input ``images`` (N, 32, 32, 3)
    uint8 with a dynamic batch axis, output ``logits`` (N, num_classes) float32;
    the card is the graph's ``wrnsweep`` metadata entry. Checked with
    ``onnx.checker`` (full); its outputs are the caller's to compare (the registry
    compares them through MLflow's own loader on real test images).
    """
    import tempfile

    onnx = _require_onnx()
    folded = fold_for_inference(model, card)
    affine_bn = _count(folded, Affine)
    graph = RawImages(folded, card["mean"], card["std"]).eval()
    height, width = card.get("input_shape", [3, 32, 32])[1:]
    # Traced with a batch of 2 while callers check other batch sizes: the batch
    # axis is proved dynamic by use.
    example = torch.zeros(2, height, width, 3, dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        path = Path(tmp) / "model.onnx"
        # The same exporter and warnings as _write_onnx (see there).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", "Constant folding", UserWarning)
        torch.onnx.export(graph, (example,), str(path), dynamo=False,
                          opset_version=ONNX_OPSET, input_names=[SERVING_INPUT],
                          output_names=[SERVING_OUTPUT],
                          dynamic_axes={SERVING_INPUT: {0: "batch"},
                                        SERVING_OUTPUT: {0: "batch"}})
        proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(card, sort_keys=True)
    onnx.checker.check_model(proto, full_check=True)
    return ServingGraph(proto=proto, folded_bn=_count(model, nn.BatchNorm2d) - affine_bn,
                        affine_bn=affine_bn)


def export_model(uri: str, out: str | os.PathLike[str], *, fmt: str = "torchscript",
                 tracking_uri: str | None = None, tolerance: float = 1e-4) -> ExportResult:
    """Load ``uri``, fold it, check it against the original, write ``out``, read it back.

    Raises ``ValueError`` for an unknown ``fmt``, ``RuntimeError`` when the folded
    or the written model differs from the unfolded one by more than ``tolerance``
    (max abs logit difference; ``out`` is then left untouched), and lets the
    loader's ``FileNotFoundError`` / ``MlflowException`` through for a bad ``uri``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    if fmt == "onnx":
        _require_onnx()  # before the download, so a missing package fails fast
    from orchestrator.registry import load_model

    if ":/" not in uri and not Path(uri).is_dir():
        # Without this, MLflow treats a mistyped folder as a relative artifact URI
        # and fails with a message about artifact repositories.
        raise FileNotFoundError(f"no model folder at {uri!r} (nor a models:/ or runs:/ URI)")
    model, card = load_model(uri, tracking_uri=tracking_uri)
    model.eval()
    batches = check_inputs(card)
    with torch.no_grad():
        reference = [model(x) for x in batches]

    folded: nn.Module | None = None
    folded_bn = affine_bn = 0
    if fmt != "state_dict":
        folded = fold_for_inference(model, card)
        affine_bn = _count(folded, Affine)
        folded_bn = _count(model, nn.BatchNorm2d) - affine_bn
        with torch.no_grad():
            _check(_max_diff(reference, [folded(x) for x in batches]), tolerance,
                   "the folded model")
    meta = _metadata(card, uri=uri, fmt=fmt, folded=fmt != "state_dict")
    meta["export"].update(folded_bn=folded_bn, affine_bn=affine_bn)
    meta_json = json.dumps(meta, sort_keys=True)

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed only once the read-back check passes,
    # so a failed export never leaves a half-written or wrong file at `out`.
    tmp = path.with_name(f".{path.name}.partial")
    try:
        if folded is None:
            outputs, stored = _write_state_dict(model, card, tmp, meta_json, batches)
        elif fmt == "torchscript":
            outputs, stored = _write_torchscript(folded, tmp, meta_json, batches)
        else:
            outputs, stored = _write_onnx(folded, tmp, meta_json, batches)
        if json.loads(stored) != meta:
            raise RuntimeError(f"the metadata read back from the {fmt} file differs "
                               "from what was written")
        diff = 0.0 if outputs is None else _max_diff(reference, outputs)
        _check(diff, tolerance, f"the written {fmt} file")
        if outputs is None and folded is not None:  # ONNX without onnxruntime
            with torch.no_grad():
                diff = _max_diff(reference, [folded(x) for x in batches])
        # Plain file permissions (0666 less the umask) for every format: safetensors
        # writes its files 0600, the other writers do not.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(path=path, format=fmt, max_abs_diff=diff, folded_bn=folded_bn,
                        card=meta, affine_bn=affine_bn)
