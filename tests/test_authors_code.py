"""The zoo against the authors' own published code (DESIGN.md, "Paper fidelity").

Each test names the file of the authors' repository it reflects. The references
here are written for these tests from reading that code (none of it is copied):
functional forward passes that take our modules' tensors as their parameters, so
an equality in float64 says the dataflow is the authors', op for op.

* szagoruyko/wide-residual-networks: ``pytorch/resnet.py``, ``pytorch/utils.py``,
  ``models/utils.lua``, ``models/wide-resnet.lua``;
* szagoruyko/diracnets: ``diracnet.py`` and ``diracconv.py`` on master (v2) and on
  branch v1;
* KaimingHe/resnet-1k-layers: ``resnet-pre-act.lua``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainables.models import build_model, wrn
from trainables.models import diracnet as dn
from trainables.models import preact_resnet as pre

F64 = torch.float64


def _authors_bn(x: torch.Tensor, bn: nn.BatchNorm2d, training: bool) -> torch.Tensor:
    """``F.batch_norm`` with the module's tensors, as the authors' ``utils.batch_norm``;
    the running statistics are cloned so that the reference never moves the model's."""
    return F.batch_norm(x, bn.running_mean.clone(), bn.running_var.clone(), bn.weight,
                        bn.bias, training=training)


