"""Export a registered model for inference: BN folded away, outputs checked, metadata inside.

``wrnsweep export models:/NAME@champion --out model.ts`` loads the model through
:func:`orchestrator.registry.load_model` (any URI it accepts: ``models:/NAME@alias``,
``models:/NAME/VERSION``, ``runs:/ID/model`` or a local model folder), folds it,
checks the folded network against the original, writes one file and reads it back.

Folding (eval-mode BN is a per-channel affine map of fixed statistics)::

    BN(y) = gamma * (y - mean) / sqrt(var + eps) + beta = s * y + (beta - s * mean),
    s = gamma / sqrt(var + eps)                                    # (C_out,)

* conv followed directly by BN (``BN(conv(x, W) + b)``) is one conv with bias::

      W' = W * s[:, None, None, None]
      b' = beta - s * mean + s * b                                 # b = 0 without bias

  This covers every BN of the post-activation ResNet (stem, conv1-bn1, conv2-bn2,
  option-B shortcut conv-BN), the inner BNs of the pre-activation blocks (WRN
  ``conv1 -> bn2``, pre-act ResNet ``conv1 -> bn2`` and ``conv2 -> bn3``), the
  stem conv into the first block's ``bn1`` where nothing else reads the stem's
  output, and every BN of a DiracNet (via :func:`trainables.models.fold_diracnet`,
  which also materialises ``alpha * delta + beta * normalize(W)``).
* a BN whose input is not a conv output alone (the pre-activation ``BN -> ReLU ->
  conv`` on a residual sum, the final BN) cannot move into the conv after it: the
  ReLU sits in between. It becomes :class:`Affine`, ``x * s + (beta - s * mean)``
  with constant buffers, so the exported graph has no BatchNorm and no running
  statistics either way.

Formats:

* ``torchscript``: ``torch.jit.script`` of the folded network; the metadata is the
  extra file ``wrnsweep.json`` (``torch.jit.load(f, _extra_files={"wrnsweep.json": ""})``).
* ``onnx``: opset 17, input ``images`` (N, 3, 32, 32) with a dynamic batch axis,
  output ``logits``; the metadata is the ``metadata_props`` entry ``wrnsweep``.
  Needs the ``onnx`` package; ``onnxruntime``, when installed, re-runs the file.
* ``state_dict``: a safetensors file of the *unfolded* weights (BN intact, the
  registry's format, for fine-tuning); the metadata is the safetensors header
  entry ``wrnsweep`` and rebuilds the network with ``build_model(card["arch"],
  num_classes=card["num_classes"], **card["hparams"])``.

The metadata (JSON) is the model card plus ``normalise``: inputs are RGB images of
``input_shape`` with values in [0, 255], fed as ``(x / 255 - mean) / std`` per channel.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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


class Affine(nn.Module):
    """A frozen eval-mode BatchNorm2d: ``x * scale + shift`` per channel, no statistics."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone().view(1, -1, 1, 1))
        self.register_buffer("shift", shift.detach().clone().view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift  # (B, C, H, W)


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, beta - s * mean)`` in float64, so folding adds no rounding of its own."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm2d without running statistics "
                         "(track_running_stats=False uses batch statistics at inference)")
    var = bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - bn.running_mean.double() * scale


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """``bn(conv(x))`` in eval mode as one conv with bias (a new module).

    ``W' = W * s``, ``b' = beta - s * mean + s * b`` with ``s = gamma / sqrt(var + eps)``.
    """
    scale, shift = _bn_scale_shift(bn)
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, bias=True,
                    padding_mode=conv.padding_mode)
    bias = shift if conv.bias is None else shift + scale * conv.bias.double()
    with torch.no_grad():
        out.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1))
        out.bias.copy_(bias)
    return out.to(conv.weight)


def bn_to_affine(bn: nn.BatchNorm2d) -> Affine:
    """``bn`` in eval mode as a fixed per-channel affine map (for BN -> ReLU -> conv)."""
    scale, shift = _bn_scale_shift(bn)
    dtype = bn.running_var.dtype if bn.running_var is not None else torch.float32
    return Affine(scale.to(dtype), shift.to(dtype))


def _copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)


# Folded forms of the residual blocks. They keep the originals' dataflow with the
# BNs removed; dropout is gone because it is the identity in eval mode.


class FoldedResNetBlock(nn.Module):
    """Post-activation block, BN folded: ``relu(conv2(relu(conv1(x))) + shortcut(x))``."""

    def __init__(self, conv1: nn.Conv2d, conv2: nn.Conv2d, shortcut: nn.Module) -> None:
        super().__init__()
        self.conv1, self.conv2, self.shortcut = conv1, conv2, shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.conv2(F.relu(self.conv1(x)))
        return F.relu(o + self.shortcut(x))


class FoldedWRNBlock(nn.Module):
    """WRN block: ``a = relu(pre(x)); o = conv2(relu(conv1(a))); o + (x or shortcut(a))``.

    ``pre`` is the block's ``bn1`` as an :class:`Affine`, or the identity when
    ``bn1`` was folded into the stem conv; ``conv1`` carries ``bn2``.
    """

    def __init__(self, pre: nn.Module, conv1: nn.Conv2d, conv2: nn.Conv2d,
                 shortcut: nn.Conv2d | None) -> None:
        super().__init__()
        self.pre, self.conv1, self.conv2 = pre, conv1, conv2
        self.project = shortcut is not None
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.pre(x))
        o = self.conv2(F.relu(self.conv1(a)))
        skip = self.shortcut(a) if self.project else x
        return o + skip


