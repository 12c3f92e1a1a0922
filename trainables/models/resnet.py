"""CIFAR ResNets of He et al. 2015 ("Deep Residual Learning", section 4.2).

6n+2 layers: a 3x3 conv with 16 filters, three groups of n basic blocks with
16/32/64 filters (feature maps 32/16/8), global average pooling and a fc layer.
The block is post-activation: conv-BN-ReLU-conv-BN, *then* the addition, *then*
ReLU (BN before the addition, ReLU after it).

Shortcuts where the shape changes:

* option "A" (the paper's CIFAR choice, default): identity with stride-2
  subsampling and zero-padded extra channels, no parameters;
* option "B": a 1x1 conv with stride 2 followed by BN (a projection).

Initialisation: the authors published no code for the CIFAR ResNets; the paper
initialises "as in [13]" (He et al. 2015, "Delving Deep into Rectifiers", which
derives N(0, 2/fan) for either fan).

* ``init`` chooses the fan of the N(0, 2/fan) conv weights. ``"fan_out"``
  (fan = k*k*C_out) follows the nearest code of the same authors:
  KaimingHe/resnet-1k-layers ``resnet-pre-act.lua`` ``ConvInit``
  (``n = kW*kH*nOutputPlane``), a file that says it incorporates material from
  fb.resnet.torch. ``"fan_in"`` (fan = k*k*C_in) is the other form.
* BN weight 1, bias 0, as ``BNInit`` in that file. torch7's own default would have
  been U(0, 1) (``BatchNormalization:reset`` calls ``weight:uniform()``), a
  library default rather than a paper choice.
* classifier bias 0, weight PyTorch's default (see ``trainables.models._weights``).

``width`` multiplies 16/32/64 (1 is the paper).
Parameter counts of the paper's configurations are the registry's rows
(``trainables/models/families.py``), checked by ``tests/test_zoo.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainables.models._fold import (
    FoldedNet,
    FoldedResNetBlock,
    copy_module,
    fold_conv_bn,
    require,
)
from trainables.models._weights import init_weights


class PadShortcut(nn.Module):
    """Option A: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.extra = cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]  # (B, cin, H/2, W/2)
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))  # (B, cout, H/2, W/2)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, add the shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            if shortcut == "A":
                self.shortcut = PadShortcut(cin, cout)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(self.conv1(x)))
        o = self.bn2(self.conv2(o))  # BN before the addition
        return F.relu(o + self.shortcut(x))  # ReLU after it


class CifarResNet(nn.Module):
    def __init__(self, depth: int, width: int, shortcut: str, init: str,
                 num_classes: int) -> None:
        super().__init__()
        n = (depth - 2) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks: list[nn.Module] = []
        cin = widths[0]
        for cout, stride in zip(widths, (1, 2, 2), strict=True):
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1, shortcut))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(widths[2], num_classes)
        init_weights(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(self.conv1(x)))  # (B, 16k, 32, 32)
        o = self.blocks(o)  # (B, 64k, 8, 8)
        return self.fc(F.adaptive_avg_pool2d(o, 1).flatten(1))


def build(*, num_classes: int, depth: int, width: int, shortcut: str, init: str) -> nn.Module:
    """ResNet-depth; ``build(num_classes=10, depth=110, width=1, shortcut="A",
    init="fan_out")`` is the paper's ResNet-110.

    Arguments are not validated here: ``trainables.models.build_model`` checks them
    (depth 6n+2, width >= 1, shortcut A or B, init fan_in or fan_out) and fills the
    defaults.
    """
    return CifarResNet(depth, width, shortcut, init, num_classes)


@torch.no_grad()
def fold(model: nn.Module) -> nn.Module:
    """``model`` for inference without BatchNorm, equal to ``model.eval()`` to rounding.

    Post-activation: every BN reads exactly one conv's output (stem, conv1, conv2,
    option-B projection), so all of them fold into that conv. A new eval-mode
    module with ``model``'s dtype and device; ``model`` is unchanged.
    """
    require(model, CifarResNet, "resnet")
    blocks: list[nn.Module] = []
    for b in model.blocks:
        shortcut = b.shortcut
        if isinstance(shortcut, nn.Sequential):  # option B: 1x1 conv, BN
            shortcut = fold_conv_bn(shortcut[0], shortcut[1])
        else:  # identity or option A (no parameters)
            shortcut = copy_module(shortcut)
        blocks.append(FoldedResNetBlock(fold_conv_bn(b.conv1, b.bn1),
                                        fold_conv_bn(b.conv2, b.bn2), shortcut))
    stem = nn.Sequential(fold_conv_bn(model.conv1, model.bn1), nn.ReLU())
    return FoldedNet(stem, blocks, nn.Identity(), copy_module(model.fc)).eval()