def _randomise_bn(model: nn.Module) -> None:
    """BN weights U(0, 1) as the authors' ``bnparams`` start them, biases and running
    statistics away from 0 and 1, so that a swapped or missing BN cannot go unseen."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.2)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.3)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)


def _same_in_both_modes(model: nn.Module, reference: Callable[[torch.Tensor, bool],
                                                                 torch.Tensor]) -> None:
    """``model`` and ``reference(x, training)`` agree in float64, eval and train mode."""
    model = model.to(F64)
    _randomise_bn(model)
    x = torch.randn(4, 3, 32, 32, dtype=F64, generator=torch.Generator().manual_seed(3))
    for training in (False, True):
        with torch.no_grad():
            want = reference(x, training)
            got = model.train(training)(x)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() < 1e-10, f"training={training}"


# -- Wide ResNet ----------------------------------------------------------------------


def _wrn_reference(model: wrn.WideResNet) -> Callable[[torch.Tensor, bool], torch.Tensor]:
    """The CIFAR forward ``f`` of wide-residual-networks ``pytorch/resnet.py``.

    A block: o1 = relu(bn0(x)); y = conv0(o1, stride); o2 = relu(bn1(y));
    z = conv1(o2); z + convdim(o1, stride) where the channels change, else z + x.
    Network: conv0, three groups (strides 1, 2, 2), relu(bn), 8x8 average, linear.
    (The PyTorch port has no dropout; the Lua model's position of it is checked in
    ``tests/test_models.py``.)
    """

    def block(x: torch.Tensor, b: wrn.BasicBlock, training: bool) -> torch.Tensor:
        stride = b.conv1.stride[0]
        o1 = F.relu(_authors_bn(x, b.bn1, training))
        y = F.conv2d(o1, b.conv1.weight, stride=stride, padding=1)
        o2 = F.relu(_authors_bn(y, b.bn2, training))
        z = F.conv2d(o2, b.conv2.weight, stride=1, padding=1)
        if b.shortcut is not None:
            return z + F.conv2d(o1, b.shortcut.weight, stride=stride)
        return z + x

    def f(x: torch.Tensor, training: bool) -> torch.Tensor:
        o = F.conv2d(x, model.conv1.weight, padding=1)
        for b in model.blocks:
            o = block(o, b, training)
        o = F.relu(_authors_bn(o, model.bn, training))
        o = F.avg_pool2d(o, 8, 1, 0).flatten(1)
        return F.linear(o, model.fc.weight, model.fc.bias)

    return f


def test_wrn_is_the_authors_pytorch_resnet() -> None:
    """wide-residual-networks ``pytorch/resnet.py``: the same function, float64, both modes."""
    torch.manual_seed(0)
    model = wrn.build(num_classes=10, depth=16, width=2, dropout=0.0, init="fan_in")
    _same_in_both_modes(model, _wrn_reference(model))


# -- DiracNet -------------------------------------------------------------------------


def _v1_delta(ni: int, no: int) -> torch.Tensor:
    """Branch v1 ``diracnet.py`` ``dirac_delta(ni, no, 3)`` for the shapes v1 builds
    (ni = no or ni = 2 no): output o takes every input i with i mod no = o."""
    delta = torch.zeros(no, ni, 3, 3)
    for i in range(ni):
        delta[i % no, i, 1, 1] = 1.0
    return delta


def _dirac_reference(model: dn.DiracNet, variant: str
                     ) -> Callable[[torch.Tensor, bool], torch.Tensor]:
    """The CIFAR ``f`` of diracnets ``diracnet.py`` ``define_diracnet``.

    A block: w = beta * normalize(W) + alpha * delta; conv2d(act(o), w, padding=1);
    bn. act is ReLU on master (v2), NCReLU on branch v1. delta: master keeps
    ``dirac_`` of W's shape; v1 its tiled ``dirac_delta``. Network: conv, relu(bn),
    three groups of 2n blocks with a 2x2 max-pool between them, then
    ``avg_pool2d(relu(o), 8)`` on master but ``avg_pool2d(o, 8)`` on v1, and linear.
    """

    def block(o: torch.Tensor, b: dn.DiracBlock, training: bool) -> torch.Tensor:
        w, alpha, beta = b.conv.weight, b.conv.alpha, b.conv.beta
        if variant == "v2":
            delta = nn.init.dirac_(torch.empty_like(w))
            act = F.relu(o)
        else:
            delta = _v1_delta(w.shape[1], w.shape[0]).to(w)
            act = torch.cat([o.clamp(min=0), o.clamp(max=0)], dim=1)
        w = (beta.view(-1, 1, 1, 1) * F.normalize(w.reshape(w.shape[0], -1)).view_as(w)
             + alpha.view(-1, 1, 1, 1) * delta)
        return _authors_bn(F.conv2d(act, w, stride=1, padding=1), b.bn, training)

    def f(x: torch.Tensor, training: bool) -> torch.Tensor:
        o = F.conv2d(x, model.conv.weight, padding=1)
        o = F.relu(_authors_bn(o, model.bn, training))
        for layer in model.layers:
            o = F.max_pool2d(o, 2) if isinstance(layer, nn.MaxPool2d) else block(
                o, layer, training)
        if variant == "v2":
            o = F.relu(o)
        o = F.avg_pool2d(o, 8).flatten(1)
        return F.linear(o, model.fc.weight, model.fc.bias)

    return f


def _moved_dirac_parameters(model: dn.DiracNet) -> None:
    """alpha and beta away from their start values, so that the learned term counts."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, dn.DiracConv2d):
                m.alpha.copy_(torch.rand(m.alpha.shape, generator=gen) + 0.5)
                m.beta.copy_(torch.rand(m.beta.shape, generator=gen) + 0.3)


@pytest.mark.parametrize("variant", ["v2", "v1"])
def test_diracnet_is_the_authors_define_diracnet(variant: str) -> None:
    """diracnets ``diracnet.py`` (master for v2, branch v1 for v1): same function in
    float64, both modes; v2 ends with ``avg_pool2d(relu(o), 8)``, v1 with ``avg_pool2d(o, 8)``."""
    torch.manual_seed(0)
    model = dn.build(num_classes=10, depth=10, width=1, variant=variant, init="fan_in")
    _moved_dirac_parameters(model)
    _same_in_both_modes(model, _dirac_reference(model, variant))


