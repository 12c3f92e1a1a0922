"""Launch, resume and finish a sweep: the Tuner and everything around it.

A sweep lives in one folder, ``<storage_path>/<name>/``: Ray Tune's experiment
(trials, checkpoints, searcher state with the Optuna study), and beside it
wrnsweep's own files:

* ``sweep.yaml``: the sweep file as given (resume re-reads it);
* ``wrnsweep.json``: the resolved manifest: tracking URI, experiment and parent run
  ids, registered model name, metric (the other commands read it);
* ``mlflow-runs.json`` (+ ``mlflow-runs.journal``, its append-only journal): trial id ->
  MLflow run id and last epoch logged;
* ``mlflow.db`` and ``mlartifacts/``: the embedded MLflow store, when no
  tracking URI is given;
* ``optuna-journal.jsonl``: the Optuna study, as JSON lines (every round's trials);
* ``wrnsweep.signatures``: this user's signatures of the files that resume would
  unpickle (:mod:`orchestrator.trust`).

When ``storage_path`` is a URI (s3://, gs://), those files stay in a local
folder ``./runs/<name>/`` on the driver instead.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import SweepConfig, load_sweep
from orchestrator.manifest import MANIFEST_ARTIFACT, META_FILE, Manifest, ManifestError, is_uri
from orchestrator.preflight import probe_tracking
from orchestrator.runmap import PRUNED, status_kind
from orchestrator.store import local_store_path, new_folder_store, tracking_env

RUNS_FILE = "mlflow-runs.json"
SWEEP_FILE = "sweep.yaml"
CHECKPOINTS_TO_KEEP = 3  # best few by the metric; Ray always keeps the latest as well

Echo = Callable[[str], None]
NO_AUTO_LOGGERS = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"  # Tune's switch, see _callbacks
# Signals on which Tune saves the experiment and returns from fit (see _fit_until_signal).
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGUSR1")
                      if hasattr(signal, name))


class SweepError(RuntimeError):
    """A sweep could not run (exit code 1), e.g. every trial failed."""


class SweepInputError(ValueError):
    """Input that is wrong before anything starts (exit code 2)."""


class SweepInterrupted(RuntimeError):
    """Ctrl-C (SIGINT) or SIGUSR1 stopped the sweep; Tune saved its state (exit code 130)."""


def make_manifest(cfg: SweepConfig, *, sweep_file: str, address: str | None = None,
                  storage: str | None = None, tracking_uri: str | None = None,
                  num_samples: int | None = None, name: str | None = None) -> Manifest:
    """Apply command-line overrides to the sweep file's settings."""
    if num_samples is not None and num_samples < 1:
        raise SweepInputError(f"--num-samples must be >= 1, got {num_samples}")
    if name is not None:
        from orchestrator.config import SWEEP_NAME, SWEEP_NAME_RULE

        if not SWEEP_NAME.fullmatch(name):
            raise SweepInputError(f"--name must match {SWEEP_NAME_RULE} (it names the output "
                                  f"folder, the MLflow experiment and model), got {name!r}")
    sweep_name = name or cfg.name
    storage_path = storage or cfg.ray.storage_path or "runs"
    if not is_uri(storage_path):
        storage_path = str(Path(storage_path).expanduser().resolve())
        home = str(Path(storage_path) / sweep_name)
    else:
        home = str(Path("runs", sweep_name).resolve())
    uri = tracking_uri or cfg.tracking.uri or f"sqlite:///{Path(home) / 'mlflow.db'}"
    return Manifest(
        name=sweep_name, sweep_file=str(Path(sweep_file).resolve()), storage_path=storage_path,
        home=home, tracking_uri=uri, experiment=cfg.tracking.experiment or sweep_name,
        registered_model=cfg.tracking.registered_model or sweep_name,
        address=address if address is not None else cfg.ray.address,
        metric=cfg.search.metric, mode=cfg.search.mode,
        num_samples=num_samples or cfg.search.num_samples, top_k=cfg.tracking.top_k,
    )


def journal_path(manifest: Manifest) -> str:
    """The sweep's Optuna journal (every round's study)."""
    from orchestrator.search import JOURNAL_FILE

    return str(Path(manifest.home) / JOURNAL_FILE)


def with_num_samples(cfg: SweepConfig, num_samples: int) -> SweepConfig:
    search = cfg.search.model_copy(update={"num_samples": num_samples})
    return cfg.model_copy(update={"search": search})


# -- resources -------------------------------------------------------------------------
def resources_fn(cfg: SweepConfig, *, cluster_has_gpu: bool,
                 gpu_memory_bytes: int | None = None) -> Callable[[dict], dict]:
    """Ray resources of a trial as a function of its sampled configuration.

    Fixed specs are per architecture. ``auto`` is one CPU plus, where the cluster
    has GPUs, the GPU share that the trial's estimated peak memory needs on a GPU
    of ``gpu_memory_bytes`` (:class:`orchestrator.packing.AutoResources`).
    """
    table: dict[str, dict[str, float]] = {}
    auto: Callable[[dict], dict] | None = None
    for arch in cfg.arch_names():
        spec = cfg.resources_for(arch)
        if spec != "auto":
            table[arch] = spec
        elif not cluster_has_gpu:
            table[arch] = {"cpu": 1.0, "gpu": 0.0}
        elif auto is None:
            from orchestrator.packing import AutoResources

            auto = AutoResources(gpu_memory_bytes)

    def resources(config: dict) -> dict:
        fixed = table.get(config["arch"])
        if fixed is not None:
            return dict(fixed)
        assert auto is not None
        return auto(config)

    return resources


