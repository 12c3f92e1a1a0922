"""Training throughput and model FLOP utilisation: the engine against the seed articles' loop.

For ResNet-20, WRN-16-8 and WRN-28-10, in one run, two arms on the same images:

* engine: :class:`trainables.engine.Trainer` with its default settings (device
  auto; on CUDA bf16 autocast + channels_last, images on the device as uint8 and
  augmented in batched gathers), timed over ``Trainer.train_one_epoch`` after one
  warm-up epoch (cuDNN heuristics, allocator growth), with a device synchronise
  before reading the clock. On CUDA the synthetic training set has 50,000 images,
  so the timed epoch is a CIFAR-sized epoch.
* plain: the seed articles' loop: fp32 NCHW model, a ``Dataset`` whose
  ``__getitem__`` augments one image at a time (the tensor equivalent of
  torchvision's ToTensor, Pad(4, reflect), RandomCrop(32), RandomHorizontalFlip,
  Normalize), ``DataLoader(batch_size, shuffle=True, num_workers=2)``, ``.cuda()``
  per batch, ``zero_grad``/forward/``CrossEntropyLoss``/backward/``step`` with
  the paper's SGD, and the articles' per-step ``loss.item()`` / accuracy
  bookkeeping (host syncs). Timed over ``--plain-steps`` steps after warm-up steps.

FLOPs per image: ``torch.utils.flop_counter.FlopCounterMode`` over one forward +
backward (model + cross-entropy) on the meta device, divided by the batch: 2
FLOPs per multiply-add of every conv and matmul (BN, ReLU, the optimiser are not
counted, the usual MFU convention). MFU = FLOPs/image x images/s / the device's
dense bf16 peak (a table of known GPUs by name; ``--peak-tflops`` overrides; "n/a"
on CPU). Both arms are divided by the same bf16 peak, although the plain arm
runs in fp32/TF32.

Targets on one H100: WRN-28-10 engine >= 40 % MFU, and the engine >= 3x the plain
loop's images/s for ResNet-20. (WRN-28-10 costs ~31.5 GFLOP per image per step,
so 40 % of 989 TFLOP/s is ~12,600 images/s, ~4 s per 50,000-image epoch; 15 s
per epoch would be ~11 % MFU.)

On a CPU-only machine the bench still runs in a few minutes: the engine runs fp32
on the CPU over 3-step epochs (ResNet-20 at batch 128, WRN-16-8 at batch 16), the
plain loop for 2 steps, and WRN-28-10 is
"not measured (CPU too slow)"; CUDA numbers are absent. The CPU rows are a smoke
run (a few steps on shared cores): their ratios vary by several x between runs.
With ``--compile`` (CUDA only) a third arm times the engine with ``compile: true``
(torch.compile with CUDA graphs); its warm-up epoch holds the compilation.
Measured on an H200: README "On a GPU", logs in ``bench/results/h200-*.log``.
Usage: ``.venv/bin/python bench/train_throughput.py [--compile]``. The last line is
``resnet20_speedup=X wrn28_10_mfu=Y device=cpu|cuda`` ("n/a" when not measured), with
``resnet20_compile_speedup=X wrn28_10_compile_mfu=Y`` before ``device`` under
``--compile`` on CUDA.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from trainables.config import TrainConfig
from trainables.data import PAD, DatasetSpec, Splits, load_splits
from trainables.engine import Trainer
from trainables.models import build_model

# Dense bf16 tensor-core peaks in TFLOP/s, by substring of torch.cuda.get_device_name
# (first match wins, so the specific names come first). NVIDIA data sheets.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),  # also GH200
    ("H100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("A100", 312.0),
)
GPU_IMAGES = 50_000  # CIFAR-10's training set: one timed epoch on CUDA
EPOCH_IMAGES = 50_000  # s/epoch column: CIFAR-10's 50,000 training images


@dataclass(frozen=True)
class Case:
    label: str
    arch: str
    hparams: dict
    cpu_batch: int | None  # batch on CPU; None: not measured on CPU (too slow)
    cpu_images: int  # engine's synthetic training set on CPU (one epoch = images / batch)


CASES = (
    Case("ResNet-20", "resnet", dict(depth=20), 128, 384),  # ~1.3 s/step on 2 idle cores
    Case("WRN-16-8", "wrn", dict(depth=16, width=8), 16, 48),  # ~1.5 s/step at batch 16
    Case("WRN-28-10", "wrn", dict(depth=28, width=10), None, 0),  # ~60 s/step at 128: skipped
)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def flops_per_image(arch: str, hparams: dict, num_classes: int = 10, batch: int = 4) -> float:
    """Forward + backward FLOPs per image (conv and matmul, 2 per multiply-add)."""
    with torch.device("meta"):
        model = build_model(arch, num_classes=num_classes, **hparams)
        x = torch.empty(batch, 3, 32, 32)
        y = torch.zeros(batch, dtype=torch.int64)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- engine arm ------------------------------------------------------------------------
def engine_images_per_s(case: Case, splits: Splits, batch: int, compile: bool = False) -> float:
    """Images/s of one Trainer.train_one_epoch, after one warm-up epoch (which also
    holds torch.compile's compilation when ``compile``)."""
    cfg = TrainConfig.from_dict(dict(arch=case.arch, **case.hparams, dataset="synthetic",
                                     synthetic_size=len(splits.train), batch_size=batch,
                                     device="auto", compile=compile))
    trainer = Trainer(cfg, splits=splits)
    trainer.train_one_epoch()  # warm-up
    trainer.epoch += 1
    _sync(trainer.device)
    start = time.perf_counter()
    _, _, images = trainer.train_one_epoch()
    _sync(trainer.device)
    return images / (time.perf_counter() - start)


# -- plain arm (the seed articles) ---------------------------------------------------------
class PerImageCifar(torch.utils.data.Dataset):
    """torchvision's transforms on one image per ``__getitem__``, without PIL."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, spec: DatasetSpec) -> None:
        self.images = images  # (N, 3, 32, 32) uint8, CPU
        self.labels = labels  # (N,) int64
        self.mean = torch.tensor(spec.mean).view(3, 1, 1)
        self.std = torch.tensor(spec.std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].float().div_(255)  # ToTensor: (3, 32, 32) in [0, 1]
        x = F.pad(x[None], (PAD,) * 4, mode="reflect")[0]  # Pad(4, reflect): (3, 40, 40)
        dy, dx = torch.randint(0, 2 * PAD + 1, (2,)).tolist()  # RandomCrop(32)
        x = x[:, dy:dy + 32, dx:dx + 32]
        if torch.rand(()) < 0.5:  # RandomHorizontalFlip
            x = x.flip(2)
        return (x - self.mean) / self.std, int(self.labels[i])  # Normalize


def plain_images_per_s(case: Case, splits: Splits, batch: int, device: torch.device,
                       warmup: int, steps: int) -> float:
    """Images/s of the seed articles' loop over ``steps`` steps after ``warmup`` steps."""
    recipe = TrainConfig.from_dict(dict(arch=case.arch, **case.hparams))
    torch.manual_seed(0)
    model = build_model(case.arch, num_classes=splits.spec.num_classes,
                        **case.hparams).to(device)  # fp32, NCHW
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)
    criterion = nn.CrossEntropyLoss()
    dataset = PerImageCifar(splits.train.images, splits.train.labels, splits.spec)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True,
                                         num_workers=2, drop_last=True)
    if len(loader) < warmup + steps:
        raise ValueError(f"{len(loader)} batches < {warmup} warm-up + {steps} timed steps")
    model.train()
    train_loss, correct, start, elapsed = 0.0, 0, 0.0, 0.0
    for step, (x, y) in enumerate(loader):
        if step == warmup:  # the clock starts before this batch is fetched by the loop body
            _sync(device)
            start = time.perf_counter()
        x, y = x.to(device), y.to(device)  # .cuda() per batch
        optimizer.zero_grad()
        out = model(x)
        loss = criterion(out, y)
        loss.backward()
        optimizer.step()
        train_loss += loss.item()  # the articles' progress bookkeeping (host syncs)
        correct += out.max(1)[1].eq(y).sum().item()
        if step == warmup + steps - 1:
            _sync(device)
            elapsed = time.perf_counter() - start
            break
    return steps * batch / elapsed


