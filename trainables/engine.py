"""The training engine: one configuration, one device, no Ray.

The Ray trainable (``trainables.trainable``) and ``wrnsweep train`` are thin
adapters over :class:`Trainer`. Everything that decides *how* a model runs lives
here, not in the model code: device, bf16 autocast and channels_last on CUDA,
fp32 with a bounded thread count on CPU, optional ``torch.compile``.

Resuming is exact: a checkpoint holds the model, optimiser, epoch count and the
RNG state, and the data loader derives its shuffling and augmentation from
(seed, epoch) alone, so training to epoch k, saving, loading and training on to n
gives the same weights as training to n straight (``tests/test_engine.py``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from trainables.config import TrainConfig
from trainables.data import Loader, Split, Splits, load_splits
from trainables.models import build_model, count_params

DIVERGENCE_CHECK_STEPS = 50  # a host sync every 50 steps costs nothing measurable


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


def lr_at(epoch: int, cfg: TrainConfig) -> float:
    """Learning rate for 0-based ``epoch``: linear warm-up, then step decay.

    During warm-up the rate rises linearly from lr/10 to lr; afterwards it is
    multiplied by ``gamma`` once for every milestone epoch already reached
    (``MultiStepLR`` semantics, as a pure function that needs no state to resume).
    """
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (0.1 + 0.9 * epoch / cfg.warmup_epochs)
    passed = sum(1 for m in cfg.milestone_epochs() if epoch >= m)
    return cfg.lr * cfg.gamma**passed


def resolve_device(name: str) -> torch.device:
    """``auto`` picks the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} was asked for but CUDA is not available")
    return device


def cpu_threads_available() -> int:
    """CPUs this process may run on (respects affinity masks set by Ray or taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class EpochResult:
    metrics: dict[str, float]
    diverged: bool = False


class Trainer:
    """Model, optimiser and loaders for one :class:`TrainConfig`.

    ``Trainer(cfg)`` builds everything; :meth:`run_epoch` trains and validates
    one epoch; :meth:`state_dict` / :meth:`load_state_dict` checkpoint it.
    """

    def __init__(self, cfg: TrainConfig, *, splits: Splits | None = None) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.cuda = self.device.type == "cuda"
        if cfg.num_threads:
            # Torch would otherwise use every core, starving trials that share a node.
            torch.set_num_threads(cfg.num_threads)
        if self.cuda and cfg.gpu_memory_fraction:
            # Fractional GPUs in Ray are a count, not a memory limit: enforce the share.
            torch.cuda.set_per_process_memory_fraction(cfg.gpu_memory_fraction, self.device)
        self.splits = splits or load_splits(
            cfg.dataset, root=cfg.data_root, download=cfg.download,
            synthetic_size=cfg.synthetic_size,
        )
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.arch, num_classes=self.splits.spec.num_classes,
                            **cfg.model_hparams())
        self.num_params = count_params(model)
        self.channels_last = self.cuda and cfg.channels_last
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=memory_format)
        # Compiled and eager modules share parameters; checkpoints use the eager one.
        # On CUDA with CUDA graphs ("reduce-overhead"): a small network's step at batch
        # 128 is bound by kernel launches, not the GPU (ResNet-20 on an H200: 376
        # launches, 12.9 ms of host time against 2.2 ms of GPU time a step, under the
        # profiler); with graphs it ran 39,626 images/s against 15,681 eager in the same
        # run, and torch.compile without graphs did not help (README "On a GPU",
        # bench/results/h200-train_throughput_graphs.log and -_compile.log).
        self.forward: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(self.model, mode="reduce-overhead" if self.cuda else None)
            if cfg.compile else self.model  # type: ignore[assignment]
        )
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
            nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
        )
        self.autocast_dtype = torch.bfloat16 if (self.cuda and cfg.amp) else None
        loader_args = dict(device=self.device, channels_last=self.channels_last, seed=cfg.seed)
        train = self.splits.train
        if cfg.train_on == "train+val":  # the papers' setting: nothing left to validate on
            train = Split(torch.cat([train.images, self.splits.val.images]),
                          torch.cat([train.labels, self.splits.val.labels]))
        self.train_loader = Loader(train, self.splits.spec, train=True,
                                   batch_size=cfg.batch_size, **loader_args)
        self.val_loader = None if cfg.train_on == "train+val" else Loader(
            self.splits.val, self.splits.spec, train=False, batch_size=cfg.eval_batch_size,
            **loader_args)
        self.test_loader = Loader(self.splits.test, self.splits.spec, train=False,
                                  batch_size=cfg.eval_batch_size, **loader_args)
        self.epoch = 0  # epochs completed
        self.best_val_acc = 0.0  # over the epochs run so far, kept across a resume

    # -- one epoch ---------------------------------------------------------------
    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_one_epoch(self) -> tuple[float, float, int]:
        """Train one epoch; returns (mean loss, accuracy, images). Raises DivergedError."""
        self.model.train()
        self.train_loader.set_epoch(self.epoch)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        seen = 0
        for step, (x, y) in enumerate(self.train_loader, start=1):  # x: (B, 3, 32, 32)
            with self._autocast():
                logits = self.forward(x)
                loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.detach().double() * y.numel()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.numel()
            if step % DIVERGENCE_CHECK_STEPS == 0 and not torch.isfinite(loss_sum):
                raise DivergedError(f"training loss is {loss_sum.item()} at epoch {self.epoch}")
        mean_loss = loss_sum.item() / max(seen, 1)
        if not math.isfinite(mean_loss):
            raise DivergedError(f"training loss is {mean_loss} at epoch {self.epoch}")
        return mean_loss, correct.item() / max(seen, 1), seen

    @torch.no_grad()
    def evaluate(self, loader: Loader) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) on ``loader``, in eval mode."""
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        seen = 0
        for x, y in loader:
            with self._autocast():
                logits = self.forward(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            seen += y.numel()
        return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1)

    def run_epoch(self) -> EpochResult:
        """Train and validate epoch ``self.epoch``; the metrics of DESIGN.md."""
        lr = lr_at(self.epoch, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        try:
            train_loss, train_acc, images = self.train_one_epoch()
        except DivergedError:
            return EpochResult({"lr": lr, "train_loss": float("nan")}, diverged=True)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        metrics = {"train_loss": train_loss, "train_acc": train_acc}
        if self.val_loader is not None:
            metrics["val_loss"], metrics["val_acc"] = self.evaluate(self.val_loader)
        self.epoch += 1
        return EpochResult({**metrics, "lr": lr, "epoch_seconds": seconds,
                            "images_per_second": images / seconds})

    def test_accuracy(self) -> float:
        """Accuracy on the test split: reported once, never used to choose."""
        return self.evaluate(self.test_loader)[1]

    # -- checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit; loadable with weights_only=True."""
        state: dict[str, Any] = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "best_val_acc": self.best_val_acc,
            "rng_cpu": torch.get_rng_state(),
            "config": self.cfg.to_dict(),
            "num_classes": self.splits.spec.num_classes,
        }
        if self.cuda:
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        # Checkpoints written before this field existed resume with 0: the next epoch sets it.
        self.best_val_acc = float(state.get("best_val_acc", 0.0))
        torch.set_rng_state(state["rng_cpu"])
        if self.cuda and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)


CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(state: dict[str, Any], folder: str | os.PathLike[str]) -> Path:
    """Write ``state`` to ``folder/checkpoint.pt`` atomically (tmp file + rename)."""
    path = Path(folder) / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint without unpickling code (``weights_only=True``)."""
    path = Path(folder)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    return torch.load(path, map_location="cpu", weights_only=True)


def train(
    cfg: TrainConfig,
    *,
    splits: Splits | None = None,
    state: dict[str, Any] | None = None,
    on_epoch: Callable[[int, dict[str, float], Trainer], None] | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` to ``cfg.epochs`` (from ``state`` when given); the final summary.

    ``on_epoch(epoch, metrics, trainer)`` runs after every epoch (1-based epoch).
    The summary has ``status`` ("finished" or "diverged"), ``epochs``,
    ``num_params``, ``best_val_acc``, ``test_acc`` (None when diverged).
    """
    trainer = Trainer(cfg, splits=splits)
    if state is not None:
        trainer.load_state_dict(state)
    while trainer.epoch < cfg.epochs:
        result = trainer.run_epoch()
        if result.diverged:
            return {"status": "diverged", "epochs": trainer.epoch, "num_params":
                    trainer.num_params, "best_val_acc": trainer.best_val_acc, "test_acc": None,
                    "trainer": trainer}
        trainer.best_val_acc = max(trainer.best_val_acc,
                                   result.metrics.get("val_acc", trainer.best_val_acc))
        if on_epoch is not None:
            on_epoch(trainer.epoch, result.metrics, trainer)
    return {"status": "finished", "epochs": trainer.epoch, "num_params": trainer.num_params,
            "best_val_acc": trainer.best_val_acc, "test_acc": trainer.test_accuracy(),
            "trainer": trainer}