def describe_plan(cfg: SweepConfig, manifest: Manifest) -> str:
    """The resolved manifest as text (``launch --dry-run``)."""
    from orchestrator.search import describe_schedule, n_startup_trials
    from orchestrator.space import describe, grid_points, starting_points

    # What launch will run: --num-samples applied (it sizes TPE's start-up), and a
    # grid runs each of its points once whatever num_samples says.
    cfg = with_num_samples(cfg, manifest.num_samples)
    trials = len(grid_points(cfg)) if cfg.search.algorithm == "grid" else manifest.num_samples
    lines = [f"sweep {manifest.name}: {trials} trials, {cfg.search.algorithm} search "
             f"on {manifest.metric} ({manifest.mode}), at most {cfg.search.max_concurrent} at once"]
    if cfg.search.algorithm == "tpe":
        # Optuna's TPE models once n_startup_trials trials have finished, enqueued included.
        starts = len(starting_points(cfg))
        lines.append(f"  TPE start-up: random draws until {n_startup_trials(cfg)} trials have "
                     f"finished ({starts} starting point(s) among them), seed "
                     f"{cfg.search.seed}, study '{manifest.name}'")
    lines.append(f"dataset: {cfg.dataset_options()['dataset']}")
    for arch, rows in describe(cfg).items():
        res = cfg.resources_for(arch)
        if res == "auto":
            from orchestrator.packing import GiB, describe_auto

            gib = cfg.ray.gpu_memory_gib
            res_text = describe_auto(cfg, arch, int(gib * GiB) if gib else None)
        else:
            res_text = f"{res['cpu']:g} CPU, {res['gpu']:g} GPU"
        lines.append(f"architecture {arch}: {cfg.epochs_for(arch)} epochs, {res_text} per trial")
        constants = cfg.recipe_constants(arch)
        lines.extend(f"  {name:<14} {text}" for name, text in rows.items()
                     if name not in constants)
        if constants:
            lines.append("  fixed: " + ", ".join(f"{k}={v}" for k, v in constants.items()))
    lines.extend(describe_schedule(cfg, trials))  # rungs and the most epochs it can spend
    lines.extend(_describe_starts(cfg))
    lines += [
        f"ray: {'local (started here)' if not manifest.address else manifest.address}",
        f"results: {manifest.experiment_path}" + (
            " (exists: launch would refuse it; `wrnsweep resume` continues it)"
            if not is_uri(manifest.experiment_path) and Path(manifest.experiment_path).exists()
            else ""),
        f"tracking: {manifest.tracking_uri} (experiment '{manifest.experiment}')",
        f"registry: top {manifest.top_k} as '{manifest.registered_model}', alias champion on "
        "the best",
    ]
    return "\n".join(lines)


def _describe_starts(cfg: SweepConfig) -> list[str]:
    """The first trials' lines of ``describe_plan``: the file's points or the papers'."""
    from orchestrator.space import recipe_points

    if cfg.search.points_to_evaluate:
        return [f"starting points: {len(cfg.search.points_to_evaluate)} "
                "(search.points_to_evaluate)"]
    if not cfg.search.starts_at_recipe:
        return []
    lines = ["starting points: each architecture's paper configuration, the nearest the "
             "space holds (search.recipe_start: false turns this off)"]
    for point in recipe_points(cfg):
        values = ", ".join(f"{k}={v}" for k, v in point.items() if k != "arch")
        lines.append(f"  {point['arch']}: {values or 'all drawn'}")
    return lines


# -- running -----------------------------------------------------------------------------
def trial_dirname(trial: Any) -> str:
    """Short trial folders (``wrn-3f2a1_00004``) instead of Tune's config dump."""
    return f"{trial.config.get('arch', 'trial')}-{trial.trial_id}"


def _quiet_tune() -> None:
    """Settings read by Tune when the Tuner is built, in the driver process."""
    # The driver prints its own progress lines; Tune's tables would repeat them.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Snapshot the experiment often: a driver killed between snapshots loses the
    # trials started since (cheap here: the state of a sweep is small JSON).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")


def _start_ray(address: str | None) -> None:
    import ray

    _quiet_tune()

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        # A Jobs API address (for `wrnsweep submit`/`jobs`), not one Ray can join.
        os.environ.pop("RAY_ADDRESS")
    # No address: a Ray of our own ("local"), even when `ray start` runs on this
    # machine (plain ray.init() would join that); RAY_ADDRESS or --address to join.
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    try:
        # Trial output stays in the trial folders; the driver prints progress lines.
        # A Ray of our own starts without a dashboard: ~0.6 s less start-up and a few
        # % of a core less through the sweep (bench/startup.py); joining a cluster
        # takes it as it is (ray.init refuses the option there).
        options = {"include_dashboard": False} if target == "local" else {}
        with _loopback_only() if target == "local" else contextlib.nullcontext():
            ray.init(address=target, log_to_driver=False, **options)
    except (ConnectionError, RuntimeError, ray.exceptions.AuthenticationError) as err:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise SweepError(f"could not start or join {where}: "
                         f"{str(err).strip().splitlines()[-1]}") from None


# Ray's switch for "this node may be part of a cluster" (ray._private.ray_constants).
_RAY_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """While a Ray of our own starts: every Ray process listens on 127.0.0.1 only.

    Ray 2.60 binds its servers (GCS, raylet, workers, dashboard and runtime-env
    agents) to the node's IP, and takes that IP from the route to the outside
    unless ``ENABLE_RAY_CLUSTER`` is off, which makes it the loopback address
    (``ray._private.services.get_node_ip_address``; ``ray.init(_node_ip_address=
    "127.0.0.1")`` alone is turned back into the outside IP by
    ``resolve_ip_for_localhost``). Ray reads the switch from the environment when
    ray is imported: the variable reaches the processes ``ray.init`` starts (the
    raylet passes it on to the workers it starts later); this process imported
    ray before (the searcher), so its constant is set as well. Both are put back
    afterwards: once Ray runs, this process asks the node for its IP, and a later
    ``ray.init`` that joins a cluster must get the outside IP. Without it, GCS,
    raylet and workers listen on ``::`` and the agents on 0.0.0.0 and the outside
    IP; the SIGKILL test of tests/test_sweep_e2e.py lists the sockets of a running sweep.
    """
    import ray._private.ray_constants as ray_constants

    before_env = os.environ.get(_RAY_CLUSTER_SWITCH)
    before_constant = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_RAY_CLUSTER_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_constant
        if before_env is None:
            os.environ.pop(_RAY_CLUSTER_SWITCH, None)
        else:
            os.environ[_RAY_CLUSTER_SWITCH] = before_env


