"""Peak training memory of a trial, estimated before it starts, and the GPU share it needs.

``resources: auto`` asks Ray for the smallest GPU fraction a trial fits in, so
that small ResNets pack several to a GPU while wide networks get more. The
estimate models one steady-state training step of :class:`trainables.engine.Trainer`
(SGD with momentum, bf16 autocast and channels_last on CUDA)::

    peak = params + grads + optimizer + activations + transient + data   (allocated_bytes)
         + workspace + context                                            (total_bytes)

* ``params_bytes``: parameters and buffers (BN statistics, DiracNet's delta), fp32.
* ``grads_bytes``: one fp32 gradient per trainable parameter. The engine calls
  ``zero_grad(set_to_none=True)`` *after* the forward pass, so the previous
  step's gradients are still alive while activations pile up.
* ``optimizer_bytes``: SGD's momentum buffer, fp32, one per trainable parameter
  (0 when ``momentum=0``).
* ``activations_bytes``: every tensor autograd keeps for backward, counted on a
  forward pass of *fake* tensors (meta tensors that report the target device,
  so no memory is allocated and a WRN-28-10 takes well under a second): a
  ``saved_tensors_hooks`` pack hook records each saved tensor's storage, tensors
  sharing a storage count once, and parameters, buffers and the input batch are
  left out (they are counted above and in ``data_bytes``). On CUDA the pass runs
  under the real bf16 autocast dispatch, so the dtype of every saved tensor is
  whatever autocast makes it: conv/linear inputs and outputs in bf16, the bf16
  copies of the weights that convs keep for backward, fp32 for the loss, and a
  1-byte mask per element for dropout. No analytic dtype rule is involved; what
  the fake pass cannot see is opaque backend scratch (e.g. a cuDNN BN reserve),
  which the workspace allowance covers.
  On the CPU, the same count on fake CPU tensors equals the bytes saved by a real
  CPU forward exactly (``tests/test_memory.py``).
* ``transient_bytes``: what is alive at the peak without being saved:
  ``max(2 x largest saved tensor, grads - activations)``. The first term covers
  the forward's in-flight intermediates and the activation gradients at the
  start of backward; the second the optimiser step, where the activations are
  gone but foreach SGD with weight decay makes one gradient-sized temporary.
* ``data_bytes``: what :class:`trainables.data.Loader` keeps on the device: the
  training images reflect-padded once to 40x40 uint8 (4,800 bytes per image,
  1.56x the 32x32 images), the evaluation images unpadded (3,072 bytes), int64
  labels and the per-epoch int64 plan (24 bytes per training image), and one
  batch as fp32 plus its uint8 gather.
* ``workspace_bytes``: an allowance, not a count: cuDNN/cuBLAS workspaces and the
  caching allocator's fragmentation, ``max(256 MiB, 10 % of allocated_bytes)``.
* ``context_bytes``: the CUDA context of the trial's process (CUDA runtime,
  cuDNN and cuBLAS handles): 512 MiB. Real per-trial memory when trials share a
  GPU; ``torch.cuda.max_memory_allocated`` does not see it.

``torch.cuda.max_memory_allocated`` after a step should be close to
``allocated_bytes`` (``bench/memory_estimate.py`` checks it on a GPU; target
within 15 %). A trial asks for ``gpu_share(total_bytes, gpu_memory)``; when it
runs out of memory anyway, ``next_share`` is the retry ladder.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainables.models import build_model

__all__ = [
    "SHARES",
    "MemoryEstimate",
    "estimate_training_memory",
    "gpu_share",
    "next_share",
    "saved_tensor_bytes",
]

MiB = 2**20
GiB = 2**30
SHARES = (0.125, 0.25, 0.5, 1.0)  # GPU fractions a trial may ask for (then no more: single-GPU)
CONTEXT_BYTES = 512 * MiB  # CUDA context + cuDNN/cuBLAS handles per process (H100, CUDA 12/13)
MIN_WORKSPACE_BYTES = 256 * MiB  # floor of the cuDNN workspace + fragmentation allowance
WORKSPACE_FRACTION = 0.10  # ... or this fraction of the allocated bytes, if larger
IMAGE_SIZE, PAD = 32, 4  # CIFAR pixels, and the loader's reflect padding (trainables.data)
PADDED_IMAGE_BYTES = 3 * (IMAGE_SIZE + 2 * PAD) ** 2  # 4,800: one 3x40x40 uint8 image
IMAGE_BYTES = 3 * IMAGE_SIZE**2  # 3,072: one 3x32x32 uint8 image
TRAIN_INDEX_BYTES = 8 + 24  # per training image: int64 label + per-epoch int64 plan (3 x 8)
EVAL_INDEX_BYTES = 8  # per evaluation image: int64 label
EVAL_IMAGES = 15_000  # CIFAR: 5,000 validation + 10,000 test images, moved once


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one trial at its peak; see the module docstring for each term."""

    params_bytes: int  # parameters + buffers, fp32
    grads_bytes: int  # fp32 gradient per trainable parameter
    optimizer_bytes: int  # SGD momentum buffers
    activations_bytes: int  # tensors saved for backward (autocast dtypes), deduplicated
    workspace_bytes: int  # allowance: cuDNN workspace + allocator fragmentation
    data_bytes: int  # dataset, labels, epoch plan and one batch on the device
    transient_bytes: int = 0  # alive at the peak but not saved: in-flight tensors, step temps
    context_bytes: int = 0  # CUDA context of the process (invisible to the allocator)

    @property
    def allocated_bytes(self) -> int:
        """What ``torch.cuda.max_memory_allocated`` should report after a training step."""
        return (self.params_bytes + self.grads_bytes + self.optimizer_bytes
                + self.activations_bytes + self.transient_bytes + self.data_bytes)

    @property
    def total_bytes(self) -> int:
        """Everything the trial needs on its GPU: allocated bytes, allowances, context."""
        return sum(getattr(self, f.name) for f in fields(self))

    def describe(self) -> str:
        """One line in MiB, e.g. for a dry-run plan."""
        parts = ", ".join(f"{f.name.removesuffix('_bytes')} {getattr(self, f.name) / MiB:,.0f}"
                          for f in fields(self))
        return f"{self.total_bytes / MiB:,.0f} MiB ({parts})"


