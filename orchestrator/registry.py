"""The model registry: a sweep's best checkpoints as MLflow models, loaded back safely.

What a registered version is
----------------------------
Each version is an MLflow 3 *logged model* named ``model``, made by its trial's run
(``source_run_id``; the run's params; the run's metrics at the checkpoint's epoch
plus the test metrics of these weights), registered as a version of the sweep's
model (``models:/NAME/V``; the best gets the alias ``champion``: stages are
deprecated in MLflow 3). Its folder::

    MLmodel                        flavors onnx + python_function (loader mlflow.onnx),
                                   signature, input example, the model card as metadata
    model.onnx                     the folded network behind its input handling
    input_example.json             two test images; serving_input_example.json: as JSON
    extra_files/model.safetensors  the unfolded weights (a state_dict), for fine-tuning
    extra_files/config.json        the model card: builder arguments, mean/std, epoch,
                                   the training config
    requirements.txt, python_env.yaml, conda.yaml   onnx, onnxruntime, mlflow (pinned)

so MLflow's own tools work with it: ``mlflow.pyfunc.load_model("models:/NAME@champion")``
runs ``model.onnx`` with onnxruntime (no pickle, no wrnsweep code), ``mlflow models
serve`` serves it (``wrnsweep serve`` does so after the checks below), and the UI
shows its signature, metrics and params. :func:`load_model` rebuilds the
``nn.Module`` from the safetensors file for fine-tuning.

Input contract (the signature): ``images``, uint8 RGB ``(N, 32, 32, 3)`` with values
0-255 (what PIL, numpy and torchvision's ``.data`` hold; any batch size), normalised
inside the graph exactly as in training; output ``logits``, float32
``(N, num_classes)`` before softmax (``argmax`` is the class; softmax gives
probabilities). Raw pixels in rather than normalised tensors, so no client can get
mean/std wrong; logits out, so nothing is lost (probabilities and the class follow).

The numbers describe the registered weights: the test split of the run's dataset
is evaluated once, at registration, on exactly the weights that are registered
(read back from the written safetensors file, fp32, TF32 off, on the driver's
device: CUDA when it has one) and the version is tagged with that ``test_acc`` and
the checkpoint's ``epoch``. A trial's own ``test_acc`` is measured after its last
epoch, on other weights than its best-validation checkpoint: it is never used here.
The ONNX graph is checked through MLflow's loader against the unfolded network on
the first test images and seeded random images (``fold_max_abs_diff``; refused
above 1e-4).

Safety: nothing here unpickles. Every loader (:func:`load_model`,
:func:`load_pyfunc`, :func:`fetch_model`, hence ``wrnsweep export`` and ``wrnsweep
serve``) downloads the files once, then (1) compares them with the SHA-256 digests
recorded in the version's (or logged model's) ``wrnsweep.sha256`` tag at
registration and (2) checks what MLflow would execute: the MLmodel may only name
the onnx and python_function flavors, the latter loaded by ``mlflow.onnx``, with no
code paths; the ONNX graph uses standard operators only and no external data; the
weights parse as safetensors. Anything else raises :class:`UnsafeModelError` before
a byte of it is run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHAMPION = "champion"
MODEL_DIR = "model"  # the logged model's name: runs:/RUN_ID/model finds it
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ONNX_FILE = "model.onnx"  # what mlflow.onnx.save_model names the graph
MLMODEL_FILE = "MLmodel"
EXTRA_DIR = "extra_files"  # where mlflow.onnx.save_model puts extra_files
DIGESTS_TAG = "wrnsweep.sha256"  # JSON {relative path: sha256} of every file registered
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # a logged model's versions (as MLflow's fluent API)
NOTE_TAG = "mlflow.note.content"  # the description the UI shows
MODEL_TYPE = "image-classifier"
# Metrics of the run at the checkpoint's epoch that describe the checkpoint itself
# (lr, timings and running bests do not): linked to the logged model.
CHECKPOINT_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")
EXAMPLE_IMAGES = 2  # test images in the input example
CHECK_IMAGES = 256  # test images the served graph is compared on (plus CHECK_RANDOM)
CHECK_RANDOM = 8  # seeded uniform uint8 images: the whole input range
CHECK_SEED = 0
FOLD_TOLERANCE = 1e-4  # max abs logit difference, as `wrnsweep export`
_ALLOWED_FLAVORS = {"python_function", "onnx"}
_ONNX_DOMAINS = {"", "ai.onnx"}  # standard operators: no custom-op library to load


class UnsafeModelError(ValueError):
    """Files that wrnsweep will not load: they could run code, or differ from what was
    registered. Raised before anything in them is executed."""


@dataclass(frozen=True)
class Candidate:
    """A trial worth registering: its run, best score and best checkpoint's state."""

    run_id: str
    trial_id: str
    score: float
    config: dict[str, Any]
    state: dict[str, Any]  # engine checkpoint (model state_dict, config, num_classes, ...)
    # The trial's test accuracy after its LAST epoch: other weights than ``state``'s
    # unless the best epoch was the last; never registered (see the module docstring).
    test_acc: float | None