@dataclass(frozen=True)
class Session:
    """What one driver prepared for its rounds: the dataset, and the cluster as found.

    Not part of the sweep's record (:class:`Manifest`): another driver (a resume,
    on another cluster) finds its own.
    """

    splits: Any
    has_gpu: bool
    gpu_memory_bytes: int | None = None  # of one GPU, for `resources: auto`


def prepare(cfg: SweepConfig, manifest: Manifest, echo: Echo) -> Session:
    """Load the dataset (a missing one is bad input, before Ray starts), start or join
    Ray, and check the cluster: the first step of launch, extend, resume and confirm."""
    splits = _load_splits(cfg)
    _start_ray(manifest.address)
    return _check_cluster(cfg, manifest, splits, echo)


def _check_cluster(cfg: SweepConfig, manifest: Manifest, splits: Any, echo: Echo) -> Session:
    """Refuse what cannot work on this cluster; say what may not."""
    import ray

    from orchestrator.config import ConfigError, check_cluster_fits

    alive = [n for n in ray.nodes() if n.get("Alive")]
    nodes = [n.get("Resources", {}) for n in alive]
    issues = check_cluster_fits(cfg, nodes)
    if issues and not manifest.address:
        raise ConfigError(issues)  # the local Ray will never grow
    if issues:
        # A joined cluster may autoscale: nodes that satisfy the request can still come.
        echo("warning: " + "; ".join(str(i) for i in issues))
    if len(alive) > 1 and not is_uri(manifest.storage_path):
        blind = nodes_without_storage(manifest.storage_path, [n["NodeID"] for n in alive])
        if blind:
            raise SweepInputError(
                f"storage_path {manifest.storage_path} is not shared: {len(blind)} of "
                f"{len(alive)} nodes cannot see it (Ray workers write checkpoints there "
                "directly). Use a folder every node mounts (NFS) or s3:// / gs://.")
    gpu_memory = None
    if any(cfg.resources_for(a) == "auto" for a in cfg.arch_names()):
        from orchestrator.packing import gpu_memory_for

        try:
            gpu_memory = gpu_memory_for(cfg, alive)
        except ValueError as err:
            raise SweepInputError(str(err)) from None
    if len(alive) > 1 and manifest.tracking_uri.startswith("sqlite:"):
        echo("note: MLflow uses a SQLite file on this driver; that is fine on a cluster "
             "because only the driver writes to MLflow")
    return Session(splits=splits, has_gpu=any(n.get("GPU", 0) > 0 for n in nodes),
                   gpu_memory_bytes=gpu_memory)


def nodes_without_storage(storage_path: str, node_ids: list[str]) -> list[str]:
    """Ids of the nodes that do not see a marker file written here into ``storage_path``.

    A zero-CPU task pinned to each node looks for the file: the only way to know
    whether a local path is one filesystem for the whole cluster.
    """
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    Path(storage_path).mkdir(parents=True, exist_ok=True)
    marker = Path(storage_path) / f".wrnsweep-shared-{uuid.uuid4().hex}"
    marker.write_text("shared storage probe\n")
    try:
        probe = ray.remote(num_cpus=0)(os.path.exists)
        futures = {
            node: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                node_id=node, soft=False)).remote(str(marker))
            for node in node_ids
        }
        return [node for node, seen in zip(futures, ray.get(list(futures.values()),
                                                           timeout=120), strict=True)
                if not seen]
    finally:
        marker.unlink(missing_ok=True)


def _load_splits(cfg: SweepConfig) -> Any:
    from trainables.data import load_splits

    opts = cfg.dataset_options()
    try:
        return load_splits(opts["dataset"], root=opts["data_root"], download=opts["download"],
                           synthetic_size=opts["synthetic_size"])
    except FileNotFoundError as err:
        raise SweepInputError(str(err)) from None


def _trainable(cfg: SweepConfig, session: Session,
               fn: Callable[..., None] | None = None) -> Any:
    from ray import tune

    from trainables.trainable import train_trial

    # The dataset goes into the object store once, not into every trial's config.
    with_data = tune.with_parameters(fn or train_trial, splits=session.splits)
    return tune.with_resources(with_data, resources=resources_fn(
        cfg, cluster_has_gpu=session.has_gpu, gpu_memory_bytes=session.gpu_memory_bytes))


