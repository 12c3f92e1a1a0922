"""The model zoo against the papers: block order, identities, errors.

What is pinned against the authors' own code (functional references, init
scales, Dirac start values, stride placement) is in ``tests/test_authors_code.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainables.models import build_model, check_hparams, count_params, names
from trainables.models import diracnet as dn

ARCHS = names()

# Parameter counts of the papers' configurations: the registry's rows, checked for
# every family by tests/test_zoo.py.


def test_wrn_28_10_on_cifar100_only_changes_the_classifier() -> None:
    # 640 features x 90 extra classes, plus 90 biases.
    model = build_model("wrn", num_classes=100, depth=28, width=10)
    assert count_params(model) == 36_479_194 + 640 * 90 + 90


SMALL = {
    "wrn": dict(depth=10, width=2, dropout=0.3),
    "resnet": dict(depth=8),
    "preact_resnet": dict(depth=11),
    "diracnet": dict(depth=10, width=1, variant="v1"),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_trains_a_step(arch: str) -> None:
    """Shape, finiteness, and a gradient reaching every parameter (timm's zoo test)."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, **SMALL[arch])
    x = torch.randn(4, 3, 32, 32)
    out = model(x)
    assert out.shape == (4, 10)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.arange(4)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_models_are_cpu_fp32() -> None:
    for arch in ARCHS:
        params = list(build_model(arch, num_classes=10, **SMALL[arch]).parameters())
        assert {p.device.type for p in params} == {"cpu"}
        assert {p.dtype for p in params} == {torch.float32}


def test_wrn_block_order_and_dropout_type() -> None:
    """BN-ReLU-conv, BN-ReLU-dropout-conv; dropout is element-wise, convs have no bias."""
    model = build_model("wrn", num_classes=10, depth=16, width=2, dropout=0.3)
    assert not any(isinstance(m, nn.Dropout2d) for m in model.modules())
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    block = model.blocks[0]
    calls: list[str] = []
    for name in ("bn1", "conv1", "bn2", "conv2"):
        getattr(block, name).register_forward_hook(lambda m, i, o, n=name: calls.append(n))
    seen_input: dict[str, torch.Tensor] = {}
    block.conv1.register_forward_hook(lambda m, i, o: seen_input.update(c1=i[0]))
    block.conv2.register_forward_hook(lambda m, i, o: seen_input.update(c2=i[0]))
    block.train()
    x = torch.randn(2, 16, 8, 8)
    torch.manual_seed(0)
    block(x)
    assert calls == ["bn1", "conv1", "bn2", "conv2"]
    # conv1 sees a ReLU output (pre-activation): nothing negative.
    assert (seen_input["c1"] >= 0).all()
    # conv2's input is dropped element-wise: zeros scattered inside channels, and the
    # kept values are scaled by 1/(1-p). Dropout2d would zero whole channels instead.
    c2 = seen_input["c2"]
    zero_fraction_per_channel = (c2 == 0).float().mean(dim=(2, 3))
    assert ((zero_fraction_per_channel > 0) & (zero_fraction_per_channel < 1)).any()
    block.eval()
    calls.clear()
    block(x)
    assert (seen_input["c2"] >= 0).all()


def test_wrn_shortcut_is_bare_conv_only_where_channels_change() -> None:
    model = build_model("wrn", num_classes=10, depth=16, width=1)
    shortcuts = [b.shortcut for b in model.blocks]
    # Width 1: group 1 keeps 16 channels (identity), groups 2 and 3 start with a 1x1 conv.
    assert [s is not None for s in shortcuts] == [False, False, True, False, True, False]
    assert all(isinstance(s, nn.Conv2d) and s.kernel_size == (1, 1) for s in shortcuts if s)
    assert model.conv1.out_channels == 16


def test_resnet_option_a_has_no_shortcut_parameters_and_zero_pads() -> None:
    model = build_model("resnet", num_classes=10, depth=20)
    block = model.blocks[3]  # first block of group 2: 16 -> 32 channels, stride 2
    assert isinstance(block.shortcut, nn.Module) and not list(block.shortcut.parameters())
    x = torch.randn(2, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


def test_resnet_bn_before_addition_relu_after() -> None:
    model = build_model("resnet", num_classes=10, depth=8).eval()
    block = model.blocks[0]
    x = torch.randn(2, 16, 8, 8)
    expected = F.relu(block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x))))) + x)
    assert torch.allclose(block(x), expected)


