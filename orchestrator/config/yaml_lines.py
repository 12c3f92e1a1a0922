"""Reading sweep YAML within limits, while recording the line of every key.

A sweep file comes from anywhere (a colleague, an archive next to a paper), so
reading it must not be a way to hang or exhaust the machine. :func:`_compose`
builds PyYAML's node tree itself, one parser event at a time (libyaml's parser
when PyYAML has it), and stops at the first limit crossed, before any Python
object is constructed:

=====================  ==========  =====================================================
limit                  value       why
=====================  ==========  =====================================================
``MAX_FILE_BYTES``     5 MiB       a sweep file is 1-3 KB; anything larger is another
                                   kind of file (and ``/dev/zero`` never ends)
``MAX_DEPTH``          16          collections inside collections: the deepest key a
                                   sweep has (``architectures.wrn.recipe.optimizer.
                                   momentum``) is 5 deep; every later stage recurses
``MAX_ITEMS``          1,000       items of one list or keys of one mapping: choices
                                   and starting points are a handful each, and each
                                   choice is a category Optuna must learn
``MAX_NODES``          10,000      values in the whole file *with every alias
                                   expanded*: the shipped files have under 200; this
                                   is what stops "billion laughs" (9 aliases of 9
                                   aliases of ...), which is only 13 lines long
``MAX_SCALAR_CHARS``   4,096       one value or key: the longest a real one can be is
                                   a path (``dataset.root``), and Linux's PATH_MAX is
                                   4,096
integers               < 2**63     depths, epochs and seeds fit in 64 bits; a longer
                                   one is a typo (and beyond 4,300 digits Python
                                   refuses to print it)
=====================  ==========  =====================================================

An alias (``*name``) counts as the number of values its anchor holds, computed
when the anchor's node is complete, so the count is exact without expanding
anything; an alias to a node still being composed (a value containing itself) is
refused. Each limit is reported like every other problem, ``FILE:LINE: key:
message``, at the value that crossed it. With the limits, composing, the line
map below, construction and both validation passes are linear in the size of
the file: the slowest 5 MB files (one 4.9 MB value, 4.9 MB of comments) take
~0.15 s, far inside the 2 s that issue 13 asks of any file under 5 MB.

PyYAML's constructed data carries no line numbers, so :func:`_walk_lines` maps
each dotted key of the node tree (``architectures.wrn.depth``,
``search.points_to_evaluate.0``) to its 1-based line. The same walk reports
duplicate keys, which PyYAML would otherwise settle silently by keeping the last
one. :func:`_compose` turns syntax errors, an empty file and a top level that is
not a mapping into :class:`ConfigError`; :func:`_line_of` gives an absent key (a
missing field) the line of its nearest parent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import (
    AliasEvent,
    CollectionStartEvent,
    DocumentEndEvent,
    DocumentStartEvent,
    Event,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
    StreamStartEvent,
)
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from orchestrator.config.errors import ConfigError, ConfigIssue

MAX_FILE_BYTES = 5 * 1024 * 1024
MAX_DEPTH = 16
MAX_ITEMS = 1_000
MAX_NODES = 10_000
MAX_SCALAR_CHARS = 4_096
_INT_BOUND = 2**63

_INT_TAG = "tag:yaml.org,2002:int"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _LimitError(Exception):
    """A limit crossed while composing: where, and what to do."""

    def __init__(self, line: int | None, key: str, message: str) -> None:
        super().__init__(message)
        self.line, self.key, self.message = line, key, message


@dataclass
class _Open:
    """A collection whose end event has not come yet."""

    node: SequenceNode | MappingNode
    path: str  # dotted key, "" at the top
    line: int  # the line of its key (or its own line in a list or at the top)
    size: int = 1  # values in it so far, aliases expanded, itself included
    height: int = 1  # collections on the longest path down from it, itself included
    items: int = 0  # list items or mapping keys so far
    key: Node | None = None  # a mapping's key that waits for its value


def _join(path: str, part: str) -> str:
    return f"{path}.{part}" if path else part


def _key_text(node: Node) -> str:
    return str(node.value) if isinstance(node, ScalarNode) else "?"


def _parser(text: str) -> Any:
    """An object with PyYAML's event API: libyaml's parser if PyYAML was built with it."""
    try:
        from yaml.cyaml import CParser
    except ImportError:  # the pure-Python parser: the same events, ~15x slower
        return yaml.SafeLoader(text)
    return CParser(text)


def _plural(n: int, what: str) -> str:
    return f"{n:,} {what}" if n == 1 else f"{n:,} {what}s"


class _Composer:
    """Parser events -> PyYAML nodes, with every limit checked as the nodes are made."""

    def __init__(self, parser: Any, constructor: SafeConstructor) -> None:
        self.parser = parser
        self.constructor = constructor
        self.resolver = Resolver()
        self.anchors: dict[str, Node] = {}
        self.done: dict[int, tuple[int, int]] = {}  # id(node) -> (size, height), when complete
        self.total = 0  # values so far, aliases expanded

    def compose(self) -> Node | None:
        """The single document's root node, or None for an empty stream."""
        self._expect(StreamStartEvent)
        if self.parser.check_event(StreamEndEvent):
            return None
        self._expect(DocumentStartEvent)
        root = self._compose_root()
        self._expect(DocumentEndEvent)
        if self.parser.check_event(DocumentStartEvent):
            event = self.parser.get_event()
            raise _LimitError(
                event.start_mark.line + 1,
                "",
                "a second YAML document starts here (after ---): "
                "a sweep file is one document; split it into two files",
            )
        return root

    def _expect(self, kind: type[Event]) -> Event:
        event = self.parser.get_event()
        assert isinstance(event, kind), event  # the parser guarantees the stream's grammar
        return event

    def _slot(self, stack: list[_Open], line: int) -> tuple[str, int]:
        """Dotted key and line of the next value: a list item, a key, or a key's value."""
        if not stack:
            return "", line
        top = stack[-1]
        if isinstance(top.node, SequenceNode):
            return _join(top.path, str(top.items)), line
        if top.key is None:  # composing a key: report at its mapping
            return top.path, line
        return _join(top.path, _key_text(top.key)), top.key.start_mark.line + 1

    def _count(self, n: int, path: str, line: int, alias: str | None) -> None:
        self.total += n
        if self.total <= MAX_NODES:
            return
        if alias is not None:
            raise _LimitError(
                line,
                path,
                f"the alias *{alias} stands for {_plural(n, 'value')}, which takes the file "
                f"past {MAX_NODES:,} values with its aliases expanded: aliases are for "
                "sharing a block such as a recipe, not for generating data",
            )
        raise _LimitError(
            line,
            path,
            f"the file has more than {MAX_NODES:,} values (a sweep file has a few hundred)",
        )

    def _compose_root(self) -> Node:
        stack: list[_Open] = []
        while True:
            event = self.parser.get_event()
            line = event.start_mark.line + 1
            if isinstance(event, SequenceEndEvent | MappingEndEvent):
                frame = stack.pop()
                frame.node.end_mark = event.end_mark
                self.done[id(frame.node)] = (frame.size, frame.height)
                node, size, height = frame.node, frame.size, frame.height
            else:
                path, key_line = self._slot(stack, line)
                if stack and stack[-1].items >= MAX_ITEMS and self._starts_item(stack[-1]):
                    top = stack[-1]
                    raise _LimitError(
                        top.line,
                        top.path,
                        f"this list has more than {MAX_ITEMS:,} items; a sweep file's lists are "
                        "short (choices and starting points are a handful)"
                        if isinstance(top.node, SequenceNode)
                        else f"this mapping has more than {MAX_ITEMS:,} keys; a section of a "
                        "sweep file has a dozen",
                    )
                if isinstance(event, AliasEvent):
                    node, size, height = self._alias(event, stack, path, line)
                elif isinstance(event, ScalarEvent):
                    is_key = bool(stack) and not self._in_value(stack[-1])
                    node = self._scalar(event, path, line, is_key)
                    size, height = 1, 0
                    self._count(1, path, line, None)
                elif isinstance(event, CollectionStartEvent):
                    if len(stack) + 1 > MAX_DEPTH:
                        raise _LimitError(
                            line,
                            path,
                            f"nested more than {MAX_DEPTH} levels deep (a sweep file needs 5)",
                        )
                    self._count(1, path, line, None)
                    stack.append(_Open(self._collection(event), path, key_line))
                    continue
                else:  # pragma: no cover - the parser emits nothing else inside a document
                    raise AssertionError(event)
            if not stack:
                return node
            self._attach(stack[-1], node, size, height)

    @staticmethod
    def _in_value(top: _Open) -> bool:
        """Whether the next node in ``top`` is a value (a list item, or a key's value)."""
        return isinstance(top.node, SequenceNode) or top.key is not None

    @staticmethod
    def _starts_item(top: _Open) -> bool:
        """Whether the next node in ``top`` starts an item (a mapping's key starts one)."""
        return isinstance(top.node, SequenceNode) or top.key is None

    def _attach(self, top: _Open, node: Node, size: int, height: int) -> None:
        top.size += size
        top.height = max(top.height, height + 1)
        if isinstance(top.node, SequenceNode):
            top.node.value.append(node)
            top.items += 1
        elif top.key is None:
            top.key = node
        else:
            top.node.value.append((top.key, node))
            top.key = None
            top.items += 1

    def _anchor(self, event: ScalarEvent | CollectionStartEvent, node: Node) -> None:
        if event.anchor is None:
            return
        if event.anchor in self.anchors:
            raise _LimitError(
                event.start_mark.line + 1,
                "",
                f"YAML syntax error: the anchor &{event.anchor} is defined twice "
                f"(first at line {self.anchors[event.anchor].start_mark.line + 1})",
            )
        self.anchors[event.anchor] = node

    def _alias(
        self, event: AliasEvent, stack: list[_Open], path: str, line: int
    ) -> tuple[Node, int, int]:
        target = self.anchors.get(event.anchor)
        if target is None:
            raise _LimitError(
                line,
                path,
                f"the alias *{event.anchor} has no anchor: write &{event.anchor} on a value "
                "above it first",
            )
        if isinstance(target, ScalarNode):
            size, height = 1, 0
        elif id(target) in self.done:
            size, height = self.done[id(target)]
        else:
            raise _LimitError(
                line,
                path,
                f"the alias *{event.anchor} is inside the value it names (a value cannot "
                "contain itself)",
            )
        if len(stack) + height > MAX_DEPTH:
            raise _LimitError(
                line,
                path,
                f"the alias *{event.anchor} nests this value more than {MAX_DEPTH} levels deep "
                "(a sweep file needs 5)",
            )
        self._count(size, path, line, event.anchor)
        return target, size, height

    def _scalar(self, event: ScalarEvent, path: str, line: int, is_key: bool) -> ScalarNode:
        if len(event.value) > MAX_SCALAR_CHARS:
            what = "key" if is_key else "value"
            raise _LimitError(
                line,
                path,
                f"a {what} of {len(event.value):,} characters; the longest a sweep file needs "
                f"is a path, at most {MAX_SCALAR_CHARS:,}",
            )
        tag = event.tag
        if tag is None or tag == "!":
            tag = self.resolver.resolve(ScalarNode, event.value, event.implicit)
        node = ScalarNode(tag, event.value, event.start_mark, event.end_mark, style=event.style)
        if tag == _INT_TAG and len(event.value) > 15 and self._too_big(node):
            raise _LimitError(
                line,
                path,
                f"integer {event.value[:20]}... is out of range: integers in a sweep file "
                "fit in 64 bits",
            )
        self._anchor(event, node)
        return node

    def _too_big(self, node: ScalarNode) -> bool:
        try:
            value = self.constructor.construct_yaml_int(node)
        except ValueError:
            return False  # the constructor reports it, with its line
        return abs(value) >= _INT_BOUND

    def _collection(self, event: CollectionStartEvent) -> SequenceNode | MappingNode:
        node: SequenceNode | MappingNode
        tag = event.tag
        if isinstance(event, SequenceStartEvent):
            if tag is None or tag == "!":
                tag = self.resolver.resolve(SequenceNode, None, event.implicit)
            node = SequenceNode(tag, [], event.start_mark, None, flow_style=event.flow_style)
        else:
            assert isinstance(event, MappingStartEvent)
            if tag is None or tag == "!":
                tag = self.resolver.resolve(MappingNode, None, event.implicit)
            node = MappingNode(tag, [], event.start_mark, None, flow_style=event.flow_style)
        self._anchor(event, node)
        return node


