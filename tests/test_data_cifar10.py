"""CIFAR10DataModule on tiny fake batches in CIFAR10's real pickle format (no download)."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torchvision import transforms

from lightning_prune import BudgetCallback, PrunedClassifier, make_permanent
from lightning_prune.backbones import VGG19, Conv4, ResNet18
from lightning_prune.data import CIFAR10DataModule
from lightning_prune.data import cifar10 as cifar10_module
from lightning_prune.data.epoch_sampler import EpochSeededSampler

try:
    from dataset_fixtures import (
        count_nonzero_weights,
        expected_kept,
        read_cifar10_batch,
        tar_cifar10,
        write_cifar10,
        write_cifar10_batch,
    )
except ImportError:  # tests/ imported as a package
    from tests.dataset_fixtures import (
        count_nonzero_weights,
        expected_kept,
        read_cifar10_batch,
        tar_cifar10,
        write_cifar10,
        write_cifar10_batch,
    )

ROWS = 20  # per batch: 100 training and 20 test images


@pytest.fixture
def data_dir(tmp_path):
    write_cifar10(tmp_path, rows_per_batch=ROWS)
    return tmp_path


@pytest.fixture
def one_thread():
    """Tiny models on a shared CPU run many times faster on one thread than on contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_download(monkeypatch):
    """Fail the test if anything tries to download."""

    def fail(*args, **kwargs):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", fail)
    monkeypatch.setattr("torchvision.datasets.utils.download_url", fail)


def make(data_dir, **kwargs) -> CIFAR10DataModule:
    options = {"data_dir": str(data_dir), "batch_size": 8, "num_workers": 0, "val_size": 20, "verify_checksums": False}
    options.update(kwargs)
    return CIFAR10DataModule(**options)


def labels_of(dataset) -> list[int]:
    return [int(dataset[i][1]) for i in range(len(dataset))]


def test_batches_have_the_right_shapes_dtypes_and_ranges(data_dir, no_download):
    dm = make(data_dir)
    dm.prepare_data()  # files present: nothing to download
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (80, 20, 20)
    assert dm.classes[:2] == ["airplane", "automobile"] and len(dm.classes) == dm.num_classes == 10
    low = min((0 - m) / s for m, s in zip(dm.mean, dm.std))
    high = max((1 - m) / s for m, s in zip(dm.mean, dm.std))
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
        assert y.shape == (8,) and y.dtype == torch.int64
        assert low - 1e-5 <= x.min() and x.max() <= high + 1e-5
        assert 0 <= y.min() and y.max() < 10


def test_pixels_keep_cifar_layout(data_dir):
    """Row i of b"data" is the R plane, then G, then B, each 32x32 row-major: the tensor must match exactly."""
    dm = make(data_dir, mean=(0, 0, 0), std=(1, 1, 1), augment=False)
    dm.setup()
    raw = read_cifar10_batch(data_dir / "cifar-10-batches-py" / "test_batch")
    x, y = dm.test_set[3]
    expected = torch.from_numpy(raw[b"data"][3].reshape(3, 32, 32).astype(np.float32) / 255)
    assert torch.allclose(x, expected, atol=1e-6)
    assert y == raw[b"labels"][3]


def test_class_counts(data_dir):
    dm = make(data_dir)
    dm.setup()
    train_val = labels_of(dm.train_set) + labels_of(dm.val_set)
    assert np.bincount(train_val, minlength=10).tolist() == [10] * 10
    assert np.bincount(labels_of(dm.test_set), minlength=10).tolist() == [2] * 10


def test_seeded_split_is_reproducible(data_dir):
    first, again, other = make(data_dir, seed=1), make(data_dir, seed=1), make(data_dir, seed=2)
    for dm in (first, again, other):
        dm.setup()
    assert first.val_set.indices == again.val_set.indices and first.train_set.indices == again.train_set.indices
    assert first.val_set.indices != other.val_set.indices
    assert sorted(first.train_set.indices + first.val_set.indices) == list(range(100))