def _start_tracking(cfg: SweepConfig, manifest: Manifest) -> Manifest:
    """The sweep's MLflow experiment and parent run; the manifest that names them."""
    from orchestrator.tracking import SWEEP_TAG, ensure_experiment, git_commit, mlflow_client

    tracking_env()
    db = local_store_path(manifest.tracking_uri)
    if db == Path(manifest.home) / "mlflow.db" and not db.exists():
        new_folder_store(db)  # the folder's own store: a copy, not 2 s of migrations
    client = mlflow_client(manifest.tracking_uri)
    artifacts = None
    if manifest.tracking_uri.startswith("sqlite:"):
        # The embedded store keeps its artifacts beside the database, not in ./mlruns.
        artifacts = (Path(manifest.home) / "mlartifacts").resolve().as_uri()
    manifest = manifest.replace(
        experiment_id=ensure_experiment(client, manifest.experiment, artifacts))
    tags = {SWEEP_TAG: manifest.name, "ray.address": manifest.address or "local",
            "wrnsweep.storage_path": manifest.experiment_path}
    commit = git_commit(Path(manifest.sweep_file).parent)
    if commit:
        tags["git.commit"] = commit
    run = client.create_run(manifest.experiment_id, run_name=manifest.name, tags=tags)
    manifest = manifest.replace(parent_run_id=run.info.run_id)
    client.log_text(manifest.parent_run_id, cfg.source_text, "sweep.yaml")
    client.log_dict(manifest.parent_run_id, cfg.model_dump(mode="json"), "resolved_config.json")
    client.log_dict(manifest.parent_run_id, manifest.to_json(), MANIFEST_ARTIFACT)
    client.log_param(manifest.parent_run_id, "num_samples", manifest.num_samples)
    client.log_param(manifest.parent_run_id, "architectures", ",".join(cfg.arch_names()))
    client.log_param(manifest.parent_run_id, "metric", manifest.objective)
    return manifest


def _callbacks(cfg: SweepConfig, manifest: Manifest, echo: Echo, runs_file: str = RUNS_FILE,
               num_samples: int | None = None,
               best_so_far: tuple[float, str] | None = None, prefix: str = "") -> list:
    from orchestrator.progress import ConsoleProgress
    from orchestrator.tracking import SweepTracker

    assert manifest.experiment_id and manifest.parent_run_id
    tracker = SweepTracker(
        tracking_uri=manifest.tracking_uri, experiment_id=manifest.experiment_id,
        parent_run_id=manifest.parent_run_id, state_file=str(Path(manifest.home) / runs_file),
        metric=manifest.metric, mode=manifest.mode, sweep_name=manifest.name,
    )
    from orchestrator.packing import OomEscalation

    progress = ConsoleProgress(metric=manifest.metric, mode=manifest.mode,
                               num_samples=num_samples or manifest.num_samples, echo=echo)
    progress.best = best_so_far  # an extension's "best so far" counts the earlier rounds
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    # Tune's CSV and JSON result files (what Tune and `finish` read back), but not its
    # TensorBoard event files: nothing here reads them, and writing them cost the
    # driver ~9 ms per trial (bench/scale.py). Given explicitly, with Tune's automatic
    # loggers off while a fit runs (`_explicit_loggers_only`, resume included).
    from orchestrator.trust import StateSigner

    # OOM escalation first: the tracker then records the retry with the new share.
    # The signer signs each snapshot of Tune's state before Tune copies it into the
    # sweep folder (it is restored with the other callbacks from tuner.pkl on resume).
    return [OomEscalation(tracker, echo), tracker, progress, CSVLoggerCallback(),
            JsonLoggerCallback(), StateSigner(manifest.home, prefix)]


def launch(cfg: SweepConfig, manifest: Manifest, *, echo: Echo = print,
           trainable: Callable[..., None] | None = None) -> dict[str, Any]:
    """Run the sweep described by ``cfg`` and ``manifest`` to the end; the summary.

    ``trainable`` replaces the trial function (``train_trial(config, splits)``),
    wrapped the same way; ``bench/scale.py`` passes one that trains nothing.
    """

    from orchestrator.search import create_searcher

    if not is_uri(manifest.experiment_path) and Path(manifest.experiment_path).exists():
        raise SweepInputError(
            f"{manifest.experiment_path} already exists: `wrnsweep resume "
            f"{manifest.experiment_path}` continues it, --name starts another sweep")
    cfg = with_num_samples(cfg, manifest.num_samples)
    # The study's journal is created at the first trial, in the folder made below.
    searcher, num_samples = create_searcher(cfg, study_name=manifest.name,
                                            journal=journal_path(manifest))
    manifest = manifest.replace(num_samples=num_samples)
    unreachable = probe_tracking(manifest.tracking_uri)
    if unreachable:
        raise SweepInputError(unreachable)
    session = prepare(cfg, manifest, echo)
    home = Path(manifest.home)
    created = not home.exists()
    home.mkdir(parents=True, exist_ok=True)
    try:
        from orchestrator.trust import sign_bytes

        # Signed before it is written: resume loads its dataset and settings.
        source = cfg.source_text.encode()
        sign_bytes(home, SWEEP_FILE, source)
        (home / SWEEP_FILE).write_bytes(source)
        manifest = _start_tracking(cfg, manifest)
        manifest.save()
    except BaseException:
        # A folder without its manifest could be neither launched again nor resumed.
        if created:
            shutil.rmtree(home, ignore_errors=True)
        raise
    echo(f"sweep {manifest.name}: {num_samples} trials -> {manifest.experiment_path}")
    echo(f"tracking: {manifest.tracking_uri} (experiment '{manifest.experiment}', run "
         f"{manifest.parent_run_id})")
    results = _fit(cfg, manifest, searcher, num_samples,
                   _trainable(cfg, session, trainable), None, echo)
    return _then_confirm(cfg, manifest, finish(cfg, manifest, results, echo=echo), echo)


def _then_confirm(cfg: SweepConfig, manifest: Manifest, summary: dict[str, Any], echo: Echo
                  ) -> dict[str, Any]:
    """The sweep file's ``confirm:`` stage, once the search has finished (if it has one
    and it has not run yet)."""
    if cfg.confirm is None or manifest.confirm:
        return summary
    from orchestrator.confirm import ConfirmSpec
    from orchestrator.confirm_round import confirm

    echo("")
    spec = ConfirmSpec(**cfg.confirm.model_dump())
    return {**summary, "confirm": confirm(manifest.home, spec, echo=echo, address=manifest.address)}


