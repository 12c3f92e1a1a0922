"""The architecture registry: what the rest of wrnsweep knows about each family.

A :class:`Family` describes one architecture family completely: its
hyperparameters (name, type, the one default, the validity rule), its training
recipe, the rows of its paper's tables (configuration, parameter count, reported
error), a colour for figures, and the import path of the module that holds the
network (``build(*, num_classes, **hparams)``, optionally ``fold(model)``).

The sweep schema, the validator's messages, the CLI (``--arch`` choices and the
``train`` options), MLflow's parameter names, export's folding and the report's
paper points all read this registry; none of them lists families itself.

Nothing here imports torch: ``wrnsweep validate`` checks every value of a search
space against these rules without loading the networks. The network module is
imported only by :meth:`Family.build` and :meth:`Family.fold`.

Families come from two places, loaded on first use:

* the built-in zoo, ``trainables.models.families``;
* installed plugins: each entry point of the group ``wrnsweep.families`` names a
  module that calls :func:`register` when imported (or a :class:`Family` object).

Example of a family defined outside this package::

    from trainables.models.registry import Family, HParam, Recipe, register

    register(Family(
        name="toy", title="Toy net", paper="-", module="toy_net",
        hparams=(HParam("depth", 3, "layers", rule=my_depth_rule),),
        recipe=Recipe(nesterov=False, weight_decay=1e-4, milestones=(0.5,), gamma=0.1,
                      source="made up"),
    ))
"""

from __future__ import annotations

import dataclasses
import importlib
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ENTRY_POINT_GROUP",
    "Family",
    "HParam",
    "PaperRow",
    "Recipe",
    "families",
    "get_family",
    "hparam_names",
    "names",
    "paper_rows",
    "register",
]

ENTRY_POINT_GROUP = "wrnsweep.families"
# Modules whose import registers the built-in families.
_BUILTIN_MODULES = ("trainables.models.families",)

Rule = Callable[[Any], None]  # raises ValueError that names the rule and the value


@dataclass(frozen=True)
class HParam:
    """One model hyperparameter of a family, with its single default."""

    name: str  # keyword of build(); also the sweep file's key and the CLI option
    default: int | float | str  # the one default: build_model, train and sweeps use it
    help: str  # one line: meaning and unit
    choices: tuple[str, ...] = ()  # allowed values of a string hyperparameter
    rule: Rule | None = None  # extra validity rule (e.g. depth 6n+4)
    rule_text: str = ""  # the rule in words, for --help ("6n+4: 10, 16, 22, ...")

    @property
    def kind(self) -> type:
        """int, float or str: the type of the default (bool is not a hyperparameter type)."""
        return type(self.default)

    def check(self, value: Any) -> None:
        """Raise ``ValueError`` naming the rule and the value unless ``value`` is allowed."""
        if self.kind is str:
            if value not in self.choices:
                options = " or ".join(repr(c) for c in self.choices)
                raise ValueError(f"{self.name} must be {options}, got {self.name}={value!r}")
        elif self.kind is int and not _is_int(value):
            raise ValueError(f"{self.name} must be an integer, got {self.name}={value!r}")
        elif self.kind is float and not _is_real(value):
            raise ValueError(f"{self.name} must be a number, got {self.name}={value!r}")
        if self.rule is not None:
            self.rule(value)


@dataclass(frozen=True)
class Recipe:
    """The paper's optimiser and schedule for a family (SGD with momentum 0.9, lr 0.1)."""

    nesterov: bool
    weight_decay: float  # L2 on every parameter
    milestones: tuple[float, ...]  # lr drops, as fractions of the epochs
    gamma: float  # lr multiplier at each milestone
    source: str  # where the paper says so

    def as_dict(self) -> dict[str, Any]:
        """The fields ``TrainConfig`` takes from the recipe."""
        return {"nesterov": self.nesterov, "weight_decay": self.weight_decay,
                "milestones": self.milestones, "gamma": self.gamma}


@dataclass(frozen=True)
class PaperRow:
    """A configuration of the family's paper table, as this zoo builds it.

    ``params`` is counted by ``tests/test_zoo.py`` on the network ``build_model``
    returns for 10 classes; ``error`` holds the paper's reported test error (%) per
    dataset where the row is a published result, and is empty for rows that only
    pin the parameter formula.
    """

    label: str  # "WRN-28-10"
    hparams: Mapping[str, Any]  # build_model arguments (others take the family default)
    params: int  # parameters for 10 classes
    features: int  # classifier inputs: each extra class adds features + 1 parameters
    error: Mapping[str, float] = field(default_factory=dict)  # dataset -> test error (%)
    source: str = ""  # paper, table
    arch: str = ""  # filled by register(): the family's name

    def params_for(self, num_classes: int) -> int:
        """Parameters of this configuration for ``num_classes`` classes."""
        return self.params + (num_classes - 10) * (self.features + 1)


