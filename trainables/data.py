"""Datasets as uint8 tensors, and a loader whose augmentation is batched tensor work.

Every dataset becomes three :class:`Split` objects of CIFAR-shaped uint8 images
``(N, 3, 32, 32)`` and int64 labels ``(N,)``. A :class:`Loader` moves a split to
its device once (uint8: 50,000 CIFAR images are 150 MB) and builds each batch
with one gather, as cifar10-airbench does, instead of a PIL pipeline per image.

Datasets (:data:`DATASETS`):

=========  =======  =======  =====  =====  ======================================
name       classes  train    val    test   source
=========  =======  =======  =====  =====  ======================================
cifar10    10       45,000   5,000  10,000 torchvision; val = fixed 10% of train
cifar100   100      45,000   5,000  10,000 torchvision; val = fixed 10% of train
digits     10       1,257    270    270    scikit-learn 8x8 digits, upscaled x4
synthetic  10       S        V      V      generated; S = synthetic_size,
                                           V = max(256, S // 8)
=========  =======  =======  =====  =====  ======================================

Augmentation (the seed papers' recipe): 4-pixel reflect pad, random 32x32 crop,
horizontal flip with p=0.5. A pad + crop + flip only moves pixels, so it is one
index per output pixel: output row ``i`` of a sample shifted by ``dy`` reads input
row ``reflect(i + dy - 4)``; see :func:`augment_indices` and :func:`pad_crop_flip`.
The Loader gets the same pixels faster from a once-padded copy (see :class:`Loader`);
the tests check it against :func:`pad_crop_flip`, and that against ``F.pad``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainables.config import cache_home

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "Loader",
    "Split",
    "Splits",
    "augment_indices",
    "load_splits",
    "pad_crop_flip",
]

IMAGE_SIZE = 32  # pixels; every dataset is brought to CIFAR's 32x32
PAD = 4  # pixels of reflect padding before the random crop (the papers' recipe)

# Seeds of the fixed splits. Constants, not TrainConfig.seed: a sweep varies the
# run seed, and every trial must still be scored on the same validation images.
SPLIT_SEED = 0  # CIFAR train/val permutation and digits stratified split
SYNTHETIC_SEED = 20160523  # synthetic templates and images (WRN arXiv date)
CIFAR_VAL_FRACTION = 0.1  # 50,000 -> 45,000 train / 5,000 val


@dataclass(frozen=True)
class DatasetSpec:
    """What the loader needs to know about a dataset; mean/std in [0, 1] units."""

    name: str
    num_classes: int
    mean: tuple[float, float, float]  # per channel, of the training split, in [0, 1]
    std: tuple[float, float, float]  # per channel, in [0, 1]
    pad_crop: bool  # 4-pixel reflect pad + random 32x32 crop
    flip: bool  # random horizontal flip (False for digits: a flipped 2 is no 2)


DATASETS: dict[str, DatasetSpec] = {
    # The values every CIFAR reference implementation uses (training set statistics).
    "cifar10": DatasetSpec(
        "cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True, True
    ),
    "cifar100": DatasetSpec(
        "cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True, True
    ),
    # Computed once from the 1,257-image training split produced by load_splits
    # (grey, so the three channels are equal); tests/test_data.py recomputes them.
    "digits": DatasetSpec(
        "digits", 10, (0.3055, 0.3055, 0.3055), (0.3237, 0.3237, 0.3237), True, False
    ),
    # Computed once from load_splits("synthetic", synthetic_size=2048).train; the
    # generator's distribution does not depend on the size, and the test checks it.
    "synthetic": DatasetSpec(
        "synthetic", 10, (0.5093, 0.4938, 0.4956), (0.2063, 0.2038, 0.2084), True, True
    ),
}


# eq=False: a generated __eq__ would compare tensors and fail on their truth value.
@dataclass(frozen=True, eq=False)
class Split:
    """One split: images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64, on CPU."""

    images: torch.Tensor  # (N, 3, 32, 32) uint8
    labels: torch.Tensor  # (N,) int64

    def __post_init__(self) -> None:
        shape = tuple(self.images.shape)
        if self.images.dtype != torch.uint8 or shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"images must be uint8 of shape (N, 3, 32, 32), got {self.images.dtype} {shape}"
            )
        if self.labels.dtype != torch.int64 or tuple(self.labels.shape) != shape[:1]:
            raise ValueError(
                f"labels must be int64 of shape ({shape[0]},), "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True, eq=False)
class Splits:
    """Train, validation and test splits of one dataset; val chooses, test only reports."""

    spec: DatasetSpec
    train: Split
    val: Split
    test: Split


# ---------------------------------------------------------------------------
# Loading


def load_splits(
    name: str,
    *,
    root: str | None = None,
    download: bool = False,
    synthetic_size: int = 2048,
) -> Splits:
    """Load dataset ``name`` (a key of :data:`DATASETS`) as three uint8 splits.

    ``root`` and ``download`` apply to CIFAR only (default root
    :func:`trainables.config.cache_home`); without ``download`` a missing CIFAR folder
    raises :class:`FileNotFoundError`.
    ``synthetic_size`` is the number of synthetic training images.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got name={name!r}")
    spec = DATASETS[name]
    if name in ("cifar10", "cifar100"):
        train, val, test = _load_cifar(name, root=root, download=download)
    elif name == "digits":
        train, val, test = _load_digits()
    else:
        if synthetic_size < 1:
            raise ValueError(f"synthetic_size must be >= 1, got synthetic_size={synthetic_size}")
        eval_size = max(256, synthetic_size // 8)
        train = _synthetic_split(synthetic_size, split_id=0)
        val = _synthetic_split(eval_size, split_id=1)
        test = _synthetic_split(eval_size, split_id=2)
    return Splits(spec=spec, train=train, val=val, test=test)


def _to_split(images_nhwc: np.ndarray, labels: np.ndarray | list[int]) -> Split:
    """numpy ``(N, 32, 32, 3)`` uint8 -> :class:`Split` with NCHW images.

    torchvision's ``.data`` is an HWC view of NCHW memory, so the permute back is
    free and ``.contiguous()`` copies nothing; other layouts are copied once.
    """
    images = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous()
    return Split(images, torch.as_tensor(np.asarray(labels), dtype=torch.int64))


def _load_cifar(name: str, *, root: str | None, download: bool) -> tuple[Split, Split, Split]:
    """CIFAR-10/100 through torchvision, reading ``.data``/``.targets`` (no PIL)."""
    from torchvision import datasets  # lazy: torchvision is slow to import

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = Path(os.path.expanduser(root)) if root else cache_home()
    data_dir = folder / cls.base_folder
    if not download and not data_dir.is_dir():
        raise FileNotFoundError(
            f"{name} not found in {data_dir}; pass download=True (CLI: --download) to fetch "
            f"it into {folder}, or set data_root to the folder that holds {cls.base_folder}"
        )
    try:
        train_ds = cls(str(folder), train=True, download=download)
        test_ds = cls(str(folder), train=False, download=download)
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        if download:
            raise
        raise FileNotFoundError(
            f"{name} in {data_dir} is incomplete or corrupted ({err}); pass download=True "
            f"(CLI: --download) to fetch it again into {folder}"
        ) from err

    full = _to_split(train_ds.data, train_ds.targets)
    n = len(full)
    n_val = round(n * CIFAR_VAL_FRACTION)
    # Fixed permutation: every trial validates on the same 10% of the training set.
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    train = Split(full.images[train_idx], full.labels[train_idx])
    val = Split(full.images[val_idx], full.labels[val_idx])
    return train, val, _to_split(test_ds.data, test_ds.targets)


DIGITS_SIZES = (1257, 270, 270)  # train / val / test: 70% / 15% / 15% of 1,797, stratified


def _load_digits() -> tuple[Split, Split, Split]:
    """scikit-learn's 8x8 digits (values 0..16) as 32x32 RGB uint8, stratified split."""
    from sklearn.datasets import load_digits  # lazy: sklearn is only needed here
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).float().mul_(255.0 / 16.0)  # (1797, 8, 8) in 0..255
    # Bilinear x4 keeps strokes smooth; a 4-pixel shift of the crop is then one
    # source pixel, the same relative jitter as on CIFAR.
    x = F.interpolate(x[:, None], size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    x = x.round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(bunch.target).long()  # (1797,)

    idx = np.arange(len(y))
    n_train, _, n_test = DIGITS_SIZES
    train_idx, rest = train_test_split(
        idx, train_size=n_train, stratify=bunch.target, random_state=SPLIT_SEED
    )
    val_idx, test_idx = train_test_split(
        rest, test_size=n_test, stratify=bunch.target[rest], random_state=SPLIT_SEED
    )

    def take(positions: np.ndarray) -> Split:
        keep = torch.from_numpy(np.sort(positions))  # sorted: a stable, readable order
        return Split(x[keep], y[keep])

    return take(train_idx), take(val_idx), take(test_idx)


# Synthetic set: each class is a fixed random 3x4x4 colour pattern upsampled to
# 32x32 (low frequency, so it survives a 4-pixel crop shift); each image is its
# class pattern at a random contrast and brightness, plus Gaussian pixel noise.
_SYN_CLASSES = 10
_SYN_GRID = 4  # pattern cells per side (8x8 pixels each)
_SYN_CHUNK = 4096  # images generated per step: bounds float memory to ~50 MB
_SYN_NOISE = 0.35  # per-pixel noise std, in units of the pattern's [-0.5, 0.5] range


def _synthetic_templates() -> torch.Tensor:
    """The 10 class patterns, ``(10, 3, 32, 32)`` float in [-0.5, 0.5]."""
    g = torch.Generator().manual_seed(SYNTHETIC_SEED)
    grid = torch.rand(_SYN_CLASSES, 3, _SYN_GRID, _SYN_GRID, generator=g) - 0.5
    return F.interpolate(grid, size=IMAGE_SIZE, mode="bilinear", align_corners=False)


def _synthetic_split(n: int, *, split_id: int) -> Split:
    """``n`` synthetic images, deterministic in (n, split_id); balanced labels."""
    templates = _synthetic_templates()  # (10, 3, 32, 32)
    g = torch.Generator().manual_seed(SYNTHETIC_SEED + 1 + split_id)
    labels = (torch.arange(n) % _SYN_CLASSES)[torch.randperm(n, generator=g)]  # (N,)
    images = torch.empty(n, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    for start in range(0, n, _SYN_CHUNK):
        y = labels[start : start + _SYN_CHUNK]
        b = len(y)
        contrast = torch.empty(b, 1, 1, 1).uniform_(0.6, 1.4, generator=g)
        brightness = torch.empty(b, 1, 1, 1).uniform_(-0.15, 0.15, generator=g)
        x = torch.randn(b, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)  # (b, 3, 32, 32)
        # pixel = 127.5 * (1 + noise + contrast * pattern + brightness), in place:
        # 0..255 with the pattern spanning about half the range.
        x.mul_(127.5 * _SYN_NOISE).addcmul_(templates[y], contrast.mul_(127.5))
        x.add_(brightness.mul_(127.5).add_(127.5))
        images[start : start + b] = x.round_().clamp_(0, 255).to(torch.uint8)
    return Split(images, labels)


# ---------------------------------------------------------------------------
# Augmentation as indices


def _reflect(i: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Reflect out-of-range indices as ``F.pad(mode="reflect")`` does: -1->1, size->size-2."""
    i = i.abs()
    return torch.where(i >= size, 2 * (size - 1) - i, i)


def augment_indices(
    dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source rows and columns of a reflect-pad-4 + crop + flip, per sample.

    ``dy``, ``dx``: ``(B,)`` integer crop offsets in [0, 8] into the 40x40 padded
    image (4 = centred, no shift); ``flip``: ``(B,)`` bool. Returns ``rows`` and
    ``cols``, each ``(B, 32)`` int64: output pixel ``(i, j)`` of sample ``b`` is input
    pixel ``(rows[b, i], cols[b, j])``. Flipping reverses the columns.
    """
    ar = torch.arange(IMAGE_SIZE, device=dy.device)
    rows = _reflect(ar + (dy.long()[:, None] - PAD))  # (B, 32)
    cols = _reflect(ar + (dx.long()[:, None] - PAD))  # (B, 32)
    cols = torch.where(flip.bool()[:, None], cols.flip(1), cols)
    return rows, cols


def pad_crop_flip(
    x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor
) -> torch.Tensor:
    """Reflect-pad by 4, crop 32x32 at ``(dy, dx)``, flip where ``flip``: one gather.

    ``x``: ``(B, C, 32, 32)`` any dtype (uint8 in the loader); returns the same
    shape and dtype. Equal to ``F.pad(x, (4, 4, 4, 4), mode="reflect")[b, :,
    dy:dy+32, dx:dx+32]`` (then ``.flip(-1)``) without building the padded image.
    """
    rows, cols = augment_indices(dy, dx, flip)
    b = torch.arange(x.shape[0], device=x.device)[:, None, None]
    # Advanced indices around a slice put their dims first: (B, 32, 32, C).
    return x[b, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------
# Loader

_PADDED = IMAGE_SIZE + 2 * PAD  # 40: side of the reflect-padded image
# Gather footprint of one 32x32 window in a (3, 40, 40) padded image: the last
# element it reads is 2 * 1600 + 31 * 40 + 31 = 4471 past its first.
_WINDOW_REACH = 2 * _PADDED * _PADDED + (IMAGE_SIZE - 1) * (_PADDED + 1)


def _epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed from (seed, epoch): nearby pairs get unrelated streams."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class Loader:
    """Batches of a Split, held on ``device`` as uint8; augmentation is batched tensor work.

    Yields ``x`` ``(B, 3, 32, 32)`` normalised ``dtype`` and ``y`` ``(B,)`` int64, both
    on ``device``. With ``train=True`` the order and the augmentation of an epoch
    depend on ``(seed, epoch)`` only (call :meth:`set_epoch` before iterating), so a
    run resumed at epoch k sees exactly the batches of an uninterrupted run; the
    plan is :meth:`epoch_plan`, and batch ``i`` is ``pad_crop_flip`` of its slice.

    How a training batch is built (profiled on 2 CPU cores; numbers per batch of 128):

    * The split is reflect-padded to ``(N, 3, 40, 40)`` uint8 once and moved to the
      device (1.56x the images: 240 MB for 50,000). Every 32x32 crop of every image is
      then a window of one strided view, so a batch of crops is ONE
      ``index_select`` of B window offsets (~50 us) instead of a per-pixel
      advanced-indexing gather (~1,400 us).
    * Flips: within each batch the plan lists flipped samples first, so flipping
      is ``xb[:k].flip(3)`` on a slice, with ``k`` known on the host (no device
      sync). Batch order does not change a batch's gradient.
    * uint8 -> ``dtype`` happens in that same copy, followed by in-place
      ``x * (1/(255 std)) - mean/std`` (~60 us together); channels_last, if asked,
      is one more float copy.

    The random numbers come from a CPU generator and are moved to the device once
    per epoch (N int64 offsets and labels: 0.8 MB for 50,000), so the batches are
    the same on CPU and on any GPU.
    """

    def __init__(
        self,
        split: Split,
        spec: DatasetSpec,
        *,
        batch_size: int,
        device: torch.device | str = "cpu",
        train: bool,
        seed: int = 0,
        drop_last: bool | None = None,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size}")
        self.spec = spec
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.train = train
        self.seed = seed
        self.drop_last = train if drop_last is None else drop_last
        self.channels_last = channels_last
        self.dtype = dtype
        self.epoch = 0
        self._n = len(split)
        if self.drop_last and self._n < batch_size:
            raise ValueError(
                f"batch_size must be <= the split's {self._n} images when drop_last is set, "
                f"got batch_size={batch_size}"
            )
        self._augment = train and (spec.pad_crop or spec.flip)
        if self._augment:
            # Padded on the CPU (0.15 s for 50,000 images on 2 cores), then moved once.
            padded = F.pad(split.images, (PAD, PAD, PAD, PAD), mode="reflect")  # (N, 3, 40, 40)
            flat = padded.to(self.device).view(-1)
            # Row o of this view is the (3, 32, 32) window whose first pixel is
            # flat[o]; crop (dy, dx) of image n is row n*4800 + dy*40 + dx.
            self._windows = flat.as_strided(
                (flat.numel() - _WINDOW_REACH, 3, IMAGE_SIZE, IMAGE_SIZE),
                (1, _PADDED * _PADDED, _PADDED, 1),
            )
        else:
            # Moved once; on CPU this is the split's own tensor (no copy).
            self._images = split.images.to(self.device).contiguous()  # (N, 3, 32, 32) uint8
        self._labels = split.labels.to(self.device)  # (N,) int64
        # x_norm = x_uint8 * scale + shift == (x_uint8 / 255 - mean) / std, per channel.
        mean = torch.tensor(spec.mean, dtype=torch.float64)
        std = torch.tensor(spec.std, dtype=torch.float64)
        self._scale = (1.0 / (255.0 * std)).to(self.device, dtype).view(1, 3, 1, 1)
        self._shift = (-mean / std).to(self.device, dtype).view(1, 3, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order and augmentation the next iteration uses."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Number of batches per epoch."""
        if self.drop_last:
            return self._n // self.batch_size
        return math.ceil(self._n / self.batch_size)

    @property
    def num_images(self) -> int:
        """Images yielded per epoch (the partial last batch is dropped when drop_last)."""
        return self._n // self.batch_size * self.batch_size if self.drop_last else self._n

    def epoch_plan(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Order and augmentation of the current epoch, on CPU, for ``num_images`` samples.

        Returns ``order``, ``dy``, ``dx`` (int64, crop offsets in [0, 8] into the
        padded image; 4 = no shift) and ``flip`` (bool), each ``(num_images,)``.
        Batch ``i`` is ``pad_crop_flip(images[order[s]], dy[s], dx[s], flip[s])``
        with ``s`` its slice, normalised. Evaluation: identity order, no augmentation.
        """
        m = self.num_images
        if not self._augment:
            order = self._permutation()[0][:m] if self.train else torch.arange(m)
            no_shift = torch.full((m,), PAD)
            return order, no_shift, no_shift.clone(), torch.zeros(m, dtype=torch.bool)
        perm, g = self._permutation()
        # Drawn even when the spec disables them: the stream never depends on the spec.
        dy = torch.randint(0, 2 * PAD + 1, (self._n,), generator=g)
        dx = torch.randint(0, 2 * PAD + 1, (self._n,), generator=g)
        flip = torch.rand(self._n, generator=g) < 0.5
        if not self.spec.pad_crop:
            dy.fill_(PAD)
            dx.fill_(PAD)
        if not self.spec.flip:
            flip.zero_()
        # Flipped samples first within each batch (stable), so that flipping is a slice.
        batch_id = torch.arange(self._n) // self.batch_size
        key = batch_id * 2 + (~flip).long()
        within = torch.sort(key, stable=True).indices
        return perm[within][:m], dy[within][:m], dx[within][:m], flip[within][:m]

    def _permutation(self) -> tuple[torch.Tensor, torch.Generator]:
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        return torch.randperm(self._n, generator=g), g

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, dy, dx, flip = self.epoch_plan()  # CPU, (M,) each
        m, bs = self.num_images, self.batch_size
        if self._augment:
            offsets = order * (3 * _PADDED * _PADDED) + dy * _PADDED + dx  # (M,) int64
            # One transfer per epoch; per batch only slices of these.
            both = torch.stack([offsets, order]).to(self.device, non_blocking=True)
            offsets, labels = both[0], self._labels[both[1]]
            n_flip = torch.zeros(len(self), dtype=torch.int64)
            n_flip.index_add_(0, torch.arange(m) // bs, flip.long())
            flips = n_flip.tolist()  # host ints: no device sync per batch
        elif self.train:
            order = order.to(self.device)
            labels = self._labels[order]
        else:
            labels = self._labels
        for i, start in enumerate(range(0, m, bs)):
            stop = min(start + bs, m)
            if self._augment:
                xb = self._windows.index_select(0, offsets[start:stop])  # (B, 3, 32, 32) uint8
            elif self.train:
                xb = self._images.index_select(0, order[start:stop])  # (B, 3, 32, 32) uint8
            else:
                xb = self._images[start:stop]  # a view: evaluation reads in place
            x = torch.empty(xb.shape, dtype=self.dtype, device=self.device)  # (B, 3, 32, 32)
            k = flips[i] if self._augment else 0
            if k:
                x[:k].copy_(xb[:k].flip(3))  # uint8 -> dtype in the same copy
            x[k:].copy_(xb[k:])
            x.mul_(self._scale).add_(self._shift)
            if self.channels_last:
                # After the conversion: a float NCHW -> NHWC copy is ~3x faster on
                # CPU than converting uint8 straight into a channels_last tensor.
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, labels[start:stop]
