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

import datetime
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
        text = f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"
        # One issue, one line: a key or value from the file may hold a line break
        # (a quoted "a\nb", a block scalar), which is shown escaped.
        return text.translate(_LINE_BREAKS)


# Every character str.splitlines() breaks on, and the other control characters.
_LINE_BREAKS = {
    c: repr(chr(c))[1:-1] for c in (*range(0x20), 0x7F, 0x85, 0x2028, 0x2029) if c != 0x09
}


class ConfigError(Exception):
    """A sweep file is invalid; ``issues`` lists the problems found, in file order.

    At most 200 (``checks.MAX_ISSUES``); past them, a last issue says how many more.
    """

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
    if isinstance(value, tuple | list):  # nested at most 16 deep (yaml_lines.MAX_DEPTH)
        parts: list[str] = []
        size = 0
        for v in value:  # only as many items as are shown: a message may name 1,000 choices
            parts.append(_fmt(v))
            size += len(parts[-1]) + 2
            if size > 60:
                break
        text = "[" + ", ".join(parts) + "]"
        return text if len(text) <= 60 else text[:57] + "..."
    if isinstance(value, str):
        # A value may be up to 4,096 characters (yaml_lines.MAX_SCALAR_CHARS); a
        # message shows its start and its length.
        return repr(value) if len(value) <= 60 else f"{value[:50]!r}... ({len(value)} characters)"
    if isinstance(value, datetime.date):  # YAML reads 2024-01-01 as a date
        return value.isoformat()
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
