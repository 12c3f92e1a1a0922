"""``resources: auto``: a GPU share per trial from its estimated peak memory, and OOM escalation.

Ray's fractional GPUs are a count, not memory: two trials holding ``gpu: 0.5``
each may still not fit together. With ``auto``, each trial's peak training
memory is estimated before it starts (:func:`orchestrator.memory.estimate_training_memory`:
parameters, gradients, SGD momentum, the activations autograd keeps in the
engine's bf16/channels_last mode, the dataset on the device, allowances) from
its *sampled* architecture, width, depth, dropout and batch size, and the trial
asks Ray for the smallest share of {1/8, 1/4, 1/2, 1} of one GPU that holds it
with 20 % headroom. The trial process is then capped at that share with
``torch.cuda.set_per_process_memory_fraction`` (:class:`trainables.engine.Trainer`),
so a wrong estimate surfaces as a CUDA out-of-memory error in that trial, not in
its neighbours.

Such an error is not a lost trial: :class:`OomEscalation` (a Tune callback)
sees the trial being retried, gives it the next larger share
(:func:`orchestrator.memory.next_share`), and refunds the retry, so it does not
use up ``ray.max_failures``. The trial restarts from its last checkpoint. At a
whole GPU there is nothing larger (trials are single-GPU): a further OOM counts
as an ordinary failure.

GPU memory per device comes from ``ray.gpu_memory_gib`` in the sweep file, or
else is read with ``nvidia-smi`` by a zero-GPU Ray task on a GPU node. On a
cluster without GPUs, ``auto`` is one CPU and no GPU.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray import tune

GiB = 1024**3
HEADROOM = 0.2  # of each share, for what the estimate cannot see (fragmentation, cuDNN)
OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory")
DRY_RUN_GPU_BYTES = 80 * GiB  # shown by --dry-run when the GPU size is not given


@dataclass(frozen=True)
class Packing:
    """The estimate of one trial configuration and the share it gets."""

    total_bytes: int
    share: float  # of one GPU; 0.0 on a cluster without GPUs

    def describe(self) -> str:
        share = f"{self.share:g} GPU" if self.share else "no GPU"
        return f"{self.total_bytes / GiB:.2f} GiB -> {share}"


def train_config_of(config: dict[str, Any]) -> Any:
    """The TrainConfig a trial with this Tune config will run (prefixes stripped)."""
    from trainables.config import TrainConfig
    from trainables.trainable import trial_config

    return TrainConfig.from_dict(trial_config(config))


def dataset_images(dataset: str, synthetic_size: int) -> tuple[int, int]:
    """(training images, validation + test images) the loaders move to the GPU."""
    if dataset in ("cifar10", "cifar100"):
        return 45_000, 15_000
    if dataset == "digits":
        return 1_257, 540
    eval_size = max(256, synthetic_size // 8)
    return synthetic_size, 2 * eval_size


def estimate_bytes(tcfg: Any) -> int:
    """Peak GPU bytes of a trial of ``tcfg`` in the engine's CUDA mode (see module doc)."""
    import torch

    from orchestrator.memory import estimate_training_memory
    from trainables.data import DATASETS

    train_images, eval_images = dataset_images(tcfg.dataset, tcfg.synthetic_size)
    estimate = estimate_training_memory(
        tcfg.arch, tcfg.model_hparams(), num_classes=DATASETS[tcfg.dataset].num_classes,
        batch_size=tcfg.batch_size, amp_dtype=torch.bfloat16 if tcfg.amp else None,
        channels_last=tcfg.channels_last, dataset_images=train_images,
        eval_images=eval_images, momentum=tcfg.momentum, device="cuda",
    )
    return estimate.total_bytes


class AutoResources:
    """``config -> {"cpu": 1, "gpu": share}`` for the architectures set to ``auto``.

    Estimates are cached per configuration (an Optuna search revisits them). The
    estimate runs in this process when it sees no GPU; otherwise in a zero-GPU Ray
    task, where Ray hides the GPUs, so that the driver never opens a CUDA context
    (fake CUDA tensors would start the CUDA runtime, ~0.5 GiB of a GPU).
    """

    def __init__(self, gpu_memory_bytes: int | None, *, cpu: float = 1.0,
                 estimator: Callable[[Any], int] | None = None) -> None:
        self.gpu_memory_bytes = gpu_memory_bytes
        self.cpu = cpu
        self.estimator = estimator or _estimate_away_from_gpus
        self._cache: dict[tuple, Packing] = {}

    def packing(self, config: dict[str, Any]) -> Packing:
        from orchestrator.memory import gpu_share

        tcfg = train_config_of(config)
        key = (tcfg.arch, tuple(sorted(tcfg.model_hparams().items())), tcfg.batch_size,
               tcfg.amp, tcfg.dataset, tcfg.synthetic_size)
        if key not in self._cache:
            total = self.estimator(tcfg)
            share = (gpu_share(total, self.gpu_memory_bytes, headroom=HEADROOM)
                     if self.gpu_memory_bytes else 0.0)
            self._cache[key] = Packing(total, share)
        return self._cache[key]

    def __call__(self, config: dict[str, Any]) -> dict[str, float]:
        return {"cpu": self.cpu, "gpu": self.packing(config).share}

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles the trainable (and this with it) into the experiment state.
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state


def _estimate_away_from_gpus(tcfg: Any) -> int:
    import torch

    if torch.cuda.device_count() == 0:
        return estimate_bytes(tcfg)
    import ray

    task = ray.remote(num_cpus=0, num_gpus=0)(estimate_bytes)
    return int(ray.get(task.remote(tcfg), timeout=300))


