"""The ``wrnsweep`` command line: a thin click layer over the library.

Exit codes: 0 success, 2 invalid input (a message, no traceback, nothing
started), 1 failure at run time. Heavy modules (torch, Ray, MLflow) are imported
inside the commands that need them so that ``wrnsweep --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
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


def _hparam_options() -> list[click.Option]:
    """``--arch`` and one option per model hyperparameter, from the registry.

    Built when ``train`` is parsed or its help is shown (not at import: the
    registry loads plugins), so a registered family's hyperparameters appear
    without an edit here. Each help line gives every family's default and rule.
    """
    from trainables.models.registry import families, hparam_names

    options = [click.Option(["--arch"], required=True,
                            type=click.Choice([f.name for f in families()]),
                            help="Architecture family.")]
    for name in hparam_names():
        users = [(f, f.hparam(name)) for f in families() if name in f.hparam_names]
        first = users[0][1]
        groups: dict[str, list[str]] = {}  # "rule [default]" -> families
        for f, h in users:
            groups.setdefault(f"{h.rule_text + ' ' if h.rule_text else ''}[{h.default}]",
                              []).append(f.name)
        per_family = "; ".join(f"{', '.join(archs)}: {rule}" for rule, archs in groups.items())
        choices = sorted({c for _, h in users for c in h.choices})
        kind: Any = click.Choice(choices) if choices else first.kind
        text = f"{first.help[0].upper()}{first.help[1:]}. {per_family}."
        options.append(click.Option([f"--{name.replace('_', '-')}", name], type=kind,
                                    default=None, help=text))
    return options


class _ZooCommand(click.Command):
    """A command whose model options come from the architecture registry."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        return [*_hparam_options(), *params]