# -- saved tensors -----------------------------------------------------------------------
@dataclass
class SavedTensors:
    """Storages autograd saved for backward: bytes per dtype, and the largest one."""

    by_dtype: dict[torch.dtype, int]
    largest: int  # bytes of the largest single storage

    @property
    def total(self) -> int:
        return sum(self.by_dtype.values())


def _storage_key(t: torch.Tensor) -> int:
    # The StorageImpl's address: shared by views, distinct for live storages, and
    # defined for meta and fake tensors too (whose data pointers are all 0).
    return t.untyped_storage()._cdata


@contextmanager
def _autocast(device_type: str, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` without its "CUDA is not available" guard.

    Fake CUDA tensors get autocast's CUDA dispatch on a machine without a GPU; the
    public context manager would disable itself there, so set the same state.
    """
    if dtype is None:
        yield
        return
    prev = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    torch.set_autocast_enabled(device_type, True)
    torch.set_autocast_dtype(device_type, dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled(device_type, prev[0])
        torch.set_autocast_dtype(device_type, prev[1])


def saved_tensor_bytes(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    amp_dtype: torch.dtype | None = None,
) -> SavedTensors:
    """Bytes autograd saves for backward in one training forward (model + cross-entropy).

    Works on real, meta and fake tensors alike. Storages of parameters, buffers
    and ``x`` are excluded; the model is put in training mode. The graph (and so
    every saved tensor) stays alive until the count is done, so storage
    addresses cannot be reused within one count.
    """
    model.train()
    exclude = {_storage_key(t) for t in (*model.parameters(), *model.buffers(), x)}
    seen: dict[int, tuple[torch.dtype, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in exclude and key not in seen:
            seen[key] = (t.dtype, t.untyped_storage().nbytes())
        return t

    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack), \
            _autocast(x.device.type, amp_dtype):
        loss = F.cross_entropy(model(x), y)
    by_dtype: dict[torch.dtype, int] = {}
    for dtype, nbytes in seen.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    result = SavedTensors(by_dtype, max((n for _, n in seen.values()), default=0))
    del loss  # frees the graph and the saved tensors
    return result


def _fake_model(model: nn.Module, device: str, channels_last: bool) -> None:
    """Replace ``model``'s meta parameters and buffers by fake tensors on ``device``.

    Must run inside a ``FakeTensorMode``. ``Module.to`` cannot do this (it swaps
    tensor types), so the entries are replaced in place.
    """
    def fake(t: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if channels_last and t.dim() == 4 else torch.contiguous_format
        return torch.empty(t.shape, dtype=t.dtype, device=device, memory_format=fmt)

    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(fake(p), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = fake(b)


def _fake_saved(
    model: nn.Module, device: str, batch_size: int, amp_dtype: torch.dtype | None,
    channels_last: bool,
) -> SavedTensors:
    from torch._subclasses.fake_tensor import FakeTensorMode  # heavy import: only when needed

    with FakeTensorMode():
        _fake_model(model, device, channels_last)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.empty(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, device=device, memory_format=fmt)
        y = torch.zeros(batch_size, dtype=torch.int64, device=device)
        return saved_tensor_bytes(model, x, y, amp_dtype=amp_dtype)


# -- the estimate ----------------------------------------------------------------------
def estimate_training_memory(
    arch: str,
    hparams: dict[str, Any],
    *,
    num_classes: int = 10,
    batch_size: int = 128,
    amp_dtype: torch.dtype | None = torch.bfloat16,
    channels_last: bool = True,
    dataset_images: int = 45_000,
    eval_images: int = EVAL_IMAGES,
    momentum: float = 0.9,
    device: str = "cuda",
) -> MemoryEstimate:
    """Peak memory of one training step of ``build_model(arch, **hparams)`` at ``batch_size``.

    ``hparams`` are ``build_model``'s keyword arguments (``depth``, ``width``,
    ``dropout``, ...; ``None`` means the builder's default). ``amp_dtype`` is the
    autocast dtype (``None``: fp32, the engine's CPU mode); ``channels_last``
    does not change any size, it is applied for fidelity. ``dataset_images`` /
    ``eval_images`` are the training / validation+test images the loaders move
    to the device. ``device`` is the device *type* whose kernels and autocast
    rules decide what is saved (``"cuda"``; ``"cpu"`` to compare with a CPU run,
    which also drops the CUDA context). Nothing is allocated: the model is built
    on the meta device and run on fake tensors. Invalid ``hparams`` raise
    ``build_model``'s ``ValueError``. Results are cached per argument set (the
    search revisits architectures), so only the first call per set costs time.

    Cost on 2 CPU cores: ~0.1 s for WRN-28-10 at batch 128, plus a one-off ~1.5 s
    in the first call of a process (``FakeTensorMode`` imports ``torch._dynamo``).
    Where CUDA is available, autograd on fake CUDA tensors starts the CUDA runtime
    of the calling process (a context on the current GPU, ~0.5 GiB): call it where
    GPUs are hidden (``CUDA_VISIBLE_DEVICES=""``, as Ray sets for a task with
    ``num_gpus=0``) or where the process uses the GPU anyway.
    """
    try:
        key = tuple(sorted(hparams.items()))
        hash(key)
    except TypeError:  # unhashable hyperparameter values: no cache
        return _estimate.__wrapped__(arch, tuple(hparams.items()), num_classes, batch_size,
                                     amp_dtype, channels_last, dataset_images, eval_images,
                                     momentum, device)
    return _estimate(arch, key, num_classes, batch_size, amp_dtype, channels_last,
                     dataset_images, eval_images, float(momentum), device)


@functools.lru_cache(maxsize=1024)
def _estimate(
    arch: str,
    hparams_items: tuple[tuple[str, Any], ...],
    num_classes: int,
    batch_size: int,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    dataset_images: int,
    eval_images: int,
    momentum: float,
    device: str,
) -> MemoryEstimate:
    hparams = dict(hparams_items)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got device={device!r}")
    with torch.device("meta"):
        model = build_model(arch, num_classes=num_classes, **hparams)
    trainable = [p for p in model.parameters() if p.requires_grad]
    params = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    grads = sum(p.numel() * p.element_size() for p in trainable)
    optimizer = grads if momentum else 0
    saved = _fake_saved(model, device, batch_size, amp_dtype, channels_last)
    activations = saved.total
    # Optimiser step: foreach SGD with weight decay makes one gradient-sized copy,
    # at a time when the activations have been freed.
    transient = max(2 * saved.largest, grads - activations)
    batch = batch_size * (IMAGE_BYTES * 4 + IMAGE_BYTES)  # fp32 batch + its uint8 gather
    data = (dataset_images * (PADDED_IMAGE_BYTES + TRAIN_INDEX_BYTES)
            + eval_images * (IMAGE_BYTES + EVAL_INDEX_BYTES) + batch)
    allocated = params + grads + optimizer + activations + transient + data
    workspace = max(MIN_WORKSPACE_BYTES, math.ceil(WORKSPACE_FRACTION * allocated))
    return MemoryEstimate(
        params_bytes=params, grads_bytes=grads, optimizer_bytes=optimizer,
        activations_bytes=activations, workspace_bytes=workspace, data_bytes=data,
        transient_bytes=transient, context_bytes=CONTEXT_BYTES if device == "cuda" else 0,
    )


# -- GPU shares --------------------------------------------------------------------------
def gpu_share(total_bytes: int, gpu_memory_bytes: int, *, headroom: float = 0.2) -> float:
    """The smallest share in :data:`SHARES` with ``share * gpu_memory * (1 - headroom) >= total``.

    Trials are single-GPU: one that does not fit a whole GPU (less headroom)
    raises ``ValueError`` saying how much it needs, instead of asking Ray for
    GPUs it could not use.
    """
    if gpu_memory_bytes <= 0:
        raise ValueError(f"gpu_memory_bytes must be > 0, got {gpu_memory_bytes}")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got headroom={headroom}")
    usable = gpu_memory_bytes * (1 - headroom)
    for share in SHARES:
        if share * usable >= total_bytes:
            return share
    raise ValueError(
        f"a trial needs an estimated {total_bytes / GiB:.1f} GiB, more than one GPU offers "
        f"({gpu_memory_bytes / GiB:.1f} GiB less {headroom:.0%} headroom = {usable / GiB:.1f} "
        "GiB) and trials run on a single GPU: lower batch_size, width or depth"
    )


def next_share(share: float) -> float:
    """The OOM retry ladder: 1/8 -> 1/4 -> 1/2 -> 1 -> 2 -> 3 ... (the next larger step)."""
    if not share > 0:
        raise ValueError(f"share must be > 0, got share={share}")
    for step in SHARES:
        if step > share:
            return step
    return float(math.floor(share) + 1)

