"""How a problem in a sweep file is reported: file, line, dotted key and message.

Every stage of validation (YAML syntax, pass 1, pass 2, the cluster check at
launch) reports through :class:`ConfigIssue`, so the CLI prints them all the
same way, ``FILE:LINE: key: message``, and :class:`ConfigError` carries every
issue found rather than the first one.

:func:`_fmt` writes values in those messages the way the user wrote them in
YAML. It lives here, at the bottom of the package, because the schema's own
number validator uses it as well as both passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a sweep file: where it is and what to do about it."""

    file: str
    line: int | None  # 1-based; None when the key is absent and has no parent line
    key: str  # dotted path: "architectures.wrn.depth.low", "search.points_to_evaluate.0.depth"
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(Exception):
    """A sweep file is invalid; ``issues`` lists every problem found, in file order."""

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        self.issues = list(issues)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)


def _fmt(value: Any) -> str:
    """A value as the user wrote it in YAML (60 -> 60, not 60.0; True -> true)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    if isinstance(value, tuple | list) and all(
        v is None or isinstance(v, bool | int | float | str) for v in value
    ):  # flat lists only: a YAML alias can make a list contain itself
        text = "[" + ", ".join(_fmt(v) for v in value) + "]"
        return text if len(text) <= 60 else text[:57] + "..."
    if isinstance(value, str):
        return repr(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
