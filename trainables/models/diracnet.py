"""DiracNets (Zagoruyko & Komodakis 2017): deep plain networks without skip connections.

Each layer convolves with a weight that is a Dirac delta plus a normalised
learned kernel, so identity is built into the parameterisation instead of a skip::

    y = BN(conv(act(x), alpha * delta + beta * normalize(W)))

``normalize`` scales each output filter of W to unit L2 norm. There is no
shortcut anywhere; max-pooling halves the resolution between the three groups
(widths 16k, 32k, 64k; depth 6n+4 gives 2n layers per group). The stem is
conv3x3-BN-ReLU. The reference is the authors' szagoruyko/diracnets
``diracnet.py`` (``define_diracnet``, CIFAR branch), on two branches:

* ``v2`` (branch master): plain ReLU, C -> C layers; alpha starts at 1 and beta
  at 0.1 per output channel (``gen_group_params``: ``torch.ones(no).fill_(1)``,
  ``fill_(0.1)``; ``diracconv.py`` ``init_params`` the same); delta is
  ``nn.init.dirac_`` of the weight's shape, so where a group doubles the channels
  it is [I; 0]: the new half of the channels starts from the learned term alone;
  a ReLU before the final pooling (``F.avg_pool2d(F.relu(o), 8)``).
* ``v1`` (branch v1, the seed article's form): NCReLU(x) = [max(x, 0), min(x, 0)]
  concatenated along channels, so a layer sees 2C channels; alpha and beta are
  scalars starting at 5 and 1e-3 (``gen_group_params``: ``torch.Tensor([5])``,
  ``torch.Tensor([1e-3])``); delta is that branch's ``dirac_delta(ni, no)``
  with ni = 2 x the input channels: [I | I] for 2C -> C layers, and the plain
  identity for a group's first layer, whose 2C NCReLU channels map onto 2C
  outputs (ni == no); no activation before the final pooling
  (``F.avg_pool2d(o, 8)``). With alpha=1, beta=0 a 2C -> C layer returns its
  input exactly: [I | I] * [relu(x), min(x, 0)] = x.

Initialisation, as the authors do unless said otherwise:

* stem conv: N(0, 2/fan) with the fan chosen by ``init``; ``"fan_in"``
  (fan = k*k*C_in) is the authors' (``kaiming_normal_`` with its default mode
  on both branches);
* learned kernels W: v2 like the stem (master ``conv_params`` calls
  ``kaiming_normal_``); v1 N(0, 0.1^2) whatever ``init`` says (v1 ``conv_params``
  with ``gain=0.1``: ``normal_(std=gain)``). ``normalize`` removes the scale from
  the forward pass, but not from training: the gradient through ``normalize``
  scales as 1/|W|, so the start scale sets W's effective learning rate;
* classifier: weight N(0, 2/fan_in), bias 0 (``linear_params`` on both branches);
* BN weight 1, bias 0. The authors' ``bnparams`` starts BN weights at U(0, 1)
  (``torch.rand``), torch7's default carried into their PyTorch code, a library
  default rather than a paper choice; we keep 1.

At inference the Dirac term and BN fold into one ordinary conv with bias
(:func:`fold`), leaving a plain chain of conv-act layers: the point of DiracNets.

Parameter counts of the paper's configurations are the registry's rows
(``trainables/models/families.py``), checked by ``tests/test_zoo.py``.
The paper's CIFAR table lists DiracNet-28-5 at 9.1M and DiracNet-28-10 at 36.5M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainables.models._fold import (
    GlobalAvgPool,
    conv_from_weight,
    copy_module,
    fold_conv_bn,
    require,
)
from trainables.models._weights import init_conv

# (alpha, beta) at the start: v1 branch and master diracnet.py gen_group_params.
START = {"v1": (5.0, 1e-3), "v2": (1.0, 0.1)}
V1_KERNEL_STD = 0.1  # v1 branch conv_params(..., gain=0.1): normal_(std=gain)


def ncrelu(x: torch.Tensor) -> torch.Tensor:
    """[max(x, 0), min(x, 0)] along channels: (B, C, H, W) -> (B, 2C, H, W)."""
    return torch.cat([x.clamp(min=0), x.clamp(max=0)], dim=1)


class NCReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ncrelu(x)


def dirac_delta(cin: int, cout: int, k: int = 3) -> torch.Tensor:
    """The (cout, cin, k, k) delta of a Dirac conv.

    cin = 2 cout (v1 after NCReLU): [I | I], so the conv adds the two halves back
    into x. Every other shape of both variants: ``nn.init.dirac_``, i.e. I when
    cin = cout and [I; 0] when cout = 2 cin (v2 where a group doubles the channels).
    """
    if cin == 2 * cout:
        eye = nn.init.dirac_(torch.empty(cout, cout, k, k))
        return torch.cat([eye, eye], dim=1)
    return nn.init.dirac_(torch.empty(cout, cin, k, k))


class DiracConv2d(nn.Module):
    """3x3 conv with weight alpha * delta + beta * normalize(W), stride 1, padding 1.

    ``variant`` sets alpha/beta (scalars for v1, per output channel for v2) and
    their start values, and the start scale of W (see the module docstring).
    """

    def __init__(self, cin: int, cout: int, variant: str, init: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, 3, 3))
        if variant == "v1":
            nn.init.normal_(self.weight, std=V1_KERNEL_STD)
        else:
            init_conv(self.weight, init)
        alpha, beta = START[variant]
        shape = (1,) if variant == "v1" else (cout,)
        self.alpha = nn.Parameter(torch.full(shape, alpha))
        self.beta = nn.Parameter(torch.full(shape, beta))
        # Not persistent: it is a constant of the shape, not state to save.
        self.register_buffer("delta", dirac_delta(cin, cout), persistent=False)

    def effective_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """alpha * delta + beta * normalize(W), computed in ``dtype`` (default: W's)."""
        dtype = self.weight.dtype if dtype is None else dtype
        w, alpha, beta = (t.to(dtype) for t in (self.weight, self.alpha, self.beta))
        w = F.normalize(w.flatten(1), dim=1).view_as(w)
        delta = self.delta.to(w.dtype)
        return alpha.view(-1, 1, 1, 1) * delta + beta.view(-1, 1, 1, 1) * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight(), padding=1)


