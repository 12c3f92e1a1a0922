"""Reading sweep YAML while recording the line of every key.

PyYAML's constructed data carries no line numbers, so :class:`_LineLoader` walks
the node tree (``yaml.compose``) and maps each dotted key
(``architectures.wrn.depth``, ``search.points_to_evaluate.0``) to its 1-based
line. The same walk reports duplicate keys, which PyYAML would otherwise settle
silently by keeping the last one. :func:`_compose` turns syntax errors, an empty
file and a top level that is not a mapping into :class:`ConfigError`;
:func:`_line_of` gives an absent key (a missing field) the line of its nearest
parent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from orchestrator.config.errors import ConfigError, ConfigIssue


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that also maps every key and list item to its 1-based line.

    PyYAML keeps the last of two equal keys without a word; the node walk that
    records lines reports them instead.
    """

    def load_with_lines(self) -> tuple[Any, dict[str, int], list[tuple[str, int, int]]]:
        node = self.get_single_node()
        if node is None:
            return None, {}, []
        lines: dict[str, int] = {}
        dups: list[tuple[str, int, int]] = []  # (dotted key, line, line of the first one)
        self._walk(node, "", lines, dups, set())
        return self.construct_document(node), lines, dups

    def _walk(
        self,
        node: yaml.Node,
        path: str,
        lines: dict[str, int],
        dups: list[tuple[str, int, int]],
        stack: set[int],
    ) -> None:
        if id(node) in stack:  # a recursive alias; its lines are already recorded
            return
        stack.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *anchor` keys take their parent's line
                key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
                dotted = f"{path}.{key}" if path else key
                line = key_node.start_mark.line + 1
                if key in first:
                    dups.append((dotted, line, first[key]))
                first.setdefault(key, line)
                lines[dotted] = line  # the last one wins, as in the constructed data
                self._walk(value_node, dotted, lines, dups, stack)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                dotted = f"{path}.{i}" if path else str(i)
                lines[dotted] = item.start_mark.line + 1
                self._walk(item, dotted, lines, dups, stack)
        stack.discard(id(node))


def _compose(text: str, filename: str) -> tuple[dict[str, Any], dict[str, int], list[ConfigIssue]]:
    loader = _LineLoader(text)
    try:
        data, lines, dups = loader.load_with_lines()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or "invalid YAML"
        if exc.context:
            what = f"{what} ({exc.context})"
        column = f", column {mark.column + 1}" if mark is not None else ""
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(
            [ConfigIssue(filename, line, "", f"YAML syntax error: {what}{column}")]
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue(filename, None, "", f"YAML error: {exc}")]) from None
    finally:
        loader.dispose()
    if data is None:
        raise ConfigError(
            [
                ConfigIssue(
                    filename,
                    None,
                    "",
                    "the file is empty: a sweep needs at least name and architectures",
                )
            ]
        )
    if not isinstance(data, dict):
        raise ConfigError(
            [
                ConfigIssue(
                    filename,
                    1,
                    "",
                    f"the top level must be a mapping (name: ..., architectures: ...), "
                    f"got a {type(data).__name__}",
                )
            ]
        )
    issues = [
        ConfigIssue(
            filename,
            line,
            key,
            f"duplicate key (first at line {first}); YAML would silently keep only the last one",
        )
        for key, line, first in dups
    ]
    return data, lines, issues


def _line_of(lines: Mapping[str, int], key: str) -> int | None:
    while key:
        if key in lines:
            return lines[key]
        key = key.rpartition(".")[0]
    return None
