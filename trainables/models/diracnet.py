"""DiracNets (Zagoruyko & Komodakis 2017): deep plain networks without skip connections.

Each layer convolves with a weight that is a Dirac delta plus a normalised
learned kernel, so identity is built into the parameterisation instead of a skip::

    y = BN(conv(act(x), alpha * delta + beta * normalize(W)))

``normalize`` scales each output filter of W to unit L2 norm. There is no
shortcut anywhere; max-pooling halves the resolution between the three groups
(widths 16k, 32k, 64k; depth 6n+4 gives 2n layers per group, as in the
authors' code).

Two variants:

* ``v1`` (the form of the seed article and the authors' functional code):
  activation NCReLU(x) = [max(x, 0), min(x, 0)] concatenated along channels, so a
  layer maps 2C -> C channels and delta is [I | I]; alpha and beta are scalars
  per layer. With alpha=1, beta=0 a layer returns its input exactly:
  [I | I] * [relu(x), min(x, 0)] = x.
* ``v2``: plain ReLU, C -> C layers, alpha and beta per output channel.

At inference the Dirac term and BN fold into one ordinary conv with bias
(:func:`fold`), leaving a plain chain of conv-act layers: the point of DiracNets.

Parameters (10 classes; counted by ``tests/test_models.py``)::

    DiracNet-16-1 v2    173,402      DiracNet-16-1 v1     343,026
    DiracNet-34-2 v2  1,854,378      DiracNet-34-2 v1   3,693,158
    DiracNet-28-5 v2  9,124,250      DiracNet-28-10 v2 36,450,090

The paper's CIFAR table lists DiracNet-28-5 at 9.1M and DiracNet-28-10 at 36.5M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainables.models._checks import check_choice, check_width, depth_6n4

VARIANTS = ("v1", "v2")
ALPHA_INIT = 5.0  # authors' value: training starts close to an identity chain
BETA_INIT = 1e-3  # authors' value


def check(*, depth: int = 34, width: int = 2, variant: str = "v2") -> None:
    """Raise ``ValueError`` naming the rule when the arguments are not a DiracNet."""
    depth_6n4("DiracNet", depth)
    check_width(width)
    check_choice("variant", variant, VARIANTS)


def ncrelu(x: torch.Tensor) -> torch.Tensor:
    """[max(x, 0), min(x, 0)] along channels: (B, C, H, W) -> (B, 2C, H, W)."""
    return torch.cat([x.clamp(min=0), x.clamp(max=0)], dim=1)


class NCReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ncrelu(x)


def dirac_delta(cin: int, cout: int, k: int = 3) -> torch.Tensor:
    """A (cout, cin, k, k) delta: identity tiled where channel counts differ.

    cin = 2 cout gives [I | I] (v1 after NCReLU); cout = 2 cin gives [I; I].
    """
    n = min(cin, cout)
    eye = nn.init.dirac_(torch.empty(n, n, k, k))
    return eye.repeat(max(cout // cin, 1), max(cin // cout, 1), 1, 1)


class DiracConv2d(nn.Module):
    """3x3 conv with weight alpha * delta + beta * normalize(W), stride 1, padding 1."""

    def __init__(self, cin: int, cout: int, per_channel: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, 3, 3))
        nn.init.normal_(self.weight)  # the scale is irrelevant: it is normalised away
        shape = (cout,) if per_channel else (1,)
        self.alpha = nn.Parameter(torch.full(shape, ALPHA_INIT))
        self.beta = nn.Parameter(torch.full(shape, BETA_INIT))
        # Not persistent: it is a constant of the shape, not state to save.
        self.register_buffer("delta", dirac_delta(cin, cout), persistent=False)

    def effective_weight(self) -> torch.Tensor:
        w = F.normalize(self.weight.flatten(1), dim=1).view_as(self.weight)
        return self.alpha.view(-1, 1, 1, 1) * self.delta + self.beta.view(-1, 1, 1, 1) * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight(), padding=1)


class DiracBlock(nn.Module):
    """act -> DiracConv -> BN (no skip connection)."""

    def __init__(self, cin: int, cout: int, variant: str) -> None:
        super().__init__()
        self.v1 = variant == "v1"
        self.act: nn.Module = NCReLU() if self.v1 else nn.ReLU()
        self.conv = DiracConv2d(2 * cin if self.v1 else cin, cout, per_channel=not self.v1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.act(x)))


class DiracNet(nn.Module):
    def __init__(self, depth: int, width: int, variant: str, num_classes: int) -> None:
        super().__init__()
        check(depth=depth, width=width, variant=variant)
        n = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        cin = widths[0]
        for g, cout in enumerate(widths):
            if g > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2 * n):
                layers.append(DiracBlock(cin, cout, variant))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[2], num_classes)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn(self.conv(x)))  # (B, 16k, 32, 32)
        o = self.layers(o)  # (B, 64k, 8, 8); as in the authors' code, no activation after
        return self.fc(F.adaptive_avg_pool2d(o, 1).flatten(1))


def build(*, num_classes: int, depth: int = 34, width: int = 2, variant: str = "v2") -> nn.Module:
    """DiracNet-depth-width; ``build(num_classes=10, depth=34, width=2)`` is DiracNet-34-2."""
    return DiracNet(depth, width, variant, num_classes)


def _fold_bn(weight: torch.Tensor, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """conv(x, weight) followed by BN (eval statistics) as one conv with bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (cout,)
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2], 1, weight.shape[2] // 2)
    conv.weight.copy_(weight * scale.view(-1, 1, 1, 1))
    conv.bias.copy_(bn.bias - bn.running_mean * scale)
    return conv


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


@torch.no_grad()
def fold(model: DiracNet) -> nn.Sequential:
    """The inference form of a trained DiracNet: plain conv(+bias)-act layers only.

    Each Dirac weight is materialised and each BN (with its running statistics)
    is folded into the conv before it. Matches ``model.eval()`` outputs to fp32
    rounding. The result is a new module in eval mode; ``model`` is unchanged.
    """
    if not isinstance(model, DiracNet):
        raise TypeError(f"fold expects a DiracNet, got {type(model).__name__}")
    layers: list[nn.Module] = [_fold_bn(model.conv.weight, model.bn), nn.ReLU()]
    for layer in model.layers:
        if isinstance(layer, DiracBlock):
            layers += [NCReLU() if layer.v1 else nn.ReLU(),
                       _fold_bn(layer.conv.effective_weight(), layer.bn)]
        else:
            layers.append(nn.MaxPool2d(2))
    fc = nn.Linear(model.fc.in_features, model.fc.out_features)
    fc.load_state_dict(model.fc.state_dict())
    folded = nn.Sequential(*layers, Flatten(), fc)
    return folded.to(model.fc.weight.device).eval()