@dataclass(frozen=True)
class Family:
    """An architecture family: everything the driver needs without importing torch."""

    name: str  # registry key: "wrn"
    title: str  # "Wide ResNet"
    paper: str  # the paper, for docs and reports
    module: str  # import path of build(*, num_classes, **hparams) and fold(model)
    hparams: tuple[HParam, ...]
    recipe: Recipe
    rows: tuple[PaperRow, ...] = ()
    colour: str = "tab:gray"  # matplotlib colour of this family in reports

    def __post_init__(self) -> None:
        names = [h.name for h in self.hparams]
        if "depth" not in names:
            raise ValueError(f"family {self.name!r} must have a 'depth' hyperparameter")
        if len(set(names)) != len(names):
            raise ValueError(f"family {self.name!r} lists a hyperparameter twice: {names}")
        rows = tuple(dataclasses.replace(r, arch=self.name) for r in self.rows)
        object.__setattr__(self, "rows", rows)

    @property
    def hparam_names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.hparams)

    def hparam(self, name: str) -> HParam:
        return next(h for h in self.hparams if h.name == name)

    def defaults(self) -> dict[str, Any]:
        return {h.name: h.default for h in self.hparams}

    def resolve(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Every hyperparameter of the family: ``values`` over the defaults, checked.

        ``None`` means "the default". Raises ``ValueError`` for a name the family
        does not take or a value its rule refuses.
        """
        given = self._given(values)
        out = {**self.defaults(), **given}
        for h in self.hparams:
            h.check(out[h.name])
        return out

    def check(self, values: Mapping[str, Any]) -> None:
        """Check only the given hyperparameters (a validator checks one key at a time)."""
        for name, value in self._given(values).items():
            self.hparam(name).check(value)

    def _given(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The values that are not None; ValueError for a name the family does not take."""
        given = {k: v for k, v in values.items() if v is not None}
        unknown = sorted(set(given) - set(self.hparam_names))
        if unknown:
            raise ValueError(
                f"{self.name} takes hyperparameters {list(self.hparam_names)}, "
                f"got unexpected {unknown}"
            )
        return given

    def network_module(self) -> Any:
        """The module with ``build`` (and ``fold``): imports torch."""
        return importlib.import_module(self.module)

    def build(self, *, num_classes: int, **values: Any) -> Any:
        """The network for ``num_classes`` classes, every hyperparameter resolved."""
        return self.network_module().build(num_classes=num_classes, **self.resolve(values))

    def fold(self, model: Any) -> Any:
        """The inference form of ``model`` (BN folded away), or TypeError if none."""
        folder = getattr(self.network_module(), "fold", None)
        if folder is None:
            raise TypeError(f"family {self.name!r} ({self.module}) defines no fold(model)")
        return folder(model)


_REGISTRY: dict[str, Family] = {}
_loaded = False


def register(family: Family) -> Family:
    """Add ``family``; a name may be registered once."""
    if not isinstance(family, Family):
        raise TypeError(f"register expects a Family, got {type(family).__name__}")
    if family.name in _REGISTRY:
        raise ValueError(f"family {family.name!r} is already registered "
                         f"(by {_REGISTRY[family.name].module})")
    _REGISTRY[family.name] = family
    return family


def _load() -> None:
    """Import the built-in zoo and the installed plugins, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if isinstance(obj, Family) and obj.name not in _REGISTRY:
            register(obj)


def families() -> tuple[Family, ...]:
    """Every registered family, built-ins first, in registration order."""
    _load()
    return tuple(_REGISTRY.values())


def names() -> tuple[str, ...]:
    """Registered family names: the values of ``arch``."""
    return tuple(f.name for f in families())


def get_family(arch: object) -> Family:
    """The family called ``arch``; ``ValueError`` naming the choices otherwise."""
    _load()
    if not isinstance(arch, str) or arch not in _REGISTRY:
        raise ValueError(f"arch must be one of {list(names())}, got arch={arch!r}")
    return _REGISTRY[arch]


def hparam_names() -> tuple[str, ...]:
    """Every model hyperparameter name of any family, in first-seen order."""
    seen: dict[str, None] = {}
    for f in families():
        seen.update(dict.fromkeys(f.hparam_names))
    return tuple(seen)


def paper_rows() -> tuple[PaperRow, ...]:
    """Every family's paper rows, family by family."""
    return tuple(r for f in families() for r in f.rows)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