def test_val_size_zero_validates_on_the_test_set(data_dir):
    dm = make(data_dir, val_size=0)
    dm.setup()
    assert dm.val_set is dm.test_set and len(dm.train_set) == 100


def test_val_size_too_large(data_dir):
    with pytest.raises(ValueError, match="val_size=100 leaves no training image"):
        make(data_dir, val_size=100).setup()


def test_augmentation_switch(data_dir):
    plain = make(data_dir, augment=False)
    plain.setup()
    assert torch.equal(plain.train_set[0][0], plain.train_set[0][0])
    kinds = [type(t) for t in make(data_dir).train_transform().transforms]
    assert kinds[:2] == [transforms.RandomCrop, transforms.RandomHorizontalFlip]
    assert not any(k in (transforms.RandomCrop, transforms.RandomHorizontalFlip) for k in
                   [type(t) for t in plain.train_transform().transforms])
    assert make(data_dir).train_transform().transforms[0].padding == 4


def test_init_touches_no_disk(tmp_path):
    target = tmp_path / "not_here"
    dm = CIFAR10DataModule(data_dir=str(target))
    assert not target.exists() and dm.train_set is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"val_size": -1}, "val_size"),
        ({"val_size": 0.1}, "number of training images"),
        ({"mean": (0.5, 0.5)}, "one value per RGB channel"),
        ({"std": (0.5, 0.0, 0.5)}, "std values must be > 0"),
        ({"crop_padding": -1}, "crop_padding"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CIFAR10DataModule(data_dir=str(tmp_path), **kwargs)


def test_pin_memory_and_persistent_workers(data_dir):
    dm = make(data_dir, num_workers=0)
    dm.setup()
    assert dm.train_dataloader().pin_memory == torch.cuda.is_available()  # no trainer attached
    dm.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert dm.train_dataloader().pin_memory is False  # a CPU trainer never pins
    assert dm.train_dataloader().persistent_workers is False  # no worker processes
    forced = make(data_dir, num_workers=1, pin_memory=True)
    forced.setup()
    loader = forced.val_dataloader()  # workers start only on iteration
    assert loader.pin_memory is True and loader.persistent_workers is True and loader.num_workers == 1


def test_missing_data_without_download(tmp_path, no_download):
    dm = make(tmp_path / "empty", download=False)
    dm.prepare_data()  # download disabled: nothing happens here
    with pytest.raises(FileNotFoundError) as err:
        dm.setup()
    text = str(err.value)
    assert str(tmp_path / "empty" / "cifar-10-batches-py") in text and "download=True" in text
    assert "cifar-10-python.tar.gz" in text


def test_prepare_data_downloads_only_missing_data(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        "torchvision.datasets.utils.download_and_extract_archive",
        lambda url, root, filename=None, md5=None: calls.append((url, root, filename, md5)) or write_cifar10(root),
    )
    dm = make(tmp_path, verify_checksums=True)
    dm.prepare_data()
    assert calls == [(cifar10_module.CIFAR10_URL, str(tmp_path), "cifar-10-python.tar.gz",
                      cifar10_module.CIFAR10_ARCHIVE_MD5)]
    dm.prepare_data()  # now in place
    assert len(calls) == 1


def test_missing_batch_file(data_dir):
    os.remove(data_dir / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="did not find data_batch_3"):
        make(data_dir).setup()


def test_truncated_batch(data_dir):
    path = data_dir / "cifar-10-batches-py" / "data_batch_2"
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(RuntimeError, match="data_batch_2 is truncated or corrupt"):
        make(data_dir).setup()


def test_truncated_archive(tmp_path, monkeypatch):
    """A cut-off cifar-10-python.tar.gz (an interrupted download) fails with an error that says what to delete."""
    import torchvision.datasets.utils as tv_utils

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(tv_utils, "_urlretrieve", no_network)
    monkeypatch.setattr(tv_utils, "_get_redirect_url", no_network)
    archive = tar_cifar10(write_cifar10(tmp_path / "staging", rows_per_batch=ROWS), tmp_path / "full.tar.gz")
    content = archive.read_bytes()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "cifar-10-python.tar.gz").write_bytes(content[: len(content) // 2])
    dm = make(data_dir, download=True)  # the archive is there: torchvision extracts it without downloading
    with pytest.raises(RuntimeError, match=r"Could not download or extract CIFAR10") as err:
        dm.prepare_data()
    assert str(data_dir / "cifar-10-python.tar.gz") in str(err.value) and "delete it" in str(err.value)
    with pytest.raises(FileNotFoundError, match="did not find"):
        make(data_dir, download=True).setup()  # the part extracted before the cut is never read as the data set


def test_wrong_checksum(data_dir):
    with pytest.raises(RuntimeError, match="data_batch_1 is corrupt: its md5 is"):
        make(data_dir, verify_checksums=True).setup()


def test_batch_with_fewer_rows(data_dir):
    path = data_dir / "cifar-10-batches-py" / "data_batch_4"
    raw = read_cifar10_batch(path)
    write_cifar10_batch(path, raw[b"data"][:10], raw[b"labels"][:10], raw[b"batch_label"])
    with pytest.raises(RuntimeError, match="different numbers of images"):
        make(data_dir).setup()


def test_batch_with_wrong_shape(data_dir):
    path = data_dir / "cifar-10-batches-py" / "test_batch"
    raw = read_cifar10_batch(path)
    write_cifar10_batch(path, raw[b"data"][:, :3000], raw[b"labels"], raw[b"batch_label"])
    with pytest.raises(RuntimeError, match=r"expected uint8 \(N, 3072\)"):
        make(data_dir).setup()


@pytest.mark.parametrize(
    "backbone",
    [
        lambda: Conv4(num_classes=10, input_size=32, width=4, hidden=8),
        lambda: VGG19(num_classes=10, width_multiplier=0.0625),
        lambda: ResNet18(num_classes=10, width=4),
    ],
    ids=["conv4", "vgg19", "resnet18"],
)
def test_a_short_pruned_fit_on_the_datamodule_meets_the_budget(data_dir, backbone, one_thread):
    dm = make(data_dir)
    net = backbone()
    kept, total = expected_kept(net, 0.5)
    model = PrunedClassifier(net, num_classes=10)
    budget = BudgetCallback(sparsity=0.5)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[budget],
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2 and budget.finalized
    assert (budget.report.kept, budget.report.total) == (kept, total)  # exactly the budget, not just under it
    assert count_nonzero_weights(make_permanent(model.backbone, inplace=False)) == kept


def test_datasets_pickle_for_spawned_workers(data_dir):
    import pickle

    dm = make(data_dir)
    dm.setup()
    for dataset in (dm.train_set, dm.val_set, dm.test_set):
        copy = pickle.loads(pickle.dumps(dataset))
        assert len(copy) == len(dataset) and copy[0][1] == dataset[0][1]


def test_shuffling_depends_only_on_seed_and_epoch(data_dir):
    dm = make(data_dir, augment=False)
    dm.setup()

    def labels(loader, epoch):
        loader.sampler.set_epoch(epoch)  # Lightning does this at the start of every epoch
        return torch.cat([y for _, y in loader]).tolist()

    first, second = dm.train_dataloader(), dm.train_dataloader()
    assert isinstance(first.sampler, EpochSeededSampler)
    assert labels(first, 3) == labels(second, 3) and labels(first, 3) != labels(first, 4)
    assert sorted(labels(first, 0)) == sorted(labels_of(dm.train_set))
    assert not isinstance(dm.val_dataloader().sampler, EpochSeededSampler)  # evaluation keeps the dataset order