@dataclass(frozen=True)
class Evaluation:
    """One pass over a split: the counts behind the accuracy, and the mean loss."""

    correct: int
    total: int
    loss: float  # mean cross-entropy, nats

    @property
    def accuracy(self) -> float:
        # The same expression as trainables.engine.Trainer.evaluate: equal floats.
        return self.correct / max(self.total, 1)


def model_card(state: dict[str, Any]) -> dict[str, Any]:
    """What a loader needs besides the weights: builder arguments and input handling."""
    from trainables.config import TrainConfig
    from trainables.data import DATASETS

    cfg = TrainConfig.from_dict(state["config"])
    spec = DATASETS[cfg.dataset]
    return {
        "arch": cfg.arch,
        "num_classes": int(state["num_classes"]),
        "hparams": cfg.model_hparams(),
        "input_shape": [3, 32, 32],
        "mean": list(spec.mean),
        "std": list(spec.std),
        "dataset": cfg.dataset,
        "epoch": int(state["epoch"]),
        "train_config": cfg.to_dict(),
    }


def write_model_folder(state: dict[str, Any], folder: Path) -> Path:
    """``folder`` with the weights (safetensors) and the model card (config.json)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state["model"].items()}
    save_file(tensors, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(model_card(state), indent=2) + "\n")
    return folder


# -- evaluation ----------------------------------------------------------------------------
@contextlib.contextmanager
def _exact_fp32() -> Iterator[None]:
    """fp32 convolutions and matmuls on CUDA without TF32 (10-bit mantissas), restored after."""
    import torch

    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def evaluate(model: Any, split: Any, spec: Any, *, batch_size: int = 1024,
             device: Any = "cpu") -> Evaluation:
    """Accuracy and loss of ``model`` on ``split``, as the engine evaluates: fp32, eval mode.

    The batches come from :class:`trainables.data.Loader` (``train=False``): the same
    normalisation, order and batch size as ``Trainer.evaluate`` with
    ``eval_batch_size=batch_size``; on CPU the result equals that method's.
    """
    import torch
    import torch.nn.functional as F

    from trainables.data import Loader

    loader = Loader(split, spec, batch_size=batch_size, device=device, train=False)
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    with torch.no_grad(), _exact_fp32():
        for x, y in loader:  # x: (B, 3, 32, 32) fp32 normalised, y: (B,)
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum").double())
            correct += int((logits.argmax(1) == y).sum())
            total += int(y.numel())
    return Evaluation(correct=correct, total=total, loss=loss_sum / max(total, 1))


def _load_splits(cfg: Any, cache: dict[tuple[Any, ...], Any]) -> tuple[Any, str | None]:
    """The run's dataset as the driver can load it (never downloading); or why not."""
    from trainables.data import load_splits

    key = (cfg.dataset, cfg.data_root, cfg.synthetic_size)
    if key not in cache:
        try:
            cache[key] = (load_splits(cfg.dataset, root=cfg.data_root, download=False,
                                      synthetic_size=cfg.synthetic_size), None)
        except (FileNotFoundError, OSError) as err:
            cache[key] = (None, f"the {cfg.dataset} test split is not readable on the "
                                f"registering machine: {err}")
    return cache[key]