@contextlib.contextmanager
def _explicit_loggers_only() -> Iterator[None]:
    """Tune's automatic result loggers off while a sweep's fit runs.

    The sweep passes Tune's CSV and JSON loggers itself (see ``_callbacks``); Tune
    would add its TensorBoard logger, on a resume too (the restored callbacks are the
    launch's). Tune reads the switch when fit() creates the callbacks; it is set only
    meanwhile, so that a plain Tuner later in the same process gets Tune's defaults.
    """
    previous = os.environ.get(NO_AUTO_LOGGERS)
    os.environ[NO_AUTO_LOGGERS] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(NO_AUTO_LOGGERS, None)
        else:
            os.environ[NO_AUTO_LOGGERS] = previous


def _fit_until_signal(tuner: Any) -> tuple[Any, bool]:
    """``tuner.fit()``, and whether a signal (Ctrl-C, SIGUSR1) ended it before the sweep did.

    On SIGINT or SIGUSR1, Tune saves the experiment state and returns from ``fit()``
    as if the sweep had ended, its running trials marked TERMINATED in memory
    (PENDING on disk, for a restore). Its SIGINT handler, installed by ``fit()``,
    puts back the handler it found when it fires and stays installed otherwise, so
    a marker installed here tells the two apart. That holds only where Tune ran
    ``fit`` in this process, which its SIGUSR1 handler (always installed then) shows:
    under Ray Client (``ray://``) fit runs on the cluster. The handlers found here
    are put back afterwards: Tune's stale one would swallow a Ctrl-C during
    registration. With ``TUNE_DISABLE_SIGINT_HANDLER=1`` Tune leaves SIGINT alone
    and a stop cannot be told from an end.
    """
    if threading.current_thread() is not threading.main_thread():
        return tuner.fit(), False  # signals reach the main thread only; Tune installs none
    previous = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}
    before_int = previous[signal.SIGINT]

    def marker(signum: int, frame: Any) -> None:  # a second Ctrl-C: what it did before
        if before_int is signal.SIG_IGN:
            return
        if callable(before_int):
            before_int(signum, frame)
        else:  # SIG_DFL, or a handler not installed from Python
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, marker)
    try:
        results = tuner.fit()
        tune_here = all(signal.getsignal(sig) is not previous[sig]
                        for sig in _STOP_SIGNALS if sig != signal.SIGINT)
        interrupted = (tune_here and _tune_catches_sigint()
                       and signal.getsignal(signal.SIGINT) is marker)
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: installed outside Python, cannot be restored
                signal.signal(sig, handler)
    return results, interrupted


def _tune_catches_sigint() -> bool:
    """Whether Tune installs its SIGINT handler (its own reading of the switch)."""
    try:
        return not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0"))
    except ValueError:
        return True  # Tune itself would fail on such a value before fit starts


def _run_tuner(tuner: Any, manifest: Manifest) -> Any:
    """Run a sweep's Tuner (launch, extend, resume); Tune's ResultGrid.

    Raises :class:`SweepInterrupted` when a signal stopped it: the runs then stay
    RUNNING and nothing is ranked or registered until ``resume`` ends the sweep.
    """
    with _explicit_loggers_only(), _sealed_after(manifest):
        results, interrupted = _fit_until_signal(tuner)
    if interrupted:
        raise SweepInterrupted(
            f"interrupted ({len(results)} trials of this run started); the state is saved: "
            f"`wrnsweep resume {manifest.home}` continues the sweep")
    return results


@contextlib.contextmanager
def _sealed_after(manifest: Manifest) -> Iterator[None]:
    """Sign everything Tune left in the sweep folder once fit returns, however it ends.

    Tune's snapshots were signed as they were taken (``trust.StateSigner``); this
    also covers the last one, written as fit returns (the sweep's end, Ctrl-C or
    an error). Everything in the folder is this process's Tune's or was checked
    before it started (resume, extend). When fit raised, a failure to sign does
    not hide that error.
    """
    from orchestrator.trust import sign_folder

    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            sign_folder(manifest.home, manifest.experiment_path)
        raise
    sign_folder(manifest.home, manifest.experiment_path)


def _rounds(manifest: Manifest) -> list[tuple[str, str]]:
    """``(Tune experiment path, run-map file)`` of each round: the launch, then extends."""
    rounds = [(manifest.experiment_path, RUNS_FILE)]
    for name in manifest.rounds:
        rounds.append((f"{manifest.experiment_path}/{name}", f"mlflow-runs.{name}.json"))
    return rounds


def _fit(cfg: SweepConfig, manifest: Manifest, searcher: Any, num_samples: int, trainable: Any,
         round_: tuple[str, str] | None, echo: Echo,
         best_so_far: tuple[float, str] | None = None, *, scheduler: Any = None,
         metric: str | None = "") -> Any:
    """Build the Tuner of one round and run it; Tune's ResultGrid.

    ``scheduler``: the sweep file's when None. ``metric``: what Tune ranks and keeps
    checkpoints by, the manifest's when "" and nothing when None (a confirm round that
    trains on train+val has no validation metric: the latest checkpoints are kept).
    """
    from ray import tune

    from orchestrator.search import create_scheduler
    from orchestrator.trust import sign_folder

    path, runs_file = round_ or (manifest.experiment_path, RUNS_FILE)
    storage, _, name = path.rpartition("/")
    prefix = _round_prefix(manifest, path)
    metric = manifest.metric if metric == "" else metric
    mode = manifest.mode if metric else None
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler or create_scheduler(cfg),
            num_samples=num_samples, metric=metric, mode=mode,
            trial_dirname_creator=trial_dirname,
            # A new trial reuses a finished trial's worker when their resources match:
            # torch is imported once per slot, not per trial (the dataset is put in the
            # object store once; each trial maps it from there).
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=storage, verbose=0,
            callbacks=_callbacks(cfg, manifest, echo, runs_file, num_samples, best_so_far,
                                 prefix),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=CHECKPOINTS_TO_KEEP, checkpoint_score_attribute=metric,
                checkpoint_score_order=mode or "max"),
            # No fail_fast: it would make the experiment unrestorable.
            failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures),
        ),
    )
    # Tune wrote tuner.pkl as the Tuner was built: sign it before anything else runs.
    sign_folder(manifest.home, manifest.experiment_path, only=[f"{prefix}tuner.pkl"])
    return _run_tuner(tuner, manifest)


