"""Pass 2: what a sweep file means, checked once its shape is known.

Plain functions check what a type cannot say: ranges and steps, the recipe
against the rules of ``TrainConfig``, milestones against the epochs, the search
metric and its starting points, the scheduler against the epochs, per-trial
resources, and that every value a model hyperparameter can take is buildable
(``trainables.models.check_hparams``), so that a sweep does not spend trials on
errors. When pass 1 fails, each top-level section is re-validated alone
(:func:`_sections_alone`) so that the sections that are fine still get these
checks, and every problem is reported at once.

:class:`_Checker` collects the issues of both passes, each with the line of its
key, and reports at most ``MAX_ISSUES`` of them. Every check is linear in the
size of the file (choices are compared through a set, int ranges enumerated up
to ``_MAX_ENUMERATED`` values), and ``yaml_lines`` bounds that size, so no file
can make validation slow. :func:`check_cluster_fits` is the one check that needs the cluster; the
sweep runs it at launch, once Ray's nodes are known.

The buildability rules are the registry's (``trainables.models.families``); no
network module, and so no torch, is imported to check them.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from orchestrator.config.errors import ConfigIssue, _fmt
from orchestrator.config.messages import (
    _closest,
    _error_message,
    _field_types,
    _resolve_loc,
    _suggest,
)
from orchestrator.config.schema import (
    _TRAIN_DEFAULTS,
    METRICS,
    SEARCHABLE_RECIPE_KEYS,
    Architectures,
    ArchSpace,
    DatasetSpec,
    FloatChoices,
    FloatRange,
    IntChoices,
    IntRange,
    MilestoneSearch,
    MilestoneSpace,
    RaySpec,
    RecipeSpec,
    ResourceSpec,
    SchedulerSpec,
    SearchSpec,
    StrChoices,
    SweepConfig,
    TrackingSpec,
    _drop_null_sections,
    _merge_recipes,
    _param_sources,
)
from orchestrator.config.targets import address_problem, storage_problem, tracking_uri_problem
from orchestrator.config.yaml_lines import _line_of
from trainables.config import RECIPE_BOUNDS
from trainables.models import check_hparams
from trainables.models.registry import get_family, names

# The largest GPU node any cloud sells today (8x A100/H100/H200 boxes); a trial
# asking for more can never be placed, so it is rejected before Ray waits forever.
MAX_GPUS_PER_NODE = 8
# More than five LR drops has no precedent in the seed papers (they use 2 or 3),
# and each one is a search dimension.
MAX_MILESTONES = 5
# Every value of an int range is checked against the family's rules (~15 us each
# on a loaded 2-core machine), and a file has an int range per int hyperparameter
# of each family (8 today): 1,000 values each, as many as a choices list may hold
# (yaml_lines.MAX_ITEMS), keep the whole check near 0.1 s. No hyperparameter of
# these families has more than a few dozen useful values.
_MAX_ENUMERATED = 1_000
# A float range cut into more steps than this is continuous in all but name, and
# beyond 2**53 steps the division that checks the step loses its precision.
_MAX_STEPS = 1e12
# Optuna's samplers hand the seed to NumPy, which takes 0 .. 2**32 - 1.
_MAX_SEED = 2**32 - 1
# A folder name (255 bytes on every common file system) that Ray and MLflow
# extend with their own suffixes; 100 characters leave room for them.
MAX_NAME_LENGTH = 100
# A sweep name is a folder name, an MLflow experiment and model name, and goes into
# MLflow filter strings: no quotes, no slashes, and not "." or "..".
SWEEP_NAME = re.compile(r"(?!\.\.?$)[A-Za-z0-9_.-]+")
SWEEP_NAME_RULE = "[A-Za-z0-9_.-]+ (not . or ..)"


# Issues reported for one file; beyond them, a count. A file with more is not a
# sweep file with typos, and each pass-1 message costs a "did you mean" search
# (~0.1 ms): 5,000 unknown keys took 1.5 s to word, and nobody reads them all.
MAX_ISSUES = 200


class _Checker:
    """Collects issues; each one gets the line of its key (or of its nearest parent)."""

    def __init__(self, filename: str, lines: dict[str, int]) -> None:
        self.filename = filename
        self.lines = lines
        self.issues: list[ConfigIssue] = []
        self.unworded = 0  # pass-1 errors past MAX_ISSUES: counted, not worded
        self._seen: set[tuple[str, str]] = set()

    def report(self) -> list[ConfigIssue]:
        """The issues in file order, at most ``MAX_ISSUES`` of them and then how many more."""
        issues = sorted(self.issues, key=lambda i: i.line or 0)
        more = len(issues) - MAX_ISSUES + self.unworded
        if more <= 0:
            return issues
        shown = issues[:MAX_ISSUES]
        return [
            *shown,
            ConfigIssue(
                self.filename,
                None,
                "",
                f"... and {more:,} more issues not shown; fix the ones above first",
            ),
        ]

    def add(self, key: str, message: str) -> None:
        # The shared recipe is checked once per architecture that uses it; say it once.
        if (key, message) in self._seen:
            return
        self._seen.add((key, message))
        self.issues.append(ConfigIssue(self.filename, _line_of(self.lines, key), key, message))

    def add_validation_error(self, exc: ValidationError) -> None:
        errors = []
        raw = exc.errors(include_url=False)
        self.unworded += max(0, len(raw) - MAX_ISSUES)
        for err in raw[:MAX_ISSUES]:
            parts, holder, end = _resolve_loc(tuple(err["loc"]))
            errors.append((err, parts, holder, end))
        # A misspelt key also makes its correct name "missing"; the did-you-mean says both.
        suggested = {
            (".".join(parts[:-1]), m)
            for err, parts, holder, _ in errors
            if err["type"] == "extra_forbidden"
            and holder is not None
            and (m := _closest(parts[-1], holder.model_fields)) is not None
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
    ray: RaySpec | None

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
            ray=cfg.ray,
        )


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
        named = [a for a in names() if a in raw_archs]
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
        ray=values["ray"],
    )


def _check_meaning(ck: _Checker, s: _Sections) -> None:
    if s.name is not None and not SWEEP_NAME.fullmatch(s.name):
        ck.add(
            "name",
            f"must match {SWEEP_NAME_RULE} (it names the Optuna study, the MLflow experiment "
            f"and the output folder), got {_fmt(s.name)}",
        )
    elif s.name is not None and len(s.name) > MAX_NAME_LENGTH:
        ck.add(
            "name",
            f"must be at most {MAX_NAME_LENGTH} characters (it names the output folder), "
            f"got {len(s.name)}",
        )
    if isinstance(s.dataset, DatasetSpec) and s.dataset.synthetic_size < 1:
        ck.add("dataset.synthetic_size", f"must be >= 1, got {s.dataset.synthetic_size}")
    if s.archs_complete and not s.archs:
        ck.add("architectures", f"give at least one architecture, of {', '.join(names())}")

    epochs_default = _TRAIN_DEFAULTS["epochs"]
    shared_epochs = s.recipe.epochs if s.recipe is not None and s.recipe.epochs else epochs_default
    if s.recipe is not None:
        _check_recipe(ck, "recipe", s.recipe, shared_epochs)

    for arch, space in s.archs.items():
        for name in get_family(arch).hparam_names:
            spec = getattr(space, name)
            if spec is None:
                continue
            key = f"architectures.{arch}.{name}"
            if _check_form(ck, key, spec) and not _too_big(ck, key, spec):
                _check_buildable(ck, check_hparams, arch, name, key, spec)
        if space.recipe is not None:
            own_epochs = space.recipe.epochs or shared_epochs
            _check_recipe(ck, f"architectures.{arch}.recipe", space.recipe, own_epochs)
        _check_merged_recipe(ck, arch, _merge_recipes(s.recipe, space.recipe, arch))

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
    _check_targets(ck, s)


def _check_targets(ck: _Checker, s: _Sections) -> None:
    """The forms of ``ray.address``, ``ray.storage_path`` and ``tracking.uri``."""
    found = [
        ("ray.address", s.ray and s.ray.address, address_problem),
        ("ray.storage_path", s.ray and s.ray.storage_path, storage_problem),
        ("tracking.uri", s.tracking and s.tracking.uri, tracking_uri_problem),
    ]
    for key, value, rule in found:
        problem = rule(value) if value is not None else None
        if problem:
            ck.add(key, problem)


def _check_form(ck: _Checker, key: str, spec: Any) -> bool:
    """choices non-empty and distinct; low < high; step > 0 and dividing; log needs low > 0."""
    before = len(ck.issues)
    if isinstance(spec, IntChoices | FloatChoices | StrChoices):
        if not spec.choices:
            ck.add(
                f"{key}.choices",
                "choices must not be empty: give at least one value (or a constant)",
            )
        # One pass with a set (a scan of the earlier items took 30 s for 40k choices).
        # After pass 1 the choices of one param are all ints, all floats or all
        # strings (bools are refused), so hashing agrees with == here: 1 and 1.0
        # in a float param are one value, as they were. The bool flag in the key
        # keeps True apart from 1 should a bool ever get through.
        seen: set[tuple[bool, Any]] = set()
        for i, value in enumerate(spec.choices):
            mark = (isinstance(value, bool), value)
            if mark in seen:
                ck.add(f"{key}.choices.{i}", f"{_fmt(value)} appears twice in choices")
            seen.add(mark)
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
                if not math.isfinite(n) or n > _MAX_STEPS:
                    ck.add(
                        f"{key}.step",
                        f"step {_fmt(step)} cuts {_fmt(low)}..{_fmt(high)} into more than "
                        f"{_MAX_STEPS:.0e} steps; use a larger step or none",
                    )
                elif abs(n - round(n)) > 1e-9 * max(1.0, abs(n)):
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
                f"range has {count:,} values; at most {_MAX_ENUMERATED:,} can be checked "
                "(as many as a choices list may hold), narrow it",
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
            bad_values = {b for b, _ in bad}  # once: inside the comprehension it was quadratic
            good = [v for v in values if v not in bad_values]
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


def _check_bounds(ck: _Checker, name: str, key: str, spec: Any) -> None:
    # The bounds TrainConfig and `wrnsweep train` apply: a bad value fails here, at
    # validate time, with the same rule instead of in the first trial.
    test, rule = RECIPE_BOUNDS[name]
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


def _check_merged_recipe(ck: _Checker, arch: str,
                         merged: dict[str, tuple[Any, str]]) -> None:
    """Rules that span keys which may come from the shared recipe and an override."""
    epochs = merged.get("epochs", (_TRAIN_DEFAULTS["epochs"], ""))[0]
    if "warmup_epochs" in merged and epochs >= 1:
        warmup, key = merged["warmup_epochs"]
        if warmup >= epochs:
            ck.add(key, f"warmup_epochs must be < epochs ({epochs}), got {warmup}")
    nesterov, said = merged.get("nesterov", (get_family(arch).recipe.nesterov, ""))
    if "momentum" in merged and merged["momentum"][0] == 0 and nesterov:
        # torch.optim.SGD raises "Nesterov momentum requires a momentum" in the first trial.
        why = "nesterov: true" if said else f"nesterov (the {arch} recipe's; set nesterov: false)"
        ck.add(merged["momentum"][1], f"{why} needs momentum > 0, got momentum=0")


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
    if not 0 <= search.seed <= _MAX_SEED:
        ck.add(
            "search.seed", f"must be in [0, {_MAX_SEED}] (NumPy's seed range), got {search.seed}"
        )
    if search.n_startup_trials is not None and search.n_startup_trials < 0:
        ck.add("search.n_startup_trials", f"must be >= 0, got {search.n_startup_trials}")
    if search.algorithm == "grid" and search.recipe_start:
        ck.add("search.recipe_start",
               "grid search runs every point of the grid once; a start at the papers' "
               "configurations has nothing to put first (leave recipe_start out)")
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
    model_names = get_family(arch).hparam_names
    allowed = list(model_names) + list(SEARCHABLE_RECIPE_KEYS)
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
            where = f"architectures.{arch}.{name}" if name in model_names else "recipe"
            ck.add(
                k,
                f"{name} is not part of the {arch} space; "
                f"give it a range or choices in {where} first",
            )
        else:
            problem = _outside(sources[name][0], value)
            if problem:
                ck.add(k, f"value {_fmt(value)} is outside the {arch} space: {problem}")
            elif name in model_names:
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
        space = MilestoneSpace(spec.count, spec.low, spec.high, spec.min_gap)
        ok = isinstance(value, list) and space.holds(value)
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
    allowed = ["default", *names()]
    for arch, value in resources.items():
        key = f"resources.{arch}"
        if arch not in allowed:
            ck.add(
                key,
                f"unknown key {arch!r}{_suggest(arch, allowed)} (allowed: {', '.join(allowed)})",
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
    cfg: SweepConfig, node_resources: list[dict[str, float]], *, here: bool = False
) -> list[ConfigIssue]:
    """Architectures whose per-trial request no single node can satisfy.

    ``node_resources`` are Ray node resource dicts (``{"CPU": 16, "GPU": 8}``, as in
    ``[n["Resources"] for n in ray.nodes() if n["Alive"]]``). A trial is placed on
    one node, so the largest node must hold it; otherwise Ray would wait forever.
    ``"auto"`` requests are skipped: they are sized to the cluster at launch.
    ``here``: the one node is this machine, where a launch without an address
    starts its own Ray (``orchestrator.preflight``); the message says so.
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
        if here:
            machine = node_resources[0]
            issues.append(
                ConfigIssue(
                    cfg.source_path,
                    cfg.line_of(key),
                    key,
                    f"this machine cannot run a {arch} trial (cpu={_fmt(req['cpu'])}, "
                    f"gpu={_fmt(req['gpu'])}): it has {_fmt(float(machine.get('CPU', 0)))} "
                    f"CPUs and {_fmt(float(machine.get('GPU', 0)))} GPUs, and with no "
                    "address a launch runs here (--address joins a cluster)",
                )
            )
            continue
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