# -- registration --------------------------------------------------------------------------
def register(client: Any, name: str, candidates: list[Candidate], *,
             metric: str, sweep_run_ids: set[str] | frozenset[str] = frozenset(),
             echo: Callable[[str], None] | None = None) -> list[Any]:
    """Register ``candidates`` (best first) as versions of ``name``; alias the first.

    Each new candidate becomes an MLflow logged model of its run and a version (see
    the module docstring for what is in it, and what is measured). A run registered
    before (an extended sweep registers again after each round) keeps its version,
    re-ranked, rather than getting a duplicate; a version of one of ``sweep_run_ids``
    (the sweep's trials) that is no longer among the candidates loses its ``rank``
    tag, so no two versions claim the same rank.

    Raises ``RuntimeError`` when a served graph differs from its network by more than
    ``FOLD_TOLERANCE`` (that logged model is marked FAILED; nothing is registered for
    it). Returns the ModelVersion objects in the order of ``candidates``.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise
    versions = []
    splits_cache: dict[tuple[Any, ...], Any] = {}
    for rank, cand in enumerate(candidates, start=1):
        existing = client.search_model_versions(f"name='{name}' and run_id='{cand.run_id}'")
        if existing:  # registered by an earlier round of an extended sweep: rank it again
            client.set_model_version_tag(name, existing[0].version, "rank", str(rank))
            versions.append(existing[0])
            continue
        versions.append(_register_one(client, name, cand, rank=rank, metric=metric,
                                      splits_cache=splits_cache, echo=echo))
    chosen = {cand.run_id for cand in candidates}
    for stale in _versions_of(client, name, sweep_run_ids - chosen):
        if "rank" in (stale.tags or {}):
            client.delete_model_version_tag(name, stale.version, "rank")
    if versions:
        client.set_registered_model_alias(name, CHAMPION, versions[0].version)
    return versions


def _register_one(client: Any, name: str, cand: Candidate, *, rank: int, metric: str,
                  splits_cache: dict[tuple[Any, ...], Any],
                  echo: Callable[[str], None] | None) -> Any:
    from orchestrator.store import SWEEP_TAG
    from trainables.config import TrainConfig

    cfg = TrainConfig.from_dict(cand.state["config"])
    card = model_card(cand.state)
    run = client.get_run(cand.run_id)
    splits, missing = _load_splits(cfg, splits_cache)
    if missing:
        (echo or _stderr)(f"warning: {missing}; version of run {cand.run_id} registered "
                          "without test_acc")
    with tempfile.TemporaryDirectory(prefix="wrnsweep-register-") as tmp:
        weights = write_model_folder(cand.state, Path(tmp) / "weights")
        made = _make_mlflow_model(client, run, cand, card, cfg, weights, splits,
                                  Path(tmp) / MODEL_DIR)
    test = made["test"]
    sweep = run.data.tags.get(SWEEP_TAG)
    hparams = json.dumps(card["hparams"], sort_keys=True)
    tags = {
        metric: repr(float(cand.score)),
        "test_acc": "n/a" if test is None else repr(test.accuracy),
        "epoch": str(card["epoch"]),
        "epochs": str(cfg.epochs),
        "arch": card["arch"],
        "config": hparams,
        "params": str(made["num_params"]),
        "dataset": cfg.dataset,
        "trial_id": cand.trial_id,
        "sweep": sweep or "-",
        "rank": str(rank),
        "fold_max_abs_diff": f"{made['fold_diff']:.3g}",
        "input": made["input"],
        "output": made["output"],
        DIGESTS_TAG: json.dumps(made["digests"], sort_keys=True),
    }
    if test is not None:
        tags.update(test_correct=f"{test.correct}/{test.total}",
                    test_loss=repr(test.loss), eval_device=made["device"])
    else:
        tags["test_acc_missing"] = str(missing)[:4000]
    model_id = made["model_id"]
    description = _description(card, cfg, cand, metric, made, sweep, missing)
    client.set_logged_model_tags(model_id, {NOTE_TAG: description})
    with _store_as_default(client.tracking_uri):
        # The source MLflow's fluent registration writes; the UI links a version to its
        # logged model ("Source Model") only for this form.
        version = client.create_model_version(
            name, f"models:/{model_id}", run_id=cand.run_id, tags=tags, model_id=model_id,
            description=description)
    # What MLflow's fluent registration records: the logged model's page lists it.
    links = json.loads(client.get_logged_model(model_id).tags.get(MODEL_VERSIONS_TAG, "[]"))
    links.append({"name": version.name, "version": str(version.version)})
    client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps(links)})
    return version


@contextlib.contextmanager
def _store_as_default(tracking_uri: str) -> Iterator[None]:
    """Make ``tracking_uri`` the process-wide default while MLflow's in-process registry
    resolves a ``models:/<model_id>`` source.

    MLflow's SQL registry looks the logged model up through a plain ``MlflowClient()``
    (its own TODO: "Propagate tracking URI ... rather than relying on global URI"), which
    would read another store (or create ``./mlruns``). A server resolves it itself.
    """
    from orchestrator.store import is_local_store

    if not is_local_store(tracking_uri):
        yield
        return
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(tracking_uri):
        yield


def _make_mlflow_model(client: Any, run: Any, cand: Candidate, card: dict[str, Any],
                       cfg: Any, weights: Path, splits: Any, folder: Path) -> dict[str, Any]:
    """Evaluate the written weights, build and check the MLflow model, log it; what was made.

    Through ``client`` alone (MLflow's fluent ``log_model`` would use the process-wide
    tracking URI, not the sweep's store).
    """
    import mlflow.onnx
    import numpy as np
    import torch
    from mlflow.entities import LoggedModelOutput, Metric
    from mlflow.models import Model
    from safetensors.torch import load_file

    from orchestrator.export import SERVING_OUTPUT, RawImages, serving_onnx
    from trainables.engine import resolve_device
    from trainables.models import build_model, count_params

    # Exactly the registered bytes: the network is rebuilt from the written file.
    model = build_model(card["arch"], num_classes=card["num_classes"], **card["hparams"])
    model.load_state_dict(load_file(str(weights / WEIGHTS_FILE)))
    model.eval()
    device = resolve_device("auto")
    test = None
    if splits is not None:
        net = model if device.type == "cpu" else _on(model, device)
        test = evaluate(net, splits.test, splits.spec, batch_size=cfg.eval_batch_size,
                        device=device)
    graph = serving_onnx(model, card)
    size = card["input_shape"][1:]
    check = _check_images(splits, size)  # (N, 32, 32, 3) uint8
    example = (check[:EXAMPLE_IMAGES] if splits is not None
               else np.zeros((EXAMPLE_IMAGES, *size, 3), dtype=np.uint8))
    signature = _signature(card, np, size)
    run_id = run.info.run_id
    params = {k: str(v) for k, v in run.data.params.items()} or {
        k: str(v) for k, v in card["train_config"].items()}
    logged = client.create_logged_model(
        run.info.experiment_id, name=MODEL_DIR, source_run_id=run_id, params=params,
        tags={"arch": card["arch"], "config": json.dumps(card["hparams"], sort_keys=True),
              "epoch": str(card["epoch"]), "dataset": cfg.dataset, "trial_id": cand.trial_id},
        model_type=MODEL_TYPE)
    model_id = logged.model_id
    try:
        meta = {**card, "input": _input_text(size), "output": _output_text(card),
                "preprocessing": "inside the graph: x * 1/(255 std) - mean/std per channel"}
        with _no_progress_bars():  # it "downloads" the two local extra files
            mlflow.onnx.save_model(
                graph.proto, str(folder),
                mlflow_model=Model(artifact_path=logged.artifact_location, run_id=run_id,
                                   model_uuid=model_id, model_id=model_id),
                signature=signature, input_example=example, metadata=meta,
                pip_requirements=mlflow.onnx.get_default_pip_requirements(),
                save_as_external_data=False,  # one self-contained file (a WRN-28-10 is 146 MB)
                extra_files=[str(weights / WEIGHTS_FILE), str(weights / CONFIG_FILE)])
        # The check goes through MLflow's own loader: signature enforcement, onnxruntime.
        with _quiet("mlflow.onnx"):  # "CUDA provider unavailable", on every CPU machine
            served = mlflow.pyfunc.load_model(str(folder)).predict(check)[SERVING_OUTPUT]
        with torch.no_grad(), _exact_fp32():
            reference = RawImages(model, card["mean"], card["std"])(torch.from_numpy(check))
        fold_diff = float(np.abs(served - reference.numpy()).max())
        if not fold_diff <= FOLD_TOLERANCE:  # `not <=`: NaN fails too
            raise RuntimeError(
                f"the ONNX graph of run {run_id} differs from its network: max abs logit "
                f"difference {fold_diff:.3g} > {FOLD_TOLERANCE:g} on {len(check)} images; "
                "not registered")
        digests = file_digests(folder)
        client.log_model_artifacts(model_id, str(folder))
        # The run made this model at the checkpoint's epoch; its metrics there are the
        # model's, and so are the test metrics of exactly these weights.
        epoch = card["epoch"]
        client.log_outputs(run_id, [LoggedModelOutput(model_id, step=epoch)])
        linked = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, run_id=run_id)
                  for key in CHECKPOINT_METRICS for m in client.get_metric_history(run_id, key)
                  if m.step == epoch and m.model_id is None]
        if test is not None:
            now = _now_ms()
            linked += [Metric("test_acc", test.accuracy, now, epoch, model_id=model_id,
                              run_id=run_id),
                       Metric("test_loss", test.loss, now, epoch, model_id=model_id,
                              run_id=run_id)]
        if linked:
            client.log_batch(run_id, metrics=linked)
        client.set_logged_model_tags(model_id, {
            "params": str(count_params(model)), "fold_max_abs_diff": f"{fold_diff:.3g}",
            DIGESTS_TAG: json.dumps(digests, sort_keys=True)})
        client.finalize_logged_model(model_id, "READY")
    except BaseException:
        with contextlib.suppress(Exception):
            client.finalize_logged_model(model_id, "FAILED")
        raise
    return {"model_id": model_id, "artifact_location": logged.artifact_location,
            "test": test, "fold_diff": fold_diff, "folded_bn": graph.folded_bn,
            "affine_bn": graph.affine_bn, "num_params": count_params(model),
            "digests": digests, "device": str(device), "checked": len(check),
            "input": _input_text(size), "output": _output_text(card)}


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Only errors from ``logger`` while inside."""
    import logging

    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """MLflow's artifact progress bars off (they are on unless the variable says false)."""
    import os

    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr)