def test_diracnet_v2_relu_before_pooling_matters() -> None:
    """diracnets master ``diracnet.py``: the final ReLU changes the output (the last BN
    has negative outputs), so the equality above is not vacuous."""
    torch.manual_seed(0)
    model = dn.build(num_classes=10, depth=10, width=1, variant="v2", init="fan_in").to(F64)
    _randomise_bn(model)
    model.eval()
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    with torch.no_grad():
        features = model.layers(F.relu(model.bn(model.conv(x))))
        assert (features < 0).any()
        without_relu = model.fc(F.adaptive_avg_pool2d(features, 1).flatten(1))
        assert (model(x) - without_relu).abs().max().item() > 1e-3


def _dirac_convs(variant: str) -> list[dn.DiracConv2d]:
    model = dn.build(num_classes=10, depth=10, width=1, variant=variant, init="fan_in")
    return [m for m in model.modules() if isinstance(m, dn.DiracConv2d)]


def test_diracnet_v2_delta_is_dirac_of_the_weight_shape() -> None:
    """diracnets master ``diracnet.py`` (``dirac_(v.data.clone())`` per conv) and
    ``diracconv.py`` (``dirac_(self.weight.data.clone())``): delta = ``nn.init.dirac_``
    of (cout, cin, 3, 3), i.e. [I; 0] where a group doubles the channels."""
    convs = _dirac_convs("v2")
    doubling = [c for c in convs if c.weight.shape[0] == 2 * c.weight.shape[1]]
    assert len(doubling) == 2  # the first layer of groups 2 and 3
    for conv in convs:
        assert torch.equal(conv.delta, nn.init.dirac_(torch.empty_like(conv.weight)))
    for conv in doubling:
        cin = conv.weight.shape[1]
        centre = conv.delta[:, :, 1, 1]
        assert torch.equal(centre[:cin], torch.eye(cin))  # [I; ...]
        assert not centre[cin:].any()  # [...; 0]: the new channels start from beta * W
        assert not conv.delta[:, :, [0, 2]].any() and not conv.delta[:, :, :, [0, 2]].any()


def test_diracnet_v1_delta_is_the_v1_branch_tiling() -> None:
    """diracnets branch v1 ``diracnet.py`` ``dirac_delta(ni, no)`` with ni = 2 x the
    input channels (NCReLU): [I | I] for 2C -> C layers, the identity for a group's
    first layer (2C NCReLU channels onto 2C outputs)."""
    convs = _dirac_convs("v1")
    shapes = [tuple(c.weight.shape[:2]) for c in convs]
    assert shapes == [(16, 32)] * 2 + [(32, 32), (32, 64), (64, 64), (64, 128)]
    for conv in convs:
        cout, cin = conv.weight.shape[:2]
        assert torch.equal(conv.delta, _v1_delta(cin, cout))
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():  # alpha=1, beta=0: [I | I] gives x back, I gives NCReLU(x)
        for conv in convs[:3]:
            conv.alpha.fill_(1.0)
            conv.beta.fill_(0.0)
        assert torch.allclose(convs[0](dn.ncrelu(x)), x, atol=1e-6)
        y = torch.randn(2, 16, 6, 6)  # the input of group 2's first layer: 16 channels
        assert torch.allclose(convs[2](dn.ncrelu(y)), dn.ncrelu(y), atol=1e-6)


def test_diracnet_start_values() -> None:
    """alpha/beta at the start. Master ``diracnet.py`` ``gen_group_params`` and
    ``diracconv.py`` ``init_params``: ones(cout) and 0.1 per output channel. Branch v1
    ``diracnet.py`` ``gen_group_params``: scalars ``Tensor([5])`` and ``Tensor([1e-3])``."""
    for conv in _dirac_convs("v2"):
        cout = conv.weight.shape[0]
        assert conv.alpha.shape == conv.beta.shape == (cout,)
        assert torch.equal(conv.alpha, torch.ones(cout))
        assert torch.equal(conv.beta, torch.full((cout,), 0.1))
    for conv in _dirac_convs("v1"):
        assert conv.alpha.shape == conv.beta.shape == (1,)
        assert conv.alpha.item() == 5.0
        assert conv.beta.item() == pytest.approx(1e-3, rel=1e-6)  # float32 of 1e-3


