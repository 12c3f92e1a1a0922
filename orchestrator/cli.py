"""The ``wrnsweep`` command line: a thin click layer over the library.

Exit codes: 0 success, 2 invalid input (a message, no traceback, nothing
started), 1 failure at run time. Heavy modules (torch, Ray, MLflow) are imported
inside the commands that need them so that ``wrnsweep --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click


class InvalidInput(click.UsageError):
    """Bad input: exit code 2 with a one-line message (click prints no traceback)."""

    exit_code = 2

    def show(self, file: Any = None) -> None:  # no "Usage:" block: the message says it all
        click.echo(f"Error: {self.format_message()}", err=True)


def _float_list(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated fractions such as 0.3,0.6,0.8, got {value!r}"
        ) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="wrnsweep")
def main() -> None:
    """Sweep CIFAR residual networks across GPUs with Ray Tune, Optuna and MLflow."""


@main.command()
@click.option("--arch", required=True,
              type=click.Choice(["wrn", "resnet", "preact_resnet", "diracnet"]),
              help="Architecture family.")
@click.option("--depth", type=int, required=True,
              help="Layers as the paper counts them: WRN/DiracNet 6n+4, ResNet 6n+2, "
                   "pre-act ResNet 9n+2.")
@click.option("--width", type=int, default=None, help="Width multiplier k (default 1).")
@click.option("--dropout", type=float, default=None, help="WRN dropout between the 3x3 convs.")
@click.option("--shortcut", type=click.Choice(["A", "B"]), default=None,
              help="ResNet shortcut: A zero-pad identity (paper), B 1x1 projection.")
@click.option("--variant", type=click.Choice(["v1", "v2"]), default=None,
              help="DiracNet variant: v1 NCReLU + scalar alpha/beta, v2 per-channel.")
@click.option("--dataset", type=click.Choice(["cifar10", "cifar100", "digits", "synthetic"]),
              default="digits", show_default=True,
              help="digits and synthetic need no download.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="CIFAR cache folder [default: ~/.cache/wrnsweep].")
@click.option("--download", is_flag=True, help="Download CIFAR into --data-root if missing.")
@click.option("--epochs", type=int, default=None, help="Training epochs [default: 200].")
@click.option("--batch-size", type=int, default=None, help="Images per step [default: 128].")
@click.option("--lr", type=float, default=None, help="Peak learning rate [default: 0.1].")
@click.option("--momentum", type=float, default=None, help="SGD momentum [default: 0.9].")
@click.option("--nesterov/--no-nesterov", default=None,
              help="Nesterov momentum [default: the paper's: on for WRN/DiracNet].")
@click.option("--weight-decay", type=float, default=None,
              help="L2 weight decay [default: 5e-4 WRN/DiracNet, 1e-4 ResNets].")
@click.option("--milestones", callback=_float_list, default=None,
              help="LR steps as fractions of the epochs, e.g. 0.3,0.6,0.8 [default: paper].")
@click.option("--gamma", type=float, default=None,
              help="LR factor at each milestone [default: 0.2 WRN/DiracNet, 0.1 ResNets].")
@click.option("--warmup-epochs", type=int, default=None, help="Linear warm-up epochs.")
@click.option("--label-smoothing", type=float, default=None, help="Label smoothing in [0, 1).")
@click.option("--seed", type=int, default=None, help="Seed for init, data order, dropout.")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N [default: auto].")
@click.option("--amp/--no-amp", default=None, help="bf16 autocast on CUDA [default: on].")
@click.option("--channels-last/--no-channels-last", default=None,
              help="NHWC memory format on CUDA [default: on].")
@click.option("--compile", "compile_", is_flag=True, default=None, help="torch.compile the model.")
@click.option("--threads", type=int, default=None, help="CPU threads [default: all].")
@click.option("--out", type=click.Path(file_okay=False), default="runs/train", show_default=True,
              help="Folder for metrics.jsonl, config.json and checkpoint.pt.")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt.")
def train(out: str, resume: bool, compile_: bool | None, threads: int | None,
          **options: Any) -> None:
    """Train one configuration without Ray (progress per epoch, metrics as JSON lines).

    \b
    Example:
      wrnsweep train --arch wrn --depth 16 --width 2 --dropout 0.3 \\
                     --dataset synthetic --epochs 3 --out runs/x
    """
    from trainables.config import TrainConfig
    from trainables.models import check_hparams

    values = {k: v for k, v in options.items() if v is not None}
    values["download"] = options["download"] or False
    if compile_:
        values["compile"] = True
    if threads is not None:
        values["num_threads"] = threads
    try:
        cfg = TrainConfig.from_dict(values)
        check_hparams(cfg.arch, **cfg.model_hparams())
    except ValueError as err:
        raise InvalidInput(str(err)) from None
    folder = Path(out)
    state = _resume_state(folder, cfg) if resume else None
    _run_training(cfg, folder, state)


def _resume_state(folder: Path, cfg: Any) -> dict[str, Any]:
    from trainables.engine import CHECKPOINT_FILE, load_checkpoint

    path = folder / CHECKPOINT_FILE
    if not path.exists():
        raise InvalidInput(f"--resume: no checkpoint at {path}")
    state = load_checkpoint(path)
    if state["config"] != cfg.to_dict():
        raise InvalidInput(f"--resume: {path} was written by another configuration; "
                           "use the same options or another --out")
    return state


def _run_training(cfg: Any, folder: Path, state: dict[str, Any] | None) -> None:
    from trainables.data import load_splits
    from trainables.engine import save_checkpoint, train

    try:  # before anything is written: a missing dataset is bad input
        splits = load_splits(cfg.dataset, root=cfg.data_root, download=cfg.download,
                             synthetic_size=cfg.synthetic_size)
    except FileNotFoundError as err:
        raise InvalidInput(str(err)) from None
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    metrics_path = folder / "metrics.jsonl"
    click.echo(f"training {cfg.arch} depth={cfg.depth} width={cfg.width} on {cfg.dataset} "
               f"for {cfg.epochs} epochs -> {folder}")

    def on_epoch(epoch: int, metrics: dict[str, float], trainer: Any) -> None:
        with metrics_path.open("a") as f:
            f.write(json.dumps({"epoch": epoch, "time": time.time(), **metrics}) + "\n")
        save_checkpoint(trainer.state_dict(), folder)
        click.echo(
            f"epoch {epoch:>3}/{cfg.epochs}  train_loss {metrics['train_loss']:.4f}  "
            f"train_acc {metrics['train_acc']:.4f}  val_loss {metrics['val_loss']:.4f}  "
            f"val_acc {metrics['val_acc']:.4f}  lr {metrics['lr']:.4g}  "
            f"{metrics['images_per_second']:.0f} img/s"
        )

    summary = train(cfg, splits=splits, state=state, on_epoch=on_epoch)
    if summary["status"] == "diverged":
        click.echo(f"diverged: the training loss became NaN/inf at epoch "
                   f"{summary['epochs'] + 1}; try a lower --lr", err=True)
        sys.exit(1)
    click.echo(f"done: {summary['num_params']:,} parameters, best val_acc "
               f"{summary['best_val_acc']:.4f}, test_acc {summary['test_acc']:.4f}; "
               f"checkpoint {folder / 'checkpoint.pt'}")
