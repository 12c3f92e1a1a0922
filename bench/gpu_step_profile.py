"""Where a small network's training step goes on a GPU: host-bound or device-bound.

For ResNet-20 (the smallest network of the zoo's recipes), ``Trainer.train_one_epoch``
on 50,000 synthetic CIFAR-shaped images at batch 128, 512 and 2048 (one warm-up
epoch, then one timed epoch, device synchronised before each clock read); then
``torch.profiler`` over 20 training steps at batch 128 (forward, loss, zero_grad,
backward, SGD step, as the engine runs them): the host's self time, the device's
self time, and the kernel launches per step.

If images/s grows in proportion to the batch while ms/step stays flat, the step is
bound by the host (Python and kernel launches), not the GPU: larger batches or
CUDA graphs are what would speed it up, not faster kernels.
CUDA only. Usage: ``python bench/gpu_step_profile.py``. The last line is
``ms_per_step_128=X ms_per_step_512=Y ms_per_step_2048=Z launches_per_step=N
host_ms_per_step=H device_ms_per_step=D``.
"""

from __future__ import annotations

import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from trainables.config import TrainConfig
from trainables.data import load_splits
from trainables.engine import Trainer

IMAGES = 50_000
BATCHES = (128, 512, 2048)
PROFILED_STEPS = 20
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")


def trainer(splits, batch: int) -> Trainer:  # type: ignore[no-untyped-def]
    cfg = TrainConfig.from_dict(dict(arch="resnet", depth=20, dataset="synthetic",
                                     synthetic_size=IMAGES, batch_size=batch, device="auto"))
    return Trainer(cfg, splits=splits)


def ms_per_step(splits, batch: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(ms per step, images/s) of one timed epoch after a warm-up epoch."""
    t = trainer(splits, batch)
    t.train_one_epoch()
    t.epoch += 1
    torch.cuda.synchronize()
    start = time.perf_counter()
    _, _, images = t.train_one_epoch()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return 1000 * elapsed / (images / batch), images / elapsed


def profiled_steps(splits) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    """(host ms, device ms, kernel launches) per step at batch 128."""
    t = trainer(splits, 128)
    t.train_one_epoch()  # warm-up
    t.train_loader.set_epoch(1)
    batches = iter(t.train_loader)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_STEPS):
            x, y = next(batches)
            with t._autocast():
                loss = F.cross_entropy(t.forward(x), y)
            t.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            t.optimizer.step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    host = sum(e.self_cpu_time_total for e in events) / 1000
    # the device's own events (kernels, copies), as the profiler's table sums them
    device = sum(e.self_device_time_total for e in events
                 if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1000
    launches = sum(e.count for e in events if e.key in LAUNCH_CALLS)
    return host / PROFILED_STEPS, device / PROFILED_STEPS, launches / PROFILED_STEPS


def main() -> None:
    if not torch.cuda.is_available():
        print("not measured (no CUDA)")
        print("ms_per_step_128=n/a ms_per_step_512=n/a ms_per_step_2048=n/a "
              "launches_per_step=n/a host_ms_per_step=n/a device_ms_per_step=n/a")
        return
    print(f"device={torch.cuda.get_device_name()} cpu_cores={os.cpu_count()} "
          f"torch={torch.__version__} python={platform.python_version()}")
    splits = load_splits("synthetic", synthetic_size=IMAGES)
    steps = {}
    for batch in BATCHES:
        steps[batch], ips = ms_per_step(splits, batch)
        print(f"ResNet-20 batch {batch:>5}: {ips:>9,.0f} images/s  {steps[batch]:6.2f} ms/step",
              flush=True)
    host, device, launches = profiled_steps(splits)
    print(f"profiled (batch 128, under the profiler): host {host:.1f} ms/step, "
          f"device {device:.1f} ms/step, {launches:.0f} kernel launches/step")
    print(" ".join(f"ms_per_step_{b}={steps[b]:.2f}" for b in BATCHES)
          + f" launches_per_step={launches:.0f} host_ms_per_step={host:.1f}"
          f" device_ms_per_step={device:.1f}")


if __name__ == "__main__":
    main()
