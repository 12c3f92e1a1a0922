"""The shape of a sweep file as pydantic models, and the view the rest of the code uses.

The models use ``extra="forbid"`` and strict ints and bools, so a misspelt key
or a depth written ``28.0`` is an error rather than a silent default. A
hyperparameter can be written as a constant, ``{choices: [...]}`` or
``{low: ..., high: ..., step?: ..., log?: ...}``; each is a discriminated union
whose tag is picked from the YAML value, so an error names only the form the
user meant.

:class:`SweepConfig` is the validated file. Its methods give each architecture's
space in one form, :class:`Param` / :class:`MilestoneSpace` (what
``orchestrator.space`` turns into Optuna calls), with a per-architecture recipe
merged over the shared one. Only the shape is checked here: ranges, rules that
span keys and buildability are pass 2 (``checks``).

Nothing heavy is imported: ``trainables.config`` is plain dataclasses, without
torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Strict,
    Tag,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from orchestrator.config.errors import _fmt
from orchestrator.config.yaml_lines import _line_of
from trainables.config import TrainConfig
from trainables.models.registry import Family, families, get_family, names

# Per-epoch metrics a sweep may optimise, with the only sensible direction.
# test_acc is deliberately absent: choosing on the test set leaks it.
METRICS: dict[str, str] = {
    "val_acc": "max",
    "val_loss": "min",
    "train_acc": "max",
    "train_loss": "min",
}
# Recipe keys that may be searched (everything else in a recipe is a constant).
SEARCHABLE_RECIPE_KEYS = ("lr", "weight_decay", "gamma", "milestones")
_TRAIN_DEFAULTS: dict[str, Any] = {
    f.name: f.default
    for f in dataclasses.fields(TrainConfig)
    if f.default is not dataclasses.MISSING
}


# ------------------------------------------------------------------ scalar types

Int = Annotated[int, Strict()]  # YAML 28.0 is a float: a depth must be written 28
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]


def _number(value: Any) -> Any:
    """Accept ints and numeric strings as floats; refuse booleans and inf/nan.

    PyYAML follows YAML 1.1, where ``5e-4`` (no dot) is a *string*; that is how
    most people write a weight decay, so numeric strings are accepted.
    """
    if isinstance(value, bool):
        raise PydanticCustomError(
            "number_type", "expected a number, got {value}", {"value": _fmt(value)}
        )
    if isinstance(value, int):
        return float(value)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise PydanticCustomError(
                "number_type", "expected a number, got {value}", {"value": repr(value)}
            ) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError(
            "finite_number", "expected a finite number, got {value}", {"value": value}
        )
    return value


Number = Annotated[float, BeforeValidator(_number)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ------------------------------------------------------------------ param forms


class IntChoices(_Model):
    """``{choices: [16, 22, 28]}``: a categorical over integers."""

    choices: tuple[Int, ...]


class FloatChoices(_Model):
    """``{choices: [0.1, 0.2]}``: a categorical over numbers."""

    choices: tuple[Number, ...]


class StrChoices(_Model):
    """``{choices: [A, B]}``: a categorical over strings."""

    choices: tuple[Str, ...]


class IntRange(_Model):
    """``{low: 2, high: 10, step: 2}``: integers low..high inclusive."""

    low: Int
    high: Int
    step: Int | None = None  # None -> 1
    log: Bool = False


class FloatRange(_Model):
    """``{low: 0.02, high: 0.2, log: true}``: a real interval, inclusive."""

    low: Number
    high: Number
    step: Number | None = None  # None -> continuous
    log: Bool = False


class MilestoneSearch(_Model):
    """``{count: 3, low: 0.2, high: 0.9, min_gap: 0.05}``: searched LR-drop fractions."""

    count: Int
    low: Number
    high: Number
    # Two drops closer than this are one drop in practice; it also keeps sampled
    # milestones strictly increasing, which TrainConfig requires.
    min_gap: Number = 0.05


# Other tools' words for this file's keys and values (W&B: min/max and values, Ray
# Tune: lower/upper, Hyperopt: q, Optuna: maximize), so that "did you mean" can point
# from one to the other.
_SYNONYMS: dict[str, str] = {
    "min": "low",
    "minimum": "low",
    "lower": "low",
    "max": "high",
    "maximum": "high",
    "upper": "high",
    "values": "choices",
    "options": "choices",
    "categories": "choices",
    "q": "step",
    "increment": "step",
    "log_scale": "log",
    "logscale": "log",
    "loguniform": "log",
    "maximize": "max",  # Optuna's direction=
    "minimize": "min",
    "maximise": "max",
    "minimise": "min",
}


def _param_tag(value: Any) -> str:
    """Pick the param form from the YAML value, so errors name only that form."""
    if isinstance(value, IntChoices | FloatChoices | StrChoices):
        return "choices"
    if isinstance(value, IntRange | FloatRange):
        return "range"
    if isinstance(value, dict):
        if "choices" in value:
            return "choices"
        if any(k in value for k in ("low", "high", "step", "log")):
            return "range"
        # Neither form's keys: a misspelt "choices" (or another tool's word for it)
        # should be reported as such.
        if any(
            _SYNONYMS.get(str(k).casefold()) == "choices"
            or difflib.get_close_matches(str(k), ["choices"], n=1, cutoff=0.6)
            for k in value
        ):
            return "choices"
        return "range"
    if isinstance(value, list):
        return "list"  # matches no member: reported with a "write {choices: [...]}" hint
    return "constant"


def _param(const: Any, choices: type[BaseModel], rng: type[BaseModel] | None) -> Any:
    members: list[Any] = [Annotated[const, Tag("constant")], Annotated[choices, Tag("choices")]]
    if rng is not None:
        members.append(Annotated[rng, Tag("range")])
    return Annotated[Union[tuple(members)], Discriminator(_param_tag)]  # noqa: UP007


IntParam = _param(Int, IntChoices, IntRange)
FloatParam = _param(Number, FloatChoices, FloatRange)
StrParam = _param(Str, StrChoices, None)
MilestonesParam = Annotated[
    Union[  # noqa: UP007
        Annotated[tuple[Number, ...], Tag("constant")],
        Annotated[MilestoneSearch, Tag("search")],
    ],
    Discriminator(lambda v: "search" if isinstance(v, dict | MilestoneSearch) else "constant"),
]

# ---------------------------------------------------------------------- sections


class OptimizerSpec(_Model):
    """SGD settings (the only optimiser of the seed papers)."""

    momentum: Number | None = None
    nesterov: Bool | None = None


class RecipeSpec(_Model):
    """Training recipe; a key left out comes from the paper recipe of each arch."""

    epochs: Int | None = None
    batch_size: Int | None = None
    optimizer: OptimizerSpec | None = None
    lr: FloatParam | None = None
    weight_decay: FloatParam | None = None
    milestones: MilestonesParam | None = None
    gamma: FloatParam | None = None
    warmup_epochs: Int | None = None
    label_smoothing: Number | None = None


# One space model per registered family, made from its hyperparameters: an int
# hyperparameter takes the int param forms, a float the number forms, a string the
# string forms (its choices are checked in pass 2, with the registry's message).
# ``depth`` is required: it is what a sweep of a residual family is about.
_PARAM_TYPES: dict[type, Any] = {int: IntParam, float: FloatParam, str: StrParam}


def _space_model(family: Family) -> type[_Model]:
    fields: dict[str, Any] = {}
    for h in family.hparams:
        tp = _PARAM_TYPES[h.kind]
        fields[h.name] = (tp, ...) if h.name == "depth" else (Optional[tp], None)  # noqa: UP045
    fields["recipe"] = (Optional[RecipeSpec], None)  # noqa: UP045
    name = "".join(part.title() for part in family.name.split("_")) + "Space"
    model = create_model(name, __base__=_Model, **fields)
    model.__doc__ = f"{family.title}: the {family.name} section of architectures."
    return model


# arch -> its space model, for every registered family (trainables.models.families
# and plugins), in registration order.
ARCH_SPACES: dict[str, type[_Model]] = {f.name: _space_model(f) for f in families()}
ArchSpace = _Model  # any of ARCH_SPACES' models


def _block_not_empty(value: Any, info: ValidationInfo) -> Any:
    """``wrn:`` with nothing under it is null in YAML; leaving the family out silently
    would run a different sweep from the one the file seems to describe."""
    if value is None and info.field_name is not None:
        arch = info.field_name
        space, family = ARCH_SPACES[arch], get_family(arch)
        needed = [n for n, f in space.model_fields.items() if f.is_required()]
        first = needed[0] if needed else family.hparam_names[0]
        example = f"{first}: {_fmt(family.hparam(first).default)}"
        raise PydanticCustomError(
            "empty_arch_block",
            "the {arch} block is empty, so {arch} would be left out of the sweep: give "
            "{what} under it (e.g. {example}), or delete the line",
            {"arch": arch, "what": f"at least its {first}", "example": example},
        )
    return value


Architectures = create_model(
    "Architectures",
    __base__=_Model,
    __validators__={
        "_block_not_empty": field_validator(*ARCH_SPACES, mode="before")(_block_not_empty)
    },
    **{arch: (Optional[space], None) for arch, space in ARCH_SPACES.items()},  # noqa: UP045
)
Architectures.__doc__ = (
    "The architectures of the sweep; each one is a branch of the conditional space."
)


DatasetName = Literal["cifar10", "cifar100", "digits", "synthetic"]


class DatasetSpec(_Model):
    """The long form of ``dataset:``."""

    name: DatasetName = "cifar10"
    root: Str | None = None  # passed as written: a worker node expands it on its own disk
    download: Bool = False
    synthetic_size: Int = _TRAIN_DEFAULTS["synthetic_size"]


DatasetField = Annotated[
    Union[Annotated[DatasetName, Tag("name")], Annotated[DatasetSpec, Tag("mapping")]],  # noqa: UP007
    Discriminator(lambda v: "mapping" if isinstance(v, dict | DatasetSpec) else "name"),
]


class SearchSpec(_Model):
    """How trials are proposed (Optuna) and what they are judged on."""

    algorithm: Literal["tpe", "random", "grid"] = "tpe"
    num_samples: Int = 32
    max_concurrent: Int = 4
    metric: Str = "val_acc"  # checked in pass 2, so test_acc gets its own reason
    mode: Literal["max", "min"] = "max"  # derived from the metric when left out
    seed: Int = 0
    n_startup_trials: Int | None = None
    points_to_evaluate: tuple[dict[Str, Any], ...] = ()
    # None: on for tpe, off for random (the blind baseline) and grid (runs every point).
    recipe_start: Bool | None = None

    @property
    def starts_at_recipe(self) -> bool:
        """Whether the first trials are the papers' configurations (see ``space.recipe_points``).

        A file's own ``points_to_evaluate`` replace them.
        """
        if self.points_to_evaluate or self.algorithm == "grid":
            return False
        return self.recipe_start if self.recipe_start is not None else self.algorithm == "tpe"

    @model_validator(mode="before")
    @classmethod
    def _mode_from_metric(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("mode") is None:
            metric = data.get("metric", "val_acc")
            data = {
                **data,
                "mode": METRICS.get(metric, "max") if isinstance(metric, str) else "max",
            }
        return data


class SchedulerSpec(_Model):
    """The Ray Tune trial scheduler; periods are in epochs."""

    name: Literal["asha", "fifo", "hyperband"] = "asha"
    grace_period: Int = 1
    reduction_factor: Number = 3.0


class ResourceSpec(_Model):
    """What one trial reserves from Ray."""

    cpu: Number = 1.0
    gpu: Number = 0.0


ResourceValue = Annotated[
    Union[Annotated[Literal["auto"], Tag("auto")], Annotated[ResourceSpec, Tag("spec")]],  # noqa: UP007
    Discriminator(lambda v: "spec" if isinstance(v, dict | ResourceSpec) else "auto"),
]


class TrackingSpec(_Model):
    """MLflow: where runs go and which models get registered."""

    uri: Str | None = None  # None -> sqlite:///<output>/mlflow.db
    experiment: Str | None = None  # None -> sweep name
    registered_model: Str | None = None  # None -> sweep name
    top_k: Int = 3


class ConfirmSection(_Model):
    """After the search: its top configurations trained again with several seeds
    (``orchestrator.confirm``; the same as ``wrnsweep confirm``)."""

    top: Int = Field(default=3, ge=1)
    seeds: Int = Field(default=5, ge=1)
    epochs: Int | None = Field(default=None, ge=1)  # None: each configuration's own
    train_on: Literal["train", "train+val"] = "train"


class RaySpec(_Model):
    """Which Ray cluster runs the trials and where their checkpoints go."""

    address: Str | None = None  # None -> start a local Ray; "auto" or ray://host:10001
    storage_path: Str | None = None  # None -> ./runs ; a shared path or s3:// / gs:// on a cluster
    # A trial that raises is retried from its last checkpoint this many times.
    max_failures: Int = Field(default=2, ge=0)
    # Memory of one GPU, for `resources: auto`; None -> read with nvidia-smi on a GPU node.
    gpu_memory_gib: Number | None = Field(default=None, gt=0)


# ------------------------------------------------------------------ uniform view


@dataclass(frozen=True)
class Param:
    """One dimension of an architecture's space, in a form the space builder can use."""

    name: str
    kind: Literal["constant", "categorical", "int", "float"]
    value: Any = None  # constant only
    choices: tuple[Any, ...] = ()  # categorical only
    low: float | int | None = None  # int / float only
    high: float | int | None = None
    step: float | int | None = None  # int: always set (default 1); float: None = continuous
    log: bool = False

    @property
    def searchable(self) -> bool:
        """False for a constant: the space returns it without asking Optuna."""
        return self.kind != "constant"

    def values(self) -> list[Any]:
        """Every value the param can take (for grid search); a float range has no such list."""
        if self.kind == "constant":
            return [self.value]
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))  # type: ignore[arg-type]
        raise ValueError(f"{self.name} is a float range: it has no finite list of values")


