"""The sweep file: schema, loader, and errors that point at file, line and key.

One YAML file describes a whole sweep (see ``search_spaces/README.md``)::

    cfg = load_sweep("search_spaces/wrn.yaml")   # raises ConfigError
    cfg.arch_names()          # ['wrn']
    cfg.params_for("wrn")     # {'depth': Param(kind='categorical', ...), 'lr': ...}
    cfg.recipe_constants("wrn")  # {'epochs': 200, 'batch_size': 128, ...}

Validation happens in two passes so that every problem is reported at once:

1. *Shape* -- pydantic models (``extra="forbid"``, strict ints) check keys and
   types. Each error ``loc`` is translated into a dotted key, union tags are
   dropped, and unknown keys get a ``difflib`` suggestion.
2. *Meaning* -- plain functions check ranges, the recipe, the scheduler against
   the epochs, resources, the starting points, and that every value a model
   parameter can take is buildable (``trainables.models.check_hparams``).
   When pass 1 fails, each top-level section is re-validated alone so that the
   sections that are fine still get pass 2.

Line numbers come from the YAML node tree (``yaml.compose``), recorded per dotted
key; an issue on a key that is absent (a missing field) falls back to its parent.

Nothing heavy is imported at module level: the CLI imports this module to print
``--help``, and ``trainables.models`` pulls in torch, so it is imported only
inside the buildability check.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Strict,
    Tag,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from trainables.config import ARCHS, MODEL_HPARAMS, TrainConfig

__all__ = [
    "MAX_GPUS_PER_NODE",
    "MAX_MILESTONES",
    "METRICS",
    "ConfigError",
    "ConfigIssue",
    "MilestoneSpace",
    "Param",
    "SweepConfig",
    "check_cluster_fits",
    "load_sweep",
    "parse_sweep",
]

# Per-epoch metrics a sweep may optimise, with the only sensible direction.
# test_acc is deliberately absent: choosing on the test set leaks it.
METRICS: dict[str, str] = {
    "val_acc": "max",
    "val_loss": "min",
    "train_acc": "max",
    "train_loss": "min",
}
# The largest GPU node any cloud sells today (8x A100/H100/H200 boxes); a trial
# asking for more can never be placed, so it is rejected before Ray waits forever.
MAX_GPUS_PER_NODE = 8
# More than five LR drops has no precedent in the seed papers (they use 2 or 3),
# and each one is a search dimension.
MAX_MILESTONES = 5
# Checking every value of a huge int range would stall `wrnsweep validate`.
_MAX_ENUMERATED = 100_000
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
# Recipe keys that may be searched (everything else in a recipe is a constant).
SEARCHABLE_RECIPE_KEYS = ("lr", "weight_decay", "gamma", "milestones")
_TRAIN_DEFAULTS: dict[str, Any] = {
    f.name: f.default
    for f in dataclasses.fields(TrainConfig)
    if f.default is not dataclasses.MISSING
}


# --------------------------------------------------------------------------- errors


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
        # Neither form's keys: a misspelt "choices" should be reported as such.
        if any(difflib.get_close_matches(str(k), ["choices"], n=1, cutoff=0.6) for k in value):
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


class WrnSpace(_Model):
    """Wide ResNet: depth 6n+4, width k, dropout between the two convs."""

    depth: IntParam
    width: IntParam | None = None
    dropout: FloatParam | None = None
    recipe: RecipeSpec | None = None


class ResNetSpace(_Model):
    """He et al. 2015 CIFAR ResNet: depth 6n+2, shortcut A or B."""

    depth: IntParam
    width: IntParam | None = None
    shortcut: StrParam | None = None
    recipe: RecipeSpec | None = None


class PreactResNetSpace(_Model):
    """Pre-activation bottleneck ResNet: depth 9n+2."""

    depth: IntParam
    width: IntParam | None = None
    recipe: RecipeSpec | None = None


class DiracNetSpace(_Model):
    """DiracNet: depth 6n+4, variant v1 or v2."""

    depth: IntParam
    width: IntParam | None = None
    variant: StrParam | None = None
    recipe: RecipeSpec | None = None


ArchSpace = WrnSpace | ResNetSpace | PreactResNetSpace | DiracNetSpace


class Architectures(_Model):
    """The architectures of the sweep; each one is a branch of the conditional space."""

    wrn: WrnSpace | None = None
    resnet: ResNetSpace | None = None
    preact_resnet: PreactResNetSpace | None = None
    diracnet: DiracNetSpace | None = None


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
    for name in MODEL_HPARAMS[arch]:
        spec = getattr(space, name)
        if spec is not None:
            out[name] = (spec, f"architectures.{arch}.{name}")
    merged = _merge_recipes(shared, space.recipe, arch)
    for name in SEARCHABLE_RECIPE_KEYS:
        if name in merged:
            out[name] = merged[name]
    return out


# ------------------------------------------------------------------------ config


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
        """Architectures of the sweep, in the canonical order of ``trainables.config.ARCHS``."""
        return [a for a in ARCHS if getattr(self.architectures, a) is not None]

    def arch_space(self, arch: str) -> ArchSpace:
        """The raw per-architecture section; KeyError if the sweep does not include it."""
        space = getattr(self.architectures, arch, None) if arch in ARCHS else None
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


# --------------------------------------------------------------------- loading


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and validate a sweep file; raises :class:`ConfigError` listing every issue."""
    filename = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([ConfigIssue(filename, None, "", "no such file")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            [ConfigIssue(filename, None, "", f"cannot read the file: {exc}")]
        ) from None
    return parse_sweep(text, filename)


def parse_sweep(text: str, filename: str = "<string>") -> SweepConfig:
    """Validate sweep YAML ``text``; ``filename`` is only used in messages."""
    data, lines, dup_issues = _compose(text, filename)
    ck = _Checker(filename, lines)
    ck.issues.extend(dup_issues)
    cfg: SweepConfig | None
    try:
        cfg = SweepConfig.model_validate(data)
    except ValidationError as exc:
        cfg = None
        ck.add_validation_error(exc)
        parts = _sections_alone(data)
    else:
        parts = _Sections.of(cfg)
    _check_meaning(ck, parts)
    if ck.issues or cfg is None:
        raise ConfigError(sorted(ck.issues, key=lambda i: i.line or 0))
    cfg._source_text = text
    cfg._source_path = filename
    cfg._lines = lines
    return cfg


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


# ----------------------------------------------------------- pass 1: pydantic


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


# ----------------------------------------------------------- pass 2: meaning


class _Checker:
    """Collects issues; each one gets the line of its key (or of its nearest parent)."""

    def __init__(self, filename: str, lines: dict[str, int]) -> None:
        self.filename = filename
        self.lines = lines
        self.issues: list[ConfigIssue] = []
        self._seen: set[tuple[str, str]] = set()

    def add(self, key: str, message: str) -> None:
        # The shared recipe is checked once per architecture that uses it; say it once.
        if (key, message) in self._seen:
            return
        self._seen.add((key, message))
        self.issues.append(ConfigIssue(self.filename, _line_of(self.lines, key), key, message))

    def add_validation_error(self, exc: ValidationError) -> None:
        errors = []
        for err in exc.errors(include_url=False):
            parts, holder, end = _resolve_loc(tuple(err["loc"]))
            errors.append((err, parts, holder, end))
        # A misspelt key also makes its correct name "missing"; the did-you-mean says both.
        suggested = {
            (".".join(parts[:-1]), m)
            for err, parts, holder, _ in errors
            if err["type"] == "extra_forbidden" and holder is not None
            for m in difflib.get_close_matches(
                parts[-1], list(holder.model_fields), 1, _SUGGEST_CUTOFF
            )
        }
        for err, parts, holder, end in errors:
            if err["type"] == "missing" and (".".join(parts[:-1]), parts[-1]) in suggested:
                continue
            self.add(".".join(parts), _error_message(err, parts, holder, end))


@dataclass
class _Sections:
    """The sections that passed pass 1 (None: that section had shape errors)."""

    name: str | None
    dataset: Any
    archs: dict[str, ArchSpace]  # the ones that validated
    archs_named: list[str]  # every valid arch name the file lists, valid or not
    archs_complete: bool
    recipe: RecipeSpec | None
    search: SearchSpec | None
    scheduler: SchedulerSpec | None
    resources: dict[str, Any] | None
    tracking: TrackingSpec | None

    @classmethod
    def of(cls, cfg: SweepConfig) -> _Sections:
        names = cfg.arch_names()
        return cls(
            name=cfg.name,
            dataset=cfg.dataset,
            archs={a: cfg.arch_space(a) for a in names},
            archs_named=names,
            archs_complete=True,
            recipe=cfg.recipe,
            search=cfg.search,
            scheduler=cfg.scheduler,
            resources=dict(cfg.resources),
            tracking=cfg.tracking,
        )


def _drop_null_sections(data: Any) -> Any:
    """``search:`` with every line commented out is null in YAML: read it as "defaults"."""
    if not isinstance(data, dict):
        return data
    return {k: v for k, v in data.items() if not (v is None and k in _OPTIONAL_SECTIONS)}


_OPTIONAL_SECTIONS = ("recipe", "search", "scheduler", "resources", "tracking", "ray")


def _validate_alone(tp: Any, value: Any) -> Any:
    try:
        return TypeAdapter(tp).validate_python(value)
    except ValidationError:
        return None


def _sections_alone(data: dict[str, Any]) -> _Sections:
    """Re-validate each top-level section on its own after pass 1 failed somewhere."""
    hints = _field_types(SweepConfig)
    data = _drop_null_sections(data)
    values: dict[str, Any] = {}
    for fname, finfo in SweepConfig.model_fields.items():
        if fname in data:
            values[fname] = _validate_alone(hints[fname], data[fname])
        elif not finfo.is_required():
            values[fname] = finfo.get_default(call_default_factory=True)
        else:
            values[fname] = None
    raw_archs = data.get("architectures")
    archs: dict[str, ArchSpace] = {}
    named: list[str] = []
    if isinstance(raw_archs, dict):
        named = [a for a in ARCHS if a in raw_archs]
        arch_hints = _field_types(Architectures)
        for arch in named:
            space = _validate_alone(arch_hints[arch], raw_archs[arch])
            if space is not None:
                archs[arch] = space
    complete = values["architectures"] is not None
    return _Sections(
        name=values["name"],
        dataset=values["dataset"],
        archs=archs,
        archs_named=named,
        archs_complete=complete,
        recipe=values["recipe"],
        search=values["search"],
        scheduler=values["scheduler"],
        resources=values["resources"],
        tracking=values["tracking"],
    )


def _check_meaning(ck: _Checker, s: _Sections) -> None:
    if s.name is not None and not _NAME_RE.fullmatch(s.name):
        ck.add(
            "name",
            f"must match [A-Za-z0-9_.-]+ (it names the Optuna study, the MLflow experiment "
            f"and the output folder), got {s.name!r}",
        )
    if isinstance(s.dataset, DatasetSpec) and s.dataset.synthetic_size < 1:
        ck.add("dataset.synthetic_size", f"must be >= 1, got {s.dataset.synthetic_size}")
    if s.archs_complete and not s.archs:
        ck.add("architectures", f"give at least one architecture, of {', '.join(ARCHS)}")

    epochs_default = _TRAIN_DEFAULTS["epochs"]
    shared_epochs = s.recipe.epochs if s.recipe is not None and s.recipe.epochs else epochs_default
    if s.recipe is not None:
        _check_recipe(ck, "recipe", s.recipe, shared_epochs)

    check_hparams = _import_check_hparams()
    for arch, space in s.archs.items():
        for name in MODEL_HPARAMS[arch]:
            spec = getattr(space, name)
            if spec is None:
                continue
            key = f"architectures.{arch}.{name}"
            if _check_form(ck, key, spec) and not (name == "depth" and _too_big(ck, key, spec)):
                _check_buildable(ck, check_hparams, arch, name, key, spec)
        if space.recipe is not None:
            own_epochs = space.recipe.epochs or shared_epochs
            _check_recipe(ck, f"architectures.{arch}.recipe", space.recipe, own_epochs)
        if s.recipe is not None:
            _check_merged_recipe(ck, _merge_recipes(s.recipe, space.recipe, arch))

    if s.search is not None:
        _check_search(ck, s, check_hparams)
    if s.scheduler is not None:
        _check_scheduler(ck, s)
    if s.resources is not None:
        _check_resources(ck, s.resources)
    if s.tracking is not None and s.tracking.top_k < 1:
        ck.add(
            "tracking.top_k",
            f"must be >= 1 (models registered after the sweep), got {s.tracking.top_k}",
        )


def _import_check_hparams() -> Callable[..., None]:
    # torch comes with trainables.models: import it only when a file is validated.
    from trainables.models import check_hparams

    return check_hparams


def _check_form(ck: _Checker, key: str, spec: Any) -> bool:
    """choices non-empty and distinct; low < high; step > 0 and dividing; log needs low > 0."""
    before = len(ck.issues)
    if isinstance(spec, IntChoices | FloatChoices | StrChoices):
        if not spec.choices:
            ck.add(
                f"{key}.choices",
                "choices must not be empty: give at least one value (or a constant)",
            )
        for i, value in enumerate(spec.choices):
            if value in spec.choices[:i]:
                ck.add(f"{key}.choices.{i}", f"{_fmt(value)} appears twice in choices")
    elif isinstance(spec, IntRange | FloatRange):
        low, high, step = spec.low, spec.high, spec.step
        if not low < high:
            ck.add(
                key,
                f"empty range: low ({_fmt(low)}) must be < high ({_fmt(high)}); "
                f"write a single value as a constant",
            )
        if spec.log and low <= 0:
            ck.add(f"{key}.low", f"a log range needs low > 0, got low={_fmt(low)}")
        if step is not None:
            if step <= 0:
                ck.add(f"{key}.step", f"step must be > 0, got step={_fmt(step)}")
            elif spec.log and not (isinstance(spec, IntRange) and step == 1):
                ck.add(
                    f"{key}.step",
                    "step cannot be combined with log: Optuna samples a log range without steps",
                )
            elif low < high:
                n = (high - low) / step
                if abs(n - round(n)) > 1e-9 * max(1.0, abs(n)):
                    fixed = low + math.floor(n + 1e-9) * step
                    ck.add(
                        f"{key}.step",
                        f"high - low ({_fmt(high - low)}) must be a multiple of "
                        f"step ({_fmt(step)}); "
                        f"e.g. high: {_fmt(fixed)}",
                    )
    return len(ck.issues) == before


def _too_big(ck: _Checker, key: str, spec: Any) -> bool:
    if isinstance(spec, IntRange):
        count = (spec.high - spec.low) // (spec.step or 1) + 1
        if count > _MAX_ENUMERATED:
            ck.add(
                key,
                f"range has {count} values; at most {_MAX_ENUMERATED} can be checked, narrow it",
            )
            return True
    return False


def _check_buildable(
    ck: _Checker, check_hparams: Callable[..., None], arch: str, name: str, key: str, spec: Any
) -> None:
    """Every value this param can take must build; a search must not waste trials on errors."""

    def error(value: Any) -> str | None:
        try:
            check_hparams(arch, **{name: value})
        except ValueError as exc:
            return str(exc)
        return None

    def one(k: str, value: Any) -> None:
        msg = error(value)
        if msg is not None:
            ck.add(k, f"value {_fmt(value)} cannot be built: {msg}")

    if isinstance(spec, IntChoices | FloatChoices | StrChoices):
        for i, value in enumerate(spec.choices):
            one(f"{key}.choices.{i}", value)
    elif isinstance(spec, IntRange):
        values = range(spec.low, spec.high + 1, spec.step or 1)
        bad = [(v, m) for v in values if (m := error(v)) is not None]
        if len(bad) == 1:
            ck.add(key, f"value {bad[0][0]} cannot be built: {bad[0][1]}")
        elif bad:
            good = [v for v in values if v not in {b for b, _ in bad}]
            shown = ", ".join(str(v) for v, _ in bad[:6]) + (", ..." if len(bad) > 6 else "")
            fix = f"; use {{choices: {_fmt(good[:8])}}} instead" if good else ""
            ck.add(
                key,
                f"{len(bad)} of {len(values)} values cannot be built ({shown}): {bad[0][1]}{fix}",
            )
    elif isinstance(spec, FloatRange):
        # A real interval: the rules are bounds, so its ends decide.
        one(f"{key}.low", spec.low)
        one(f"{key}.high", spec.high)
    else:
        one(key, spec)


# Numeric rules of the recipe: name -> (test, rule text). Mirrors TrainConfig.__post_init__
# so a bad value fails at validate time instead of in the first trial.
_RECIPE_BOUNDS: dict[str, tuple[Callable[[float], bool], str]] = {
    "lr": (lambda v: v > 0, "lr must be > 0"),
    "weight_decay": (lambda v: v >= 0, "weight_decay must be >= 0"),
    "gamma": (lambda v: 0 < v <= 1, "gamma must be in (0, 1]"),
    "epochs": (lambda v: v >= 1, "epochs must be >= 1"),
    "batch_size": (lambda v: v >= 1, "batch_size must be >= 1"),
    "warmup_epochs": (lambda v: v >= 0, "warmup_epochs must be >= 0"),
    "label_smoothing": (lambda v: 0 <= v < 1, "label_smoothing must be in [0, 1)"),
    "momentum": (lambda v: 0 <= v < 1, "momentum must be in [0, 1)"),
}


def _check_bounds(ck: _Checker, name: str, key: str, spec: Any) -> None:
    test, rule = _RECIPE_BOUNDS[name]
    if isinstance(spec, FloatChoices):
        items = [(f"{key}.choices.{i}", v) for i, v in enumerate(spec.choices)]
    elif isinstance(spec, FloatRange):
        items = [(f"{key}.low", spec.low), (f"{key}.high", spec.high)]
    else:
        items = [(key, spec)]
    for k, value in items:
        if not test(value):
            ck.add(k, f"{rule}, got {_fmt(value)}")


def _check_recipe(ck: _Checker, prefix: str, recipe: RecipeSpec, epochs: int) -> None:
    for name in ("epochs", "batch_size", "warmup_epochs", "label_smoothing"):
        value = getattr(recipe, name)
        if value is not None:
            _check_bounds(ck, name, f"{prefix}.{name}", value)
    if recipe.optimizer is not None and recipe.optimizer.momentum is not None:
        _check_bounds(ck, "momentum", f"{prefix}.optimizer.momentum", recipe.optimizer.momentum)
    for name in ("lr", "weight_decay", "gamma"):
        spec = getattr(recipe, name)
        if spec is not None and _check_form(ck, f"{prefix}.{name}", spec):
            _check_bounds(ck, name, f"{prefix}.{name}", spec)
    if isinstance(recipe.milestones, tuple):
        _check_milestones(ck, f"{prefix}.milestones", recipe.milestones, epochs)
    elif isinstance(recipe.milestones, MilestoneSearch):
        _check_milestone_search(ck, f"{prefix}.milestones", recipe.milestones)


def _check_milestones(ck: _Checker, key: str, ms: tuple[float, ...], epochs: int) -> None:
    for i, m in enumerate(ms):
        if m >= 1:
            frac, epoch = (m / epochs, int(m)) if m <= epochs else (0.5, epochs // 2)
            ck.add(
                f"{key}.{i}",
                f"milestone {_fmt(m)} is beyond the epochs: milestones are fractions of the "
                f"epochs in (0, 1); give fractions of recipe.epochs, "
                f"e.g. {frac:.3g} for epoch {epoch}",
            )
            return
        if m <= 0:
            ck.add(
                f"{key}.{i}",
                f"milestone {_fmt(m)} must be > 0: "
                "milestones are fractions of the epochs in (0, 1)",
            )
            return
    if any(a >= b for a, b in itertools.pairwise(ms)):
        ck.add(
            key,
            "milestones must be fractions of the epochs in (0, 1), strictly increasing; "
            f"got {_fmt(ms)}",
        )


def _check_milestone_search(ck: _Checker, key: str, spec: MilestoneSearch) -> None:
    if not 1 <= spec.count <= MAX_MILESTONES:
        ck.add(f"{key}.count", f"count must be in [1, {MAX_MILESTONES}], got {spec.count}")
    if not 0 < spec.low < 1:
        ck.add(
            f"{key}.low", f"low must be a fraction of the epochs in (0, 1), got {_fmt(spec.low)}"
        )
    if not 0 < spec.high < 1:
        ck.add(
            f"{key}.high", f"high must be a fraction of the epochs in (0, 1), got {_fmt(spec.high)}"
        )
    if not spec.low < spec.high:
        ck.add(key, f"empty range: low ({_fmt(spec.low)}) must be < high ({_fmt(spec.high)})")
    if spec.min_gap <= 0:
        ck.add(
            f"{key}.min_gap",
            f"min_gap must be > 0 (milestones must differ), got {_fmt(spec.min_gap)}",
        )
    elif spec.count >= 1 and spec.high - spec.low < (spec.count - 1) * spec.min_gap - 1e-12:
        need = (spec.count - 1) * spec.min_gap
        ck.add(
            key,
            f"{spec.count} milestones {_fmt(spec.min_gap)} apart need high - low >= {need:.3g}, "
            f"got {spec.high - spec.low:.3g}",
        )


def _check_merged_recipe(ck: _Checker, merged: dict[str, tuple[Any, str]]) -> None:
    """Rules that span keys which may come from the shared recipe and an override."""
    epochs = merged.get("epochs", (_TRAIN_DEFAULTS["epochs"], ""))[0]
    if "warmup_epochs" in merged and epochs >= 1:
        warmup, key = merged["warmup_epochs"]
        if warmup >= epochs:
            ck.add(key, f"warmup_epochs must be < epochs ({epochs}), got {warmup}")
    if "momentum" in merged and merged["momentum"][0] == 0 and merged.get("nesterov", (False,))[0]:
        # torch.optim.SGD raises "Nesterov momentum requires a momentum" in the first trial.
        ck.add(merged["momentum"][1], "nesterov: true needs momentum > 0, got momentum=0")


def _check_search(ck: _Checker, s: _Sections, check_hparams: Callable[..., None]) -> None:
    search = s.search
    assert search is not None
    if search.metric == "test_acc":
        ck.add(
            "search.metric",
            "test_acc cannot be the search metric: the test set is never used to choose; "
            "use val_acc (or val_loss) and read test_acc of the chosen models afterwards",
        )
    elif search.metric not in METRICS:
        ck.add(
            "search.metric",
            f"must be one of {', '.join(METRICS)}; "
            f"got {search.metric!r}{_suggest(search.metric, METRICS)}",
        )
    elif search.mode != METRICS[search.metric]:
        ck.add(
            "search.mode",
            f"mode {search.mode} contradicts metric {search.metric}: "
            f"{search.metric} is {'maxim' if METRICS[search.metric] == 'max' else 'minim'}ised, "
            f"use mode: {METRICS[search.metric]} (or leave mode out)",
        )
    if search.num_samples < 1:
        ck.add("search.num_samples", f"must be >= 1, got {search.num_samples}")
    if search.max_concurrent < 1:
        ck.add("search.max_concurrent", f"must be >= 1, got {search.max_concurrent}")
    if search.n_startup_trials is not None and search.n_startup_trials < 0:
        ck.add("search.n_startup_trials", f"must be >= 0, got {search.n_startup_trials}")
    if search.algorithm == "grid":
        for arch, space in s.archs.items():
            for name, (spec, key) in _param_sources(arch, space, s.recipe).items():
                if isinstance(spec, FloatRange | MilestoneSearch):
                    ck.add(
                        key,
                        f"grid search needs a finite space but {name} is a continuous range; "
                        f"use choices (or an int range), or algorithm: tpe / random",
                    )
    for i, point in enumerate(search.points_to_evaluate):
        _check_point(ck, s, f"search.points_to_evaluate.{i}", point, check_hparams)


def _check_point(
    ck: _Checker, s: _Sections, key: str, point: dict[str, Any], check_hparams: Callable[..., None]
) -> None:
    """A starting point must lie in its arch's space (Optuna would otherwise re-sample it)."""
    arch = point.get("arch")
    if arch is None:
        if len(s.archs_named) != 1:
            ck.add(
                key,
                "missing arch: each point names its architecture, "
                f"one of {', '.join(s.archs_named)}",
            )
            return
        arch = s.archs_named[0]
    if arch not in s.archs_named:
        hint = _suggest(str(arch), s.archs_named)
        ck.add(
            f"{key}.arch",
            f"arch {_fmt(arch)} is not in architectures{hint} "
            f"(the sweep has {', '.join(s.archs_named)})",
        )
        return
    space = s.archs.get(arch)
    if space is None:
        return  # that architecture has its own errors
    sources = _param_sources(arch, space, s.recipe)
    allowed = list(MODEL_HPARAMS[arch]) + list(SEARCHABLE_RECIPE_KEYS)
    before = len(ck.issues)
    model_values: dict[str, Any] = {}
    for name, value in point.items():
        if name == "arch":
            continue
        k = f"{key}.{name}"
        if name not in allowed:
            ck.add(
                k,
                f"unknown key {name!r} for {arch}{_suggest(name, allowed)} "
                f"(allowed: arch, {', '.join(allowed)})",
            )
        elif name not in sources:
            where = f"architectures.{arch}.{name}" if name in MODEL_HPARAMS[arch] else "recipe"
            ck.add(
                k,
                f"{name} is not part of the {arch} space; "
                f"give it a range or choices in {where} first",
            )
        else:
            problem = _outside(sources[name][0], value)
            if problem:
                ck.add(k, f"value {_fmt(value)} is outside the {arch} space: {problem}")
            elif name in MODEL_HPARAMS[arch]:
                model_values[name] = value
    if len(ck.issues) == before and model_values:
        try:
            check_hparams(arch, **model_values)
        except ValueError as exc:
            ck.add(key, f"this point cannot be built: {exc}")


def _outside(spec: Any, value: Any) -> str | None:
    """Why ``value`` is not a value ``spec`` can take, or None if it is."""
    is_num = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(spec, MilestoneSearch):
        ok = (
            isinstance(value, list)
            and len(value) == spec.count
            and all(isinstance(m, int | float) and spec.low <= m <= spec.high for m in value)
            and all(b - a >= spec.min_gap - 1e-12 for a, b in itertools.pairwise(value))
        )
        return (
            None
            if ok
            else (
                f"milestones take {spec.count} increasing fractions in "
                f"[{_fmt(spec.low)}, {_fmt(spec.high)}] "
                f"at least {_fmt(spec.min_gap)} apart"
            )
        )
    if isinstance(spec, IntChoices | FloatChoices | StrChoices):
        return (
            None
            if value in spec.choices and type(value) is not bool
            else f"one of {_fmt(spec.choices)}"
        )
    if isinstance(spec, IntRange):
        step = spec.step or 1
        ok = isinstance(value, int) and not isinstance(value, bool)
        ok = ok and spec.low <= value <= spec.high and (value - spec.low) % step == 0
        return (
            None
            if ok
            else f"an integer in [{spec.low}, {spec.high}]"
            + (f" with step {step}" if step != 1 else "")
        )
    if isinstance(value, str) and isinstance(spec, FloatRange | FloatChoices | float):
        return "expected a number (YAML 1.1 reads 5e-4 as text: write 5.0e-4)"
    if isinstance(spec, FloatRange):
        return (
            None
            if is_num and spec.low <= value <= spec.high
            else f"a number in [{_fmt(spec.low)}, {_fmt(spec.high)}]"
        )
    # a constant: a point cannot change it (the space returns it as is)
    if isinstance(spec, tuple):
        same = (
            isinstance(value, list)
            and len(value) == len(spec)
            and all(
                isinstance(v, int | float) and math.isclose(v, c)
                for v, c in zip(value, spec, strict=False)
            )
        )
    elif isinstance(spec, float):
        same = is_num and math.isclose(value, spec)
    else:
        same = value == spec and type(value) is type(spec)
    return None if same else f"the constant {_fmt(spec)} (a point cannot change a constant)"


def _check_scheduler(ck: _Checker, s: _Sections) -> None:
    sched = s.scheduler
    assert sched is not None
    if sched.grace_period < 1:
        ck.add("scheduler.grace_period", f"must be >= 1 epoch, got {sched.grace_period}")
    elif s.recipe is not None:
        for arch, space in s.archs.items():
            merged = _merge_recipes(s.recipe, space.recipe, arch)
            epochs = merged.get("epochs", (_TRAIN_DEFAULTS["epochs"], ""))[0]
            if sched.grace_period > epochs >= 1:
                ck.add(
                    "scheduler.grace_period",
                    f"grace_period ({sched.grace_period}) must be <= epochs "
                    f"({epochs}, for {arch}): "
                    f"no trial would ever be stopped early",
                )
    if sched.reduction_factor <= 1:
        ck.add("scheduler.reduction_factor", f"must be > 1, got {_fmt(sched.reduction_factor)}")


def _check_resources(ck: _Checker, resources: dict[str, Any]) -> None:
    names = ["default", *ARCHS]
    for arch, value in resources.items():
        key = f"resources.{arch}"
        if arch not in names:
            ck.add(
                key, f"unknown key {arch!r}{_suggest(arch, names)} (allowed: {', '.join(names)})"
            )
            continue
        if not isinstance(value, ResourceSpec):
            continue  # "auto": sized from GPU memory at launch
        cpu, gpu = value.cpu, value.gpu
        if cpu < 0:
            ck.add(f"{key}.cpu", f"must be >= 0, got {_fmt(cpu)}")
        if gpu < 0:
            ck.add(f"{key}.gpu", f"must be >= 0, got {_fmt(gpu)}")
        elif gpu > 1 and gpu != int(gpu):
            ck.add(
                f"{key}.gpu", f"a trial cannot use {_fmt(gpu)} GPUs: fractional GPUs must be < 1"
            )
        elif gpu > MAX_GPUS_PER_NODE:
            ck.add(
                f"{key}.gpu",
                f"no node could ever satisfy gpu={_fmt(gpu)} "
                f"(the largest GPU node has {MAX_GPUS_PER_NODE})",
            )
        if cpu == 0 and gpu == 0:
            ck.add(key, "a trial must reserve some CPU or GPU, got cpu=0 and gpu=0")


# ------------------------------------------------------------ cluster placement


def check_cluster_fits(
    cfg: SweepConfig, node_resources: list[dict[str, float]]
) -> list[ConfigIssue]:
    """Architectures whose per-trial request no single node can satisfy.

    ``node_resources`` are Ray node resource dicts (``{"CPU": 16, "GPU": 8}``, as in
    ``[n["Resources"] for n in ray.nodes() if n["Alive"]]``). A trial is placed on
    one node, so the largest node must hold it; otherwise Ray would wait forever.
    ``"auto"`` requests are skipped: they are sized to the cluster at launch.
    """
    issues: list[ConfigIssue] = []
    for arch in cfg.arch_names():
        req = cfg.resources_for(arch)
        if req == "auto":
            continue
        fits = any(
            float(node.get("CPU", 0)) >= req["cpu"] and float(node.get("GPU", 0)) >= req["gpu"]
            for node in node_resources
        )
        if fits:
            continue
        key = next((f"resources.{k}" for k in (arch, "default") if k in cfg.resources), "resources")
        if node_resources:
            most_cpu = max(float(n.get("CPU", 0)) for n in node_resources)
            most_gpu = max(float(n.get("GPU", 0)) for n in node_resources)
            offer = (
                f"{len(node_resources)} node(s), the largest with {_fmt(most_cpu)} CPUs "
                f"and {_fmt(most_gpu)} GPUs"
            )
        else:
            offer = "no nodes"
        issues.append(
            ConfigIssue(
                cfg.source_path,
                cfg.line_of(key),
                key,
                f"no node of the cluster can run a {arch} trial (cpu={_fmt(req['cpu'])}, "
                f"gpu={_fmt(req['gpu'])}): the cluster has {offer}",
            )
        )
    return issues