# -- report --------------------------------------------------------------------------------
def _fmt_mfu(flops: float, ips: float | None, peak: float | None) -> str:
    if ips is None or peak is None:
        return "n/a"
    return f"{flops * ips / (peak * 1e12):.1%}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak in TFLOP/s (default: table by GPU name)")
    parser.add_argument("--plain-steps", type=int, default=None,
                        help="timed steps of the plain loop (default: 100 on CUDA, 2 on CPU)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the engine with `compile: true` (torch.compile, CUDA "
                             "only: its warm-up epoch holds the compilation)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    peak = peak_tflops(device, args.peak_tflops)
    warmup = 10 if cuda else 1  # plain-arm warm-up steps (worker start, cuDNN)
    steps = args.plain_steps or (100 if cuda else 2)
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    print(f"device={device} ({name}) peak_bf16={f'{peak:g} TFLOP/s' if peak else 'unknown'} "
          f"cpu_cores={os.cpu_count()} torch_threads={torch.get_num_threads()} "
          f"torch={torch.__version__} python={platform.python_version()}")
    gpu_splits = load_splits("synthetic", synthetic_size=GPU_IMAGES) if cuda else None

    rows: list[tuple[str, ...]] = []
    results: dict[str, dict[str, float | None]] = {}
    for case in CASES:
        flops = flops_per_image(case.arch, case.hparams)
        batch = 128 if cuda else case.cpu_batch
        if batch is None:
            results[case.label] = {"engine": None, "plain": None}
            rows.append((case.label, "-", "engine/plain", "not measured (CPU too slow)",
                         "-", "-", "n/a", f"{flops / 1e9:.2f}"))
            continue
        if cuda:
            assert gpu_splits is not None
            splits = gpu_splits
        else:
            splits = load_splits("synthetic", synthetic_size=case.cpu_images)
        engine = engine_images_per_s(case, splits, batch)
        plain = plain_images_per_s(case, splits, batch, device, warmup, steps)
        results[case.label] = {"engine": engine, "plain": plain}
        engine_settings = "bf16+channels_last, device data" if cuda else "fp32, device data"
        arms = [("engine", engine, engine_settings),
                ("plain", plain, "fp32 NCHW, DataLoader(2 workers)")]
        if args.compile and cuda:
            compiled = engine_images_per_s(case, splits, batch, compile=True)
            results[case.label]["compiled"] = compiled
            arms.insert(1, ("engine+compile", compiled, engine_settings + ", torch.compile"))
        for arm, ips, settings in arms:
            rows.append((case.label, str(batch), arm, settings, f"{ips:,.0f}",
                         f"{EPOCH_IMAGES / ips:,.1f}", _fmt_mfu(flops, ips, peak),
                         f"{flops / 1e9:.2f}"))
        rows.append((case.label, "", "ratio", "engine / plain", f"{engine / plain:.2f}x",
                     "", "", ""))
        if "compiled" in results[case.label]:
            rows.append((case.label, "", "ratio", "engine+compile / plain",
                         f"{results[case.label]['compiled'] / plain:.2f}x", "", "", ""))
    if not cuda:
        rows.append(("(all)", "128", "engine/plain", "CUDA rows: not measured (no CUDA)",
                     "-", "-", "n/a", ""))

    head = ("model", "batch", "arm", "settings", "images/s", "s/epoch", "MFU", "GFLOP/img")
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    for row in (head, *rows):
        print("  ".join(cell.ljust(w) if i < 4 else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(row, widths, strict=True))))

    r20 = results["ResNet-20"]
    speedup = (f"{r20['engine'] / r20['plain']:.2f}"
               if r20["engine"] and r20["plain"] else "n/a")
    wrn = results["WRN-28-10"]["engine"]
    wrn_flops = flops_per_image("wrn", dict(depth=28, width=10))
    wrn_mfu = f"{wrn_flops * wrn / (peak * 1e12):.3f}" if wrn and peak else "n/a"
    if cuda:
        print(f"targets: WRN-28-10 engine MFU >= 40 % (got {wrn_mfu}); "
              f"ResNet-20 engine >= 3x plain (got {speedup})")
    compiled = ""
    if "compiled" in r20:  # --compile on CUDA
        wrn_compiled = results["WRN-28-10"]["compiled"]
        compiled = (f" resnet20_compile_speedup={r20['compiled'] / r20['plain']:.2f}"
                    f" wrn28_10_compile_mfu={wrn_flops * wrn_compiled / (peak * 1e12):.3f}"
                    if peak and wrn_compiled else "")
    print(f"resnet20_speedup={speedup} wrn28_10_mfu={wrn_mfu}{compiled} device={device.type}")


if __name__ == "__main__":
    main()