def _trained_like(model: dn.DiracNet) -> dn.DiracNet:
    """Running statistics, BN affines and alpha/beta all away from their start."""
    _randomise_bn(model)
    _moved_dirac_parameters(model)
    return model


@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-11), (torch.float32, 1e-4)],
                         ids=["float64", "float32"])
def test_diracnet_fold_is_exact(variant: str, dtype: torch.dtype, tol: float) -> None:
    """diracnets master ``diracnet.py`` ships ``DiracNet``, the folded inference form
    (conv with bias, ReLU, max-pool, final ReLU, pooling): ours folds the same way,
    in the model's dtype, to ~1e-12 in float64 and float32 rounding in float32."""
    torch.manual_seed(0)
    model = dn.build(num_classes=10, depth=10, width=1, variant=variant, init="fan_in")
    model = _trained_like(model.to(dtype)).eval()
    folded = dn.fold(model)
    assert {p.dtype for p in folded.parameters()} == {dtype}
    kinds = [type(m) for m in folded]
    assert nn.BatchNorm2d not in kinds and dn.DiracConv2d not in kinds
    # v2: a ReLU right before the pooling; v1: the last Dirac conv feeds the pooling.
    assert (kinds[-3] is nn.ReLU) == (variant == "v2")
    x = torch.randn(8, 3, 32, 32, dtype=dtype, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, got = model(x), folded(x)
    assert want.abs().max().item() > 0.1  # a real signal, not a vanishing one
    assert (got - want).abs().max().item() < tol


# -- pre-activation ResNet ------------------------------------------------------------


def _preact_reference(model: pre.PreActResNet, stride_on: str
                      ) -> Callable[[torch.Tensor, bool], torch.Tensor]:
    """The CIFAR model of resnet-1k-layers ``resnet-pre-act.lua``.

    Same-shape unit: [BN, ReLU, conv1x1, BN, ReLU, conv3x3, BN, ReLU, conv1x1] + x.
    Increasing-dimension unit: a = ReLU(BN(x)) shared, then [conv1x1 (stride), BN,
    ReLU, conv3x3, BN, ReLU, conv1x1] + conv1x1(a, stride). ``stride_on="conv3x3"``
    moves the unit's stride to its 3x3 conv and changes nothing else. Network:
    conv3x3, three stages (strides 1, 2, 2), BN, ReLU, 8x8 average, linear.
    """

    def unit(x: torch.Tensor, b: pre.Bottleneck, training: bool) -> torch.Tensor:
        stride = b.shortcut.stride[0] if b.shortcut is not None else 1
        s1, s3 = (stride, 1) if stride_on == "conv1x1" else (1, stride)
        a = F.relu(_authors_bn(x, b.bn1, training))
        o = F.conv2d(a, b.conv1.weight, stride=s1)
        o = F.conv2d(F.relu(_authors_bn(o, b.bn2, training)), b.conv2.weight, stride=s3,
                     padding=1)
        o = F.conv2d(F.relu(_authors_bn(o, b.bn3, training)), b.conv3.weight)
        return o + (x if b.shortcut is None else F.conv2d(a, b.shortcut.weight, stride=stride))

    def f(x: torch.Tensor, training: bool) -> torch.Tensor:
        o = F.conv2d(x, model.conv1.weight, padding=1)
        for b in model.blocks:
            o = unit(o, b, training)
        o = F.relu(_authors_bn(o, model.bn, training))
        return F.linear(F.avg_pool2d(o, 8).flatten(1), model.fc.weight, model.fc.bias)

    return f


def _preact(stride_on: str) -> pre.PreActResNet:
    torch.manual_seed(0)
    return pre.build(num_classes=10, depth=20, width=1, stride_on=stride_on, init="fan_out")


@pytest.mark.parametrize("stride_on", ["conv1x1", "conv3x3"])
def test_preact_stride_placement(stride_on: str) -> None:
    """resnet-1k-layers ``resnet-pre-act.lua``: the stride of an increasing-dimension
    unit is on its first 1x1 conv (``Convolution(nInputPlane, nBottleneckPlane, 1, 1,
    stride, stride, 0, 0)``) and on the projection; "conv3x3" moves it to the 3x3."""
    model = _preact(stride_on)
    strided = [b for b in model.blocks if b.shortcut is not None and b.shortcut.stride == (2, 2)]
    assert len(strided) == 2  # the first unit of stages 2 and 3
    for b in strided:
        on_1x1 = stride_on == "conv1x1"
        assert b.conv1.stride == ((2, 2) if on_1x1 else (1, 1))
        assert b.conv2.stride == ((1, 1) if on_1x1 else (2, 2))
        assert b.conv3.stride == (1, 1)
    others = [b for b in model.blocks if b not in strided]
    assert all(c.stride == (1, 1) for b in others for c in (b.conv1, b.conv2, b.conv3))


@pytest.mark.parametrize("stride_on", ["conv1x1", "conv3x3"])
def test_preact_is_the_authors_resnet_pre_act(stride_on: str) -> None:
    """resnet-1k-layers ``resnet-pre-act.lua`` (with the stride moved for "conv3x3"):
    same function in float64, both modes; the projection reads the pre-activated input."""
    model = _preact(stride_on)
    _same_in_both_modes(model, _preact_reference(model, stride_on))


def test_preact_stride_placements_are_different_networks() -> None:
    """Same parameters, stride on the 1x1 or on the 3x3: different outputs (a 1x1 conv
    with stride 2 drops three of four positions before the 3x3 sees them)."""
    a, b = _preact("conv1x1").to(F64).eval(), _preact("conv3x3").to(F64).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    with torch.no_grad():
        assert (a(x) - b(x)).abs().max().item() > 1e-3


# -- initialisation -------------------------------------------------------------------

# The sample standard deviation of n normal draws has a relative standard error of
# 1/sqrt(2(n - 1)); six of them bound a false failure at ~2e-9. Every measured conv
# below has cin != cout, so fan_in and fan_out differ by a factor >= 2 and their
# stds by >= sqrt(2): 41 %, far outside the tolerance.
SIGMAS = 6


def _assert_std(weight: torch.Tensor, expected: float) -> None:
    n = weight.numel()
    tolerance = SIGMAS / math.sqrt(2 * (n - 1))
    measured = weight.detach().double().std().item()
    assert abs(measured / expected - 1) < tolerance, (measured, expected, n)


def _fan(conv: nn.Conv2d | torch.Tensor, init: str) -> int:
    w = conv.weight if isinstance(conv, nn.Module) else conv
    cout, cin, kh, kw = w.shape
    return kh * kw * (cin if init == "fan_in" else cout)


def _probe(arch: str, **hparams: object) -> tuple[nn.Module, list[torch.Tensor]]:
    """A model whose probed convs have a large fan and cin != cout."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, **hparams)
    if arch == "wrn":  # first conv of stage 2: 128 -> 256, 3x3 (294,912 weights)
        return model, [model.blocks[1].conv1.weight]
    if arch == "resnet":  # first conv of stage 2: 128 -> 256, 3x3
        return model, [model.blocks[1].conv1.weight]
    if arch == "preact_resnet":  # last unit's conv3: 256 -> 1024, 1x1 (262,144 weights)
        return model, [model.blocks[-1].conv3.weight]
    # diracnet: the stem (3 -> 128, 3x3; fan_in 27, fan_out 1152), and for v2 the
    # learned kernel of stage 2's first layer (128 -> 256, 3x3)
    weights = [model.conv.weight]
    if hparams.get("variant", "v2") == "v2":
        weights.append(model.layers[3].conv.weight)  # layers: 2 blocks, pool, 2 blocks, ...
    return model, weights


SHAPES = {  # depth and width of each probe (width 8: large fans)
    "wrn": dict(depth=10, width=8),
    "resnet": dict(depth=8, width=8),
    "preact_resnet": dict(depth=11, width=4),
    "diracnet": dict(depth=10, width=8),
}


@pytest.mark.parametrize("init", ["fan_in", "fan_out"])
@pytest.mark.parametrize("arch", list(SHAPES))
def test_init_std_is_sqrt_2_over_fan(arch: str, init: str) -> None:
    """N(0, 2/fan) for the chosen fan, every family (``init`` is each one's option)."""
    _, weights = _probe(arch, **SHAPES[arch], init=init)
    for w in weights:
        _assert_std(w, math.sqrt(2 / _fan(w, init)))


AUTHORS_INIT = [
    # models/utils.lua MSRinit: sqrt(2/(kW*kH*nInputPlane)); pytorch/utils.py conv_params:
    # kaiming_normal_ (default mode fan_in)
    ("wrn", "fan_in"),
    # resnet-pre-act.lua ConvInit: n = kW*kH*nOutputPlane (no CIFAR ResNet code exists;
    # the registry takes the same authors' later code)
    ("resnet", "fan_out"),
    ("preact_resnet", "fan_out"),
    # diracnet.py conv_params and the stem: kaiming_normal_ (fan_in), both branches
    ("diracnet", "fan_in"),
]


@pytest.mark.parametrize(("arch", "authors"), AUTHORS_INIT)
def test_default_init_is_the_authors(arch: str, authors: str) -> None:
    """``build_model`` without ``init`` draws as the authors' code does (files above)."""
    _, weights = _probe(arch, **SHAPES[arch])
    for w in weights:
        _assert_std(w, math.sqrt(2 / _fan(w, authors)))


@pytest.mark.parametrize("init", ["fan_in", "fan_out"])
def test_diracnet_v1_kernels_start_at_std_0_1(init: str) -> None:
    """diracnets branch v1 ``diracnet.py`` ``conv_params(..., gain=0.1)``: the learned
    kernels are ``normal_(std=0.1)`` whatever ``init`` says (it sets the stem)."""
    model, _ = _probe("diracnet", **SHAPES["diracnet"], variant="v1", init=init)
    _assert_std(model.layers[3].conv.weight, 0.1)
    _assert_std(model.conv.weight, math.sqrt(2 / _fan(model.conv, init)))


def test_diracnet_classifier_is_kaiming_fan_in() -> None:
    """diracnets ``diracnet.py`` ``linear_params`` (both branches): weight
    ``kaiming_normal_`` of (classes, features), i.e. N(0, 2/features); bias 0."""
    torch.manual_seed(0)
    model = dn.build(num_classes=100, depth=10, width=8, variant="v2", init="fan_in")
    _assert_std(model.fc.weight, math.sqrt(2 / model.fc.in_features))
    assert not model.fc.bias.any()


@pytest.mark.parametrize("arch", ["wrn", "resnet", "preact_resnet", "diracnet"])
def test_bn_starts_at_one_and_classifier_bias_at_zero(arch: str) -> None:
    """resnet-1k-layers ``resnet-pre-act.lua`` BNInit (weight 1, bias 0) for every
    family, and the classifier bias 0 of every authors' file (``models/utils.lua``
    FCinit, ``linear_params``). The U(0, 1) BN weights of wide-residual-networks
    ``pytorch/utils.py`` and diracnets ``diracnet.py`` (``bnparams``: ``torch.rand``,
    torch7's default) are a library default that we do not follow."""
    model = build_model(arch, num_classes=10, depth=SHAPES[arch]["depth"])
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(b.weight, torch.ones_like(b.weight)) for b in bns)
    assert all(not b.bias.any() for b in bns)
    assert not model.fc.bias.any()
