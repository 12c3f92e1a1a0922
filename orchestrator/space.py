"""The search space: a validated sweep file as an Optuna define-by-run function.

The space is conditional: Optuna first picks ``arch``, then only that
architecture's parameters. Every parameter name is namespaced by architecture
(``wrn.depth``, ``resnet.depth``, ``wrn.lr``) because Optuna allows one
distribution per name across all branches; the trainable strips the prefix.

Searched LR milestones keep their order by construction: Optuna draws ``count``
numbers u_i in [0, 1] (``wrn.milestone_u1`` ...), which are sorted and mapped to
``low + u_(i) * free + (i - 1) * min_gap`` with ``free = high - low - (count - 1)
* min_gap``; every sample is strictly increasing, at least ``min_gap`` apart,
inside [low, high]. The resulting list is returned as ``<arch>.milestones``.

The function only computes; nothing here touches Ray, torch or the disk.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from orchestrator.config import MilestoneSpace, Param, SweepConfig
from trainables.config import TrainConfig
from trainables.models.registry import get_family

SpaceFn = Callable[[Any], dict[str, Any]]


def key(arch: str, name: str) -> str:
    """The namespaced name of ``name`` in ``arch``'s branch of the space."""
    return f"{arch}.{name}"


def _free(space: MilestoneSpace) -> float:
    """Room left for the milestones to move once the gaps are set aside (>= 0)."""
    return max(0.0, space.high - space.low - (space.count - 1) * space.min_gap)


def milestones_from_unit(u: list[float], space: MilestoneSpace) -> list[float]:
    """Map ``count`` numbers in [0, 1] to increasing milestones ``min_gap`` apart.

    No rounding: a rounded value could break the gap or the bounds that the
    validator accepted (e.g. ``min_gap: 0.00003``).
    """
    free = _free(space)
    # min(): float noise of the sum must not step past `high` on a tight spec.
    return [min(space.high, space.low + v * free + i * space.min_gap)
            for i, v in enumerate(sorted(u))]


def mean_first_milestone(space: MilestoneSpace) -> float:
    """The mean first milestone a searched space samples (random search's draws).

    The first of ``count`` sorted uniform draws has mean ``1 / (count + 1)``; it moves
    over the free room from ``low`` (:func:`milestones_from_unit`).
    """
    return space.low + _free(space) / (space.count + 1)


def unit_from_milestones(milestones: list[float], space: MilestoneSpace) -> list[float]:
    """The inverse of :func:`milestones_from_unit`, for starting points."""
    free = _free(space)
    if free == 0:
        return [0.0] * space.count
    return [min(1.0, max(0.0, (m - space.low - i * space.min_gap) / free))
            for i, m in enumerate(milestones)]


def fixed_values(cfg: SweepConfig, arch: str) -> dict[str, Any]:
    """What every trial of ``arch`` gets without a search: recipe constants and data."""
    return {**cfg.recipe_constants(arch), **cfg.dataset_options(), "seed": cfg.search.seed}


def _suggest(trial: Any, arch: str, param: Param | MilestoneSpace) -> Any:
    name = key(arch, param.name)
    if isinstance(param, MilestoneSpace):
        u = [trial.suggest_float(key(arch, f"milestone_u{i + 1}"), 0.0, 1.0)
             for i in range(param.count)]
        return milestones_from_unit(u, param)
    if param.kind == "constant":
        return list(param.value) if isinstance(param.value, tuple) else param.value
    if param.kind == "categorical":
        return trial.suggest_categorical(name, list(param.choices))
    if param.kind == "int":
        return trial.suggest_int(name, int(param.low), int(param.high),  # type: ignore[arg-type]
                                 step=int(param.step or 1), log=param.log)
    return trial.suggest_float(name, float(param.low), float(param.high),  # type: ignore[arg-type]
                               step=param.step, log=param.log)


class DefineByRun:
    """The Optuna define-by-run function of a sweep (TPE and random search).

    A class rather than a closure: OptunaSearch pickles its space with the
    experiment state, which is how ``resume`` continues the same study.
    """

    def __init__(self, cfg: SweepConfig) -> None:
        self.archs = cfg.arch_names()
        self.params = {arch: cfg.params_for(arch) for arch in self.archs}
        self.fixed = {arch: fixed_values(cfg, arch) for arch in self.archs}

    def __call__(self, trial: Any) -> dict[str, Any]:
        archs = self.archs
        # A single architecture is a constant: points_to_evaluate then need no "arch".
        arch = trial.suggest_categorical("arch", archs) if len(archs) > 1 else archs[0]
        out: dict[str, Any] = {"arch": arch, **self.fixed[arch]}
        for param in self.params[arch].values():
            out[key(arch, param.name)] = _suggest(trial, arch, param)
        return out


def define_by_run(cfg: SweepConfig) -> SpaceFn:
    """The define-by-run function for ``cfg``."""
    return DefineByRun(cfg)


