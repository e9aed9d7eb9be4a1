"""TinyImageNetDataModule on a tiny fake tree (and zip) in Tiny ImageNet's real on-disk layout (no download)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torchvision import transforms

from lightning_prune import BudgetCallback, PrunedClassifier, make_permanent
from lightning_prune.backbones import VGG19, Conv4, ResNet18
from lightning_prune.data import TinyImageNetDataModule
from lightning_prune.data import tinyimagenet as tiny_module
from lightning_prune.data.tinyimagenet import VAL_SORTED_MARKER, sort_val_images

try:
    from dataset_fixtures import (
        TINY_WNIDS,
        copy_tree,
        count_nonzero_weights,
        expected_kept,
        relative_files,
        val_annotations,
        write_tinyimagenet,
        zip_tree,
    )
except ImportError:  # tests/ imported as a package
    from tests.dataset_fixtures import (
        TINY_WNIDS,
        copy_tree,
        count_nonzero_weights,
        expected_kept,
        relative_files,
        val_annotations,
        write_tinyimagenet,
        zip_tree,
    )

TRAIN_PER_CLASS, VAL_PER_CLASS = 2, 1  # 400 training and 200 test images


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """The fake tree as the official zip unpacks, written once per module; tests copy it."""
    return write_tinyimagenet(tmp_path_factory.mktemp("pristine"), TRAIN_PER_CLASS, VAL_PER_CLASS)


@pytest.fixture(scope="module")
def archive(pristine, tmp_path_factory) -> Path:
    return zip_tree(pristine, tmp_path_factory.mktemp("zip") / "tiny-imagenet-200.zip")


@pytest.fixture
def data_dir(pristine, tmp_path) -> Path:
    copy_tree(pristine, tmp_path)
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
    def fail(*args, **kwargs):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(tiny_module, "download_url", fail)


def make(data_dir, **kwargs) -> TinyImageNetDataModule:
    options = {"data_dir": str(data_dir), "batch_size": 8, "num_workers": 0, "val_size": 16, "verify_checksums": False}
    options.update(kwargs)
    return TinyImageNetDataModule(**options)


def sorted_val_tree(pristine: Path) -> set[str]:
    """The files of val/ once sorted, derived from the annotations."""
    expected = {f"{wnid}/images/{name}" for name, wnid in val_annotations(pristine).items()}
    return expected | {"val_annotations.txt", VAL_SORTED_MARKER}


def test_batches_have_the_right_shapes_dtypes_and_ranges(data_dir, no_download):
    dm = make(data_dir)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (400 - 16, 16, 200)
    low = min((0 - m) / s for m, s in zip(dm.mean, dm.std))
    high = max((1 - m) / s for m, s in zip(dm.mean, dm.std))
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (8, 3, 64, 64) and x.dtype == torch.float32  # greyscale JPEGs come out RGB too
        assert y.shape == (8,) and y.dtype == torch.int64
        assert low - 1e-5 <= x.min() and x.max() <= high + 1e-5
        assert 0 <= y.min() and y.max() < 200


def test_classes_are_sorted_wnids_in_train_and_test(data_dir, pristine):
    dm = make(data_dir, val_size=0)
    dm.prepare_data()
    dm.setup()
    assert dm.classes == sorted(TINY_WNIDS) and len(dm.classes) == dm.num_classes
    assert dm.train_set.dataset.class_to_idx == dm.test_set.class_to_idx
    index = {wnid: i for i, wnid in enumerate(sorted(TINY_WNIDS))}
    annotations = val_annotations(pristine)
    for path, label in dm.test_set.samples:
        assert label == index[annotations[os.path.basename(path)]]
    for path, label in dm.train_set.dataset.samples:
        assert label == index[os.path.basename(path).split("_")[0]]


def test_class_counts(data_dir):
    dm = make(data_dir)
    dm.prepare_data()
    dm.setup()
    full = dm.train_set.dataset.targets
    assert np.bincount(full, minlength=200).tolist() == [TRAIN_PER_CLASS] * 200
    assert np.bincount(dm.test_set.targets, minlength=200).tolist() == [VAL_PER_CLASS] * 200
    assert sorted(dm.train_set.indices + dm.val_set.indices) == list(range(400))


def test_seeded_split_is_reproducible(data_dir):
    dm = make(data_dir, seed=3)
    dm.prepare_data()
    modules = [dm, make(data_dir, seed=3), make(data_dir, seed=4)]
    for m in modules:
        m.setup()
    assert modules[0].val_set.indices == modules[1].val_set.indices
    assert modules[0].val_set.indices != modules[2].val_set.indices


def test_val_size_zero_validates_on_the_test_set(data_dir):
    dm = make(data_dir, val_size=0)
    dm.prepare_data()
    dm.setup()
    assert dm.val_set is dm.test_set and len(dm.train_set) == 400


def test_augmentation_switch(data_dir):
    kinds = [type(t) for t in make(data_dir).train_transform().transforms]
    assert kinds[:2] == [transforms.RandomCrop, transforms.RandomHorizontalFlip]
    plain = make(data_dir, augment=False)
    assert [type(t) for t in plain.train_transform().transforms] == [transforms.ToTensor, transforms.Normalize]
    plain.prepare_data()
    plain.setup()
    assert torch.equal(plain.train_set[0][0], plain.train_set[0][0])


def test_init_touches_no_disk(tmp_path):
    target = tmp_path / "not_here"
    TinyImageNetDataModule(data_dir=str(target))
    assert not target.exists()


# ---------------------------------------------------------------------- sorting the validation images
def test_sort_val_images_result_and_idempotence(data_dir, pristine):
    root = data_dir / "tiny-imagenet-200"
    sort_val_images(str(root))
    assert relative_files(root / "val") == sorted_val_tree(pristine)
    assert not (root / "val" / "images").exists()
    assert relative_files(root / "train") == relative_files(pristine / "train")  # train untouched
    before = {p: (root / "val" / p).stat().st_mtime_ns for p in relative_files(root / "val")}
    sort_val_images(str(root))  # second run: nothing changes
    assert {p: (root / "val" / p).stat().st_mtime_ns for p in relative_files(root / "val")} == before
    os.remove(root / "val" / VAL_SORTED_MARKER)  # even without the marker, a sorted tree stays as it is
    sort_val_images(str(root))
    assert relative_files(root / "val") == sorted_val_tree(pristine)


def test_sort_val_images_finishes_an_interrupted_run(data_dir, pristine, monkeypatch):
    root = data_dir / "tiny-imagenet-200"
    real_move, moves = tiny_module._move, []

    def move_then_die(src, dst):
        if len(moves) == 100:
            raise KeyboardInterrupt  # killed halfway
        moves.append(src)
        real_move(src, dst)

    monkeypatch.setattr(tiny_module, "_move", move_then_die)
    with pytest.raises(KeyboardInterrupt):
        sort_val_images(str(root))
    assert not (root / "val" / VAL_SORTED_MARKER).exists()
    assert len(os.listdir(root / "val" / "images")) == 100  # half moved
    with pytest.raises(RuntimeError, match="not sorted into class folders yet"):
        make(data_dir).setup()  # a half-sorted tree is never read
    monkeypatch.setattr(tiny_module, "_move", real_move)
    dm = make(data_dir)
    dm.prepare_data()  # finishes the job
    assert relative_files(root / "val") == sorted_val_tree(pristine)
    dm.setup()
    assert len(dm.test_set) == 200


def test_sort_val_images_with_a_missing_image(data_dir):
    root = data_dir / "tiny-imagenet-200"
    os.remove(root / "val" / "images" / "val_7.JPEG")
    with pytest.raises(RuntimeError, match=r"1 validation images listed in val_annotations.txt .* val_7.JPEG"):
        make(data_dir).prepare_data()
    assert not (root / "val" / VAL_SORTED_MARKER).exists()


def test_sort_val_images_with_an_unlisted_image(data_dir):
    root = data_dir / "tiny-imagenet-200"
    shutil.copy(root / "val" / "images" / "val_0.JPEG", root / "val" / "images" / "stray.JPEG")
    with pytest.raises(RuntimeError, match="not listed in val_annotations.txt"):
        make(data_dir).prepare_data()


# ---------------------------------------------------------------------- archive and download
def test_extracts_the_archive(tmp_path, archive, pristine, no_download):
    shutil.copy(archive, tmp_path / "tiny-imagenet-200.zip")
    dm = make(tmp_path, download=True)  # the archive is there: no download
    dm.prepare_data()
    root = tmp_path / "tiny-imagenet-200"
    assert relative_files(root / "train") == relative_files(pristine / "train")
    assert relative_files(root / "val") == sorted_val_tree(pristine)
    assert sorted(os.listdir(tmp_path)) == ["tiny-imagenet-200", "tiny-imagenet-200.zip"]  # no staging folder left
    marker_time = (root / "val" / VAL_SORTED_MARKER).stat().st_mtime_ns
    dm.prepare_data()  # in place: neither extracted nor sorted again
    assert (root / "val" / VAL_SORTED_MARKER).stat().st_mtime_ns == marker_time
    dm.setup()
    assert len(dm.test_set) == 200


def test_download_then_extract(tmp_path, archive, monkeypatch):
    calls = []

    def fake_download(url, root, filename=None, md5=None):
        calls.append(url)
        shutil.copy(archive, os.path.join(root, filename))

    monkeypatch.setattr(tiny_module, "download_url", fake_download)
    dm = make(tmp_path, download=True)
    dm.prepare_data()
    assert calls == [tiny_module.TINYIMAGENET_URL]
    assert sorted(os.listdir(tmp_path)) == ["tiny-imagenet-200", "tiny-imagenet-200.zip"]
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 400


def test_downloaded_archive_with_wrong_checksum(tmp_path, archive, monkeypatch):
    monkeypatch.setattr(tiny_module, "download_url",
                        lambda url, root, filename=None, md5=None: shutil.copy(archive, os.path.join(root, filename)))
    with pytest.raises(RuntimeError, match=f"official tiny-imagenet-200.zip has {tiny_module.TINYIMAGENET_MD5}.*deleted"):
        make(tmp_path, download=True, verify_checksums=True).prepare_data()
    assert os.listdir(tmp_path) == []  # the bad download is deleted


def test_stale_partial_download_is_not_trusted(tmp_path, archive, monkeypatch):
    (tmp_path / "tiny-imagenet-200.zip.part").write_bytes(b"PK\x03\x04 half a download")
    seen = []

    def fake_download(url, root, filename=None, md5=None):
        seen.append(os.path.exists(os.path.join(root, filename)))
        shutil.copy(archive, os.path.join(root, filename))

    monkeypatch.setattr(tiny_module, "download_url", fake_download)
    make(tmp_path, download=True).prepare_data()
    assert seen == [False]  # the stale part was removed before downloading again
    assert (tmp_path / "tiny-imagenet-200" / "val" / VAL_SORTED_MARKER).is_file()


def test_archive_with_wrong_checksum(tmp_path, archive, no_download):
    shutil.copy(archive, tmp_path / "tiny-imagenet-200.zip")
    with pytest.raises(RuntimeError, match="truncated or corrupt. Delete it and re-run"):
        make(tmp_path, verify_checksums=True).prepare_data()
    assert not (tmp_path / "tiny-imagenet-200").exists()


def test_truncated_archive(tmp_path, archive, no_download):
    content = archive.read_bytes()
    (tmp_path / "tiny-imagenet-200.zip").write_bytes(content[: len(content) // 2])
    with pytest.raises(RuntimeError, match=r"tiny-imagenet-200.zip is truncated or corrupt .*BadZipFile.*Delete it"):
        make(tmp_path).prepare_data()
    assert sorted(os.listdir(tmp_path)) == ["tiny-imagenet-200.zip"]  # no partial tree, no staging folder


def test_corrupt_member_in_archive(tmp_path, archive, no_download):
    content = bytearray(archive.read_bytes())
    at = content.find(b"JFIF") + 200  # inside the first JPEG: the CRC check fails on extraction
    content[at : at + 16] = bytes(16)
    (tmp_path / "tiny-imagenet-200.zip").write_bytes(bytes(content))
    with pytest.raises(RuntimeError, match="truncated or corrupt"):
        make(tmp_path).prepare_data()
    assert sorted(os.listdir(tmp_path)) == ["tiny-imagenet-200.zip"]


# ---------------------------------------------------------------------- missing or partial data
def test_missing_data_without_download(tmp_path, no_download):
    dm = make(tmp_path / "nothing", download=False)
    dm.prepare_data()
    with pytest.raises(FileNotFoundError) as err:
        dm.setup()
    text = str(err.value)
    assert str(tmp_path / "nothing" / "tiny-imagenet-200" / "wnids.txt") in text
    assert "download=True" in text and tiny_module.TINYIMAGENET_URL in text


def test_setup_before_prepare_data(data_dir):
    with pytest.raises(RuntimeError, match=r"call prepare_data\(\) before setup\(\)"):
        make(data_dir).setup()


def test_missing_class_folder(data_dir):
    shutil.rmtree(data_dir / "tiny-imagenet-200" / "train" / TINY_WNIDS[5])
    dm = make(data_dir)
    dm.prepare_data()
    with pytest.raises(RuntimeError, match=f"1 of the 200 classes .* no training folder .*{TINY_WNIDS[5]}"):
        dm.setup()


def test_class_folder_without_images(data_dir):
    images = data_dir / "tiny-imagenet-200" / "train" / TINY_WNIDS[9] / "images"
    for name in os.listdir(images):
        os.remove(images / name)
    dm = make(data_dir)
    dm.prepare_data()
    with pytest.raises(RuntimeError, match=f"Tiny ImageNet training images .*{TINY_WNIDS[9]}"):
        dm.setup()


def test_class_with_fewer_images(data_dir):
    images = data_dir / "tiny-imagenet-200" / "train" / TINY_WNIDS[2] / "images"
    os.remove(images / min(os.listdir(images)))
    dm = make(data_dir)
    dm.prepare_data()
    with pytest.raises(RuntimeError, match=f"should each hold 2 images .* hold fewer: {TINY_WNIDS[2]} \\(1\\)"):
        dm.setup()


def test_wnids_file_with_missing_classes(data_dir):
    wnids = data_dir / "tiny-imagenet-200" / "wnids.txt"
    wnids.write_text("".join(wnids.read_text().splitlines(keepends=True)[:150]))
    with pytest.raises(RuntimeError, match="lists 150 wnids"):
        make(data_dir).setup()


def test_sorted_val_image_deleted_later(data_dir):
    dm = make(data_dir)
    dm.prepare_data()
    val = data_dir / "tiny-imagenet-200" / "val"
    wnid = min(p.name for p in val.iterdir() if p.is_dir())
    os.remove(next((val / wnid / "images").iterdir()))
    with pytest.raises(RuntimeError, match="validation"):
        dm.setup()


# ---------------------------------------------------------------------- end to end
@pytest.mark.parametrize(
    "backbone",
    [
        lambda: Conv4(num_classes=200, input_size=64, width=4, hidden=8),
        lambda: VGG19(num_classes=200, width_multiplier=0.0625),
        lambda: ResNet18(num_classes=200, width=4),
    ],
    ids=["conv4", "vgg19", "resnet18"],
)
def test_a_short_pruned_fit_on_the_datamodule_meets_the_budget(data_dir, backbone, one_thread):
    dm = make(data_dir)
    net = backbone()
    kept, total = expected_kept(net, 0.5)
    model = PrunedClassifier(net, num_classes=200)
    budget = BudgetCallback(sparsity=0.5)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[budget],
    )
    trainer.fit(model, datamodule=dm)  # runs prepare_data (sorting val/) and setup
    assert trainer.global_step == 2 and budget.finalized
    assert (budget.report.kept, budget.report.total) == (kept, total)  # exactly the budget, not just under it
    assert count_nonzero_weights(make_permanent(model.backbone, inplace=False)) == kept


def test_datasets_pickle_for_spawned_workers(data_dir):
    import pickle

    dm = make(data_dir)
    dm.prepare_data()
    dm.setup()
    for dataset in (dm.train_set, dm.val_set, dm.test_set):
        copy = pickle.loads(pickle.dumps(dataset))
        assert len(copy) == len(dataset) and copy[0][1] == dataset[0][1]