@dataclass(frozen=True)
class MilestoneSpace:
    """Searched LR milestones: ``count`` increasing fractions in [low, high], ``min_gap`` apart."""

    count: int
    low: float
    high: float
    min_gap: float
    name: str = "milestones"

    @property
    def kind(self) -> str:
        return "milestones"

    def holds(self, values: Sequence[Any]) -> bool:
        """Whether ``values`` are milestones this space can sample: ``count`` numbers in
        [low, high], increasing at least ``min_gap`` apart (1e-12: float noise)."""
        return (
            len(values) == self.count
            and all(isinstance(m, int | float) and not isinstance(m, bool)
                    and self.low <= m <= self.high for m in values)
            and all(b - a >= self.min_gap - 1e-12 for a, b in itertools.pairwise(values))
        )

    @property
    def searchable(self) -> bool:
        return True


def _to_param(name: str, spec: Any) -> Param | MilestoneSpace:
    if isinstance(spec, MilestoneSearch):
        return MilestoneSpace(spec.count, spec.low, spec.high, spec.min_gap)
    if isinstance(spec, IntChoices | FloatChoices | StrChoices):
        return Param(name, "categorical", choices=tuple(spec.choices))
    if isinstance(spec, IntRange):
        return Param(name, "int", low=spec.low, high=spec.high, step=spec.step or 1, log=spec.log)
    if isinstance(spec, FloatRange):
        return Param(name, "float", low=spec.low, high=spec.high, step=spec.step, log=spec.log)
    return Param(name, "constant", value=tuple(spec) if isinstance(spec, tuple | list) else spec)


