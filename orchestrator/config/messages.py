"""Pass 1 messages: pydantic's validation errors as ``dotted.key: message``.

Pydantic reports each error with a ``loc`` tuple that contains union tags and
dict-key markers, and with a generic message. :func:`_resolve_loc` walks the loc
through the schema's type hints to recover the dotted key as written in the file
and the model that holds it; :func:`_error_message` then says what is wrong in
the file's own terms: an unknown key gets a ``difflib`` suggestion or is pointed
at the section it belongs in, a type error shows the value as written, and a
list given as a param is shown in its ``{choices: [...]}`` form.

:func:`_suggest` ("did you mean": another case, another tool's word, or a close
spelling), :func:`_closest` and :func:`_field_types` are shared with pass 2
(``checks``).
"""

from __future__ import annotations

import datetime
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from functools import cache, lru_cache
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Discriminator, Tag

from orchestrator.config.errors import _fmt
from orchestrator.config.schema import (
    _SYNONYMS,
    ARCH_SPACES,
    Architectures,
    RecipeSpec,
    SweepConfig,
)
from trainables.models.registry import hparam_names, names

# difflib similarity above which a key counts as a misspelling: "wrm" -> "wrn" (0.67)
# is one, "dropout" -> "depth" (0.5) is not.
_SUGGEST_CUTOFF = 0.6


def _closest(word: str, options: Iterable[str]) -> str | None:
    """The option ``word`` was probably meant to be, or None.

    In order: the same word in another case (``TPE`` -> ``tpe``: difflib compares
    case-sensitively and finds nothing), the word other tools use for it
    (``min`` -> ``low``, see ``_SYNONYMS``), then a close spelling.
    """
    return _closest_in(word, tuple(options))


@lru_cache(maxsize=4096)  # looked up for its message and for "missing" suppression
def _closest_in(word: str, options: tuple[str, ...]) -> str | None:
    folded = {o.casefold(): o for o in options}
    same = folded.get(word.casefold())
    if same is not None and same != word:
        return same
    synonym = _SYNONYMS.get(word.casefold())
    if synonym in options:
        return synonym
    match = difflib.get_close_matches(word, options, n=1, cutoff=_SUGGEST_CUTOFF)
    return match[0] if match else None


def _suggest(word: str, options: Iterable[str]) -> str:
    match = _closest(word, options)
    return f"; did you mean {match!r}?" if match else ""


# `depth:16` is one string to YAML, not a key and a value.
_GLUED = re.compile(r"([A-Za-z_]\w*):(\S[^\n]{0,40})")


def _key_hints(bad: str) -> str:
    """Why a key that looks right is not: a missing space after ':', a look-alike letter."""
    glued = _GLUED.fullmatch(bad)
    if glued:
        return f" (YAML needs a space after the colon: {glued[1]}: {glued[2]})"
    odd = next((c for c in bad if not c.isascii()), None)
    if odd is not None:
        return f" (it contains {odd!r}, U+{ord(odd):04X}, not an ASCII character)"
    return ""


