"""Peak training memory estimates (orchestrator.memory) against exact counts on the CPU.

The activation count runs on fake (meta) tensors; on the CPU the same count over a
real forward must give the same bytes, exactly in fp32. The GPU-side check
(estimate vs ``torch.cuda.max_memory_allocated``) is ``bench/memory_estimate.py``.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from orchestrator import memory
from orchestrator.memory import (
    CONTEXT_BYTES,
    SHARES,
    estimate_training_memory,
    gpu_share,
    next_share,
    saved_tensor_bytes,
)
from trainables.models import build_model, count_params

GiB = 2**30
MODELS = [  # (arch, hparams): one per family, as the issue lists them
    ("resnet", dict(depth=20)),  # ResNet-20
    ("wrn", dict(depth=16, width=2)),  # WRN-16-2
    ("diracnet", dict(depth=16, width=1, variant="v2")),  # DiracNet-16-1 v2
    ("preact_resnet", dict(depth=20)),  # pre-act ResNet-20 (9n+2, n=2)
]
BATCH = 32


def _real_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


@pytest.mark.parametrize(("arch", "hparams"), MODELS, ids=[f"{a}-{h}" for a, h in MODELS])
def test_fake_count_equals_real_cpu_forward_in_fp32(arch, hparams) -> None:
    """Bytes saved for backward by a real CPU forward == the fake-tensor count, exactly."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, **hparams)
    x, y = _real_batch()
    real = saved_tensor_bytes(model, x, y)
    est = estimate_training_memory(arch, hparams, batch_size=BATCH, amp_dtype=None,
                                   channels_last=False, device="cpu")
    assert est.activations_bytes == real.total
    assert real.total > 0.9 * real.by_dtype[torch.float32]  # mostly fp32 feature maps


@pytest.mark.parametrize(("arch", "hparams"), [MODELS[0], ("wrn", dict(depth=16, width=2,
                                                                       dropout=0.3))])
