"""Weight initialisation shared by the residual families (WRN, ResNet, pre-act ResNet).

Convs: N(0, 2 / fan) with fan = k*k*C_in ("fan_in") or k*k*C_out ("fan_out"),
i.e. ``kaiming_normal_(mode=init, nonlinearity="relu")``; each family's docstring
says which one its authors use. BN weight 1, bias 0; classifier bias 0, classifier
weight PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which is also torch7's
``nn.Linear`` default (``reset``: ``uniform(-stdv, stdv)``, ``stdv = 1/sqrt(inputSize)``).
"""

from __future__ import annotations

import torch
from torch import nn


def init_conv(weight: torch.Tensor, init: str) -> None:
    """N(0, 2/fan) in place; ``init`` is ``"fan_in"`` or ``"fan_out"``."""
    nn.init.kaiming_normal_(weight, mode=init, nonlinearity="relu")


def init_weights(model: nn.Module, init: str) -> None:
    """Every conv N(0, 2/fan) by ``init``, BN weight 1 / bias 0, classifier bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            init_conv(m.weight, init)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