def _on(model: Any, device: Any) -> Any:
    import copy

    return copy.deepcopy(model).to(device)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _check_images(splits: Any, size: list[int]) -> Any:
    """The first CHECK_IMAGES test images and CHECK_RANDOM seeded random ones, NHWC uint8."""
    import numpy as np

    gen = np.random.default_rng(CHECK_SEED)
    noise = gen.integers(0, 256, size=(CHECK_RANDOM, *size, 3), dtype=np.uint8)
    if splits is None:
        return noise
    real = splits.test.images[:CHECK_IMAGES].permute(0, 2, 3, 1).contiguous().numpy()
    return np.concatenate([real, noise])


def _signature(card: dict[str, Any], np: Any, size: list[int]) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from orchestrator.export import SERVING_INPUT, SERVING_OUTPUT

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *size, 3), SERVING_INPUT)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, card["num_classes"]),
                                   SERVING_OUTPUT)]))


def _input_text(size: list[int]) -> str:
    return f"images: uint8 RGB (N, {size[0]}, {size[1]}, 3), values 0-255"


def _output_text(card: dict[str, Any]) -> str:
    return f"logits: float32 (N, {card['num_classes']}), before softmax"


def _description(card: dict[str, Any], cfg: Any, cand: Candidate, metric: str,
                 made: dict[str, Any], sweep: str | None, missing: str | None) -> str:
    hparams = ", ".join(f"{k}={v}" for k, v in sorted(card["hparams"].items()))
    test = made["test"]
    if test is None:
        tested = f"Test accuracy: not measured ({missing})."
    else:
        tested = (f"Test accuracy of exactly these weights: {test.accuracy:.4f} "
                  f"({test.correct}/{test.total}; loss {test.loss:.4f}; fp32 on "
                  f"{made['device']}).")
    milestones = ", ".join(f"{m:g}" for m in cfg.milestones)
    return "\n\n".join([
        f"**{card['arch']}** ({hparams}): {made['num_params']:,} parameters, "
        f"{card['dataset']} ({card['num_classes']} classes).",
        f"Weights of epoch {card['epoch']} of {cfg.epochs}: the best {metric} "
        f"({cand.score:.4f}) of trial {cand.trial_id} (run {cand.run_id}) of sweep "
        f"{sweep or '-'}. {tested}",
        f"Training: lr {cfg.lr:g}, batch {cfg.batch_size}, momentum {cfg.momentum:g}"
        f"{' (Nesterov)' if cfg.nesterov else ''}, weight decay {cfg.weight_decay:g}, "
        f"lr x{cfg.gamma:g} at {milestones} of the epochs, seed {cfg.seed}.",
        f"Serving (`model.onnx`, MLflow's onnx flavor): BatchNorm and Dirac terms folded "
        f"({made['folded_bn']} BN into convs, {made['affine_bn']} as affine), max abs logit "
        f"difference to the unfolded network {made['fold_diff']:.2g} on {made['checked']} "
        f"images. Input {made['input']}, normalised inside; output {made['output']}.",
        "Fine-tuning: `orchestrator.registry.load_model(URI)` rebuilds the nn.Module from "
        f"`{EXTRA_DIR}/{WEIGHTS_FILE}` and `{EXTRA_DIR}/{CONFIG_FILE}`.",
    ])