def test_fake_autocast_count_matches_real_cpu_autocast(arch, hparams) -> None:
    """The autocast state the estimator sets by hand gives what ``torch.autocast`` gives.

    Real: the public ``torch.autocast("cpu", bfloat16)`` on real tensors. The only
    difference allowed is BN's per-channel saved mean/invstd, which the meta
    kernels give in bf16 where the CPU kernel keeps fp32 (a few KiB).
    """
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, **hparams)
    x, y = _real_batch()
    seen: dict[int, int] = {}
    exclude = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers(), x)}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in exclude:
            seen.setdefault(key, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    real = sum(seen.values())
    del loss
    est = estimate_training_memory(arch, hparams, batch_size=BATCH, amp_dtype=torch.bfloat16,
                                   channels_last=False, device="cpu")
    assert 0 <= real - est.activations_bytes < 16 * 1024
    fp32 = estimate_training_memory(arch, hparams, batch_size=BATCH, amp_dtype=None,
                                    channels_last=False, device="cpu")
    assert est.activations_bytes < 0.6 * fp32.activations_bytes  # bf16 about halves them


@pytest.mark.parametrize(("arch", "hparams"), MODELS, ids=[f"{a}-{h}" for a, h in MODELS])
def test_params_grads_optimizer_are_exact(arch, hparams) -> None:
    model = build_model(arch, num_classes=10, **hparams)
    params = sum(p.numel() * 4 for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    est = estimate_training_memory(arch, hparams, batch_size=BATCH)
    assert est.params_bytes == params + buffers
    assert est.grads_bytes == 4 * count_params(model)  # fp32 grads, trainable parameters
    assert est.optimizer_bytes == est.grads_bytes  # SGD: one momentum buffer per parameter
    plain = estimate_training_memory(arch, hparams, batch_size=BATCH, momentum=0.0)
    assert plain.optimizer_bytes == 0
    assert est.context_bytes == CONTEXT_BYTES
    assert est.allocated_bytes + est.workspace_bytes + est.context_bytes == est.total_bytes


def test_data_bytes_follow_the_loader() -> None:
    """Padded uint8 training images (4,800 B), eval images (3,072 B), int64 indices, a batch."""
    a = estimate_training_memory("resnet", dict(depth=20), dataset_images=45_000)
    b = estimate_training_memory("resnet", dict(depth=20), dataset_images=90_000)
    assert b.data_bytes - a.data_bytes == 45_000 * (3 * 40 * 40 + 8 + 24)
    assert b.data_bytes - a.data_bytes > 1.56 * 45_000 * 3 * 32 * 32


def test_monotonic_in_batch_size_and_width() -> None:
    by_batch = [estimate_training_memory("wrn", dict(depth=16, width=2), batch_size=b)
                for b in (32, 64, 128)]
    acts = [e.activations_bytes for e in by_batch]
    assert acts[0] < acts[1] < acts[2]
    # Affine in the batch: per-image feature maps plus batch-free bf16 weight copies.
    assert acts[2] - acts[1] == 2 * (acts[1] - acts[0])
    assert [e.total_bytes for e in by_batch] == sorted(e.total_bytes for e in by_batch)
    by_width = [estimate_training_memory("wrn", dict(depth=16, width=k)) for k in (1, 2, 4)]
    for field in ("params_bytes", "activations_bytes", "total_bytes"):
        values = [getattr(e, field) for e in by_width]
        assert values[0] < values[1] < values[2], field
    # Dropout keeps its mask and its output for backward.
    with_dropout = estimate_training_memory("wrn", dict(depth=16, width=2, dropout=0.3))
    assert with_dropout.activations_bytes > by_batch[2].activations_bytes


def test_shares_on_an_80_gib_gpu() -> None:
    """What resources: auto asks for on an 80 GiB GPU (20 % headroom: 64 GiB usable).

    ResNet-20 at batch 128 needs about 1.1 GiB (of which 0.5 GiB CUDA context and
    0.25 GiB workspace allowance): 1/8. WRN-28-10 at batch 128 in bf16 needs about
    2.7 GiB (1.2 GiB activations, 0.4 GiB params+grads+momentum): that fits 1/8 of
    an 80 GiB GPU too (8 GiB usable). Memory alone does not give WRN-28-10 a whole
    GPU on an H100; it does need more than ResNet-20 on a 16 GiB GPU, and at larger
    batches.
    """
    resnet = estimate_training_memory("resnet", dict(depth=20), batch_size=128)
    wrn = estimate_training_memory("wrn", dict(depth=28, width=10), batch_size=128)
    assert 0.9 * GiB < resnet.total_bytes < 1.3 * GiB
    assert 2.2 * GiB < wrn.total_bytes < 3.2 * GiB
    assert gpu_share(resnet.total_bytes, 80 * GiB) <= 0.25
    assert gpu_share(resnet.total_bytes, 80 * GiB) == 0.125
    assert gpu_share(wrn.total_bytes, 80 * GiB) == 0.125
    assert gpu_share(resnet.total_bytes, 16 * GiB) == 0.125
    assert gpu_share(wrn.total_bytes, 16 * GiB) == 0.25
    big = estimate_training_memory("wrn", dict(depth=28, width=10), batch_size=1024)
    assert gpu_share(big.total_bytes, 80 * GiB) == 0.25
    huge = estimate_training_memory("wrn", dict(depth=28, width=10), batch_size=4096)
    assert gpu_share(huge.total_bytes, 80 * GiB) == 1.0


def test_gpu_share_boundaries_and_errors() -> None:
    gpu = 80 * GiB  # 64 GiB usable with the default 20 % headroom
    assert gpu_share(8 * GiB, gpu) == 0.125  # exactly 1/8 of 64 GiB fits
    assert gpu_share(8 * GiB + 1, gpu) == 0.25
    assert gpu_share(64 * GiB, gpu) == 1.0
    assert gpu_share(40 * GiB, gpu, headroom=0.5) == 1.0
    assert gpu_share(40 * GiB, gpu, headroom=0.0) == 0.5
    with pytest.raises(ValueError, match=r"needs an estimated 64\.1 GiB, more than one GPU offers "
                                         r"\(80\.0 GiB less 20% headroom = 64\.0 GiB\)"):
        gpu_share(64 * GiB + 2**26, gpu)
    with pytest.raises(ValueError, match="headroom must be in"):
        gpu_share(GiB, gpu, headroom=1.0)


def test_a_model_too_large_for_one_gpu_raises_a_clear_error() -> None:
    est = estimate_training_memory("wrn", dict(depth=28, width=10), batch_size=8192)
    assert est.total_bytes > 80 * GiB  # allocates nothing: fake tensors
    with pytest.raises(ValueError, match=r"single GPU: lower batch_size, width or depth"):
        gpu_share(est.total_bytes, 80 * GiB)


def test_next_share_ladder() -> None:
    ladder = [0.125]
    while ladder[-1] < 3:
        ladder.append(next_share(ladder[-1]))
    assert ladder == [0.125, 0.25, 0.5, 1.0, 2.0, 3.0]
    assert next_share(0.3) == 0.5  # an off-ladder share moves to the next step
    assert SHARES == (0.125, 0.25, 0.5, 1.0)
    with pytest.raises(ValueError, match="share must be > 0"):
        next_share(0)


def test_invalid_hparams_raise_the_builders_error() -> None:
    with pytest.raises(ValueError, match=r"WRN depth must be 6n\+4.*got depth=27"):
        estimate_training_memory("wrn", dict(depth=27, width=10))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        estimate_training_memory("wrn", dict(depth=28, width=10), batch_size=0)


def test_estimate_leaves_no_global_state_behind() -> None:
    """Autocast state restored, no CUDA initialised, results cached per argument set."""
    before = torch.get_autocast_dtype("cuda"), torch.is_autocast_enabled("cuda")
    a = estimate_training_memory("wrn", dict(depth=16, width=1, dropout=None))
    assert (torch.get_autocast_dtype("cuda"), torch.is_autocast_enabled("cuda")) == before
    assert not torch.cuda.is_initialized()
    assert estimate_training_memory("wrn", dict(dropout=None, width=1, depth=16)) is a
    assert torch.get_default_device() == torch.device("cpu")


def test_wrn_28_10_estimate_is_fast() -> None:
    estimate_training_memory("resnet", dict(depth=8))  # one-off: torch._dynamo's import
    memory._estimate.cache_clear()  # time a real estimate, not a cache hit
    start = time.perf_counter()
    estimate_training_memory("wrn", dict(depth=28, width=10), batch_size=128)
    assert time.perf_counter() - start < 2.0
