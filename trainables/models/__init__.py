"""The model zoo: CIFAR residual networks registered by name.

``build_model("wrn", num_classes=10, depth=28, width=10, dropout=0.3)`` returns a
CPU fp32 ``nn.Module``; device, dtype, channels_last and compilation are the
engine's business. Builders are pure: no I/O, no GPU, no global state. A
hyperparameter left out (or ``None``) takes the family's one default, from the
registry (``trainables.models.families``).

=================  =============================  ====================================
name               paper                          hyperparameters
=================  =============================  ====================================
``wrn``            Zagoruyko & Komodakis 2016     depth (6n+4), width, dropout, init
``resnet``         He et al. 2015 (CIFAR)         depth (6n+2), width, shortcut, init
``preact_resnet``  He et al. 2016 (bottleneck)    depth (9n+2), width, stride_on, init
``diracnet``       Zagoruyko & Komodakis 2017     depth (6n+4), width, variant, init
=================  =============================  ====================================

Importing this package does not import torch (``wrnsweep validate`` relies on
it): the network modules are imported by :func:`build_model` and :func:`fold`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainables.models.registry import Family, get_family, names

if TYPE_CHECKING:
    from torch import nn

__all__ = ["build_model", "check_hparams", "count_params", "family_of", "fold", "names"]


def check_hparams(arch: str, **hparams: Any) -> None:
    """Raise ``ValueError`` (rule and value) unless ``build_model`` would accept these.

    Cheap and torch-free: validators call it for every value of a search space.
    Only the given hyperparameters are checked; ``None`` means the default.
    """
    get_family(arch).check(hparams)


def build_model(arch: str, *, num_classes: int, **hparams: Any) -> nn.Module:
    """Build ``arch`` for ``num_classes`` classes on CPU in fp32."""
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise ValueError(f"num_classes must be an integer >= 2, got num_classes={num_classes!r}")
    return get_family(arch).build(num_classes=num_classes, **hparams)


def family_of(model: nn.Module) -> Family:
    """The registered family whose network module defines ``type(model)``."""
    module = type(model).__module__
    for arch in names():
        family = get_family(arch)
        if family.module == module:
            return family
    known = [get_family(a).module for a in names()]
    raise TypeError(f"{type(model).__name__} (from {module}) is not a network of a registered "
                    f"family (modules {known})")


def fold(model: nn.Module) -> nn.Module:
    """The eval-mode inference form of ``model``, BatchNorm (and Dirac terms) folded away."""
    return family_of(model).fold(model)


def count_params(model: nn.Module) -> int:
    """Trainable parameters, as the papers count them (BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