def _versions_of(client: Any, name: str, run_ids: set[str]) -> list[Any]:
    """The versions of ``name`` made from any of ``run_ids``."""
    if not run_ids:
        return []
    return [v for v in client.search_model_versions(f"name='{name}'", max_results=10_000)
            if v.run_id in run_ids]


# -- checking files ------------------------------------------------------------------------
def file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by POSIX path relative to it."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out[path.relative_to(folder).as_posix()] = digest.hexdigest()
    return out


def check_model_folder(folder: Path, digests: dict[str, str] | None = None) -> None:
    """Raise :class:`UnsafeModelError` unless ``folder`` is safe to load; runs nothing.

    With ``digests`` (recorded at registration) every listed file must be there,
    byte for byte. Whatever the digests say, the files that MLflow or wrnsweep would
    execute or deserialise are checked for what they are (module docstring).
    """
    folder = Path(folder)
    if digests:
        found = file_digests(folder)
        for rel, digest in sorted(digests.items()):
            if found.get(rel) != digest:
                state = "is missing" if rel not in found else "differs from what was registered"
                raise UnsafeModelError(f"{rel} {state} (sha256 recorded at registration: "
                                       f"{digest[:12]}...); refused, nothing loaded")
    mlmodel = folder / MLMODEL_FILE
    if mlmodel.exists():
        _check_mlmodel(mlmodel)
    onnx_file = folder / ONNX_FILE
    if onnx_file.exists():
        _check_onnx(onnx_file)
    weights = _find(folder, WEIGHTS_FILE)
    if weights is not None:
        _check_safetensors(weights)