def _round_prefix(manifest: Manifest, path: str) -> str:
    """A round's folder inside the sweep's experiment folder: "" or "extend-N/"."""
    base = manifest.experiment_path.rstrip("/")
    return "" if path.rstrip("/") == base else path[len(base):].strip("/") + "/"


def extend(home: str, num_samples: int, *, echo: Echo = print,
           address: str | None = None, trust: bool = False) -> dict[str, Any]:
    """Add ``num_samples`` trials to a finished sweep: same Optuna study, same parent run.

    Each extension is a Tune experiment of its own inside the sweep's folder
    (``<sweep>/extend-N``): Tune cannot raise the budget of a finished experiment.
    Its searcher continues the sweep's Optuna study from its journal (every trial,
    pruned ones included; the sampler re-seeded from the sweep's seed and the
    trial count), so TPE goes on from everything the sweep has seen. The trials
    log into the same MLflow parent run; registration then ranks every round's
    trials together. ASHA's rungs start empty in each round (Tune does not save
    scheduler state): a new round's first trials reach a rung unopposed.

    The earlier rounds' Tune state is read (unpickled) only if this user's
    wrnsweep signed it, or with ``trust`` (:func:`trusted_manifest`).
    """
    from orchestrator.search import create_searcher

    if num_samples < 1:
        raise SweepInputError(f"--num-samples must be >= 1, got {num_samples}")
    manifest = trusted_manifest(home, "extend", vouch=trust, args=f" --num-samples {num_samples}")
    tracking_env()
    cfg = load_sweep(Path(manifest.home) / SWEEP_FILE)
    if cfg.search.algorithm == "grid":
        raise SweepInputError(f"{home}: a grid sweep has run every point; extend needs a "
                              "tpe or random search")
    if address is not None:
        manifest = manifest.replace(address=address)
    last_path, _ = _rounds(manifest)[-1]
    _require_finished(last_path)
    _require_journal(manifest, last_path)
    cfg = with_num_samples(cfg, num_samples)
    searcher, _ = create_searcher(cfg, study_name=manifest.name, journal=journal_path(manifest))
    # The Optuna study so far, from the journal, with the Tune -> Optuna trial map of
    # the last round. Searcher.restore_from_dir looks for the state file named by the
    # class it is called on: the OptunaSearch that the ConcurrencyLimiter wraps.
    searcher.searcher.restore_from_dir(last_path)
    session = prepare(cfg, manifest, echo)
    name = f"extend-{len(manifest.rounds) + 1}"
    manifest = manifest.replace(rounds=(*manifest.rounds, name),
                                num_samples=manifest.num_samples + num_samples)
    # The parent run is RUNNING again before the manifest names the new round: a driver
    # killed in between leaves a sweep that resume finishes, not one it calls finished
    # while the manifest names a round that never ran.
    client = _reopen_parent(manifest, name, num_samples)
    manifest.save()
    experiment = client.get_experiment(manifest.experiment_id).name
    echo(f"extending sweep {manifest.name} by {num_samples} trials -> "
         f"{manifest.experiment_path}/{name} (parent run {manifest.parent_run_id}, {experiment})")
    earlier = client.get_run(manifest.parent_run_id).data.metrics.get(f"best_{manifest.metric}")
    results = _fit(cfg, manifest, searcher, num_samples, _trainable(cfg, session),
                   _rounds(manifest)[-1], echo,
                   best_so_far=None if earlier is None else (earlier, "earlier rounds"))
    return finish(cfg, manifest, results, echo=echo)


def trusted_manifest(home: str, command: str, *, vouch: bool = False,
                     args: str = "") -> Manifest:
    """The manifest of a sweep folder whose state this user's wrnsweep signed.

    ``command`` (resume, extend) and its other ``args`` make the command line that
    a refusal suggests with ``--trust``.

    Checked before anything of the folder is used: ``wrnsweep.json`` (it says
    where everything else is, which Ray and tracking store to connect to), then
    ``sweep.yaml`` (the dataset and its location) and every file of the Tune
    experiment that Tune would unpickle (:mod:`orchestrator.trust`). ``vouch``
    (``--trust``): the user vouches for the folder; it is signed as it is first.
    """
    from orchestrator.trust import TrustError, UntrustedFile, check_folder, sign_folder

    try:
        if vouch:
            sign_folder(home, None, own=[META_FILE])
        check_folder(home, None, own=[META_FILE])
        manifest = Manifest.load(home)
        if vouch:
            sign_folder(manifest.home, manifest.experiment_path, own=[SWEEP_FILE])
        check_folder(manifest.home, manifest.experiment_path, own=[SWEEP_FILE])
    except UntrustedFile as err:
        raise SweepInputError(
            f"{err}. {command} unpickles Tune's state from the folder, which runs any code in "
            f"it, so it reads only what this user's wrnsweep signed; `wrnsweep {command} "
            f"--trust {home}{args}` continues a folder you vouch for") from None
    except (TrustError, ManifestError) as err:
        raise SweepInputError(str(err)) from None
    return manifest