class _Constructor(SafeConstructor):
    """SafeConstructor whose failures on a value (``!!int abc``, a date 2024-13-01) say where.

    PyYAML raises plain ValueError/KeyError from some scalar constructors; they
    become a ConstructorError at the node's line like every other YAML error.
    """

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except Exception as exc:
            tag = node.tag.rsplit(":", 1)[-1]
            raise ConstructorError(
                None, None, f"cannot read {node.value!r} as !!{tag} ({exc})", node.start_mark
            ) from None


def _walk_lines(root: Node) -> tuple[dict[str, int], list[tuple[str, int, int]]]:
    """Dotted key -> line of every key and list item; and the duplicate keys.

    Aliases are walked into (their keys get the lines of their anchor's text), which
    the composer's limits keep to at most ``MAX_NODES`` steps. The recursion is at
    most ``MAX_DEPTH`` deep.
    """
    lines: dict[str, int] = {}
    dups: list[tuple[str, int, int]] = []  # (dotted key, line, line of the first one)

    def walk(node: Node, path: str) -> None:
        if isinstance(node, MappingNode):
            first: dict[str, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue  # `<<: *anchor` keys take their parent's line
                key = _key_text(key_node)
                dotted = _join(path, key)
                line = key_node.start_mark.line + 1
                if key in first:
                    dups.append((dotted, line, first[key]))
                first.setdefault(key, line)
                lines[dotted] = line  # the last one wins, as in the constructed data
                walk(value_node, dotted)
        elif isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                dotted = _join(path, str(i))
                lines[dotted] = item.start_mark.line + 1
                walk(item, dotted)

    walk(root, "")
    return lines, dups


# What a parser's context says was left open, in the words a user would look for.
_UNCLOSED = {
    "while scanning a quoted scalar": "the quote",
    "while parsing a flow sequence": "the [",
    "while parsing a flow mapping": "the {",
}


def _at_end(mark: yaml.Mark | None, text: str) -> bool:
    """Whether ``mark`` is past the last non-blank character (where a parser finds EOF)."""
    if mark is None:
        return False
    stripped = text.rstrip()
    last = stripped.count("\n")
    last_len = len(stripped) - (stripped.rfind("\n") + 1)
    return mark.line > last or (mark.line == last and mark.column >= last_len)


def _char_at(mark: yaml.Mark | None, text: str) -> str:
    if mark is None:
        return ""
    lines = text.split("\n")
    row = lines[mark.line] if mark.line < len(lines) else ""
    return row[mark.column] if mark.column < len(row) else ""


def _syntax_issue(exc: yaml.YAMLError, text: str, filename: str) -> ConfigIssue:
    """A parser's error at the line where the problem starts.

    A quote, bracket or brace that is never closed is found at the end of the
    file; the line that opened it (the error's context) is where to look.
    """
    if isinstance(exc, yaml.reader.ReaderError):
        # Position counting differs between parsers (bytes in libyaml): find the character.
        index = text.find(chr(exc.character)) if isinstance(exc.character, int) else -1
        if index < 0:
            return ConfigIssue(filename, None, "", f"YAML error: {exc.reason}")
        line = text.count("\n", 0, index) + 1
        column = index - (text.rfind("\n", 0, index) + 1) + 1
        return ConfigIssue(
            filename,
            line,
            "",
            f"character #x{exc.character:04x} is not allowed in YAML ({exc.reason}), "
            f"column {column}",
        )
    if not isinstance(exc, yaml.MarkedYAMLError):
        return ConfigIssue(filename, None, "", f"YAML error: {exc}")
    problem = exc.problem or "invalid YAML"
    mark = exc.problem_mark or exc.context_mark
    opened = exc.context_mark
    if opened is not None and exc.context and _at_end(exc.problem_mark, text):
        what = _UNCLOSED.get(exc.context, exc.context.removeprefix("while ").split(" ", 1)[-1])
        return ConfigIssue(
            filename,
            opened.line + 1,
            "",
            f"YAML syntax error: {what} opened here (column {opened.column + 1}) is never "
            f"closed ({problem} at the end of the file)",
        )
    what = f"{problem} ({exc.context})" if exc.context else problem
    kind = "YAML error" if isinstance(exc, ConstructorError) else "YAML syntax error"
    if problem.startswith("could not determine a constructor for the tag"):
        # SafeConstructor knows no !!python/... tags: nothing is ever built from a tag.
        tag = problem.rpartition(" ")[2].strip("'").replace("tag:yaml.org,2002:", "!!")
        what = f"the tag {tag} is not allowed: a sweep file holds plain values"
    line = mark.line + 1 if mark is not None else None
    column = f", column {mark.column + 1}" if mark is not None else ""
    hint = ": YAML indents with spaces, not tabs" if _char_at(mark, text) == "\t" else ""
    return ConfigIssue(filename, line, "", f"{kind}: {what}{column}{hint}")


def _compose(text: str, filename: str) -> tuple[dict[str, Any], dict[str, int], list[ConfigIssue]]:
    """The file's mapping, its line map, and its duplicate keys; ConfigError if unreadable."""
    constructor = _Constructor()
    parser = None
    try:
        parser = _parser(text)
        root = _Composer(parser, constructor).compose()
        if root is None:
            data, lines, dups = None, {}, []
        else:
            lines, dups = _walk_lines(root)
            data = constructor.construct_document(root)
    except _LimitError as exc:
        raise ConfigError([ConfigIssue(filename, exc.line, exc.key, exc.message)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([_syntax_issue(exc, text, filename)]) from None
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        # _Constructor gives a scalar's failures a line; this is the last resort for
        # a collection's (none is known with PyYAML 6), so that no input ends in a traceback.
        raise ConfigError([ConfigIssue(filename, None, "", f"YAML error: {exc}")]) from None
    finally:
        if parser is not None:
            parser.dispose()
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
        assert root is not None
        raise ConfigError(
            [
                ConfigIssue(
                    filename,
                    root.start_mark.line + 1,  # where the value starts, after any comments
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