def _check_mlmodel(path: Path) -> None:
    import yaml

    try:
        meta = yaml.safe_load(path.read_text())  # safe_load: plain data, no Python objects
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UnsafeModelError(f"{path.name}: not a readable MLmodel file ({err})") from None
    flavors = (meta or {}).get("flavors") if isinstance(meta, dict) else None
    if not isinstance(flavors, dict):
        raise UnsafeModelError(f"{path.name}: no flavors; not a model wrnsweep registered")
    other = sorted(set(flavors) - _ALLOWED_FLAVORS)
    if other:
        raise UnsafeModelError(
            f"{path.name} names the flavor(s) {other}; a wrnsweep model has only "
            f"{sorted(_ALLOWED_FLAVORS)} (other flavors can unpickle or import code); refused")
    pyfunc = flavors.get("python_function") or {}
    loader = pyfunc.get("loader_module")
    if loader != "mlflow.onnx":
        raise UnsafeModelError(
            f"{path.name}: python_function is loaded by {loader!r}, not 'mlflow.onnx' "
            "(another loader can unpickle or import code); refused")
    for flavor, conf in flavors.items():
        conf = conf or {}
        if conf.get("code") or conf.get("model_code_path") or conf.get("python_model"):
            raise UnsafeModelError(f"{path.name}: the {flavor} flavor brings code "
                                   "(code paths or a Python model); refused")
        if conf.get("data") not in (None, ONNX_FILE):
            raise UnsafeModelError(f"{path.name}: the {flavor} flavor loads "
                                   f"{conf.get('data')!r}, not {ONNX_FILE}; refused")
        if conf.get("onnx_session_options"):
            raise UnsafeModelError(f"{path.name}: onnx_session_options set; refused")


def _check_onnx(path: Path) -> None:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(path), load_external_data=False)  # protobuf: data, not code
    except (DecodeError, ValueError, OSError) as err:
        raise UnsafeModelError(f"{path.name}: not an ONNX model ({err}); refused") from None
    for node in _nodes(proto.graph):
        if node.domain not in _ONNX_DOMAINS:
            raise UnsafeModelError(f"{path.name}: operator {node.op_type} of domain "
                                   f"{node.domain!r} needs a custom-op library; refused")
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise UnsafeModelError(f"{path.name}: tensor {tensor.name} reads an external "
                                   "file; refused")