def _require_journal(manifest: Manifest, experiment_path: str) -> None:
    """Refuse a sweep whose Optuna study is a pickle (written by an earlier wrnsweep)."""
    if Path(journal_path(manifest)).is_file() or is_uri(experiment_path):
        return
    if list(Path(experiment_path).glob("searcher-state-*.pkl")):
        raise SweepInputError(
            f"{manifest.home}: the Optuna study of this sweep is a pickle (written by an earlier "
            "wrnsweep, before the study was kept as a journal); continue it with that version")


def _finished_status(manifest: Manifest) -> str | None:
    """FINISHED when ``finish`` completed the sweep; None while there is more to do.

    ``finish`` ends the parent run as its last step, and ``extend`` sets it RUNNING
    before the manifest names a new round, so a FINISHED parent run means every round ran
    and was ranked. FAILED (no trial produced a model) is not finished: resume runs
    the errored trials again (``resume_errored``), e.g. after a fix. A local store
    that is gone is refused, not made again, empty.
    """
    from orchestrator.tracking import local_store_path, mlflow_client

    store = local_store_path(manifest.tracking_uri)
    if store is not None and not store.exists():
        raise SweepInputError(f"{manifest.tracking_uri}: the sweep's tracking store is gone "
                              f"({store} does not exist)")
    if not manifest.parent_run_id:
        return None
    status = mlflow_client(manifest.tracking_uri).get_run(manifest.parent_run_id).info.status
    return status if status == "FINISHED" else None


def _require_finished(experiment_path: str) -> None:
    """Refuse to extend a round that is still running or was interrupted."""
    from ray import tune

    if not tune.Tuner.can_restore(experiment_path):
        raise SweepInputError(f"{experiment_path}: no Tune experiment state")
    analysis = tune.ExperimentAnalysis(experiment_path)
    open_trials = [t.trial_id for t in analysis.trials if t.status not in ("TERMINATED", "ERROR")]
    if open_trials:
        raise SweepInputError(
            f"{experiment_path}: {len(open_trials)} trial(s) have not finished; "
            f"`wrnsweep resume` the sweep first")


def _reopen_parent(manifest: Manifest, round_name: str, num_samples: int) -> Any:
    """The parent run is RUNNING again while trials are added (MLflow params are fixed,
    so the new totals go into tags)."""
    from orchestrator.tracking import mlflow_client

    client = mlflow_client(manifest.tracking_uri)
    assert manifest.parent_run_id
    client.update_run(manifest.parent_run_id, status="RUNNING")
    client.set_tag(manifest.parent_run_id, "wrnsweep.num_samples", str(manifest.num_samples))
    client.set_tag(manifest.parent_run_id, f"wrnsweep.{round_name}", str(num_samples))
    return client


def resume(home: str, *, echo: Echo = print, address: str | None = None,
           trust: bool = False) -> dict[str, Any]:
    """Continue an interrupted sweep from its folder (driver killed, even by SIGKILL).

    Only the last round can be unfinished (``extend`` refuses to start otherwise).
    A sweep that has finished (its parent run FINISHED: ``finish`` ran to the
    end) is left as it is: nothing is started, registered or changed.
    Tune's pickled state is read only if this user's wrnsweep signed it, or with
    ``trust`` (:func:`trusted_manifest`).
    """
    from ray import tune

    manifest = trusted_manifest(home, "resume", vouch=trust)
    tracking_env()
    if address is not None:
        manifest = manifest.replace(address=address)
    if manifest.confirm and not manifest.confirm.get("done"):  # orchestrator.confirm
        from orchestrator.confirm_round import resume_confirm

        return resume_confirm(manifest, echo=echo)
    path, _ = _rounds(manifest)[-1]
    cfg = load_sweep(Path(manifest.home) / SWEEP_FILE)
    status = _finished_status(manifest)
    if status is not None and cfg.confirm is not None and not manifest.confirm:
        # The search finished and its driver stopped before the confirm stage began.
        return _then_confirm(cfg, manifest, {"resumed": False, "status": status}, echo)
    if status is not None:
        echo(f"sweep {manifest.name} has finished (parent run {manifest.parent_run_id}): "
             f"nothing to resume; `wrnsweep extend {home} --num-samples N` adds trials")
        return {"resumed": False, "status": status}
    if not tune.Tuner.can_restore(path):
        raise SweepInputError(f"{path}: no Tune experiment state to resume")
    _require_journal(manifest, path)
    session = prepare(cfg, manifest, echo)
    echo(f"resuming sweep {manifest.name} from {path}")
    # A trial resumed from its last checkpoint may report again an epoch that Optuna
    # was told before the driver stopped: Optuna keeps the first value, and says so.
    warnings.filterwarnings("ignore", category=UserWarning,
                            message=r"The reported value is ignored because this `?step")
    # The trainable must be wrapped exactly as at launch (resources, dataset).
    tuner = tune.Tuner.restore(path, trainable=_trainable(cfg, session),
                               resume_unfinished=True, resume_errored=True)
    _here_now(tuner, cfg, manifest, echo, path)
    summary = finish(cfg, manifest, _run_tuner(tuner, manifest), echo=echo)
    return _then_confirm(cfg, manifest, summary, echo)


