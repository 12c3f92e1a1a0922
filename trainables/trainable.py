"""The Ray Tune function trainable: a thin adapter over :class:`trainables.engine.Trainer`.

Tune hands each trial a config dict; this module turns it into a frozen
:class:`TrainConfig`, restores from ``ray.tune.get_checkpoint()`` when the trial
is retried or resumed, and reports the DESIGN.md metrics once per epoch with a
checkpoint (``ray.tune.report``: ``ray.train.report`` fails a Tune trial on Ray
2.60). The last report also carries ``test_acc``.

Search spaces namespace hyperparameters by architecture (``wrn.depth``,
``resnet.depth``) because Optuna allows one distribution per name; the prefix is
stripped here, so the engine only ever sees ``depth``.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

from ray import tune

from trainables.config import TrainConfig
from trainables.data import Splits
from trainables.engine import Trainer, load_checkpoint, save_checkpoint
from trainables.result import DIVERGED_VAL_LOSS, EpochResult


def trial_config(config: dict[str, Any]) -> dict[str, Any]:
    """Flat TrainConfig keys from a Tune config: strip ``<arch>.`` prefixes.

    Keys namespaced for another architecture cannot occur in a define-by-run
    space, but are dropped rather than trusted if they do.
    """
    arch = config.get("arch")
    out: dict[str, Any] = {}
    for key, value in config.items():
        prefix, dot, name = key.partition(".")
        if not dot:
            out.setdefault(key, value)
        elif prefix == arch:
            out[name] = value  # the namespaced value wins over a shared constant
    return out


def _trial_threads() -> int | None:
    """CPUs Ray gave this trial, so torch does not oversubscribe the node."""
    try:
        resources = tune.get_context().get_trial_resources()
        cpus = resources.required_resources.get("CPU", 0)
    except Exception:  # outside a Tune session (unit tests calling the function)
        return None
    return max(1, math.floor(cpus)) if cpus else None


def _trial_gpu_fraction() -> float | None:
    try:
        gpus = tune.get_context().get_trial_resources().required_resources.get("GPU", 0)
    except Exception:
        return None
    return gpus if 0 < gpus < 1 else None


class InjectedFailure(RuntimeError):
    """Raised on purpose by the fault-injection hook (see :func:`_maybe_fail`)."""


def _maybe_fail(arch: str, next_epoch: int, restored: bool) -> None:
    """Fault injection for testing recovery on a real cluster; inert unless configured.

    ``WRNSWEEP_FAIL_AT_EPOCH=E`` makes a trial raise before training epoch E; by
    default only on its first attempt (a retry restored from a checkpoint goes
    on), with ``WRNSWEEP_FAIL_ALWAYS=1`` on every attempt. ``WRNSWEEP_FAIL_ARCH``
    limits it to one architecture. Set on the nodes, never in a sweep file.
    """
    at = os.environ.get("WRNSWEEP_FAIL_AT_EPOCH")
    if not at or next_epoch != int(at):
        return
    if os.environ.get("WRNSWEEP_FAIL_ARCH", arch) != arch:
        return
    if restored and os.environ.get("WRNSWEEP_FAIL_ALWAYS") != "1":
        return
    raise InjectedFailure(f"injected failure before epoch {next_epoch} (WRNSWEEP_FAIL_AT_EPOCH)")


def _maybe_oom() -> None:
    """Fault injection for the OOM escalation test; inert unless configured.

    ``WRNSWEEP_OOM_BELOW_SHARE=S`` makes a trial that holds less than S of a GPU
    raise CUDA's out-of-memory error, as a trial whose share is too small would
    (a CPU-only machine cannot run out of GPU memory). Set on the nodes only.
    """
    below = os.environ.get("WRNSWEEP_OOM_BELOW_SHARE")
    if not below:
        return
    try:
        gpus = tune.get_context().get_trial_resources().required_resources.get("GPU", 0)
    except Exception:  # outside a Tune session
        return
    if gpus < float(below):
        import torch

        raise torch.cuda.OutOfMemoryError(
            f"CUDA out of memory (injected by WRNSWEEP_OOM_BELOW_SHARE={below} at a share "
            f"of {gpus:g} GPU)")


def train_trial(config: dict[str, Any], splits: Splits | None = None) -> None:
    """Run one trial; ``splits`` arrives through ``tune.with_parameters`` (object store)."""
    values = trial_config(config)
    values.setdefault("num_threads", _trial_threads())
    values.setdefault("gpu_memory_fraction", _trial_gpu_fraction())
    cfg = TrainConfig.from_dict(values)
    trainer = Trainer(cfg, splits=splits)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load_state_dict(load_checkpoint(folder))
    while trainer.epoch < cfg.epochs:
        _maybe_fail(cfg.arch, trainer.epoch + 1, restored=checkpoint is not None)
        _maybe_oom()
        result = trainer.run_epoch()
        if result.diverged:
            tune.report(EpochResult(
                epoch=trainer.epoch + 1, total_epochs=cfg.epochs, diverged=True,
                metrics={"val_acc": 0.0, "val_loss": DIVERGED_VAL_LOSS,
                         "lr": result.metrics["lr"]},
                num_params=trainer.num_params).report())
            return
        last = trainer.epoch == cfg.epochs
        report = EpochResult(epoch=trainer.epoch, total_epochs=cfg.epochs,
                             metrics=result.metrics, num_params=trainer.num_params,
                             test_acc=trainer.test_accuracy() if last else None).report()
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(trainer.state_dict(), folder)
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(folder))
