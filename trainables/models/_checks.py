"""Validity rules shared by the architecture families (no torch).

Every rule raises ``ValueError`` that states the rule and the offending value,
so the sweep validator can quote it next to the YAML key that produced it. The
registry checks a value's type first (``HParam.check``), so rules see numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def depth_rule(family: str, a: int, b: int) -> Callable[[Any], None]:
    """depth = a*n + b for n >= 1, e.g. WRN's 6n+4: 3 groups of n two-conv blocks + 4."""

    def check(depth: Any) -> None:
        examples = ", ".join(str(a * n + b) for n in range(1, 5))
        if not (depth >= a + b and (depth - b) % a == 0):
            raise ValueError(
                f"{family} depth must be {a}n+{b} ({examples}, ...), got depth={depth!r}"
            )

    return check


def depth_text(a: int, b: int) -> str:
    """The rule in words for --help: ``6n+4: 10, 16, 22, 28, ...``."""
    return f"{a}n+{b}: " + ", ".join(str(a * n + b) for n in range(1, 5)) + ", ..."


def check_width(width: Any) -> None:
    if width < 1:
        raise ValueError(f"width must be an integer >= 1, got width={width!r}")


def check_dropout(dropout: Any) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got dropout={dropout!r}")
