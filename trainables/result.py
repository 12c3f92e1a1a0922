"""What a trial reports, defined once: the trainable writes it, the driver reads it.

Every epoch a trial hands Ray Tune one flat dict (``ray.tune.report``). The
trainable builds it with :meth:`EpochResult.report`; the searcher, the terminal
progress, MLflow tracking and the final ranking read it back with
:meth:`EpochResult.parse` and ask it the same questions (:attr:`stopped_early`,
:func:`better`) instead of each computing the answer from raw keys.

No torch and no Ray here: the driver's read-only commands import it too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# Keys of the flat dict Tune carries (Tune adds its own, e.g. training_iteration).
EPOCH_KEY = "epoch"  # epochs completed, 1-based
TOTAL_EPOCHS_KEY = "total_epochs"  # the epochs the trial was configured for
DIVERGED_KEY = "diverged"  # 1 when the training loss became NaN/inf (the trial ends)
TEST_KEY = "test_acc"  # once, with the last epoch of a trial that ran to the end
PARAMS_KEY = "num_params"

# Per-epoch metrics (DESIGN.md): logged to MLflow at the epoch as their step.
EPOCH_METRICS = (
    "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_second",
)
# What a diverged trial reports as its validation loss: the searcher must learn the
# region is bad (a NaN would be dropped by Tune and Optuna alike), so a finite float.
DIVERGED_VAL_LOSS = 1e6

Mode = Literal["max", "min"]


def better(value: float, best: float | None, mode: str) -> bool:
    """Whether ``value`` beats ``best`` (None: nothing yet) in direction ``mode``."""
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def best_of(values: list[float], mode: str) -> float | None:
    """The best finite value of ``values`` in direction ``mode``; None if there is none."""
    finite = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not finite:
        return None
    return max(finite) if mode == "max" else min(finite)


@dataclass(frozen=True)
class EpochResult:
    """One epoch of one trial, as reported to Tune."""

    epoch: int  # epochs completed (1-based)
    total_epochs: int  # epochs configured; fewer at the end means the scheduler stopped it
    diverged: bool = False
    metrics: Mapping[str, float] = field(default_factory=dict)  # EPOCH_METRICS present
    num_params: int | None = None
    test_acc: float | None = None  # the last epoch of a trial that ran to the end

    def report(self) -> dict[str, Any]:
        """The flat dict for ``ray.tune.report``."""
        out: dict[str, Any] = {**self.metrics, EPOCH_KEY: self.epoch,
                               TOTAL_EPOCHS_KEY: self.total_epochs,
                               DIVERGED_KEY: int(self.diverged)}
        if self.num_params is not None:
            out[PARAMS_KEY] = self.num_params
        if self.test_acc is not None:
            out[TEST_KEY] = self.test_acc
        return out

    @classmethod
    def parse(cls, result: Mapping[str, Any]) -> EpochResult:
        """Read a dict Tune hands the driver (missing keys: an epoch-less result)."""
        epoch = result.get(EPOCH_KEY, result.get("training_iteration", 0))
        params = result.get(PARAMS_KEY)
        test = result.get(TEST_KEY)
        return cls(
            epoch=int(epoch or 0),
            total_epochs=int(result.get(TOTAL_EPOCHS_KEY) or 0),
            diverged=bool(result.get(DIVERGED_KEY)),
            metrics={k: result[k] for k in EPOCH_METRICS if result.get(k) is not None},
            num_params=None if params is None else int(params),
            test_acc=None if test is None else float(test),
        )

    @property
    def stopped_early(self) -> bool:
        """For a trial's last result: ended before its epochs without diverging (pruned)."""
        return not self.diverged and self.epoch < self.total_epochs
