"""Wide Residual Networks (Zagoruyko & Komodakis, BMVC 2016), CIFAR variant.

WRN-d-k has depth d = 6N + 4 (N basic blocks per group, 3 groups, plus the first
conv, and the final classifier and the two shortcut convs that the paper counts)
and widths 16k, 32k, 64k after a 16-channel first conv.

Each block is pre-activation, "B(3,3)" with dropout in between::

    o = conv3x3(relu(bn1(x)))                        # stride s, in -> out
    o = conv3x3(dropout(relu(bn2(o))))               # out -> out
    return o + (x if in == out else conv1x1(relu(bn1(x))))

Pitfalls of reproductions that this file rules out:

* dropout is element-wise ``F.dropout`` after the second BN-ReLU (not ``Dropout2d``,
  not after the first conv);
* every conv has ``bias=False`` (BN follows each one);
* the shortcut is a 1x1 conv without BN, only where the channel count changes,
  fed with the pre-activated input as in the authors' code;
* convs use kaiming-normal init with ``mode="fan_out"``, BN weight 1 / bias 0,
  the classifier bias 0.

Parameters (10 classes; counted by ``tests/test_models.py``)::

    WRN-16-1      175,066      WRN-16-8    10,961,370
    WRN-16-4    2,748,890      WRN-22-8    17,158,106
    WRN-28-10  36,479,194      WRN-40-4     8,949,210
    WRN-40-1      563,930      WRN-40-10   55,841,754
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainables.models._checks import check_dropout, check_width, depth_6n4


def check(*, depth: int = 16, width: int = 1, dropout: float = 0.0) -> None:
    """Raise ``ValueError`` naming the rule when (depth, width, dropout) is not a WRN."""
    depth_6n4("WRN", depth)
    check_width(width)
    check_dropout(dropout)


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3, BN-ReLU-dropout-conv3x3, plus shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = dropout
        # The paper's shortcut: identity when shapes agree, else a bare 1x1 conv.
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))  # (B, cin, H, W)
        o = self.conv1(a)  # (B, cout, H/s, W/s)
        o = F.relu(self.bn2(o))
        o = F.dropout(o, p=self.dropout, training=self.training)  # element-wise
        o = self.conv2(o)
        skip = x if self.shortcut is None else self.shortcut(a)
        return o + skip


class WideResNet(nn.Module):
    """WRN-depth-width for 32x32 inputs."""

    def __init__(self, depth: int, width: int, dropout: float, num_classes: int) -> None:
        super().__init__()
        check(depth=depth, width=width, dropout=dropout)
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        for group, stride in zip(range(3), (1, 2, 2), strict=True):
            cin, cout = widths[group], widths[group + 1]
            for i in range(n):
                blocks.append(BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1,
                                         dropout))
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.blocks(self.conv1(x))  # (B, 64k, 8, 8)
        o = F.relu(self.bn(o))
        o = F.adaptive_avg_pool2d(o, 1).flatten(1)  # (B, 64k)
        return self.fc(o)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out) convs, unit BN, zero classifier bias, as the authors do."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def build(*, num_classes: int, depth: int = 28, width: int = 10, dropout: float = 0.0) -> nn.Module:
    """WRN-depth-width; ``build(num_classes=10, depth=28, width=10, dropout=0.3)``."""
    return WideResNet(depth, width, dropout, num_classes)