class DiracBlock(nn.Module):
    """act -> DiracConv -> BN (no skip connection)."""

    def __init__(self, cin: int, cout: int, variant: str, init: str) -> None:
        super().__init__()
        self.v1 = variant == "v1"
        self.act: nn.Module = NCReLU() if self.v1 else nn.ReLU()
        self.conv = DiracConv2d(2 * cin if self.v1 else cin, cout, variant, init)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.act(x)))


class DiracNet(nn.Module):
    def __init__(self, depth: int, width: int, variant: str, init: str,
                 num_classes: int) -> None:
        super().__init__()
        self.variant = variant
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
                layers.append(DiracBlock(cin, cout, variant, init))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[2], num_classes)
        init_conv(self.conv.weight, init)
        nn.init.kaiming_normal_(self.fc.weight, nonlinearity="relu")  # fan_in, as linear_params
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn(self.conv(x)))  # (B, 16k, 32, 32)
        o = self.layers(o)  # (B, 64k, 8, 8)
        if self.variant == "v2":  # master: avg_pool2d(relu(o)); v1: avg_pool2d(o)
            o = F.relu(o)
        return self.fc(F.adaptive_avg_pool2d(o, 1).flatten(1))


def build(*, num_classes: int, depth: int, width: int, variant: str, init: str) -> nn.Module:
    """DiracNet-depth-width; ``build(num_classes=10, depth=34, width=2, variant="v2",
    init="fan_in")`` is DiracNet-34-2.

    Arguments are not validated here: ``trainables.models.build_model`` checks them
    (depth 6n+4, width >= 1, variant v1 or v2, init fan_in or fan_out) and fills
    the defaults.
    """
    return DiracNet(depth, width, variant, init, num_classes)


@torch.no_grad()
def fold(model: nn.Module) -> nn.Sequential:
    """The inference form of a DiracNet: plain conv(+bias)-act layers only.

    Each Dirac weight is materialised in float64 and each BN (with its running
    statistics) is folded into the conv before it; v2 keeps its ReLU before the
    pooling. The layers take ``model``'s dtype and device, so the result equals
    ``model.eval()``'s outputs to that dtype's rounding (~1e-12 in float64). A new
    eval-mode module; ``model`` is unchanged (mode included).
    """
    require(model, DiracNet, "diracnet")
    layers: list[nn.Module] = [fold_conv_bn(model.conv, model.bn), nn.ReLU()]
    for layer in model.layers:
        if isinstance(layer, DiracBlock):
            weight = layer.conv.effective_weight(torch.float64)
            conv = conv_from_weight(weight, layer.bn, padding=1)
            layers += [NCReLU() if layer.v1 else nn.ReLU(), conv.to(layer.conv.weight)]
        else:
            layers.append(copy_module(layer))  # MaxPool2d(2)
    if model.variant == "v2":
        layers.append(nn.ReLU())
    layers += [GlobalAvgPool(), copy_module(model.fc)]
    return nn.Sequential(*layers).eval()
