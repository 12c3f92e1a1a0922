"""The model zoo: CIFAR residual networks registered by name.

``build_model("wrn", num_classes=10, depth=28, width=10, dropout=0.3)`` returns a
CPU fp32 ``nn.Module``; device, dtype, channels_last and compilation are the
engine's business. Builders are pure: no I/O, no GPU, no global state.

=================  =============================  ===========================
name               paper                          hyperparameters
=================  =============================  ===========================
``wrn``            Zagoruyko & Komodakis 2016     depth (6n+4), width, dropout
``resnet``         He et al. 2015 (CIFAR)         depth (6n+2), width, shortcut
``preact_resnet``  He et al. 2016 (bottleneck)    depth (9n+2), width
``diracnet``       Zagoruyko & Komodakis 2017     depth (6n+4), width, variant
=================  =============================  ===========================
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import ModuleType
from typing import Any

from torch import nn

from trainables.models import diracnet, preact_resnet, resnet, wrn

__all__ = ["ARCHS", "build_model", "check_hparams", "count_params", "fold_diracnet"]

_FAMILIES: dict[str, ModuleType] = {
    "wrn": wrn,
    "resnet": resnet,
    "preact_resnet": preact_resnet,
    "diracnet": diracnet,
}
ARCHS = tuple(_FAMILIES)

fold_diracnet = diracnet.fold


def _family(arch: str) -> ModuleType:
    if arch not in _FAMILIES:
        raise ValueError(f"arch must be one of {list(ARCHS)}, got arch={arch!r}")
    return _FAMILIES[arch]


def _filtered(arch: str, fn: Callable[..., Any], hparams: dict[str, Any]) -> dict[str, Any]:
    """Drop ``None`` (use the builder's default) and reject names the family lacks."""
    accepted = [p for p in inspect.signature(fn).parameters if p != "num_classes"]
    kwargs = {k: v for k, v in hparams.items() if v is not None}
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"{arch} takes hyperparameters {accepted}, got unexpected {unknown}"
        )
    return kwargs


def check_hparams(arch: str, **hparams: Any) -> None:
    """Raise ``ValueError`` (rule and value) unless ``build_model`` would accept these.

    Cheap: nothing is allocated, so validators can call it for every value of a
    search space.
    """
    family = _family(arch)
    family.check(**_filtered(arch, family.check, hparams))


def build_model(arch: str, *, num_classes: int, **hparams: Any) -> nn.Module:
    """Build ``arch`` for ``num_classes`` classes on CPU in fp32."""
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise ValueError(f"num_classes must be an integer >= 2, got num_classes={num_classes!r}")
    family = _family(arch)
    return family.build(num_classes=num_classes, **_filtered(arch, family.build, hparams))


def count_params(model: nn.Module) -> int:
    """Trainable parameters, as the papers count them (BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
