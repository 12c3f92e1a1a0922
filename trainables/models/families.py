"""The built-in zoo's registrations: one block per family (no torch).

Each block is everything wrnsweep knows about a family besides its network code
(which lives in the file named by ``module``): hyperparameters with their one
default and rule, the paper's recipe, the paper's table rows and a colour.

Defaults: ``depth`` is the family's headline CIFAR depth, ``width`` 1 (the
network the paper widens), ``init`` what the authors' code does (named on each
family). Parameter counts are for 10 classes and are checked by
``tests/test_zoo.py`` against the networks ``build_model`` returns; errors are
the papers' reported CIFAR test errors (%).

Sources of the reported errors: WRN-28-10 is the dropout-0.3 model with mean/std
preprocessing (this project's), median of 5 runs: 3.89 on CIFAR-10 and 18.85 on
CIFAR-100 (the 20.0 % in the WRN repository's README is a single run on
ZCA-whitened CIFAR-100, so it is not used). WRN-16-8's 4.81 / 22.07 come from the
paper's widening-factor table, which used ZCA-whitened inputs. Pre-act ResNet-164
and -1001: the Identity Mappings paper, as also tabulated in the WRN paper.
DiracNet-28-10: 4.75 % on CIFAR-10; DiracNet-34-2 (5.6 % in some summaries) is
left out: not confirmed against the paper.
"""

from __future__ import annotations

from trainables.models._checks import check_dropout, check_width, depth_rule, depth_text
from trainables.models.registry import Family, HParam, PaperRow, Recipe, register

WRN_PAPER = "Zagoruyko & Komodakis, Wide Residual Networks, BMVC 2016 (arXiv:1605.07146)"
RESNET_PAPER = "He et al., Deep Residual Learning for Image Recognition, CVPR 2016, Table 6"
PREACT_PAPER = "He et al., Identity Mappings in Deep Residual Networks, ECCV 2016"
DIRAC_PAPER = ("Zagoruyko & Komodakis, DiracNets: Training Very Deep Neural Networks Without "
               "Skip-Connections, 2017 (arXiv:1706.00388)")

INITS = ("fan_in", "fan_out")


def _width() -> HParam:
    return HParam("width", 1, "channel multiplier k: group widths 16k, 32k, 64k",
                  rule=check_width, rule_text=">= 1")


def _init(default: str, source: str) -> HParam:
    # fan_in = k*k*in_channels, fan_out = k*k*out_channels; the default is what the
    # family's authors' code draws, named in ``source``.
    return HParam("init", default, "conv weights ~ N(0, 2/fan), fan_in or fan_out",
                  choices=INITS, rule_text=f"as {source}")


def _depth(label: str, default: int, a: int, b: int) -> HParam:
    return HParam("depth", default, "layers as the paper counts them",
                  rule=depth_rule(label, a, b), rule_text=depth_text(a, b))


# Zagoruyko & Komodakis 2016, section 4: SGD Nesterov 0.9, lr 0.1, wd 5e-4, batch 128,
# lr x0.2 at epochs 60/120/160 of 200 (30%/60%/80%). DiracNets reuse it for CIFAR.
_WRN_RECIPE = Recipe(nesterov=True, weight_decay=5e-4, milestones=(0.3, 0.6, 0.8), gamma=0.2,
                     source=WRN_PAPER + ", section 4")
# He et al. 2015, section 4.2: momentum 0.9 (no Nesterov), wd 1e-4, lr /10 at 32k and
# 48k of 64k iterations (50%/75%). The 2016 pre-act paper trains CIFAR the same way.
_RESNET_RECIPE = Recipe(nesterov=False, weight_decay=1e-4, milestones=(0.5, 0.75), gamma=0.1,
                        source=RESNET_PAPER.replace("Table 6", "section 4.2"))

register(Family(
    name="wrn",
    title="Wide ResNet",
    paper=WRN_PAPER,
    module="trainables.models.wrn",
    hparams=(
        _depth("WRN", 28, 6, 4),
        _width(),
        HParam("dropout", 0.0, "element-wise dropout between the two 3x3 convs",
               rule=check_dropout, rule_text="[0, 1)"),
        _init("fan_in", "wide-residual-networks models/utils.lua MSRinit"),
    ),
    recipe=_WRN_RECIPE,
    rows=(
        PaperRow("WRN-28-10", {"depth": 28, "width": 10, "dropout": 0.3}, 36_479_194, 640,
                 {"cifar10": 3.89, "cifar100": 18.85}, WRN_PAPER),
        PaperRow("WRN-40-4", {"depth": 40, "width": 4}, 8_949_210, 256, {"cifar10": 4.53},
                 WRN_PAPER),
        PaperRow("WRN-16-8", {"depth": 16, "width": 8}, 10_961_370, 512,
                 {"cifar10": 4.81, "cifar100": 22.07},
                 WRN_PAPER + ", widening-factor table (ZCA-whitened inputs)"),
        PaperRow("WRN-16-1", {"depth": 16, "width": 1}, 175_066, 64),
        PaperRow("WRN-16-4", {"depth": 16, "width": 4}, 2_748_890, 256),
        PaperRow("WRN-22-8", {"depth": 22, "width": 8}, 17_158_106, 512),
        PaperRow("WRN-40-1", {"depth": 40, "width": 1}, 563_930, 64),
        PaperRow("WRN-40-10", {"depth": 40, "width": 10}, 55_841_754, 640),
    ),
    colour="tab:blue",
))

