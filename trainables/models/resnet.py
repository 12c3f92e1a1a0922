"""CIFAR ResNets of He et al. 2015 ("Deep Residual Learning", section 4.2).

6n+2 layers: a 3x3 conv with 16 filters, three groups of n basic blocks with
16/32/64 filters (feature maps 32/16/8), global average pooling and a fc layer.
The block is post-activation: conv-BN-ReLU-conv-BN, *then* the addition, *then*
ReLU (BN before the addition, ReLU after it).

Shortcuts where the shape changes:

* option "A" (the paper's CIFAR choice, default): identity with stride-2
  subsampling and zero-padded extra channels, no parameters;
* option "B": a 1x1 conv with stride 2 followed by BN (a projection).

``width`` multiplies 16/32/64 (1 is the paper). Parameters (10 classes, option A,
width 1; counted by ``tests/test_models.py``)::

    ResNet-20     269,722      ResNet-56      853,018
    ResNet-32     464,154      ResNet-110   1,727,962
    ResNet-44     658,586      ResNet-1202 19,421,274
    ResNet-20, option B: 272,474
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainables.models._checks import check_choice, check_width, depth_6n2

SHORTCUTS = ("A", "B")


def check(*, depth: int = 20, width: int = 1, shortcut: str = "A") -> None:
    """Raise ``ValueError`` naming the rule when the arguments are not a CIFAR ResNet."""
    depth_6n2("ResNet", depth)
    check_width(width)
    check_choice("shortcut", shortcut, SHORTCUTS)


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
    def __init__(self, depth: int, width: int, shortcut: str, num_classes: int) -> None:
        super().__init__()
        check(depth=depth, width=width, shortcut=shortcut)
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
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(self.conv1(x)))  # (B, 16k, 32, 32)
        o = self.blocks(o)  # (B, 64k, 8, 8)
        return self.fc(F.adaptive_avg_pool2d(o, 1).flatten(1))


def init_weights(model: nn.Module) -> None:
    """He et al. initialise with kaiming-normal (their ref [13]); BN weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def build(*, num_classes: int, depth: int = 20, width: int = 1, shortcut: str = "A") -> nn.Module:
    """ResNet-depth; ``build(num_classes=10, depth=110)`` is the paper's ResNet-110."""
    return CifarResNet(depth, width, shortcut, num_classes)