def _nodes(graph: Any) -> Iterator[Any]:
    """Every node of ``graph``, those of subgraphs (If, Loop, Scan) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g, *attr.graphs] if attr.HasField("g") else attr.graphs:
                yield from _nodes(sub)


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as err:  # SafetensorError and friends: the header did not parse
        raise UnsafeModelError(
            f"{path.name}: not a safetensors file ({type(err).__name__}: {err}); wrnsweep "
            "loads weights from safetensors only and never unpickles; refused") from None


def _find(folder: Path, name: str) -> Path | None:
    """``folder/name`` (a plain model folder) or ``folder/extra_files/name`` (registered)."""
    for path in (folder / name, folder / EXTRA_DIR / name):
        if path.is_file():
            return path
    return None


# -- resolving and fetching ----------------------------------------------------------------
def _client(tracking_uri: str | None) -> Any:
    from orchestrator.store import mlflow_client

    if tracking_uri is None:
        import mlflow

        tracking_uri = mlflow.get_tracking_uri()
    return mlflow_client(tracking_uri)


def _resolve(uri: str, tracking_uri: str | None) -> tuple[str, dict[str, str] | None]:
    """``(artifact location, recorded digests or None)`` behind a registry or run URI.

    Resolved through a client whose registry is the tracking store: MLflow's own
    ``models:/`` handling consults the process-wide default registry instead.
    """
    if uri.startswith("models:/"):
        client = _client(tracking_uri)
        name, sep, alias = uri[len("models:/"):].partition("@")
        if sep:
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = name.rpartition("/")
            if not name or not number:
                raise ValueError(f"model URI must be models:/NAME@ALIAS or models:/NAME/VERSION, "
                                 f"got {uri!r}")
            version = client.get_model_version(name, number)
        source = version.source
        logged_id = _logged_model_id(source)
        if logged_id is not None:  # models:/<model_id>: the logged model's own folder
            source = client.get_logged_model(logged_id).artifact_location
        return source, _digests((version.tags or {}).get(DIGESTS_TAG))
    if uri.startswith("runs:/"):
        client = _client(tracking_uri)
        run_id, _, path = uri[len("runs:/"):].partition("/")
        run = client.get_run(run_id)
        found = client.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"name = '{path.strip('/') or MODEL_DIR}'", max_results=100)
        logged = [m for m in found if m.source_run_id == run_id]
        if logged:  # the run's logged model (newest), as MLflow resolves runs:/ID/NAME
            model = max(logged, key=lambda m: m.creation_timestamp)
            return model.artifact_location, _digests(model.tags.get(DIGESTS_TAG))
    return uri, None


def _logged_model_id(source: str) -> str | None:
    """``m-...`` of a ``models:/<model_id>`` source; None for any other source."""
    rest = source[len("models:/"):] if source.startswith("models:/") else ""
    return rest if rest and "/" not in rest and "@" not in rest else None


def _digests(text: str | None) -> dict[str, str] | None:
    return json.loads(text) if text else None


def resolve_source(uri: str, tracking_uri: str | None) -> str:
    """The artifact location behind ``models:/NAME@alias``, ``models:/NAME/VERSION`` or
    ``runs:/ID/model`` (other URIs are returned as they are)."""
    return _resolve(uri, tracking_uri)[0]


def fetch_model(uri: str, dst: str | Path, *, tracking_uri: str | None = None) -> Path:
    """Download ``uri``'s model files into the new folder ``dst`` and check them there.

    ``uri``: ``models:/NAME@alias``, ``models:/NAME/VERSION``, ``runs:/ID/model``, any
    artifact URI, or a local folder (copied). The check (:func:`check_model_folder`,
    against the digests recorded at registration where the URI has them) runs on the
    copy, which is what gets loaded: nothing can swap a file in between. Raises
    :class:`UnsafeModelError`; ``dst`` is then left with the refused files.
    """
    import shutil

    dst = Path(dst)
    source, digests = (uri, None) if Path(uri).is_dir() else _resolve(uri, tracking_uri)
    if Path(source).is_dir():
        shutil.copytree(source, dst)
    else:
        import mlflow.artifacts

        dst.mkdir(parents=True)
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst),
                                                       tracking_uri=tracking_uri))
        if got != dst:  # a folder URI lands as dst/<its last path part>
            for item in got.iterdir():
                item.rename(dst / item.name)
            got.rmdir()
    check_model_folder(dst, digests)
    return dst


def load_model(uri: str, *, tracking_uri: str | None = None) -> tuple[Any, dict[str, Any]]:
    """``(nn.Module in eval mode on CPU, model card)`` from a registry URI or folder.

    ``uri`` may be ``models:/NAME@alias``, ``models:/NAME/VERSION``, ``runs:/ID/model``
    or a local folder (a registered model's, or one of :func:`write_model_folder`).
    The unfolded network, BatchNorm intact: the one to fine-tune. Raises
    :class:`UnsafeModelError` for files that fail the checks (module docstring).
    """
    from safetensors.torch import load_file

    from trainables.models import build_model

    with tempfile.TemporaryDirectory(prefix="wrnsweep-model-") as tmp:
        folder = Path(uri)
        if folder.is_dir():
            check_model_folder(folder)
        else:
            folder = fetch_model(uri, Path(tmp) / MODEL_DIR, tracking_uri=tracking_uri)
        card_file, weights = _find(folder, CONFIG_FILE), _find(folder, WEIGHTS_FILE)
        if card_file is None or weights is None:
            raise FileNotFoundError(f"{uri}: no {CONFIG_FILE} and {WEIGHTS_FILE} (at the top "
                                    f"or in {EXTRA_DIR}/); not a wrnsweep model")
        card = json.loads(card_file.read_text())
        model = build_model(card["arch"], num_classes=card["num_classes"], **card["hparams"])
        model.load_state_dict(load_file(str(weights)))
    return model.eval(), card


def load_pyfunc(uri: str, *, tracking_uri: str | None = None) -> Any:
    """MLflow's pyfunc model of ``uri`` (onnxruntime), loaded only after the checks.

    The same model as ``mlflow.pyfunc.load_model(uri)``; that call trusts the files,
    this one refuses tampered ones (:class:`UnsafeModelError`) and resolves ``uri``
    in ``tracking_uri``'s store rather than the process-wide registry.
    """
    import mlflow.pyfunc

    with tempfile.TemporaryDirectory(prefix="wrnsweep-pyfunc-") as tmp:
        folder = fetch_model(uri, Path(tmp) / MODEL_DIR, tracking_uri=tracking_uri)
        # onnxruntime reads the graph into memory here; the folder can go afterwards.
        return mlflow.pyfunc.load_model(str(folder))


# -- serving -------------------------------------------------------------------------------
def serve_command(folder: Path, *, host: str, port: int) -> list[str]:
    """``mlflow models serve`` of a checked local folder, in this environment."""
    import sys

    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(folder),
            "--env-manager", "local", "--host", host, "--port", str(port)]


def serve(uri: str, *, tracking_uri: str | None, host: str = "127.0.0.1", port: int = 5001,
          echo: Callable[[str], None] = print) -> int:
    """Serve ``uri`` with ``mlflow models serve`` until Ctrl-C (0) or the server's exit code.

    The model is fetched and checked first (:func:`fetch_model`) into a private
    temporary folder, which is what the server loads (with ``--env-manager local``:
    this environment, nothing installed); the server never reads the store. Raises
    ``ValueError`` for a busy port or bad host, :class:`UnsafeModelError` for refused
    files, ``RuntimeError`` if the server exits before it answers.
    """
    import os
    import sys

    from orchestrator import ui

    ui.check_port_free(host, port)
    # `mlflow models serve` execs `uvicorn` from PATH: a venv's wrnsweep run without
    # activating the venv must still start this environment's.
    path = os.environ.get("PATH", "")
    bindir = str(Path(sys.executable).parent)
    with tempfile.TemporaryDirectory(prefix="wrnsweep-serve-") as tmp:
        folder = fetch_model(uri, Path(tmp) / MODEL_DIR, tracking_uri=tracking_uri)
        base = f"http://{ui.browse_host(host)}:{port}"
        echo(f"serving {uri} on {host}:{port} ...")
        os.environ["PATH"] = os.pathsep.join([bindir, path]) if path else bindir
        try:
            with ui.running_server(serve_command(folder, host=host, port=port)) as proc:
                os.environ["PATH"] = path
                try:
                    up = ui.wait_until_up(proc, base)
                except RuntimeError:
                    raise RuntimeError(f"mlflow models serve exited with code {proc.poll()} "
                                       "before answering (its messages are above)") from None
                if not up:
                    echo(f"the server is not answering after {ui.STARTUP_TIMEOUT:.0f} s; "
                         "still waiting on it")
                echo(f"model server: POST {base}/invocations "
                     '(JSON {"inputs": uint8 images (N, 32, 32, 3)}); press Ctrl-C to stop it')
                return proc.wait()
        except KeyboardInterrupt:
            echo("model server stopped")
            return 0
        finally:
            os.environ["PATH"] = path