def test_dirac_identity_v1() -> None:
    """With alpha=1, beta=0 a v1 Dirac conv of NCReLU(x) returns x exactly ([I|I] delta)."""
    conv = dn.DiracConv2d(2 * 8, 8, "v1", "fan_in")
    with torch.no_grad():
        conv.alpha.fill_(1.0)
        conv.beta.fill_(0.0)
    x = torch.randn(3, 8, 6, 6)
    assert torch.allclose(conv(dn.ncrelu(x)), x, atol=1e-6)


def test_dirac_identity_v2_on_nonnegative_input() -> None:
    conv = dn.DiracConv2d(8, 8, "v2", "fan_in")
    with torch.no_grad():
        conv.alpha.fill_(1.0)
        conv.beta.fill_(0.0)
    x = torch.rand(3, 8, 6, 6)
    assert torch.allclose(conv(x), x, atol=1e-6)


def test_diracnet_has_no_skip_connections_and_variant_shapes() -> None:
    v1 = build_model("diracnet", num_classes=10, depth=10, width=1, variant="v1")
    v2 = build_model("diracnet", num_classes=10, depth=10, width=1, variant="v2")
    convs1 = [m for m in v1.modules() if isinstance(m, dn.DiracConv2d)]
    convs2 = [m for m in v2.modules() if isinstance(m, dn.DiracConv2d)]
    assert all(c.alpha.numel() == 1 for c in convs1)  # v1: scalar alpha/beta
    assert all(c.alpha.numel() == c.weight.shape[0] for c in convs2)  # v2: per channel
    assert convs1[0].weight.shape[1] == 2 * convs1[0].weight.shape[0]  # NCReLU doubles
    assert sum(isinstance(m, nn.MaxPool2d) for m in v2.modules()) == 2


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_diracnet_fold_matches_eval_outputs(variant: str) -> None:
    torch.manual_seed(0)
    model = build_model("diracnet", num_classes=10, depth=10, width=1, variant=variant)
    # Train a few steps so BN statistics, alpha and beta move away from their init.
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        loss = F.cross_entropy(model(torch.randn(16, 3, 32, 32)), torch.randint(0, 10, (16,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    folded = dn.fold(model)
    assert not any(isinstance(m, (nn.BatchNorm2d, dn.DiracConv2d)) for m in folded.modules())
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        diff = (folded(x) - model(x)).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize(
    ("arch", "hparams", "message"),
    [
        ("wrn", dict(depth=27), "WRN depth must be 6n+4 (10, 16, 22, 28, ...), got depth=27"),
        ("wrn", dict(width=0), "width must be an integer >= 1, got width=0"),
        ("wrn", dict(dropout=1.5), "dropout must be in [0, 1), got dropout=1.5"),
        ("wrn", dict(depth=16.0), "depth must be an integer, got depth=16.0"),
        ("resnet", dict(depth=21), "ResNet depth must be 6n+2 (8, 14, 20, 26, ...), got depth=21"),
        ("resnet", dict(shortcut="C"), "shortcut must be 'A' or 'B', got shortcut='C'"),
        ("preact_resnet", dict(depth=57),
         "pre-activation ResNet depth must be 9n+2 (11, 20, 29, 38, ...), got depth=57"),
        ("diracnet", dict(depth=33), "DiracNet depth must be 6n+4"),
        ("diracnet", dict(variant="v3"), "variant must be 'v1' or 'v2', got variant='v3'"),
        ("resnet", dict(dropout=0.3), "resnet takes hyperparameters ['depth', 'width', "
                                      "'shortcut', 'init'], got unexpected ['dropout']"),
        ("vgg", dict(), "arch must be one of ['wrn', 'resnet', 'preact_resnet', 'diracnet'], "
                        "got arch='vgg'"),
    ],
)
def test_invalid_arguments_name_rule_and_value(arch: str, hparams: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        build_model(arch, num_classes=10, **hparams)
    assert message in str(err.value)
    with pytest.raises(ValueError):
        check_hparams(arch, **hparams)


def test_none_hyperparameters_mean_defaults() -> None:
    model = build_model("wrn", num_classes=10, depth=10, width=None, dropout=None)
    assert count_params(model) == count_params(build_model("wrn", num_classes=10, depth=10))


def test_num_classes_must_be_sane() -> None:
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2, got num_classes=1"):
        build_model("wrn", num_classes=1)
