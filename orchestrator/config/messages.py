"""Pass 1 messages: pydantic's validation errors as ``dotted.key: message``.

Pydantic reports each error with a ``loc`` tuple that contains union tags and
dict-key markers, and with a generic message. :func:`_resolve_loc` walks the loc
through the schema's type hints to recover the dotted key as written in the file
and the model that holds it; :func:`_error_message` then says what is wrong in
the file's own terms: an unknown key gets a ``difflib`` suggestion or is pointed
at the section it belongs in, a type error shows the value as written, and a
list given as a param is shown in its ``{choices: [...]}`` form.

:func:`_suggest` and :func:`_field_types` are shared with pass 2 (``checks``).
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Discriminator, Tag

from orchestrator.config.errors import _fmt
from orchestrator.config.schema import (
    Architectures,
    DiracNetSpace,
    PreactResNetSpace,
    RecipeSpec,
    ResNetSpace,
    SweepConfig,
    WrnSpace,
)
from trainables.config import ARCHS, MODEL_HPARAMS

# difflib similarity above which a key counts as a misspelling: "wrm" -> "wrn" (0.67)
# is one, "dropout" -> "depth" (0.5) is not.
_SUGGEST_CUTOFF = 0.6


def _suggest(word: str, options: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=_SUGGEST_CUTOFF)
    return f"; did you mean {match[0]!r}?" if match else ""


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


_ARCH_SPACES: dict[str, type[BaseModel]] = {
    "wrn": WrnSpace,
    "resnet": ResNetSpace,
    "preact_resnet": PreactResNetSpace,
    "diracnet": DiracNetSpace,
}


def _unknown_key_message(bad: str, holder: type[BaseModel] | None, parts: list[str]) -> str:
    allowed = list(holder.model_fields) if holder is not None else []
    hint = _suggest(bad, allowed)
    if holder is Architectures:
        return f"unknown architecture {bad!r}{hint} (one of {', '.join(ARCHS)})"
    if holder in _ARCH_SPACES.values():
        arch = parts[-2]
        if bad in RecipeSpec.model_fields:
            return (
                f"{bad!r} is a recipe key: put it under architectures.{arch}.recipe "
                f"(or the shared recipe); {arch} takes {', '.join(allowed)}"
            )
        return (
            f"{bad!r} is not a hyperparameter of {arch}{hint} ({arch} takes {', '.join(allowed)})"
        )
    if holder is RecipeSpec and any(bad in names for names in MODEL_HPARAMS.values()):
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
        return f"{_TYPE_MESSAGES[etype]}, got {shown}"
    return str(err["msg"]).removeprefix("Value error, ")