def _smi_memory_bytes() -> int | None:
    """Memory of the smallest GPU of this node, by nvidia-smi (None without one)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    sizes = [int(line) for line in out.split() if line.strip().isdigit()]
    return min(sizes) * 1024**2 if sizes else None


def detect_gpu_memory(gpu_node_ids: list[str]) -> int | None:
    """Bytes of one GPU of the cluster: the smallest seen on its GPU nodes, or None."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, num_gpus=0)(_smi_memory_bytes)
    futures = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        node_id=node, soft=False)).remote() for node in gpu_node_ids]
    sizes = [s for s in ray.get(futures, timeout=120) if s]
    return min(sizes) if sizes else None


def gpu_memory_for(cfg: Any, nodes: list[dict[str, Any]]) -> int | None:
    """GPU bytes for ``auto``: the sweep file's ``ray.gpu_memory_gib``, else detected.

    ``nodes`` are ``ray.nodes()`` entries of live nodes. Raises ValueError when
    the cluster has GPUs whose memory nobody can tell.
    """
    gpu_nodes = [n["NodeID"] for n in nodes if n.get("Resources", {}).get("GPU", 0) > 0]
    if not gpu_nodes:
        return None
    if cfg.ray.gpu_memory_gib:
        return int(cfg.ray.gpu_memory_gib * GiB)
    detected = detect_gpu_memory(gpu_nodes)
    if detected is None:
        raise ValueError("resources: auto needs the memory of one GPU and nvidia-smi could "
                         "not tell it on the GPU nodes: set ray.gpu_memory_gib in the sweep file")
    return detected


def corner_configs(cfg: Any, arch: str) -> list[dict[str, Any]]:
    """Tune-like configs at the corners of ``arch``'s space (each numeric model hparam
    at its lowest and highest value, every string choice): the extremes of memory."""
    import itertools

    from trainables.models.registry import get_family

    params = cfg.params_for(arch)
    axes: list[list[tuple[str, Any]]] = []
    for name in get_family(arch).hparam_names:
        param = params.get(name)
        if param is None or param.kind == "milestones":
            continue
        if param.kind == "constant":
            values = [param.value]
        elif param.kind == "categorical":
            numeric = [v for v in param.choices if isinstance(v, int | float)]
            values = [min(numeric), max(numeric)] if numeric else list(param.choices)
        else:
            values = [param.low, param.high]
        axes.append([(name, v) for v in dict.fromkeys(values)])
    base = {"arch": arch, **cfg.dataset_options(), **cfg.recipe_constants(arch)}
    return [{**base, **dict(combo)} for combo in itertools.product(*axes)]


def describe_auto(cfg: Any, arch: str, gpu_memory_bytes: int | None) -> str:
    """Dry-run text: the estimate range of ``arch`` and the shares it leads to."""
    if gpu_memory_bytes is None:  # known once the cluster is: show an H100's
        gpu_memory_bytes = DRY_RUN_GPU_BYTES
        where = (f"{DRY_RUN_GPU_BYTES // GiB} GiB GPUs (ray.gpu_memory_gib unset: "
                 "detected at launch)")
    else:
        where = f"{gpu_memory_bytes / GiB:g} GiB GPUs"
    auto = AutoResources(gpu_memory_bytes, estimator=estimate_bytes)
    packings = [auto.packing(c) for c in corner_configs(cfg, arch)]
    low = min(packings, key=lambda p: p.total_bytes)
    high = max(packings, key=lambda p: p.total_bytes)
    text = low.describe() if low == high else f"{low.describe()} .. {high.describe()}"
    return f"auto: 1 CPU; estimated peak {text} on {where}"


# -- OOM escalation ----------------------------------------------------------------------
def is_oom(error_text: str) -> bool:
    """Whether the *latest* failure in Tune's error file (or a message) is a CUDA OOM."""
    latest = error_text.rsplit("Failure # ", 1)[-1]
    return any(marker in latest for marker in OOM_MARKERS)


def escalate(trial: Any, error_text: str) -> float | None:
    """Give a trial that ran out of GPU memory the next share; the new share or None.

    Called while the trial waits to be retried (PENDING). The failure is refunded:
    an estimate that was too small is not the trial's fault.
    """
    from ray.tune.execution.placement_groups import resource_dict_to_pg_factory

    from orchestrator.memory import next_share

    if not is_oom(error_text):
        return None
    resources = dict(trial.placement_group_factory.required_resources)
    share = float(resources.get("GPU", 0))
    if not 0 < share < 1:
        return None  # no GPU, or a whole one already: an ordinary failure
    new = next_share(share)
    trial.update_resources(resource_dict_to_pg_factory(
        {"cpu": resources.get("CPU", 1.0), "gpu": new}))
    trial.run_metadata.num_failures = max(0, trial.run_metadata.num_failures - 1)
    return new


class OomEscalation(tune.Callback):
    """Retries a trial that ran out of GPU memory with the next larger share (see module doc).

    ``tracker`` (a :class:`orchestrator.tracking.SweepTracker`) gets the new share
    as the run's ``wrnsweep.gpu`` tag.
    """

    def __init__(self, tracker: Any = None, echo: Callable[[str], None] = print) -> None:
        self.tracker = tracker
        self.echo = echo

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks into the experiment state; an echo (a click or test
        # function, a bound method) need not pickle, and a restored sweep prints anew.
        return {**self.__dict__, "echo": print}

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from orchestrator.tracking import GPU_TAG, _error_text

        old = trial.placement_group_factory.required_resources.get("GPU", 0)
        new = escalate(trial, _error_text(trial))
        if new is None:
            return
        self.echo(f"{trial.trial_id}: CUDA out of memory at {old:g} GPU; retrying with {new:g}")
        if self.tracker is not None:
            self.tracker.tag_trial(trial, GPU_TAG, f"{new:g}")