_TYPE_MESSAGES = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected a string",
    "dict_type": "expected a mapping (key: value)",
    "model_type": "expected a mapping (key: value)",
    "model_attributes_type": "expected a mapping (key: value)",
    "tuple_type": "expected a list",
    "list_type": "expected a list",
}
_MILESTONE_FORM = "{count: ..., low: ..., high: ..., min_gap?: ...}"
_PARAM_FORMS = "a constant, {choices: [...]} or {low: ..., high: ..., step?: ..., log?: ...}"


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _unannotated(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _tagged_members(tp: Any) -> dict[str, Any] | None:
    """Tag -> member type of a discriminated union (the tag shows up in error locs)."""
    if typing.get_origin(tp) is not Annotated:
        return None
    base, *meta = typing.get_args(tp)
    if not any(isinstance(m, Discriminator) for m in meta):
        return None
    members: dict[str, Any] = {}
    for member in typing.get_args(base):
        for m in typing.get_args(member)[1:]:
            if isinstance(m, Tag):
                members[m.tag] = typing.get_args(member)[0]
    return members


@cache
def _field_types(model: type[BaseModel]) -> dict[str, Any]:
    return {
        name: hint
        for name, hint in typing.get_type_hints(model, include_extras=True).items()
        if name in model.model_fields
    }


def _resolve_loc(loc: tuple[Any, ...]) -> tuple[list[str], type[BaseModel] | None, Any]:
    """Pydantic loc -> (dotted key parts, model that holds the last key, type at the end).

    Union tags and dict-key markers are dropped: they are not keys of the file.
    """
    parts: list[str] = []
    tp: Any = SweepConfig
    holder: type[BaseModel] | None = None
    for item in loc:
        tp = _strip_optional(tp)
        members = _tagged_members(tp)
        if members is not None and item in members:
            tp = members[item]
            continue
        if item == "[key]":
            continue
        parts.append(str(item))
        base = _unannotated(_strip_optional(tp))
        holder = None
        if isinstance(base, type) and issubclass(base, BaseModel):
            holder = base
            tp = _field_types(base).get(str(item))
        elif typing.get_origin(base) is dict:
            tp = typing.get_args(base)[1]
        elif typing.get_origin(base) in (tuple, list):
            tp = typing.get_args(base)[0]
        else:
            tp = None
    return parts, holder, _unannotated(_strip_optional(tp))


def _unknown_key_message(bad: str, holder: type[BaseModel] | None, parts: list[str]) -> str:
    allowed = list(holder.model_fields) if holder is not None else []
    hint = _suggest(bad, allowed) + _key_hints(bad)
    if holder is Architectures:
        return f"unknown architecture {bad!r}{hint} (one of {', '.join(names())})"
    if holder in ARCH_SPACES.values():
        arch = parts[-2]
        if bad in RecipeSpec.model_fields:
            return (
                f"{bad!r} is a recipe key: put it under architectures.{arch}.recipe "
                f"(or the shared recipe); {arch} takes {', '.join(allowed)}"
            )
        return (
            f"{bad!r} is not a hyperparameter of {arch}{hint} ({arch} takes {', '.join(allowed)})"
        )
    if holder is RecipeSpec and bad in hparam_names():
        return f"{bad!r} is a model hyperparameter: put it under architectures.<arch>.{bad}"
    return f"unknown key {bad!r}{hint} (allowed: {', '.join(allowed)})"


def _error_message(err: Mapping[str, Any], parts: list[str], holder: Any, end: Any) -> str:
    etype, value = err["type"], err.get("input")
    if etype == "extra_forbidden":
        return _unknown_key_message(parts[-1], holder, parts)
    if etype == "missing":
        return f"missing required key {parts[-1]!r}"
    if etype == "literal_error" and parts[0] == "resources":
        return f"expected 'auto' or {{cpu: ..., gpu: ...}}, got {_fmt(value)}"
    if etype in _TYPE_MESSAGES and parts[-1] == "milestones":
        return f"expected a list of fractions or {_MILESTONE_FORM}, got {_fmt(value)}"
    if etype == "literal_error":
        options = (
            [str(a) for a in typing.get_args(end)] if typing.get_origin(end) is Literal else []
        )
        hint = _suggest(str(value), options) if isinstance(value, str) else ""
        return f"must be one of {', '.join(options)}; got {_fmt(value)}{hint}"
    if etype in ("union_tag_invalid", "union_tag_not_found"):
        if isinstance(value, list):
            return f"a list is not a param: write {{choices: {_fmt(value)}}}"
        return f"expected {_PARAM_FORMS}, got {_fmt(value)}"
    if etype in _TYPE_MESSAGES:
        shown = repr(value) if isinstance(value, float) else _fmt(value)  # 28.0, not 28
        return f"{_TYPE_MESSAGES[etype]}, got {shown}{_type_hint(etype, value)}"
    if etype in _BOUND_MESSAGES:
        op, name = _BOUND_MESSAGES[etype]
        return f"must be {op} {_fmt(err['ctx'][name])}, got {_fmt(value)}"
    return str(err["msg"]).removeprefix("Value error, ")


# pydantic's Field(ge=..) and friends, worded as pass 2 words its own bounds.
_BOUND_MESSAGES = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}


def _type_hint(etype: str, value: Any) -> str:
    """What YAML did to the value the user wrote, when that explains the type error."""
    if isinstance(value, bool) and etype == "string_type":
        return " (YAML 1.1 reads yes/no/on/off as true/false: put the value in quotes)"
    if isinstance(value, datetime.date) and etype == "string_type":
        return " (YAML reads it as a date: put the value in quotes)"
    mapping = etype in ("dict_type", "model_type", "model_attributes_type")
    glued = _GLUED.fullmatch(value) if mapping and isinstance(value, str) else None
    if glued:
        return f" (YAML needs a space after the colon: {glued[1]}: {glued[2]})"
    return ""
