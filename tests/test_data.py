"""Properties of trainables.data: splits, the batched augmentation and the Loader."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainables.data import (
    DATASETS,
    Loader,
    Split,
    augment_indices,
    load_splits,
    pad_crop_flip,
)


@pytest.fixture(scope="module")
def synthetic():
    return load_splits("synthetic", synthetic_size=512)


@pytest.fixture(scope="module")
def digits():
    return load_splits("digits")


def _batches(loader: Loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True)
    )


def _denormalise(x: torch.Tensor, spec) -> torch.Tensor:
    """Normalised float (B, 3, 32, 32) -> the uint8 pixels it came from."""
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (x * std + mean).mul(255).round().to(torch.uint8)


# ---------------------------------------------------------------------------
# Augmentation


def test_reflect_indices_match_torch_reflect_mode():
    # dy = 0 reads padded rows 0..31, i.e. source rows 4,3,2,1,0,1,...,27.
    rows, cols = augment_indices(torch.tensor([0, 8]), torch.tensor([8, 0]), torch.tensor([0, 1]))
    assert rows[0, :6].tolist() == [4, 3, 2, 1, 0, 1]
    assert rows[1, -5:].tolist() == [31, 30, 29, 28, 27]  # 32 -> 30, not 31 (replicate)
    assert cols[1].tolist() == rows[0].flip(0).tolist()


def test_pad_crop_flip_equals_f_pad_reference():
    # Every crop offset (dy, dx) in [0, 8]^2 with and without flip: 162 samples.
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (162, 3, 32, 32), dtype=torch.uint8, generator=g)
    dy = torch.arange(9).repeat_interleave(18)
    dx = torch.arange(9).repeat_interleave(2).repeat(9)
    flip = torch.arange(162) % 2 == 1
    padded = F.pad(x.float(), (4, 4, 4, 4), mode="reflect")  # (162, 3, 40, 40)
    crops = [padded[b, :, dy[b] : dy[b] + 32, dx[b] : dx[b] + 32] for b in range(162)]
    ref = torch.stack([c.flip(-1) if f else c for c, f in zip(crops, flip, strict=True)])
    out = pad_crop_flip(x, dy, dx, flip)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out.float(), ref)


@pytest.mark.parametrize(
    ("pad_crop", "flip"), [(True, True), (True, False), (False, True), (False, False)]
)
def test_train_loader_batches_are_pad_crop_flip_of_the_epoch_plan(synthetic, pad_crop, flip):
    spec = dataclasses.replace(synthetic.spec, pad_crop=pad_crop, flip=flip)
    # 512 images in batches of 60, partial last batch kept: every code path of a batch.
    loader = Loader(synthetic.train, spec, batch_size=60, train=True, seed=3, drop_last=False)
    loader.set_epoch(2)
    plan = loader.epoch_plan()
    order, dy, dx, flips = plan
    assert sorted(order.tolist()) == list(range(len(synthetic.train)))
    assert bool(flips.any()) == flip and bool((dy != 4).any()) == pad_crop
    if pad_crop:
        assert dy.min() == 0 and dy.max() == 8 and dx.min() == 0 and dx.max() == 8
    expected = pad_crop_flip(synthetic.train.images[order], dy, dx, flips)
    labels = synthetic.train.labels[order]
    batches = _batches(loader, 2)
    assert [len(y) for _, y in batches] == [60] * 8 + [32]
    for i, (x, y) in enumerate(batches):
        sl = slice(i * 60, (i + 1) * 60)
        assert torch.equal(_denormalise(x, spec), expected[sl])
        assert torch.equal(y, labels[sl])
    loader.set_epoch(2)
    assert all(torch.equal(a, b) for a, b in zip(loader.epoch_plan(), plan, strict=True))


def test_digits_are_never_flipped(digits):
    assert DATASETS["digits"].flip is False and DATASETS["digits"].pad_crop is True
    loader = Loader(digits.train, digits.spec, batch_size=128, train=True)
    loader.set_epoch(0)
    _, dy, _, flip = loader.epoch_plan()
    assert not flip.any()
    assert len(set(dy.tolist())) == 9  # crops still vary


# ---------------------------------------------------------------------------
# Loader


def test_loader_shapes_dtypes_and_lengths(synthetic):
    train = Loader(synthetic.train, synthetic.spec, batch_size=100, train=True)
    assert len(train) == 5 and train.num_images == 500  # 512 images, partial batch dropped
    batches = _batches(train, 0)
    assert len(batches) == 5
    for x, y in batches:
        assert x.shape == (100, 3, 32, 32) and x.dtype == torch.float32
        assert y.shape == (100,) and y.dtype == torch.int64
        assert x.device.type == "cpu" and y.device.type == "cpu"
        assert x.is_contiguous()
    val = Loader(synthetic.val, synthetic.spec, batch_size=100, train=False)
    assert len(val) == 3 and val.num_images == 256  # no drop_last for evaluation
    assert [len(y) for _, y in val] == [100, 100, 56]


def test_loader_channels_last_and_dtype(synthetic):
    loader = Loader(
        synthetic.train,
        synthetic.spec,
        batch_size=64,
        train=True,
        channels_last=True,
        dtype=torch.bfloat16,
    )
    loader.set_epoch(0)
    x, _ = next(iter(loader))
    assert x.dtype == torch.bfloat16
    assert x.is_contiguous(memory_format=torch.channels_last)
    ref = Loader(synthetic.train, synthetic.spec, batch_size=64, train=True)
    ref.set_epoch(0)
    x32, _ = next(iter(ref))
    torch.testing.assert_close(x.float(), x32, atol=0.02, rtol=0.01)  # bf16 has 8 bits


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_loader_on_cuda_matches_cpu(synthetic):
    cpu = Loader(synthetic.train, synthetic.spec, batch_size=64, train=True, seed=1)
    gpu = Loader(synthetic.train, synthetic.spec, batch_size=64, train=True, seed=1, device="cuda")
    for (xc, yc), (xg, yg) in zip(_batches(cpu, 4), _batches(gpu, 4), strict=True):
        assert xg.device.type == "cuda"
        torch.testing.assert_close(xg.cpu(), xc)
        assert torch.equal(yg.cpu(), yc)


def test_loader_is_deterministic_per_seed_and_epoch(synthetic):
    def make(seed: int) -> Loader:
        return Loader(synthetic.train, synthetic.spec, batch_size=128, train=True, seed=seed)

    assert _same(_batches(make(0), 1), _batches(make(0), 1))
    a = make(0)
    assert not _same(_batches(a, 0), _batches(a, 1))
    assert not _same(_batches(make(0), 0), _batches(make(1), 0))


def test_resumed_loader_sees_the_same_batches():
    # The engine resumes a run at epoch k with a fresh Loader: epoch k must be
    # bit-identical to epoch k of the loader that ran epochs 0..k-1 first.
    s = load_splits("synthetic", synthetic_size=256)
    uninterrupted = Loader(s.train, s.spec, batch_size=64, train=True, seed=7)
    for epoch in range(3):
        _batches(uninterrupted, epoch)
    third = _batches(uninterrupted, 3)
    fresh = Loader(s.train, s.spec, batch_size=64, train=True, seed=7)
    fresh.set_epoch(3)
    assert _same(list(fresh), third)


def test_eval_loader_fixed_order_unaugmented_and_normalised(synthetic):
    spec = synthetic.spec
    val = Loader(synthetic.val, spec, batch_size=100, train=False)
    x = torch.cat([xb for xb, _ in val])
    y = torch.cat([yb for _, yb in val])
    assert torch.equal(y, synthetic.val.labels)
    assert torch.equal(_denormalise(x, spec), synthetic.val.images)
    val.set_epoch(5)  # the epoch does not matter for evaluation
    assert torch.equal(torch.cat([xb for xb, _ in val]), x)

    # Known pixel values: 0 -> -mean/std, 255 -> (1 - mean)/std, per channel.
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    images[2:] = 255
    split = Split(images, torch.zeros(4, dtype=torch.int64))
    [(xb, _)] = list(Loader(split, spec, batch_size=4, train=False))
    mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
    torch.testing.assert_close(xb[:2].mean((0, 2, 3)), -mean / std)
    torch.testing.assert_close(xb[2:].mean((0, 2, 3)), (1 - mean) / std)


def test_loader_rejects_batches_larger_than_a_dropped_split(synthetic):
    with pytest.raises(ValueError, match="batch_size"):
        Loader(synthetic.val, synthetic.spec, batch_size=1024, train=True)


# ---------------------------------------------------------------------------
# Datasets


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match=r"must be one of .*'cifar10'.*got name='mnist'"):
        load_splits("mnist")


def test_digits_splits(digits):
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1257, 270, 270)
    for split in (digits.train, digits.val, digits.test):
        assert split.images.shape[1:] == (3, 32, 32) and split.images.dtype == torch.uint8
        assert sorted(split.labels.unique().tolist()) == list(range(10))
        assert torch.equal(split.images[:, 0], split.images[:, 2])  # grey replicated

    # scikit-learn's 1,797 images are pairwise distinct, so the three splits
    # partition the set exactly when their images are distinct and number 1,797.
    def keys(split: Split) -> set[bytes]:
        pairs = zip(split.images[:, 0], split.labels.tolist(), strict=True)
        return {img.numpy().tobytes() + bytes([lab]) for img, lab in pairs}

    tr, va, te = keys(digits.train), keys(digits.val), keys(digits.test)
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert len(tr | va | te) == 1797
    assert digits.train.images.max() == 255 and digits.train.images.min() == 0


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_hard_coded_mean_std_match_the_training_split(name, digits):
    splits = digits if name == "digits" else load_splits("synthetic", synthetic_size=2048)
    x = splits.train.images.double() / 255  # (N, 3, 32, 32) in [0, 1]
    spec = DATASETS[name]
    # The constants are rounded to 4 decimals; 1e-3 also allows another scikit-learn.
    mean, std = torch.tensor(spec.mean).double(), torch.tensor(spec.std).double()
    torch.testing.assert_close(x.mean((0, 2, 3)), mean, atol=1e-3, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3)), std, atol=1e-3, rtol=0)


def test_synthetic_is_deterministic_and_sized():
    a = load_splits("synthetic", synthetic_size=1000)
    b = load_splits("synthetic", synthetic_size=1000)
    for sa, sb in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert torch.equal(sa.images, sb.images) and torch.equal(sa.labels, sb.labels)
    assert (len(a.train), len(a.val), len(a.test)) == (1000, 256, 256)
    assert len(load_splits("synthetic", synthetic_size=4096).val) == 512
    assert not torch.equal(a.val.images, a.test.images)
    assert torch.bincount(a.train.labels).tolist() == [100] * 10  # balanced


def test_synthetic_is_class_separable(synthetic):
    # Nearest class mean on raw pixels, fitted on train, scored on val.
    x = synthetic.train.images.flatten(1).float()  # (N, 3072)
    y = synthetic.train.labels
    means = torch.stack([x[y == c].mean(0) for c in range(10)])  # (10, 3072)
    pred = torch.cdist(synthetic.val.images.flatten(1).float(), means).argmin(1)
    accuracy = (pred == synthetic.val.labels).float().mean().item()
    assert accuracy > 0.5  # chance is 0.1


# ---------------------------------------------------------------------------
# CIFAR without network


def test_cifar_missing_without_download_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True") as info:
        load_splits("cifar10", root=str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_cifar_default_root_is_the_one_the_mlflow_store_cache_uses(tmp_path, monkeypatch):
    """Without a root, CIFAR is looked for in wrnsweep's one cache folder, which
    honours XDG_CACHE_HOME as the empty-store cache does (and is ~/.cache/wrnsweep
    without it)."""
    from orchestrator.store import STORE_CACHE, new_folder_store

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with pytest.raises(FileNotFoundError, match="download=True") as info:
        load_splits("cifar10")
    assert f"in {tmp_path / 'xdg' / 'wrnsweep' / 'cifar-10-batches-py'}" in str(info.value)
    (tmp_path / "sweep").mkdir()
    new_folder_store(tmp_path / "sweep" / "mlflow.db")
    assert list((tmp_path / "xdg" / "wrnsweep" / STORE_CACHE).glob("empty-*.db"))

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError, match="download=True") as info:
        load_splits("cifar10")
    assert f"in {tmp_path / 'home' / '.cache' / 'wrnsweep' / 'cifar-10-batches-py'}" \
        in str(info.value)


def _write_fake_cifar10(root: Path, per_batch: int) -> tuple[np.ndarray, list[int]]:
    """torchvision's on-disk CIFAR-10 format: pickled dicts of (n, 3072) uint8 rows."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    all_data, all_labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)  # rows are CHW
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, f)
        if name != "test_batch":
            all_data.append(data)
            all_labels.extend(labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return np.concatenate(all_data).reshape(-1, 3, 32, 32), all_labels


def test_cifar10_from_fake_files_splits_ten_percent(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    images, labels = _write_fake_cifar10(tmp_path, per_batch=20)  # 100 train, 20 test
    # torchvision compares each file's md5 with the real CIFAR archive's (in
    # CIFAR10._check_integrity and _load_meta); fake files cannot match, and a
    # real download is not possible offline, so this one test skips the md5.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    splits = load_splits("cifar10", root=str(tmp_path))

    assert splits.spec is DATASETS["cifar10"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 10, 20)
    for split in (splits.train, splits.val, splits.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 32, 32)
        assert split.images.is_contiguous()
    # Train and val partition the 100 training images, pixels and labels intact.
    source = {bytes(img.tobytes()): lab for img, lab in zip(images, labels, strict=True)}
    seen = []
    for split in (splits.train, splits.val):
        for img, lab in zip(split.images.numpy(), split.labels.tolist(), strict=True):
            assert source[bytes(img.tobytes())] == lab
            seen.append(bytes(img.tobytes()))
    assert len(set(seen)) == 100
    # The validation subset is fixed (module constant seed), not run-seed dependent.
    again = load_splits("cifar10", root=str(tmp_path))
    assert torch.equal(again.val.images, splits.val.images)


def test_cifar_corrupt_files_without_download_raise_file_not_found(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()  # folder present, files missing
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_splits("cifar10", root=str(tmp_path))