def _merge_recipes(
    shared: RecipeSpec | None, own: RecipeSpec | None, arch: str
) -> dict[str, tuple[Any, str]]:
    """TrainConfig-named recipe values -> (value, dotted key that set it); own wins over shared."""
    out: dict[str, tuple[Any, str]] = {}
    for prefix, spec in (("recipe", shared), (f"architectures.{arch}.recipe", own)):
        if spec is None:
            continue
        for fname in RecipeSpec.model_fields:
            value = getattr(spec, fname)
            if value is None:
                continue
            if isinstance(value, OptimizerSpec):  # flattened: TrainConfig has momentum, nesterov
                for oname in OptimizerSpec.model_fields:
                    if getattr(value, oname) is not None:
                        out[oname] = (getattr(value, oname), f"{prefix}.optimizer.{oname}")
            else:
                out[fname] = (value, f"{prefix}.{fname}")
    return out


def _param_sources(
    arch: str, space: ArchSpace, shared: RecipeSpec | None
) -> dict[str, tuple[Any, str]]:
    """Model hparams then searchable-kind recipe keys -> (spec, dotted key)."""
    out: dict[str, tuple[Any, str]] = {}
    for name in get_family(arch).hparam_names:
        spec = getattr(space, name)
        if spec is not None:
            out[name] = (spec, f"architectures.{arch}.{name}")
    merged = _merge_recipes(shared, space.recipe, arch)
    for name in SEARCHABLE_RECIPE_KEYS:
        if name in merged:
            out[name] = merged[name]
    return out


