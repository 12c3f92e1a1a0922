"""Pre-activation bottleneck ResNets of He et al. 2016 ("Identity Mappings"), CIFAR.

9n+2 layers: a 3x3 conv with 16 filters, three groups of n bottleneck blocks
(1x1 -> 3x3 -> 1x1 with 16/32/64 inner and 4x that outer channels), a final
BN-ReLU, global average pooling and a fc layer. Each block is full
pre-activation::

    a = relu(bn1(x))
    o = conv1x1(a); o = conv3x3(relu(bn2(o))); o = conv1x1(relu(bn3(o)))
    return o + (x if shapes agree else conv1x1(a, stride s))

The reference is the authors' KaimingHe/resnet-1k-layers ``resnet-pre-act.lua``:

* the projection shortcut is a bare 1x1 conv (no BN: the next block
  pre-activates) applied to the pre-activated input ``a`` (the "common BN, ReLU"
  before the ``ConcatTable`` of a unit that changes the channel count);
* ``stride_on`` places the stride s of a resolution-changing unit.
  ``"conv1x1"``: on the first 1x1 conv, as that file does
  (``Convolution(nInputPlane, nBottleneckPlane, 1, 1, stride, stride, 0, 0)``).
  ``"conv3x3"``: on the 3x3 conv, the placement of many ports (e.g.
  bearpaw/pytorch-classification ``models/cifar/preresnet.py``). That port also
  takes its projection shortcut from the raw input ``x`` rather than ``a``; we do
  not offer that: the shortcut reads ``a`` with either placement.

Initialisation, as ``resnet-pre-act.lua`` does unless said otherwise:

* ``init`` chooses the fan of the N(0, 2/fan) conv weights. ``"fan_out"``
  (fan = k*k*C_out) is the authors' ``ConvInit`` (``n = kW*kH*nOutputPlane``);
  ``"fan_in"`` (fan = k*k*C_in) is the other form.
* BN weight 1, bias 0: the file's ``BNInit`` (torch7's own default,
  ``weight:uniform()``, would have been U(0, 1));
* classifier bias 0; weight PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
  equal to torch7's ``nn.Linear`` default that the file keeps.

``width`` multiplies the channel counts (1 is the paper).
Parameter counts of the paper's configurations are the registry's rows
(``trainables/models/families.py``), checked by ``tests/test_zoo.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainables.models._fold import (
    FoldedBottleneck,
    FoldedNet,
    bn_to_affine,
    copy_module,
    fold_conv_bn,
    require,
    stem_and_first_pre,
)
from trainables.models._weights import init_weights

EXPANSION = 4  # bottleneck output channels = 4 x inner channels


class Bottleneck(nn.Module):
    def __init__(self, cin: int, inner: int, stride: int, stride_on: str) -> None:
        super().__init__()
        cout = inner * EXPANSION
        s1, s3 = (stride, 1) if stride_on == "conv1x1" else (1, stride)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, inner, 1, s1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, s3, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(inner)
        self.conv3 = nn.Conv2d(inner, cout, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))  # (B, cin, H, W)
        o = self.conv1(a)
        o = self.conv2(F.relu(self.bn2(o)))  # (B, inner, H/s, W/s) with either stride_on
        o = self.conv3(F.relu(self.bn3(o)))
        return o + (x if self.shortcut is None else self.shortcut(a))


class PreActResNet(nn.Module):
    def __init__(self, depth: int, width: int, stride_on: str, init: str,
                 num_classes: int) -> None:
        super().__init__()
        n = (depth - 2) // 9
        inner = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(3, 16 * width, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        cin = 16 * width
        for channels, stride in zip(inner, (1, 2, 2), strict=True):
            for i in range(n):
                blocks.append(Bottleneck(cin, channels, stride if i == 0 else 1, stride_on))
                cin = channels * EXPANSION
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.blocks(self.conv1(x))  # (B, 256k, 8, 8)
        o = F.relu(self.bn(o))
        return self.fc(F.adaptive_avg_pool2d(o, 1).flatten(1))


def build(*, num_classes: int, depth: int, width: int, stride_on: str, init: str) -> nn.Module:
    """Pre-act ResNet-depth; ``build(num_classes=10, depth=164, width=1,
    stride_on="conv1x1", init="fan_out")`` is the paper's ResNet-164.

    Arguments are not validated here: ``trainables.models.build_model`` checks them
    (depth 9n+2, width >= 1, stride_on conv1x1 or conv3x3, init fan_in or fan_out)
    and fills the defaults.
    """
    return PreActResNet(depth, width, stride_on, init, num_classes)


@torch.no_grad()
def fold(model: nn.Module) -> nn.Module:
    """``model`` for inference without BatchNorm, equal to ``model.eval()`` to rounding.

    ``bn2`` folds into ``conv1`` and ``bn3`` into ``conv2`` (each keeps its stride,
    wherever ``stride_on`` put it); ``bn1`` and the final BN become fixed
    :class:`~trainables.models._fold.Affine` maps, except the first block's
    ``bn1``, which the stem conv absorbs (that block always projects, so nothing
    else reads the stem). A new eval-mode module with ``model``'s dtype and
    device; ``model`` is unchanged.
    """
    require(model, PreActResNet, "preact_resnet")
    stem, first_pre = stem_and_first_pre(model)
    blocks: list[nn.Module] = []
    for i, b in enumerate(model.blocks):
        pre = first_pre if i == 0 else bn_to_affine(b.bn1)
        shortcut = None if b.shortcut is None else copy_module(b.shortcut)
        blocks.append(FoldedBottleneck(pre, fold_conv_bn(b.conv1, b.bn2),
                                       fold_conv_bn(b.conv2, b.bn3), copy_module(b.conv3),
                                       shortcut))
    post = nn.Sequential(bn_to_affine(model.bn), nn.ReLU())  # relu(bn(x)) before the pool
    return FoldedNet(stem, blocks, post, copy_module(model.fc)).eval()