register(Family(
    name="resnet",
    title="CIFAR ResNet",
    paper=RESNET_PAPER,
    module="trainables.models.resnet",
    hparams=(
        _depth("ResNet", 20, 6, 2),
        _width(),
        HParam("shortcut", "A", "where the shape changes: A zero-pad identity (the paper's "
               "CIFAR choice), B 1x1 conv + BN", choices=("A", "B")),
        # No code by the authors of the 2015 paper exists; resnet-1k-layers' ConvInit (in
        # a file that says it incorporates material from fb.resnet.torch) draws with
        # kW*kH*nOutputPlane.
        _init("fan_out", "resnet-1k-layers resnet-pre-act.lua ConvInit"),
    ),
    recipe=_RESNET_RECIPE,
    rows=(
        *(PaperRow(f"ResNet-{d}", {"depth": d}, params, 64, {"cifar10": err}, RESNET_PAPER)
          for d, params, err in ((20, 269_722, 8.75), (32, 464_154, 7.51), (44, 658_586, 7.17),
                                 (56, 853_018, 6.97), (110, 1_727_962, 6.43),
                                 (1202, 19_421_274, 7.93))),
        PaperRow("ResNet-20 (option B)", {"depth": 20, "shortcut": "B"}, 272_474, 64),
    ),
    colour="tab:orange",
))

register(Family(
    name="preact_resnet",
    title="Pre-activation ResNet (bottleneck)",
    paper=PREACT_PAPER,
    module="trainables.models.preact_resnet",
    hparams=(
        _depth("pre-activation ResNet", 164, 9, 2),
        _width(),
        HParam("stride_on", "conv1x1",
               "where a resolution change strides: conv1x1 (the authors' resnet-pre-act.lua) "
               "or conv3x3 (many ports)", choices=("conv1x1", "conv3x3")),
        _init("fan_out", "resnet-1k-layers resnet-pre-act.lua ConvInit"),
    ),
    recipe=_RESNET_RECIPE,
    rows=(
        PaperRow("pre-act ResNet-164", {"depth": 164}, 1_703_258, 256,
                 {"cifar10": 5.46, "cifar100": 24.33}, PREACT_PAPER),
        PaperRow("pre-act ResNet-1001", {"depth": 1001}, 10_327_706, 256,
                 {"cifar10": 4.92, "cifar100": 22.71}, PREACT_PAPER),
        PaperRow("pre-act ResNet-47", {"depth": 47}, 497_690, 256),
        PaperRow("pre-act ResNet-110", {"depth": 110}, 1_146_842, 256),
    ),
    colour="tab:green",
))

register(Family(
    name="diracnet",
    title="DiracNet",
    paper=DIRAC_PAPER,
    module="trainables.models.diracnet",
    hparams=(
        _depth("DiracNet", 34, 6, 4),
        _width(),
        HParam("variant", "v2", "layer form. v1: NCReLU, scalar alpha/beta (diracnets branch v1); "
               "v2: ReLU, per-channel alpha/beta (master)", choices=("v1", "v2")),
        # init sets the stem and v2's learned kernels (master's conv_params draws them
        # kaiming fan_in); v1's learned kernels start at N(0, 0.1^2) whatever init says,
        # as branch v1's conv_params(gain=0.1) draws them.
        _init("fan_in", "diracnets diracnet.py conv_params (master; stem and v2 kernels)"),
    ),
    recipe=_WRN_RECIPE,
    rows=(
        PaperRow("DiracNet-28-10", {"depth": 28, "width": 10, "variant": "v2"}, 36_450_090,
                 640, {"cifar10": 4.75}, DIRAC_PAPER),
        PaperRow("DiracNet-28-5", {"depth": 28, "width": 5, "variant": "v2"}, 9_124_250, 320),
        PaperRow("DiracNet-34-2 v2", {"depth": 34, "width": 2, "variant": "v2"}, 1_854_378, 128),
        PaperRow("DiracNet-34-2 v1", {"depth": 34, "width": 2, "variant": "v1"}, 3_693_158, 128),
        PaperRow("DiracNet-16-1 v2", {"depth": 16, "width": 1, "variant": "v2"}, 173_402, 64),
        PaperRow("DiracNet-16-1 v1", {"depth": 16, "width": 1, "variant": "v1"}, 343_026, 64),
    ),
    colour="tab:red",
))