# ------------------------------------------------------------------------ config


def _drop_null_sections(data: Any) -> Any:
    """``search:`` with every line commented out is null in YAML: read it as "defaults"."""
    if not isinstance(data, dict):
        return data
    return {k: v for k, v in data.items() if not (v is None and k in _OPTIONAL_SECTIONS)}


_OPTIONAL_SECTIONS = ("recipe", "search", "scheduler", "resources", "tracking", "ray")


class SweepConfig(_Model):
    """A validated sweep file. Build it with :func:`load_sweep` or :func:`parse_sweep`."""

    name: Str
    dataset: DatasetField = "cifar10"
    architectures: Architectures
    recipe: RecipeSpec = RecipeSpec()
    search: SearchSpec = SearchSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    resources: dict[Str, ResourceValue] = Field(default_factory=dict)
    tracking: TrackingSpec = TrackingSpec()
    ray: RaySpec = RaySpec()
    confirm: ConfirmSection | None = None  # None: no confirm stage after the search

    @model_validator(mode="before")
    @classmethod
    def _null_sections(cls, data: Any) -> Any:
        return _drop_null_sections(data)

    _source_text: str = PrivateAttr(default="")
    _source_path: str = PrivateAttr(default="<string>")
    _lines: dict[str, int] = PrivateAttr(default_factory=dict)

    @property
    def source_text(self) -> str:
        """The YAML exactly as read, for logging as an MLflow artifact."""
        return self._source_text

    @property
    def source_path(self) -> str:
        """The file it came from (or the name given to :func:`parse_sweep`)."""
        return self._source_path

    def line_of(self, key: str) -> int | None:
        """Line of a dotted key in the source, falling back to its nearest parent."""
        return _line_of(self._lines, key)

    def arch_names(self) -> list[str]:
        """Architectures of the sweep, in the registry's order."""
        return [a for a in names() if getattr(self.architectures, a) is not None]

    def arch_space(self, arch: str) -> ArchSpace:
        """The raw per-architecture section; KeyError if the sweep does not include it."""
        space = getattr(self.architectures, arch, None) if arch in ARCH_SPACES else None
        if space is None:
            raise KeyError(f"arch {arch!r} is not in this sweep; it has {self.arch_names()}")
        return space

    def params_for(self, arch: str) -> dict[str, Param | MilestoneSpace]:
        """Model hparams given for ``arch`` plus lr/weight_decay/gamma/milestones if given.

        Per-architecture recipe overrides win over the shared recipe. Constants are
        included (kind "constant"); keys the file leaves out are absent, and
        TrainConfig fills them from the paper recipe. Constant milestones are a
        ``Param`` whose value is a tuple; searched ones are a :class:`MilestoneSpace`.
        """
        sources = _param_sources(arch, self.arch_space(arch), self.recipe)
        return {name: _to_param(name, spec) for name, (spec, _key) in sources.items()}

    def recipe_constants(self, arch: str) -> dict[str, Any]:
        """Fixed recipe values under TrainConfig names (momentum/nesterov flattened).

        Includes lr, weight_decay, gamma and milestones only when they are constants.
        """
        merged = _merge_recipes(self.recipe, self.arch_space(arch).recipe, arch)
        out: dict[str, Any] = {}
        for name, (value, _key) in merged.items():
            if name in SEARCHABLE_RECIPE_KEYS:
                param = _to_param(name, value)
                if param.searchable:
                    continue
                value = param.value  # type: ignore[union-attr]
            out[name] = value
        return out

    def epochs_for(self, arch: str) -> int:
        """Epochs a trial of ``arch`` trains for (recipe, else TrainConfig's default)."""
        return self.recipe_constants(arch).get("epochs", _TRAIN_DEFAULTS["epochs"])

    def resources_for(self, arch: str) -> dict[str, float] | Literal["auto"]:
        """Ray resources of one ``arch`` trial: ``{"cpu": .., "gpu": ..}`` or ``"auto"``."""
        value = self.resources.get(arch, self.resources.get("default", ResourceSpec()))
        if value == "auto":
            return "auto"
        assert isinstance(value, ResourceSpec)
        return {"cpu": float(value.cpu), "gpu": float(value.gpu)}

    def dataset_options(self) -> dict[str, Any]:
        """The data fields of TrainConfig: dataset, data_root, download, synthetic_size."""
        spec = (
            self.dataset
            if isinstance(self.dataset, DatasetSpec)
            else DatasetSpec(name=self.dataset)
        )
        return {
            "dataset": spec.name,
            "data_root": spec.root,
            "download": spec.download,
            "synthetic_size": spec.synthetic_size,
        }
