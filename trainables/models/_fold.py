"""Inference folding shared by the families: BatchNorm merged away, eval mode only.

Eval-mode BN is a per-channel affine map of fixed statistics::

    BN(y) = gamma * (y - mean) / sqrt(var + eps) + beta = s * y + (beta - s * mean),
    s = gamma / sqrt(var + eps)                                    # (C_out,)

* conv followed directly by BN (``BN(conv(x, W) + b)``) is one conv with bias
  (:func:`fold_conv_bn`, :func:`conv_from_weight`)::

      W' = W * s[:, None, None, None]
      b' = beta - s * mean + s * b                                 # b = 0 without bias

* a BN whose input is not a conv output alone (the pre-activation ``BN -> ReLU ->
  conv`` on a residual sum, the final BN) cannot move into the conv after it: the
  ReLU sits in between. It becomes :class:`Affine`, ``x * s + (beta - s * mean)``
  with constant buffers, so a folded graph has no BatchNorm and no running
  statistics either way.

The arithmetic runs in float64 and the result takes the dtype and device of the
weights it replaces, so a float64 model folds exactly (to ~1e-12) and a float32
one to float32 rounding. Each family module's ``fold(model)`` assembles these
parts; the folded block classes keep the originals' dataflow with the BNs removed
(dropout is gone: it is the identity in eval mode).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


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


@torch.no_grad()
def conv_from_weight(weight: torch.Tensor, bn: nn.BatchNorm2d, *, bias: torch.Tensor | None = None,
                     stride: int | tuple[int, ...] = 1, padding: int | tuple[int, ...] = 0,
                     dilation: int | tuple[int, ...] = 1, groups: int = 1,
                     padding_mode: str = "zeros") -> nn.Conv2d:
    """``bn(conv2d(x, weight, bias, ...))`` in eval mode as a new ``nn.Conv2d`` with bias.

    ``weight`` may be computed (a DiracConv's ``alpha * delta + beta * normalize(W)``);
    the result has its dtype and device.
    """
    scale, shift = _bn_scale_shift(bn)
    cout, cin_per_group, kh, kw = weight.shape
    out = nn.Conv2d(cin_per_group * groups, cout, (kh, kw), stride, padding, dilation, groups,
                    bias=True, padding_mode=padding_mode, device=weight.device,
                    dtype=weight.dtype)
    folded_bias = shift if bias is None else shift + scale * bias.double()
    out.weight.copy_(weight.double() * scale.view(-1, 1, 1, 1))
    out.bias.copy_(folded_bias)
    return out


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """``bn(conv(x))`` in eval mode as one conv with bias (a new module).

    ``W' = W * s``, ``b' = beta - s * mean + s * b`` with ``s = gamma / sqrt(var + eps)``.
    """
    return conv_from_weight(conv.weight, bn, bias=conv.bias, stride=conv.stride,
                            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                            padding_mode=conv.padding_mode)


def bn_to_affine(bn: nn.BatchNorm2d) -> Affine:
    """``bn`` in eval mode as a fixed per-channel affine map (for BN -> ReLU -> conv)."""
    scale, shift = _bn_scale_shift(bn)
    like = bn.weight if bn.weight is not None else bn.running_var
    return Affine(scale.to(like), shift.to(like))


def copy_module(module: nn.Module) -> nn.Module:
    """An independent copy (same dtype and device): a folded network shares no tensor
    with the trained model, so nothing done to one changes the other."""
    return copy.deepcopy(module)


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
        # TorchScript needs a module in both cases, hence Identity plus a flag.
        self.project = shortcut is not None
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.pre(x))
        o = self.conv2(F.relu(self.conv1(a)))
        skip = self.shortcut(a) if self.project else x
        return o + skip


class FoldedBottleneck(nn.Module):
    """Pre-act bottleneck: conv1 carries ``bn2``, conv2 carries ``bn3``; ``pre`` is ``bn1``.

    The stride lives inside whichever conv had it (conv1 or conv2, and the shortcut).
    """

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


class GlobalAvgPool(nn.Module):
    """(B, C, H, W) -> (B, C): the mean over the feature map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class FoldedNet(nn.Module):
    """``fc(pool(post(blocks(stem(x)))))``; ``post`` is ReLU (ResNet) or Affine-ReLU (pre-act)."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], post: nn.Module,
                 fc: nn.Linear) -> None:
        super().__init__()
        self.stem, self.blocks, self.post, self.fc = stem, nn.Sequential(*blocks), post, fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.post(self.blocks(self.stem(x)))  # (B, C, 8, 8)
        return self.fc(F.adaptive_avg_pool2d(o, 1).flatten(1))  # (B, num_classes)


def stem_and_first_pre(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Stem conv and the first pre-activation block's ``bn1``, folded together when possible.

    The first block's ``bn1`` reads the stem conv's output; it folds into the stem
    only when nothing else reads that output, i.e. when the first block projects
    its shortcut from the pre-activated input instead of adding the raw input.
    Expects ``model.conv1`` and ``model.blocks[0].bn1`` / ``.shortcut`` (WRN, pre-act).
    """
    first = model.blocks[0]
    if first.shortcut is not None:
        return fold_conv_bn(model.conv1, first.bn1), nn.Identity()
    return copy_module(model.conv1), bn_to_affine(first.bn1)


def require(model: nn.Module, cls: type, family: str) -> None:
    """A family's ``fold`` takes only its own network class (not a block of it)."""
    if not isinstance(model, cls):
        raise TypeError(f"{family}.fold expects a {cls.__name__}, got {type(model).__name__}")
