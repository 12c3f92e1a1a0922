"""Pre-activation bottleneck ResNets of He et al. 2016 ("Identity Mappings"), CIFAR.

9n+2 layers: a 3x3 conv with 16 filters, three groups of n bottleneck blocks
(1x1 -> 3x3 -> 1x1 with 16/32/64 inner and 4x that outer channels), a final
BN-ReLU, global average pooling and a fc layer. Each block is full
pre-activation::

    a = relu(bn1(x))
    o = conv1x1(a); o = conv3x3(relu(bn2(o)), stride s); o = conv1x1(relu(bn3(o)))
    return o + (x if shapes agree else conv1x1(a, stride s))

The projection shortcut is a bare 1x1 conv (no BN: the next block pre-activates)
applied to the pre-activated input, as in the authors' code. ``width`` multiplies
the channel counts (1 is the paper). Parameters (10 classes, width 1; counted by
``tests/test_models.py``)::

    pre-act ResNet-47     497,690      pre-act ResNet-164    1,703,258
    pre-act ResNet-110  1,146,842      pre-act ResNet-1001  10,327,706
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainables.models._checks import check_width, depth_9n2
from trainables.models.resnet import init_weights

EXPANSION = 4  # bottleneck output channels = 4 x inner channels


def check(*, depth: int = 164, width: int = 1) -> None:
    """Raise ``ValueError`` naming the rule when the arguments are not a pre-act ResNet."""
    depth_9n2("pre-activation ResNet", depth)
    check_width(width)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, inner: int, stride: int) -> None:
        super().__init__()
        cout = inner * EXPANSION
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, inner, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(inner)
        self.conv3 = nn.Conv2d(inner, cout, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        o = self.conv1(a)
        o = self.conv2(F.relu(self.bn2(o)))
        o = self.conv3(F.relu(self.bn3(o)))
        return o + (x if self.shortcut is None else self.shortcut(a))


class PreActResNet(nn.Module):
    def __init__(self, depth: int, width: int, num_classes: int) -> None:
        super().__init__()
        check(depth=depth, width=width)
        n = (depth - 2) // 9
        inner = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(3, 16 * width, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        cin = 16 * width
        for channels, stride in zip(inner, (1, 2, 2), strict=True):
            for i in range(n):
                blocks.append(Bottleneck(cin, channels, stride if i == 0 else 1))
                cin = channels * EXPANSION
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.blocks(self.conv1(x))  # (B, 256k, 8, 8)
        o = F.relu(self.bn(o))
        return self.fc(F.adaptive_avg_pool2d(o, 1).flatten(1))


def build(*, num_classes: int, depth: int = 164, width: int = 1) -> nn.Module:
    """Pre-act ResNet-depth; ``build(num_classes=10, depth=164)`` is the paper's ResNet-164."""
    return PreActResNet(depth, width, num_classes)