class FoldedBottleneck(nn.Module):
    """Pre-act bottleneck: conv1 carries ``bn2``, conv2 carries ``bn3``; ``pre`` is ``bn1``."""

    def __init__(self, pre: nn.Module, conv1: nn.Conv2d, conv2: nn.Conv2d, conv3: nn.Conv2d,
                 shortcut: nn.Conv2d | None) -> None:
        super().__init__()
        self.pre, self.conv1, self.conv2, self.conv3 = pre, conv1, conv2, conv3
        self.project = shortcut is not None
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.pre(x))
        o = self.conv3(F.relu(self.conv2(F.relu(self.conv1(a)))))
        skip = self.shortcut(a) if self.project else x
        return o + skip


class FoldedNet(nn.Module):
    """``fc(pool(post(blocks(stem(x)))))``; ``post`` is ReLU (ResNet) or Affine-ReLU (pre-act)."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], post: nn.Module,
                 fc: nn.Linear) -> None:
        super().__init__()
        self.stem, self.blocks, self.post, self.fc = stem, nn.Sequential(*blocks), post, fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.post(self.blocks(self.stem(x)))  # (B, C, 8, 8)
        return self.fc(F.adaptive_avg_pool2d(o, 1).flatten(1))  # (B, num_classes)


def _fold_resnet(model: nn.Module) -> nn.Module:
    # Post-activation: every BN reads exactly one conv's output, so all of them fold.
    blocks: list[nn.Module] = []
    for b in model.blocks:
        shortcut = b.shortcut
        if isinstance(shortcut, nn.Sequential):  # option B: 1x1 conv, BN
            shortcut = fold_conv_bn(shortcut[0], shortcut[1])
        else:  # identity or option A (no parameters)
            shortcut = _copy(shortcut)
        blocks.append(FoldedResNetBlock(fold_conv_bn(b.conv1, b.bn1),
                                        fold_conv_bn(b.conv2, b.bn2), shortcut))
    stem = nn.Sequential(fold_conv_bn(model.conv1, model.bn1), nn.ReLU())
    return FoldedNet(stem, blocks, nn.Identity(), _copy(model.fc))


def _stem_and_first_pre(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Stem conv and the first block's pre-activation, folded together when possible.

    The first block's ``bn1`` reads the stem conv's output; it folds into the stem
    only when nothing else reads that output, i.e. when the first block projects
    its shortcut from the pre-activated input instead of adding the raw input.
    """
    first = model.blocks[0]
    if first.shortcut is not None:
        return fold_conv_bn(model.conv1, first.bn1), nn.Identity()
    return _copy(model.conv1), bn_to_affine(first.bn1)


def _fold_wrn(model: nn.Module) -> nn.Module:
    stem, first_pre = _stem_and_first_pre(model)
    blocks: list[nn.Module] = []
    for i, b in enumerate(model.blocks):
        pre = first_pre if i == 0 else bn_to_affine(b.bn1)
        shortcut = None if b.shortcut is None else _copy(b.shortcut)
        blocks.append(FoldedWRNBlock(pre, fold_conv_bn(b.conv1, b.bn2), _copy(b.conv2),
                                     shortcut))
    post = nn.Sequential(bn_to_affine(model.bn), nn.ReLU())  # relu(bn(x)) before the pool
    return FoldedNet(stem, blocks, post, _copy(model.fc))


def _fold_preact(model: nn.Module) -> nn.Module:
    stem, first_pre = _stem_and_first_pre(model)
    blocks: list[nn.Module] = []
    for i, b in enumerate(model.blocks):
        pre = first_pre if i == 0 else bn_to_affine(b.bn1)
        shortcut = None if b.shortcut is None else _copy(b.shortcut)
        blocks.append(FoldedBottleneck(pre, fold_conv_bn(b.conv1, b.bn2),
                                       fold_conv_bn(b.conv2, b.bn3), _copy(b.conv3), shortcut))
    post = nn.Sequential(bn_to_affine(model.bn), nn.ReLU())  # relu(bn(x)) before the pool
    return FoldedNet(stem, blocks, post, _copy(model.fc))


@torch.no_grad()
def fold_for_inference(model: nn.Module, card: dict[str, Any] | None = None) -> nn.Module:
    """An eval-mode copy of ``model`` without BatchNorm (and without Dirac convs).

    Outputs equal ``model.eval()``'s up to fp32 rounding; ``model`` itself is not
    changed (not even its train/eval mode). ``card["arch"]``, when given, must agree
    with the model's class: a mismatch means the card belongs to another model.
    """
    from trainables.models import diracnet, fold_diracnet, preact_resnet, resnet, wrn

    folders = {
        "resnet": (resnet.CifarResNet, _fold_resnet),
        "wrn": (wrn.WideResNet, _fold_wrn),
        "preact_resnet": (preact_resnet.PreActResNet, _fold_preact),
        "diracnet": (diracnet.DiracNet, fold_diracnet),
    }
    arch = next((a for a, (cls, _) in folders.items() if isinstance(model, cls)), None)
    if arch is None:
        expected = [cls.__name__ for cls, _ in folders.values()]
        raise TypeError(f"fold_for_inference expects one of {expected}, "
                        f"got {type(model).__name__}")
    if card and card.get("arch", arch) != arch:
        raise ValueError(f"the model card says arch={card['arch']!r} but the model is {arch!r}")
    folded = folders[arch][1](model)
    return folded.to(next(model.parameters()).device).eval()


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
