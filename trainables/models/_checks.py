"""Argument rules shared by the architecture families.

Every rule raises ``ValueError`` that states the rule and the offending value,
so the sweep validator can quote it next to the YAML key that produced it.
"""

from __future__ import annotations

import numbers


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _depth_rule(family: str, depth: object, a: int, b: int, smallest_n: int) -> None:
    examples = ", ".join(str(a * n + b) for n in range(smallest_n, smallest_n + 4))
    ok = _is_int(depth) and depth >= a * smallest_n + b and (depth - b) % a == 0  # type: ignore[operator]
    if not ok:
        raise ValueError(f"{family} depth must be {a}n+{b} ({examples}, ...), got depth={depth!r}")


def depth_6n4(family: str, depth: object) -> None:
    """WRN and DiracNet: 3 groups of n two-conv blocks, + first conv, fc and 2 shortcuts."""
    _depth_rule(family, depth, 6, 4, 1)


def depth_6n2(family: str, depth: object) -> None:
    """He et al. 2015 CIFAR ResNet: 3 groups of n two-conv blocks, + first conv and fc."""
    _depth_rule(family, depth, 6, 2, 1)


def depth_9n2(family: str, depth: object) -> None:
    """Bottleneck ResNet: 3 groups of n three-conv blocks, + first conv and fc."""
    _depth_rule(family, depth, 9, 2, 1)


def check_width(width: object) -> None:
    if not (_is_int(width) and width >= 1):  # type: ignore[operator]
        raise ValueError(f"width must be an integer >= 1, got width={width!r}")


def check_dropout(dropout: object) -> None:
    ok = isinstance(dropout, numbers.Real) and not isinstance(dropout, bool)
    if not (ok and 0.0 <= dropout < 1.0):  # type: ignore[operator]
        raise ValueError(f"dropout must be in [0, 1), got dropout={dropout!r}")


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        options = " or ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be {options}, got {name}={value!r}")
