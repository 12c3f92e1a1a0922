"""The frozen configuration of one training run, and the papers' recipes.

Config flows one way: YAML or CLI options -> a plain dict (what Ray Tune hands a
trial) -> :class:`TrainConfig`. Every field has a unit or a reason. Fields the
caller leaves out come from the paper recipe of the architecture
(:data:`RECIPES`), so a sweep that says nothing about the optimiser still trains
WRN with Nesterov and weight decay 5e-4, and ResNet with 1e-4 and /10 steps.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

ARCHS = ("wrn", "resnet", "preact_resnet", "diracnet")

# Paper recipes. Milestones are fractions of the total epochs, so one recipe
# serves a 200-epoch paper run and a 5-epoch smoke run alike.
RECIPES: dict[str, dict[str, Any]] = {
    # Zagoruyko & Komodakis 2016, section 4: SGD Nesterov 0.9, lr 0.1, wd 5e-4,
    # batch 128, lr x0.2 at epochs 60/120/160 of 200 (30%/60%/80%).
    "wrn": dict(nesterov=True, weight_decay=5e-4, milestones=(0.3, 0.6, 0.8), gamma=0.2),
    # He et al. 2015, section 4.2: momentum 0.9 (no Nesterov), wd 1e-4, lr /10
    # at 32k and 48k of 64k iterations (50%/75%).
    "resnet": dict(nesterov=False, weight_decay=1e-4, milestones=(0.5, 0.75), gamma=0.1),
    # He et al. 2016 (identity mappings) train CIFAR as in the 2015 paper.
    "preact_resnet": dict(nesterov=False, weight_decay=1e-4, milestones=(0.5, 0.75), gamma=0.1),
    # Zagoruyko & Komodakis 2017 reuse the WRN recipe for CIFAR.
    "diracnet": dict(nesterov=True, weight_decay=5e-4, milestones=(0.3, 0.6, 0.8), gamma=0.2),
}

# Model hyperparameters each architecture's builder accepts (see trainables.models).
MODEL_HPARAMS: dict[str, tuple[str, ...]] = {
    "wrn": ("depth", "width", "dropout"),
    "resnet": ("depth", "width", "shortcut"),
    "preact_resnet": ("depth", "width"),
    "diracnet": ("depth", "width", "variant"),
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything one trial needs; immutable so a run can be re-run from its log."""

    arch: str  # one of ARCHS
    depth: int  # total layers as the paper counts them (WRN-28-10 -> 28)
    width: int = 1  # channel multiplier k: stage widths 16k/32k/64k
    dropout: float = 0.0  # WRN only: element-wise dropout between the two 3x3 convs
    shortcut: str = "A"  # ResNet only: "A" zero-pad identity, "B" 1x1 conv + BN projection
    variant: str = "v2"  # DiracNet only: "v1" NCReLU + scalar alpha/beta, "v2" per-channel
    dataset: str = "cifar10"  # cifar10 | cifar100 | digits | synthetic
    data_root: str | None = None  # CIFAR cache folder; None -> ~/.cache/wrnsweep
    download: bool = False  # CIFAR is fetched only when asked
    synthetic_size: int = 2048  # training images of the synthetic set
    epochs: int = 200
    batch_size: int = 128  # images per SGD step, as in every seed paper
    eval_batch_size: int = 1024  # evaluation has no gradients: larger batches are cheaper
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # L2 on every parameter, as the papers do
    milestones: tuple[float, ...] = (0.3, 0.6, 0.8)  # fractions of `epochs`, ascending
    gamma: float = 0.2  # lr multiplier at each milestone
    warmup_epochs: int = 0  # linear warm-up from lr/10, in epochs
    label_smoothing: float = 0.0
    seed: int = 0  # seeds init, data order, augmentation and dropout
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU: fp32 there)
    channels_last: bool = True  # NHWC on CUDA: faster convs on tensor cores
    compile: bool = False  # torch.compile the model (CUDA only; minutes of warm-up)
    num_threads: int | None = None  # CPU threads; None -> every core the process may use
    gpu_memory_fraction: float | None = None  # cap for a trial sharing a GPU
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept for the log

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {list(ARCHS)}, got arch={self.arch!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got epochs={self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got batch_size={self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got lr={self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got weight_decay={self.weight_decay}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got gamma={self.gamma}")
        ms = self.milestones
        if any(not 0 < m < 1 for m in ms) or any(a >= b for a, b in itertools.pairwise(ms)):
            raise ValueError(
                "milestones must be strictly increasing fractions of the epochs in (0, 1), "
                f"got milestones={list(ms)}"
            )
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(
                f"label_smoothing must be in [0, 1), got label_smoothing={self.label_smoothing}"
            )
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                f"warmup_epochs must be in [0, epochs), got warmup_epochs={self.warmup_epochs}"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a flat dict, filling unspecified recipe fields from the paper.

        Keys that are not fields are kept in ``extra`` (a Tune config may carry
        bookkeeping keys) rather than silently dropped.
        """
        arch = values.get("arch")
        merged: dict[str, Any] = dict(RECIPES.get(arch, {})) if isinstance(arch, str) else {}
        names = {f.name for f in dataclasses.fields(cls)}
        extra: dict[str, Any] = {}
        for key, value in values.items():
            if value is None and key in RECIPES.get(arch, {}):
                continue  # None means "the paper's value"
            if key in names and key != "extra":
                merged[key] = value
            else:
                extra[key] = value
        if "milestones" in merged:
            merged["milestones"] = tuple(float(m) for m in merged["milestones"])
        return cls(**merged, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; ``TrainConfig.from_dict(c.to_dict()) == c``."""
        out = dataclasses.asdict(self)
        out["milestones"] = list(self.milestones)
        if not out["extra"]:
            out.pop("extra")
        return out

    def model_hparams(self) -> dict[str, Any]:
        """The keyword arguments of ``build_model`` for this architecture."""
        return {name: getattr(self, name) for name in MODEL_HPARAMS[self.arch]}

    def milestone_epochs(self) -> list[int]:
        """Milestones as epoch indices: the lr changes at the start of these epochs."""
        return [max(1, round(m * self.epochs)) for m in self.milestones]