def grid_points(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Every configuration of a grid sweep (the validator allows no float ranges there)."""
    points: list[dict[str, Any]] = []
    for arch in cfg.arch_names():
        params = cfg.params_for(arch)
        names = [key(arch, p.name) for p in params.values()]
        values = [p.values() for p in params.values()]  # type: ignore[union-attr]
        for combo in itertools.product(*values):
            point = {"arch": arch, **fixed_values(cfg, arch)}
            point.update({n: list(v) if isinstance(v, tuple) else v
                          for n, v in zip(names, combo, strict=True)})
            points.append(point)
    return points


class GridSpace:
    """A define-by-run function with one categorical: the index of a grid point.

    Optuna's GridSampler then walks the indices; the conditional structure lives
    in the explicit list instead of in the sampler.
    """

    def __init__(self, points: list[dict[str, Any]]) -> None:
        self.points = points

    def __call__(self, trial: Any) -> dict[str, Any]:
        index = trial.suggest_categorical("grid_point", list(range(len(self.points))))
        return dict(self.points[index])


def grid_space(points: list[dict[str, Any]]) -> SpaceFn:
    return GridSpace(points)


def paper_configuration(arch: str) -> dict[str, Any]:
    """The configuration the family's paper headlines, under the sweep file's names.

    The family's first table row with a reported error (WRN-28-10 with dropout 0.3,
    ResNet-20, pre-activation ResNet-164, DiracNet-28-10) over its defaults, and its
    recipe: lr 0.1 (``TrainConfig``'s, both papers'), weight decay, gamma, milestones.
    """
    family = get_family(arch)
    headline = next(row for row in family.rows if row.error)
    recipe = family.recipe
    return {**family.defaults(), **headline.hparams, "lr": TrainConfig.lr,
            "weight_decay": recipe.weight_decay, "gamma": recipe.gamma,
            "milestones": list(recipe.milestones)}


def recipe_points(cfg: SweepConfig) -> list[dict[str, Any]]:
    """The papers' configuration of each architecture, the nearest the space holds.

    One starting point per architecture (``points_to_evaluate`` form): each searched
    key takes the value of :func:`paper_configuration` nearest to it in the space
    (:func:`_nearest`); a key with no such value (a string the choices lack, more
    milestones than the paper has) is left to the sampler.
    """
    points = []
    for arch in cfg.arch_names():
        paper = paper_configuration(arch)
        point: dict[str, Any] = {"arch": arch}
        for name, param in cfg.params_for(arch).items():
            value = _nearest(param, paper.get(name)) if param.searchable else None
            if value is not None:
                point[name] = value
        points.append(point)
    return points


def _nearest(param: Param | MilestoneSpace, value: Any) -> Any:
    """The value of ``param``'s space nearest to ``value``, or None if there is none."""
    if value is None:
        return None
    if isinstance(param, MilestoneSpace):
        return _nearest_milestones(list(value), param)
    if param.kind == "categorical":
        if value in param.choices:
            return value
        numbers = [c for c in param.choices if isinstance(c, int | float)]
        if isinstance(value, str) or not numbers:
            return None
        return min(numbers, key=lambda c: abs(c - value))  # the first of a tie
    low, high = param.low, param.high
    assert low is not None and high is not None
    clamped = min(max(value, low), high)
    if param.kind == "float" and not param.step:
        return float(clamped)
    step = param.step or 1  # an int range always has one
    snapped = low + round((clamped - low) / step) * step  # on the range's grid
    snapped = snapped - step if snapped > high else snapped
    return int(snapped) if param.kind == "int" else float(snapped)


def _nearest_milestones(milestones: list[float], space: MilestoneSpace) -> list[float] | None:
    """The paper's milestones cut to the ``count`` the space searches.

    The first ``count`` of them (the schedule that follows the paper's longest: WRN's
    0.3, 0.6, 0.8 in a space of two is 0.3, 0.6), else the first subset in order the
    space holds; None when none does (more milestones than the paper has, or none in
    the space's bounds): the sampler draws them.
    """
    for subset in itertools.combinations(milestones, space.count):
        if space.holds(subset):
            return list(subset)
    return None


def starting_points(cfg: SweepConfig) -> list[dict[str, Any]]:
    """The first trials, with the names the space function suggests.

    ``search.points_to_evaluate`` when the file gives them, else the papers'
    configurations when ``search.starts_at_recipe`` (:func:`recipe_points`).
    Keys that are constants in the space are left out (the validator rejects
    points that would change one): a constant returned by the function would
    silently override the enqueued value anyway.
    """
    archs = cfg.arch_names()
    given = list(cfg.search.points_to_evaluate)
    points = given or (recipe_points(cfg) if cfg.search.starts_at_recipe else [])
    out: list[dict[str, Any]] = []
    for point in points:
        arch = point.get("arch", archs[0])
        params = cfg.params_for(arch)
        enqueued: dict[str, Any] = {"arch": arch} if len(archs) > 1 else {}
        for name, value in point.items():
            param = params.get(name)
            if name == "arch" or param is None or not param.searchable:
                continue
            if isinstance(param, MilestoneSpace):
                # Optuna draws milestone_u*: enqueue the values that give these milestones.
                for i, u in enumerate(unit_from_milestones(list(value), param)):
                    enqueued[key(arch, f"milestone_u{i + 1}")] = u
                continue
            enqueued[key(arch, name)] = value
        out.append(enqueued)
    return out


def describe(cfg: SweepConfig) -> dict[str, dict[str, str]]:
    """Human-readable space per architecture, for ``launch --dry-run``."""
    out: dict[str, dict[str, str]] = {}
    for arch in cfg.arch_names():
        rows: dict[str, str] = {}
        for param in cfg.params_for(arch).values():
            rows[param.name] = _describe_param(param)
        out[arch] = rows
    return out


def _describe_param(param: Param | MilestoneSpace) -> str:
    if isinstance(param, MilestoneSpace):
        return (f"{param.count} increasing fractions in [{param.low}, {param.high}], "
                f">= {param.min_gap} apart")
    if param.kind == "constant":
        return f"= {param.value}"
    if param.kind == "categorical":
        return "one of " + ", ".join(str(c) for c in param.choices)
    scale = " (log)" if param.log else ""
    has_step = param.step not in (None, 1) if param.kind == "int" else param.step is not None
    step = f" step {param.step}" if has_step else ""
    return f"{param.kind} in [{param.low}, {param.high}]{step}{scale}"
