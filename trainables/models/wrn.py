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
  not after the first conv), as ``nn.Dropout`` in the authors' ``models/wide-resnet.lua``;
* every conv has ``bias=False`` (BN follows each one; ``utils.DisableBias`` there);
* the shortcut is a 1x1 conv without BN, only where the channel count changes,
  fed with the pre-activated input as in ``models/wide-resnet.lua`` and
  ``pytorch/resnet.py`` (``convdim`` applied to ``o1``).

Initialisation:

* ``init`` chooses the fan of the N(0, 2/fan) conv weights. ``"fan_in"``
  (fan = k*k*C_in) is the authors': ``models/utils.lua`` MSRinit draws
  ``normal(0, sqrt(2/(kW*kH*nInputPlane)))`` and ``pytorch/utils.py`` ``conv_params``
  calls ``kaiming_normal_`` with its default mode, fan_in. ``"fan_out"`` is what
  many write-ups use.
* BN weight 1, bias 0. The authors' code starts BN weights at U(0, 1): torch7's
  ``SpatialBatchNormalization`` default (``reset`` calls ``weight:uniform()``; the
  Lua model never re-initialises BN) and ``pytorch/utils.py`` ``bnparams``
  (``torch.rand``). That is a library default, not a choice of the paper; we keep 1.
* classifier bias 0 (``utils.FCinit``); its weight keeps PyTorch's default
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)), torch7's ``nn.Linear`` default that the Lua
  model keeps (the PyTorch port draws it with ``kaiming_normal_`` instead).

Parameter counts of the paper's configurations are the registry's rows
(``trainables/models/families.py``), checked by ``tests/test_zoo.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainables.models._fold import (
    FoldedNet,
    FoldedWRNBlock,
    bn_to_affine,
    copy_module,
    fold_conv_bn,
    require,
    stem_and_first_pre,
)
from trainables.models._weights import init_weights


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

    def __init__(self, depth: int, width: int, dropout: float, init: str,
                 num_classes: int) -> None:
        super().__init__()
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
        init_weights(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.blocks(self.conv1(x))  # (B, 64k, 8, 8)
        o = F.relu(self.bn(o))
        o = F.adaptive_avg_pool2d(o, 1).flatten(1)  # (B, 64k)
        return self.fc(o)


def build(*, num_classes: int, depth: int, width: int, dropout: float, init: str) -> nn.Module:
    """WRN-depth-width; ``build(num_classes=10, depth=28, width=10, dropout=0.3, init="fan_in")``.

    Arguments are not validated here: ``trainables.models.build_model`` checks them
    (depth 6n+4, width >= 1, dropout in [0, 1), init fan_in or fan_out) and fills
    the defaults.
    """
    return WideResNet(depth, width, dropout, init, num_classes)


@torch.no_grad()
def fold(model: nn.Module) -> nn.Module:
    """``model`` for inference without BatchNorm, equal to ``model.eval()`` to rounding.

    Each ``bn2`` folds into the ``conv1`` before it; ``bn1`` becomes a fixed
    :class:`~trainables.models._fold.Affine` (it reads a residual sum and feeds a
    ReLU), except in the first block when its shortcut is a projection: then
    nothing but ``bn1`` reads the stem conv, which absorbs it. The final BN is an
    Affine too. A new eval-mode module with ``model``'s dtype and device;
    ``model`` is unchanged.
    """
    require(model, WideResNet, "wrn")
    stem, first_pre = stem_and_first_pre(model)
    blocks: list[nn.Module] = []
    for i, b in enumerate(model.blocks):
        pre = first_pre if i == 0 else bn_to_affine(b.bn1)
        shortcut = None if b.shortcut is None else copy_module(b.shortcut)
        blocks.append(FoldedWRNBlock(pre, fold_conv_bn(b.conv1, b.bn2), copy_module(b.conv2),
                                     shortcut))
    post = nn.Sequential(bn_to_affine(model.bn), nn.ReLU())  # relu(bn(x)) before the pool
    return FoldedNet(stem, blocks, post, copy_module(model.fc)).eval()