def _here_now(tuner: Any, cfg: SweepConfig, manifest: Manifest, echo: Echo, path: str) -> None:
    """Point a restored Tuner's callbacks, searcher and new trials at the folder's place now.

    Tune restores the callbacks and the searcher pickled at launch, and they name
    the folder, the tracking store and the Optuna journal where the sweep was then:
    a folder moved since would be written to (or looked for) at the old place. So
    the callbacks are made again, the searcher is given the folder's journal, and
    trials Tune adds get the folder's storage (:mod:`orchestrator.relocate`).
    Under Ray Client the Tuner runs on the cluster, where the folder has not moved.
    """
    local = getattr(tuner, "_local_tuner", None)
    if local is None:
        return
    runs_file = next(runs for round_path, runs in _rounds(manifest) if round_path == path)
    from orchestrator.relocate import trials_here

    local.get_run_config().callbacks = _callbacks(cfg, manifest, echo, runs_file,
                                                  prefix=_round_prefix(manifest, path))
    local._tune_config.scheduler = trials_here(local._tune_config.scheduler, path)
    search_alg = local._tune_config.search_alg
    getattr(search_alg, "searcher", search_alg).use_journal(journal_path(manifest))


# -- after the sweep ------------------------------------------------------------------------
def _round_results(path: str, manifest: Manifest) -> Any:
    """Tune's results of a finished round, read from its folder."""
    from ray import tune

    return tune.ResultGrid(tune.ExperimentAnalysis(path, default_metric=manifest.metric,
                                                   default_mode=manifest.mode))


def finish(cfg: SweepConfig, manifest: Manifest, results: Any, *,
           echo: Echo = print) -> dict[str, Any]:
    """The steps after a search round: reconcile, rank, register, close, show.

    Every round's trials are ranked together (an extended sweep), by the one
    ranking ``best`` and ``report`` show: MLflow's (:func:`leaderboard.leaderboard`).
    """
    from orchestrator.leaderboard import format_table, leaderboard
    from orchestrator.registry import CHAMPION, register
    from orchestrator.store import mlflow_client

    client = mlflow_client(manifest.tracking_uri)
    rounds = _rounds(manifest)
    results = [*(r for path, _ in rounds[:-1] for r in _round_results(path, manifest)), *results]
    runs = reconcile(client, manifest, results, echo)
    rows = leaderboard(client, manifest)
    chosen = _candidates(rank(rows, manifest.metric), runs, results, manifest)
    sweep_run_ids = {entry.run_id for entry in runs.values() if entry.run_id}
    versions = register(client, manifest.registered_model, chosen, metric=manifest.metric,
                        sweep_run_ids=sweep_run_ids, echo=echo) if chosen else []
    errors = sum(1 for r in results if r.error)
    _close_parent(client, manifest, len(results), errors,
                  chosen[0].score if chosen else None)
    echo("")
    echo(format_table(leaderboard(client, manifest), manifest.metric))
    if not versions:
        raise SweepError(f"no trial produced a model ({errors} of {len(results)} failed); "
                         f"see {manifest.experiment_path}")
    uri = f"models:/{manifest.registered_model}@{CHAMPION}"
    echo(f"\nregistered {len(versions)} version(s) of '{manifest.registered_model}'; "
         f"best: {uri} (tracking {manifest.tracking_uri})")
    if not math.isfinite(chosen[0].score):
        echo("warning: the best score is not finite")
    return {"trials": len(results), "errors": errors, "rows": rows,
            "versions": [v.version for v in versions], "champion": uri}


def reconcile(client: Any, manifest: Manifest, results: Any, echo: Echo) -> dict[str, Any]:
    """Close what a killed driver left RUNNING, in every round; trial id -> run entry."""
    from orchestrator.runmap import load_run_map, reconcile_runs
    from orchestrator.tracking import BufferedWriter

    outcomes = {(r.metrics or {}).get("trial_id"): "error" if r.error else "ok" for r in results}
    runs = {}
    for _, runs_name in _rounds(manifest):
        round_runs = load_run_map(Path(manifest.home) / runs_name)
        writer = BufferedWriter(echo=echo)
        reconcile_runs(client, round_runs, outcomes, writer.submit)
        writer.close()
        runs.update(round_runs)
    return runs


# What may be registered: a trial that ran to its end or that the scheduler stopped,
# with a finite score (not one that failed or diverged: FAILED).
REGISTRABLE = ("FINISHED", PRUNED)


def rank(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The leaderboard's rows that may be registered, best first (its order)."""
    from orchestrator.leaderboard import best_key

    score = best_key(metric)
    return [row for row in rows if status_kind(row["status"]) in REGISTRABLE
            and isinstance(row.get(score), int | float) and math.isfinite(row[score])]


def _candidates(ranked: list[dict[str, Any]], runs: dict[str, Any], results: Any,
                manifest: Manifest) -> list[Any]:
    """The first ``top_k`` ranked trials that have a checkpoint, with its weights."""
    from orchestrator.leaderboard import best_key
    from orchestrator.registry import Candidate
    from trainables.engine import load_checkpoint

    trial_of = {entry.run_id: trial_id for trial_id, entry in runs.items() if entry.run_id}
    result_of = {(r.metrics or {}).get("trial_id"): r for r in results if not r.error}
    chosen = []
    for row in ranked:
        result = result_of.get(trial_of.get(row["run_id"]))
        checkpoint = result and result.get_best_checkpoint(manifest.metric, manifest.mode)
        if checkpoint is None:
            continue
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(folder)
        chosen.append(Candidate(run_id=row["run_id"], trial_id=trial_of[row["run_id"]],
                                score=float(row[best_key(manifest.metric)]),
                                config=result.config, state=state,
                                test_acc=(result.metrics or {}).get("test_acc")))
        if len(chosen) == manifest.top_k:
            break
    return chosen


def _close_parent(client: Any, manifest: Manifest, trials: int, errors: int,
                  best: float | None) -> None:
    if not manifest.parent_run_id:
        return
    client.log_metric(manifest.parent_run_id, "trials", trials)
    client.log_metric(manifest.parent_run_id, "trials_failed", errors)
    if best is not None:
        client.log_metric(manifest.parent_run_id, f"best_{manifest.metric}", best)
    client.set_terminated(manifest.parent_run_id, status="FINISHED" if best is not None
                          else "FAILED")