@main.command(cls=_ZooCommand)
@click.option("--dataset", type=click.Choice(["cifar10", "cifar100", "digits", "synthetic"]),
              default="digits", show_default=True,
              help="digits and synthetic need no download.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="CIFAR cache folder [default: $XDG_CACHE_HOME/wrnsweep, else "
                   "~/.cache/wrnsweep].")
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
@click.option("--force", is_flag=True,
              help="Start over in an OUT that holds a run (its metrics and checkpoint go).")
def train(out: str, resume: bool, force: bool, compile_: bool | None, threads: int | None,
          **options: Any) -> None:
    """Train one configuration without Ray (progress per epoch, metrics as JSON lines).

    \b
    Example:
      wrnsweep train --arch wrn --depth 16 --width 2 --dropout 0.3 \\
                     --dataset synthetic --epochs 3 --out runs/x
    """

    values = {k: v for k, v in options.items() if v is not None}
    values["download"] = options["download"] or False
    if compile_:
        values["compile"] = True
    if threads is not None:
        values["num_threads"] = threads
    try:
        cfg = _train_config(values)
    except ValueError as err:
        raise InvalidInput(str(err)) from None
    folder = Path(out)
    if resume and force:
        raise InvalidInput("--resume and --force exclude each other: continue the run in "
                           f"{folder}, or start over")
    run_files = [folder / name for name in TRAIN_FILES if (folder / name).exists()]
    if run_files and not (resume or force):
        raise InvalidInput(f"--out {folder} already holds a run ({run_files[0].name}): "
                           "--resume continues it, --force starts over, or give another --out")
    state = _resume_state(folder, cfg) if resume else None
    _run_training(cfg, folder, state, remove=run_files if force else [])


# What `wrnsweep train` writes in --out (config.json, metrics.jsonl, checkpoint.pt).
TRAIN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt")


def _train_config(values: dict[str, Any]) -> Any:
    """TrainConfig from train's options; a hyperparameter of another family is an error."""
    from trainables.config import TrainConfig
    from trainables.models.registry import get_family, hparam_names

    family = get_family(values["arch"])
    foreign = [n for n in hparam_names() if n in values and n not in family.hparam_names]
    if foreign:
        options = ", ".join(f"--{n.replace('_', '-')}" for n in foreign)
        raise ValueError(f"{options} is not a hyperparameter of {family.name} "
                         f"({family.name} takes {', '.join(family.hparam_names)})")
    return TrainConfig.from_dict(values)


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


def _run_training(cfg: Any, folder: Path, state: dict[str, Any] | None,
                  remove: list[Path]) -> None:
    from trainables.data import load_splits
    from trainables.engine import save_checkpoint, train

    try:  # before anything is written: a missing dataset is bad input
        splits = load_splits(cfg.dataset, root=cfg.data_root, download=cfg.download,
                             synthetic_size=cfg.synthetic_size)
    except FileNotFoundError as err:
        raise InvalidInput(str(err)) from None
    for path in remove:  # --force: only the files a run of `train` writes
        path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    metrics_path = folder / "metrics.jsonl"
    shown = " ".join(f"{k}={v}" for k, v in cfg.model_hparams().items())
    click.echo(f"training {cfg.arch} {shown} on {cfg.dataset} "
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


# -- sweeps ---------------------------------------------------------------------------
def _load_sweep_or_exit(path: str) -> Any:
    from orchestrator.config import ConfigError, load_sweep

    try:
        return load_sweep(path)
    except ConfigError as err:
        raise InvalidInput(f"invalid sweep file\n{err}") from None


def _run_sweep(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Map the sweep's errors onto exit codes: 2 for input, 1 for failures at run time."""
    from orchestrator.jobs import use_token_if_present

    use_token_if_present()  # before Ray is imported: joining a Ray 2.60 cluster needs it
    from orchestrator.config import ConfigError
    from orchestrator.sweep import SweepError, SweepInterrupted
    from orchestrator.trust import TrustError

    try:
        with _tracking_errors():  # and a store that fails mid-way (a server went away)
            return fn(*args, **kwargs)
    except (ConfigError, TrustError) as err:  # TrustError: a signing key others can read
        raise InvalidInput(str(err)) from None
    except SweepInterrupted as err:
        click.echo(f"Error: {err}", err=True)
        sys.exit(130)  # the shell's code for "ended by SIGINT"
    except SweepError as err:
        raise click.ClickException(str(err)) from None


def _from_environment(param: str) -> bool:
    """Whether ``param`` of the running command came from its environment variable."""
    ctx = click.get_current_context(silent=True)
    return ctx is not None and \
        ctx.get_parameter_source(param) is click.core.ParameterSource.ENVIRONMENT


def _check_store(tracking_uri: str) -> None:
    """Refuse a local tracking store that does not exist, before MLflow creates an empty one.

    Read-only commands (best, report, ui, export) pointed at a mistyped SQLite path
    would otherwise create the database, print MLflow's schema messages and then
    find nothing.
    """
    from orchestrator.store import StoreMovedError, local_store_path, relocate_store

    path = local_store_path(tracking_uri)
    if path is not None and not path.exists():
        raise InvalidInput(f"{tracking_uri}: no such tracking store ({path} does not exist)")
    if path is not None and (path.parent / "wrnsweep.json").exists():
        try:  # a sweep folder's own store, maybe moved: re-point it at its artifacts
            relocate_store(path)
        except StoreMovedError as err:
            raise InvalidInput(str(err)) from None


@contextlib.contextmanager
def _tracking_errors(*, missing_is_input: bool = False) -> Iterator[None]:
    """A tracking store's failures as one line (exit 1), a sweep folder's as bad input (2).

    ``missing_is_input``: MLflow's "does not exist" (an unknown model, alias or run
    named on the command line) is bad input too. MLflow's HTTP retries are turned off
    first (as for a sweep): an unreachable server fails in seconds, not minutes.
    """
    from orchestrator.store import tracking_env
    from orchestrator.sweep import SweepInputError

    tracking_env()
    try:
        yield
    except SweepInputError as err:
        raise InvalidInput(str(err)) from None
    except click.ClickException:
        raise  # already the command's answer (and MLflow need not be imported to say so)
    except Exception as err:
        from mlflow.exceptions import MlflowException

        from orchestrator.store import error_line

        if not isinstance(err, MlflowException):
            raise
        first = error_line(err)
        if missing_is_input and getattr(err, "error_code", None) in (
                "RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise InvalidInput(first) from None
        raise click.ClickException(first) from None


def _address_form(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    from orchestrator.config.targets import address_problem

    problem = value and address_problem(value)
    if problem:
        raise InvalidInput(f"--address: {problem}")
    return value


address_option = click.option(
    "--address", default=None, callback=_address_form,
    help="Ray cluster to join: auto, HOST:6379 or ray://HOST:10001 [default: start a local "
         "Ray, or join RAY_ADDRESS when it names a cluster].")
tracking_option = click.option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
    help="MLflow tracking URI, e.g. http://HOST:5000 [default: SQLite in the sweep folder; "
         "env MLFLOW_TRACKING_URI].")


def _refused(problems: list[str]) -> str:
    return "a launch would be refused:\n" + "\n".join(problems) if len(problems) > 1 \
        else problems[0]


@main.command()
@click.argument("sweep_files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@address_option
def validate(sweep_files: tuple[str, ...], address: str | None) -> None:
    """Check sweep files without starting anything (exit 2 with FILE:LINE: key: message).

    Every file is checked and every problem printed; the exit code is 2 if any
    file is bad. Beyond the file itself, what a launch from here would refuse
    (see orchestrator/preflight.py): with no cluster to join (no --address,
    ray.address or RAY_ADDRESS) every trial must fit this machine.
    """
    from orchestrator.config import ConfigError, load_sweep
    from orchestrator.preflight import preflight

    bad = 0
    for sweep_file in sweep_files:
        try:
            cfg = load_sweep(sweep_file)
        except ConfigError as err:
            click.echo(f"Error: invalid sweep file\n{err}", err=True)
            bad += 1
            continue
        problems = preflight(cfg, address=address)
        if problems:
            click.echo(f"Error: {_refused(problems)}", err=True)
            bad += 1
            continue
        click.echo(f"{sweep_file}: ok ({', '.join(cfg.arch_names())}; "
                   f"{cfg.search.num_samples} trials)")
    if bad and len(sweep_files) > 1:
        raise InvalidInput(f"{bad} of {len(sweep_files)} sweep files are invalid")
    if bad:
        sys.exit(2)  # the file's problems are printed above


@main.command()
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@address_option
@click.option("--storage", default=None,
              help="Where results and checkpoints go: a folder or s3:// / gs:// URI "
                   "[default: ray.storage_path, else ./runs].")
@tracking_option
@click.option("--num-samples", type=int, default=None, help="Trials to run (overrides the file).")
@click.option("--name", default=None, help="Sweep name (overrides the file's `name`).")
@click.option("--dry-run", is_flag=True, help="Print the resolved manifest; start nothing.")
def launch(sweep_file: str, address: str | None, storage: str | None,
           tracking_uri: str | None, num_samples: int | None, name: str | None,
           dry_run: bool) -> None:
    """Run the sweep in SWEEP_FILE: Optuna + scheduler on Ray Tune, tracked in MLflow."""
    from orchestrator.preflight import preflight
    from orchestrator.sweep import describe_plan, make_manifest
    from orchestrator.sweep import launch as run_launch

    cfg = _load_sweep_or_exit(sweep_file)
    manifest = _run_sweep(make_manifest, cfg, sweep_file=sweep_file, address=address,
                          storage=storage, tracking_uri=tracking_uri, num_samples=num_samples,
                          name=name)
    # What the launch would refuse once Ray runs, refused before: dry run or not.
    problems = preflight(cfg, address=address, storage=storage, tracking_uri=tracking_uri,
                         tracking_from_env=_from_environment("tracking_uri"))
    if problems:
        raise InvalidInput(_refused(problems))
    if dry_run:
        click.echo(describe_plan(cfg, manifest))
        return
    _run_sweep(run_launch, cfg, manifest, echo=click.echo)


trust_option = click.option(
    "--trust", is_flag=True,
    help="Continue a folder this user's wrnsweep did not sign (someone else's, or changed "
         "since): you vouch for it, since Tune unpickles its state, which runs any code it "
         "holds. The folder is signed as it is, so later commands need no --trust.")


@main.command()
@click.argument("sweep_dir", type=click.Path(file_okay=False))
@address_option
@trust_option
def resume(sweep_dir: str, address: str | None, trust: bool) -> None:
    """Continue an interrupted sweep from its folder (<storage>/<name>).

    A finished sweep is left as it is (exit 0). Only a folder this user's wrnsweep
    signed is resumed without --trust (see "Trust and safety" in the README).
    """
    from orchestrator.sweep import resume as run_resume

    _run_sweep(run_resume, sweep_dir, echo=click.echo, address=address, trust=trust)


@main.command()
@click.argument("sweep_dir", type=click.Path(file_okay=False))
@click.option("--num-samples", type=int, required=True, help="Trials to add.")
@address_option
@trust_option
def extend(sweep_dir: str, num_samples: int, address: str | None, trust: bool) -> None:
    """Add trials to a finished sweep: same Optuna study, same MLflow parent run."""
    from orchestrator.sweep import extend as run_extend

    if num_samples < 1:
        raise InvalidInput(f"--num-samples must be >= 1, got {num_samples}")
    if not Path(sweep_dir).is_dir():
        raise InvalidInput(f"{sweep_dir}: no such sweep folder")
    _run_sweep(run_extend, sweep_dir, num_samples, echo=click.echo, address=address,
               trust=trust)


@main.command("confirm")
@click.argument("sweep_dir", type=click.Path(file_okay=False))
@click.option("--top", type=int, default=3, show_default=True,
              help="Configurations to confirm: the search's best by its validation metric.")
@click.option("--seeds", type=int, default=5, show_default=True,
              help="Runs of each configuration, each with a new seed.")
@click.option("--epochs", type=int, default=None,
              help="Epochs of each run [default: each configuration's own].")
@click.option("--train-on", "train_on", default="train", show_default=True,
              help="train: the 45k/5k split (validation kept); train+val: all 50k "
                   "training images, as the papers (no validation metric then).")
@address_option
@trust_option
def confirm_command(sweep_dir: str, top: int, seeds: int, epochs: int | None, train_on: str,
                    address: str | None, trust: bool) -> None:
    """Re-train the search's best configurations with several seeds; mean ± std, median.

    Each of the top configurations of the finished sweep in SWEEP_DIR trains again
    from scratch with --seeds new seeds, as Ray Tune trials with the sweep's
    resources, tracked as child runs of the sweep's parent run. The statistics go
    to the parent run; the configuration with the best mean validation accuracy is
    registered (its seed closest to the median) as the champion. Resumable with
    `wrnsweep resume SWEEP_DIR`.
    """
    from orchestrator.confirm import ConfirmInputError, ConfirmSpec

    spec = ConfirmSpec(top=top, seeds=seeds, epochs=epochs, train_on=train_on)
    try:
        spec.check()
    except ConfirmInputError as err:
        raise InvalidInput(str(err)) from None
    if not Path(sweep_dir).is_dir():
        raise InvalidInput(f"{sweep_dir}: no such sweep folder")
    from orchestrator.confirm_round import confirm

    _run_sweep(confirm, sweep_dir, spec, echo=click.echo, address=address, trust=trust)


def _manifest_for(target: str, tracking_uri: str | None) -> Any:
    """A sweep folder's manifest, or that of a sweep name looked up in MLflow at
    ``tracking_uri`` (the record its launch logged on the parent run)."""
    from orchestrator.manifest import Manifest, ManifestError

    if Path(target).is_dir():
        try:
            manifest = Manifest.load(target)
        except ManifestError as err:
            raise InvalidInput(str(err)) from None
        # The folder records where its runs are: an MLFLOW_TRACKING_URI exported for
        # other work must not redirect it (an explicit --tracking-uri does: a moved store).
        if tracking_uri and not _from_environment("tracking_uri"):
            manifest = manifest.replace(tracking_uri=tracking_uri)
        _check_store(manifest.tracking_uri)  # a deleted mlflow.db is not made again, empty
        return manifest
    if not tracking_uri:
        raise InvalidInput(f"{target}: no such sweep folder (give a folder, or a sweep name "
                           "with --tracking-uri)")
    from orchestrator.config import SWEEP_NAME, SWEEP_NAME_RULE

    if not SWEEP_NAME.fullmatch(target):
        raise InvalidInput(f"{target}: no such sweep folder, and not a sweep name (names "
                           f"match {SWEEP_NAME_RULE})")
    _check_store(tracking_uri)
    from orchestrator.store import SWEEP_TAG, logged_manifest, mlflow_client

    client = mlflow_client(tracking_uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`{SWEEP_TAG}` = '{target}' and tags.`mlflow.runName` = '{target}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise InvalidInput(f"no sweep named {target!r} at {tracking_uri}")
    try:
        manifest = logged_manifest(client, runs[0].info.run_id)
    except ManifestError as err:
        raise InvalidInput(f"sweep {target!r} at {tracking_uri}: {err}") from None
    # Its store is the one it was found in, under whatever URI this machine uses for it.
    return manifest.replace(tracking_uri=tracking_uri)


@main.command()
@click.argument("target")
@click.option("--top", "top", type=int, default=None, help="Show the best K trials only.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@tracking_option
def best(target: str, top: int | None, as_json: bool, tracking_uri: str | None) -> None:
    """Leaderboard of a sweep from MLflow; TARGET is a sweep folder or a sweep name."""
    from orchestrator.leaderboard import format_table, leaderboard
    from orchestrator.store import mlflow_client

    if top is not None and top < 1:
        raise InvalidInput(f"--top must be >= 1, got {top}")
    from orchestrator.confirm import format_summary, leaderboard_rows_with, read_summary

    with _tracking_errors():
        manifest = _manifest_for(target, tracking_uri)
        client = mlflow_client(manifest.tracking_uri)
        rows = leaderboard(client, manifest, top=top)
        confirmed = read_summary(client.get_run(manifest.parent_run_id).data.tags)
    if as_json:
        click.echo(json.dumps(leaderboard_rows_with(rows, confirmed), indent=2))
        return
    click.echo(format_table(rows, manifest.metric))
    if confirmed:
        click.echo("\n" + format_summary(confirmed))


@main.command()
@click.argument("target")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for report.html, report.json and the PNGs [default: "
                   "<sweep folder>/report, or ./report-NAME for a sweep name].")
@tracking_option
def report(target: str, out: str | None, tracking_uri: str | None) -> None:
    """Self-contained HTML report of a sweep from MLflow, also logged to its parent run.

    TARGET is a sweep folder or a sweep name (with --tracking-uri). The page has the
    leaderboard with GPU-hours, learning curves, accuracy against parameters with the
    Pareto front (and the papers' points for CIFAR), parallel coordinates and
    hyperparameter importances (Optuna fANOVA).
    """
    from orchestrator.report import ARTIFACT_DIR, write_report
    from orchestrator.store import mlflow_client

    with _tracking_errors():  # an unreachable store, a deleted run: one line, exit 1
        manifest = _manifest_for(target, tracking_uri)
        folder = Path(out) if out else (Path(target) / "report" if Path(target).is_dir()
                                        else Path(f"report-{manifest.name}"))
        result = write_report(mlflow_client(manifest.tracking_uri), manifest, folder)
    click.echo(f"report written to {result.html.resolve()} ({len(result.figures)} figures "
               f"beside it); logged to run {manifest.parent_run_id} under {ARTIFACT_DIR}/")


@main.command(name="ui")
@click.argument("target")
@click.option("--port", type=int, default=5000, show_default=True,
              help="Port of the UI (checked free before anything starts).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; 0.0.0.0 shows the store to the whole network.")
@tracking_option
def ui_command(target: str, port: int, host: str, tracking_uri: str | None) -> None:
    """MLflow UI for a sweep; TARGET is a sweep folder or a sweep name (--tracking-uri).

    A local store (the sweep folder's SQLite by default) gets `mlflow server` from this
    environment until Ctrl-C; a sweep tracked on an MLflow server gets that server's
    URL, nothing started. Either way it prints the URL of the sweep's runs.
    """
    from orchestrator import ui

    with _tracking_errors():  # the server to look the name up in failed: one line, exit 1
        manifest = _manifest_for(target, tracking_uri)
    if ui.is_server(manifest.tracking_uri):
        click.echo(f"MLflow UI: {ui.experiment_url(manifest.tracking_uri, manifest.experiment_id)}")
        return
    try:
        code = ui.serve(manifest.tracking_uri, manifest.experiment_id, host=host, port=port,
                        echo=click.echo)
    except ValueError as err:
        raise InvalidInput(str(err)) from None
    except RuntimeError as err:
        raise click.ClickException(str(err)) from None
    if code != 0:
        raise click.ClickException(f"mlflow server exited with code {code}")


@main.command()
@click.argument("sweep_dir", type=click.Path(file_okay=False))
@click.option("--port", type=int, default=8080, show_default=True,
              help="Port of the dashboard (0: any free port; the URL printed says which).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; 0.0.0.0 shows the study to the whole network.")
def dashboard(sweep_dir: str, port: int, host: str) -> None:
    """optuna-dashboard for a sweep's Optuna study, read-only, until Ctrl-C.

    SWEEP_DIR is a sweep folder; its optuna-journal.jsonl holds every trial with its
    parameters, its value per epoch (pruned trials up to the rung that stopped them)
    and, as the user attribute wrnsweep.trial_id, the tag of its MLflow run. Requests
    that would change the study are refused (403): resume and extend read it.
    """
    if not Path(sweep_dir).is_dir():
        raise InvalidInput(f"{sweep_dir}: no such sweep folder")
    from orchestrator.search import serve_dashboard

    try:
        serve_dashboard(sweep_dir, host=host, port=port, echo=click.echo)
    except (FileNotFoundError, ValueError) as err:  # no study yet; a port in use
        raise InvalidInput(str(err)) from None


# -- cluster jobs -------------------------------------------------------------------------
jobs_address_option = click.option(
    "--address", envvar="RAY_ADDRESS", required=True,
    help="Ray Jobs API of the cluster's head, e.g. http://HEAD:8265 [env RAY_ADDRESS].")


def _jobs_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Connection problems and unknown job ids are user errors, not tracebacks.

    ``submit`` goes through Ray's client (it uploads a working directory), the other
    job commands through :class:`orchestrator.jobs.JobsApi`, without Ray.
    """
    from orchestrator.jobs import use_token_if_present

    use_token_if_present()  # must precede the first import of ray, which reads the mode
    errors: tuple[type[BaseException], ...] = (ConnectionError, ValueError, RuntimeError)
    if "ray" in sys.modules:  # Ray's client was used: its authentication error too
        from ray.exceptions import AuthenticationError

        errors = (*errors, AuthenticationError)
    try:
        return fn(*args, **kwargs)
    except errors as err:
        raise click.ClickException(str(err).strip().splitlines()[0]) from None


@main.command()
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@jobs_address_option
@click.option("--follow", is_flag=True, help="Stream the job's logs; exit with its outcome.")
@click.option("--storage", default=None,
              help="storage_path on the cluster: a shared folder or s3:// / gs:// URI.")
@click.option("--tracking-uri", default=None,
              help="MLflow tracking URI as seen from the cluster, e.g. http://mlflow:5000.")
@click.option("--num-samples", type=int, default=None, help="Trials to run (overrides the file).")
@click.option("--name", default=None, help="Sweep name (overrides the file's `name`).")
@click.option("--pip", multiple=True, help="Extra pip requirement for the job (repeatable).")
@click.option("--agent-wait", type=click.IntRange(min=0), default=300, show_default=True,
              metavar="SECONDS",
              help="How long to retry a head that answers 'No available agent to submit "
                   "job' (a starting head does for its first seconds).")
def submit(sweep_file: str, address: str, follow: bool, storage: str | None,
           tracking_uri: str | None, num_samples: int | None, name: str | None,
           pip: tuple[str, ...], agent_wait: int) -> None:
    """Submit SWEEP_FILE to a Ray cluster through the Jobs API (validated here first)."""
    from orchestrator import jobs

    _load_sweep_or_exit(sweep_file)
    if num_samples is not None and num_samples < 1:
        raise InvalidInput(f"--num-samples must be >= 1, got {num_samples}")
    from orchestrator.config import SWEEP_NAME, SWEEP_NAME_RULE

    if name is not None and not SWEEP_NAME.fullmatch(name):  # as launch checks it
        raise InvalidInput(f"--name must match {SWEEP_NAME_RULE}, got {name!r}")
    _, job_id = _jobs_call(jobs.submit, sweep_file, address=address, storage=storage,
                           tracking_uri=tracking_uri, num_samples=num_samples,
                           name=name, pip=pip, agent_wait=agent_wait)
    click.echo(f"submitted job {job_id} to {address}")
    if not follow:
        click.echo(f"follow it with: wrnsweep jobs logs {job_id} --address {address} --follow")
        return
    status = _jobs_call(jobs.follow, jobs.JobsApi(address), job_id, click.echo)
    click.echo(f"job {job_id}: {status}")
    if status != "SUCCEEDED":
        sys.exit(1)


@main.group(name="jobs")
def jobs_group() -> None:
    """List, inspect, follow and stop submitted sweeps."""


@jobs_group.command(name="list")
@jobs_address_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def jobs_list(address: str, as_json: bool) -> None:
    """Submitted sweeps on the cluster, newest first."""
    from orchestrator import jobs

    found = _jobs_call(lambda: jobs.JobsApi(address).list_jobs())
    rows = sorted((jobs.describe(j) for j in found
                   if (j.get("metadata") or {}).get("wrnsweep.sweep")),
                  key=lambda r: r["start"] or 0, reverse=True)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['job_id']}  {row['status']:<9}  {row['sweep']}")


@jobs_group.command(name="status")
@click.argument("job_id")
@jobs_address_option
def jobs_status(job_id: str, address: str) -> None:
    """Status of one job."""
    from orchestrator import jobs

    info = _jobs_call(lambda: jobs.JobsApi(address).get_job_info(job_id))
    row = jobs.describe(info)
    click.echo(f"{row['job_id']}: {row['status']}" + (f" ({row['message']})"
                                                      if row["message"] else ""))


@jobs_group.command(name="logs")
@click.argument("job_id")
@jobs_address_option
@click.option("--follow", is_flag=True, help="Keep streaming until the job ends.")
def jobs_logs(job_id: str, address: str, follow: bool) -> None:
    """Logs of one job."""
    from orchestrator import jobs

    api = jobs.JobsApi(address)
    if follow:
        status = _jobs_call(jobs.follow, api, job_id, click.echo)
        click.echo(f"job {job_id}: {status}")
        return
    click.echo(_jobs_call(api.get_job_logs, job_id), nl=False)


@jobs_group.command(name="stop")
@click.argument("job_id")
@jobs_address_option
def jobs_stop(job_id: str, address: str) -> None:
    """Stop a running job (its trials stop; `wrnsweep resume` can continue the sweep)."""
    from orchestrator import jobs

    stopped = _jobs_call(lambda: jobs.JobsApi(address).stop_job(job_id))
    click.echo(f"job {job_id}: {'stop requested' if stopped else 'was not running'}")


EXPORT_SUFFIXES = {"torchscript": (".pt", ".pth", ".ts"), "onnx": (".onnx",),
                   "state_dict": (".safetensors",)}


def _export_format(out: str, fmt: str | None) -> str:
    """The format asked for, or the one ``out``'s suffix names; a mismatch is refused."""
    suffix = Path(out).suffix.lower()
    named = next((f for f, suffixes in EXPORT_SUFFIXES.items() if suffix in suffixes), None)
    if fmt is None:
        return named or "torchscript"
    if named is not None and named != fmt:
        raise InvalidInput(f"--out {out} names a {named} file, but --format is {fmt}")
    return fmt


@main.command(name="export")
@click.argument("model_uri")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="File to write (.pt for torchscript, .onnx, .safetensors).")
@click.option("--format", "fmt", type=click.Choice(list(EXPORT_SUFFIXES)), default=None,
              help="torchscript/onnx: BN and Dirac terms folded for inference; state_dict: "
                   "the registry's unfolded weights [default: from --out's suffix, else "
                   "torchscript].")
@tracking_option
def export_command(model_uri: str, out: str, fmt: str | None, tracking_uri: str | None) -> None:
    """Export MODEL_URI (models:/NAME@champion, models:/NAME/V, runs:/..., or a folder)."""
    from orchestrator.export import export_model

    fmt = _export_format(out, fmt)
    if model_uri.startswith(("models:/", "runs:/")):
        if not tracking_uri:
            raise InvalidInput(f"{model_uri}: give the sweep's store with --tracking-uri (e.g. "
                               "sqlite:///runs/NAME/mlflow.db) or MLFLOW_TRACKING_URI")
        _check_store(tracking_uri)
    try:
        with _tracking_errors(missing_is_input=True):
            result = export_model(model_uri, out, fmt=fmt, tracking_uri=tracking_uri)
    except (ValueError, FileNotFoundError, ImportError) as err:
        raise InvalidInput(str(err)) from None
    except RuntimeError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"wrote {result.path} ({result.format}): {result.folded_bn} BN folded into "
               f"convs, {result.affine_bn} as affine; max abs difference vs the unfolded "
               f"model {result.max_abs_diff:.3g}")


@main.command(name="serve")
@click.argument("model_uri")
@click.option("--port", type=int, default=5001, show_default=True,
              help="Port of the model server (checked free first; 5001 leaves 5000 to "
                   "`wrnsweep ui`).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; 0.0.0.0 serves the model to the whole network.")
@tracking_option
def serve_command(model_uri: str, port: int, host: str, tracking_uri: str | None) -> None:
    """Serve MODEL_URI over HTTP with `mlflow models serve` until Ctrl-C.

    MODEL_URI: models:/NAME@champion, models:/NAME/V, runs:/ID/model or a model folder.
    The files are downloaded once into a private temporary folder and checked (the
    SHA-256 digests recorded at registration; no pickling flavor, no code) before the
    server loads them, in this environment (--env-manager local). Request: POST
    /invocations {"inputs": uint8 RGB images (N, 32, 32, 3)}; reply:
    {"predictions": {"logits": (N, classes)}}.
    """
    from orchestrator import registry

    if model_uri.startswith(("models:/", "runs:/")):
        if not tracking_uri:
            raise InvalidInput(f"{model_uri}: give the sweep's store with --tracking-uri (e.g. "
                               "sqlite:///runs/NAME/mlflow.db) or MLFLOW_TRACKING_URI")
        _check_store(tracking_uri)
    elif not Path(model_uri).is_dir():
        raise InvalidInput(f"no model folder at {model_uri!r} (nor a models:/ or runs:/ URI)")
    try:
        with _tracking_errors(missing_is_input=True):
            code = registry.serve(model_uri, tracking_uri=tracking_uri, host=host, port=port,
                                  echo=click.echo)
    except (ValueError, FileNotFoundError) as err:  # a refused model, a busy port
        raise InvalidInput(str(err)) from None
    except RuntimeError as err:
        raise click.ClickException(str(err)) from None
    if code != 0:
        raise click.ClickException(f"mlflow models serve exited with code {code}")


if __name__ == "__main__":  # `python -m orchestrator.cli`, the entrypoint of submitted jobs
    main()
