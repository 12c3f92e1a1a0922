"""The frozen configuration of one training run.

Config flows one way: YAML or CLI options -> a plain dict (what Ray Tune hands a
trial) -> :class:`TrainConfig`. Every field has a unit or a reason. What the
caller leaves out comes from the architecture's registration
(``trainables.models.families``): model hyperparameters from their one default,
optimiser and schedule from the paper's recipe, so a sweep that says nothing
about the optimiser still trains WRN with Nesterov and weight decay 5e-4, and
ResNet with 1e-4 and /10 steps.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainables.models.registry import get_family


def cache_home() -> Path:
    """wrnsweep's folder in the user's cache: ``$XDG_CACHE_HOME/wrnsweep``, else
    ``~/.cache/wrnsweep``. CIFAR's default root, and where the empty MLflow store
    every new sweep folder copies is kept (:mod:`orchestrator.store`).

    RuntimeError where there is no home directory and the variable is unset.
    """
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wrnsweep"


# Bounds of the numeric training settings: one set for `wrnsweep train`, TrainConfig
# and sweep files (orchestrator.config.checks reports them at the YAML key).
RECIPE_BOUNDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: v > 0, "lr must be > 0"),
    "weight_decay": (lambda v: v >= 0, "weight_decay must be >= 0"),
    "gamma": (lambda v: 0 < v <= 1, "gamma must be in (0, 1]"),
    "epochs": (lambda v: v >= 1, "epochs must be >= 1"),
    "batch_size": (lambda v: v >= 1, "batch_size must be >= 1"),
    "warmup_epochs": (lambda v: v >= 0, "warmup_epochs must be >= 0"),
    "label_smoothing": (lambda v: 0 <= v < 1, "label_smoothing must be in [0, 1)"),
    "momentum": (lambda v: 0 <= v < 1, "momentum must be in [0, 1)"),
    "num_threads": (lambda v: v >= 1, "num_threads must be >= 1"),
    "eval_batch_size": (lambda v: v >= 1, "eval_batch_size must be >= 1"),
}


TRAIN_ON = ("train", "train+val")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one trial needs; immutable so a run can be re-run from its log."""

    arch: str  # a registered family: trainables.models.registry.names()
    # The family's hyperparameters (depth, width, ...), every one resolved: those not
    # given take the registry's default. Flat in to_dict()/from_dict() (Tune's config).
    model: dict[str, Any] = field(default_factory=dict)
    dataset: str = "cifar10"  # cifar10 | cifar100 | digits | synthetic
    data_root: str | None = None  # CIFAR cache folder; None -> cache_home()
    download: bool = False  # CIFAR is fetched only when asked
    synthetic_size: int = 2048  # training images of the synthetic set
    epochs: int = 200
    batch_size: int = 128  # images per SGD step, as in every seed paper
    eval_batch_size: int = 1024  # evaluation has no gradients: larger batches are cheaper
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9
    nesterov: bool = None  # type: ignore[assignment]  # None -> the family's recipe
    weight_decay: float = None  # type: ignore[assignment]  # L2 on every parameter; recipe
    milestones: tuple[float, ...] = None  # type: ignore[assignment]  # fractions of `epochs`
    gamma: float = None  # type: ignore[assignment]  # lr multiplier at each milestone; recipe
    warmup_epochs: int = 0  # linear warm-up from lr/10, in epochs
    label_smoothing: float = 0.0
    seed: int = 0  # seeds init, data order, augmentation and dropout
    # What SGD sees: "train" (the 45k/5k split: validation chooses) or "train+val"
    # (all 50k training images, as the papers train; no validation metric then).
    train_on: str = "train"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU: fp32 there)
    channels_last: bool = True  # NHWC on CUDA: faster convs on tensor cores
    compile: bool = False  # torch.compile the model (CUDA graphs on CUDA; a warm-up of ~20-30 s)
    num_threads: int | None = None  # CPU threads; None -> every core the process may use
    gpu_memory_fraction: float | None = None  # cap for a trial sharing a GPU
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept for the log

    def __post_init__(self) -> None:
        family = get_family(self.arch)  # ValueError naming the registered families
        object.__setattr__(self, "model", family.resolve(self.model))
        for name, value in family.recipe.as_dict().items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        for name, (ok, rule) in RECIPE_BOUNDS.items():
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise ValueError(f"{rule}, got {name}={value!r}")
        if self.train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, "
                             f"got train_on={self.train_on!r}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0, got momentum=0")
        ms = self.milestones
        if any(not 0 < m < 1 for m in ms) or any(a >= b for a, b in itertools.pairwise(ms)):
            raise ValueError(
                "milestones must be strictly increasing fractions of the epochs in (0, 1), "
                f"got milestones={list(ms)}"
            )
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                f"warmup_epochs must be in [0, epochs), got warmup_epochs={self.warmup_epochs}"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a flat dict (what Tune hands a trial); ``None`` means the default.

        The family's hyperparameter names go into ``model``; keys that are not
        fields are kept in ``extra`` (a Tune config may carry bookkeeping keys)
        rather than silently dropped. Unspecified recipe fields come from the paper.
        """
        arch = values.get("arch")
        model_names = get_family(arch).hparam_names
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "model"}
        fields: dict[str, Any] = {"model": {}}
        extra: dict[str, Any] = {}
        for key, value in values.items():
            if key in model_names:
                fields["model"][key] = value
            elif key in names:
                if value is not None:
                    fields[key] = value
            else:
                extra[key] = value
        return cls(**fields, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; ``TrainConfig.from_dict(c.to_dict()) == c``."""
        out = dataclasses.asdict(self)
        model = out.pop("model")
        out = {"arch": out.pop("arch"), **model, **out}
        out["milestones"] = list(self.milestones)
        if not out["extra"]:
            out.pop("extra")
        return out

    def model_hparams(self) -> dict[str, Any]:
        """The keyword arguments of ``build_model`` for this architecture."""
        return dict(self.model)

    def milestone_epochs(self) -> list[int]:
        """Milestones as epoch indices: the lr changes at the start of these epochs."""
        return [max(1, round(m * self.epochs)) for m in self.milestones]
