"""Training-loader throughput: trainables.data.Loader against the seed articles' pipeline.

Both read the same 50,000 synthetic CIFAR-shaped uint8 images and produce the
same augmentation (4-pixel reflect pad, random 32x32 crop, horizontal flip,
per-channel normalisation) in batches of 128:

* project: ``Loader(train=True)``: images on the device as uint8, one batched
  gather per batch. Median of 3 full epochs after 1 warm-up epoch.
* seed: torchvision transforms on PIL images (``Pad(4, reflect)``,
  ``RandomCrop(32)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``) in a
  ``DataLoader(batch_size=128, shuffle=True, num_workers=1)``, as the seed
  articles train. 100 batches after 5 warm-up batches (an epoch would take
  minutes); it always runs on the CPU, its batches are not copied to the device.

Neither side consumes the batches: this measures the input pipeline alone.
Usage: ``.venv/bin/python bench/data_pipeline.py [--device cuda] [--epochs 3]``.
The last line is ``project_images_per_s=N seed_images_per_s=N ratio=X``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from trainables.data import DATASETS, Loader, Split, load_splits

BATCH = 128  # images per batch, the seed papers' SGD batch
NUM_IMAGES = 50_000  # CIFAR's training-set size
SEED_WARMUP_BATCHES = 5  # covers the worker's start-up
SEED_BATCHES = 100  # 12,800 images: ~4 s at the PIL pipeline's rate on 2 cores


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def project_images_per_s(
    images: torch.Tensor, labels: torch.Tensor, device: torch.device, epochs: int
) -> tuple[float, list[float]]:
    """Median images/s over ``epochs`` full epochs (plus one warm-up) of the Loader."""
    loader = Loader(
        Split(images, labels), DATASETS["synthetic"], batch_size=BATCH, device=device, train=True
    )
    rates = []
    for epoch in range(epochs + 1):  # epoch 0 is the warm-up
        loader.set_epoch(epoch)
        _sync(device)
        start = time.perf_counter()
        for _x, _y in loader:
            pass
        _sync(device)  # the loader's kernels are asynchronous on CUDA
        if epoch > 0:
            rates.append(loader.num_images / (time.perf_counter() - start))
    return statistics.median(rates), rates


class _PILDataset(torch.utils.data.Dataset):
    """The seed articles' dataset: a PIL image per ``__getitem__``, then transforms."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images = images_hwc  # (N, 32, 32, 3) uint8, as torchvision's CIFAR10.data
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def seed_images_per_s(images: torch.Tensor, labels: torch.Tensor) -> float:
    """images/s of the torchvision PIL pipeline over SEED_BATCHES batches."""
    from torchvision import transforms as T

    spec = DATASETS["synthetic"]
    transform = T.Compose(
        [
            T.Pad(4, padding_mode="reflect"),
            T.RandomCrop(32),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(spec.mean, spec.std),
        ]
    )
    dataset = _PILDataset(images.permute(0, 2, 3, 1).numpy(), labels.numpy(), transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=1)
    batches = iter(loader)
    for _ in range(SEED_WARMUP_BATCHES):
        next(batches)
    start = time.perf_counter()
    for _ in range(SEED_BATCHES):
        next(batches)
    elapsed = time.perf_counter() - start
    del batches  # stops the worker
    return SEED_BATCHES * BATCH / elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device of the project Loader (default: cuda if available, else cpu)",
    )
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs of the project Loader")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    splits = load_splits("synthetic", synthetic_size=NUM_IMAGES)
    images, labels = splits.train.images, splits.train.labels  # (50000, 3, 32, 32) uint8

    project, rates = project_images_per_s(images, labels, device, args.epochs)
    seed = seed_images_per_s(images, labels)
    ratio = project / seed

    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(
        f"device={device}{gpu} cpu_cores={os.cpu_count()} torch_threads={torch.get_num_threads()} "
        f"torch={torch.__version__} python={platform.python_version()}"
    )
    rows = [
        (f"project Loader, {device}, median of {args.epochs} epochs", f"{project:,.0f}"),
        ("  per epoch", ", ".join(f"{r:,.0f}" for r in rates)),
        ("seed PIL + DataLoader(num_workers=1), cpu", f"{seed:,.0f}"),
    ]
    print(f"{'pipeline':<44} {'images/s':>12}")
    for name, value in rows:
        print(f"{name:<44} {value:>12}")
    print(
        f"project_images_per_s={round(project)} seed_images_per_s={round(seed)} ratio={ratio:.1f}"
    )


if __name__ == "__main__":
    main()
