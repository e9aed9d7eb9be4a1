"""CIFAR10DataModule on real CIFAR-10 images, built by shared/tools/cifar10-from-jpeg from shared/data/.

The archive holds the 60,000 real CIFAR-10 images as JPEGs; the tool writes a subset of them in the official python
layout (``cifar-10-batches-py/``). Both are looked for next to the repository (``<repo>/../shared/``); without them
every test here is skipped. The CI test reads a 60-image subset (a few seconds); the slow one trains Conv4 on a few
thousand images and checks that it learned while pruned to its exact budget (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import io
import runpy
import subprocess
import sys
import tarfile
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from lightning_prune import BudgetCallback, PrunedClassifier, make_permanent
from lightning_prune.backbones import Conv4
from lightning_prune.data import CIFAR10DataModule

try:
    from dataset_fixtures import CIFAR10_LABEL_NAMES, count_nonzero_weights, expected_kept
except ImportError:  # tests/ imported as a package
    from tests.dataset_fixtures import CIFAR10_LABEL_NAMES, count_nonzero_weights, expected_kept

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ARCHIVE = SHARED / "data" / "cifar10-jpeg.tar.gz"
TOOL = SHARED / "tools" / "cifar10-from-jpeg"

pytestmark = [
    pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"real CIFAR-10 JPEG archive not found at {ARCHIVE}"),
    pytest.mark.skipif(not TOOL.is_file(), reason=f"the tool cifar10-from-jpeg not found at {TOOL}"),
]

# The smallest subset in the official layout: 5 training images a class make five batches of 10, as many as the
# test batch with 1 a class (the module requires every batch, the test batch included, to hold as many images).
TRAIN_PER_CLASS, TEST_PER_CLASS = 5, 1


def build_subset(root: Path, train_per_class: int, test_per_class: int) -> Path:
    """Run the tool as a user does; returns ``root``, which then holds ``cifar-10-batches-py/``."""
    command = [sys.executable, str(TOOL), str(root), "--train-per-class", str(train_per_class),
               "--test-per-class", str(test_per_class)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return root


def tool_classes() -> list[str]:
    """The class order the tool labels with (its CLASSES list), read from the tool itself."""
    return list(runpy.run_path(str(TOOL), run_name="cifar10_from_jpeg")["CLASSES"])


def jpeg_pixels(per_class: dict[str, int], classes: list[str]) -> dict[str, dict[bytes, int]]:
    """``{split: {decoded RGB pixels: label}}`` of the first ``per_class[split]`` JPEGs (sorted by name) of each class
    in the archive, the images the tool takes for a subset."""
    chosen: dict[str, tuple[str, int]] = {}  # member name: (split, label)
    found: dict[str, dict[bytes, int]] = {split: {} for split in per_class}
    with tarfile.open(ARCHIVE, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        for split, n in per_class.items():
            for label, name in enumerate(classes):
                files = sorted(m for m in members if m.startswith(f"{split}/{name}/") and m.endswith(".jpg"))
                chosen.update({file: (split, label) for file in files[:n]})
        for file in sorted(chosen, key=lambda f: members[f].offset_data):  # forward through the gzip stream only
            split, label = chosen[file]
            with Image.open(io.BytesIO(tar.extractfile(members[file]).read())) as image:
                found[split][np.asarray(image.convert("RGB"), dtype=np.uint8).tobytes()] = label
    return found


@pytest.fixture(scope="module")
def real_subset(tmp_path_factory) -> Path:
    return build_subset(tmp_path_factory.mktemp("cifar10_real"), TRAIN_PER_CLASS, TEST_PER_CLASS)


def raw_module(data_dir: Path, **kwargs) -> CIFAR10DataModule:
    """Images as ToTensor gives them (no normalisation, no augmentation), as the documentation loads the data."""
    options = {"data_dir": str(data_dir), "download": False, "verify_checksums": False, "batch_size": 10,
               "num_workers": 0, "val_size": 10, "augment": False, "mean": (0, 0, 0), "std": (1, 1, 1)}
    options.update(kwargs)
    return CIFAR10DataModule(**options)


def all_images(dataset) -> tuple[torch.Tensor, list[int]]:
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), [int(y) for y in labels]


def test_real_subset_loads(real_subset):
    dm = raw_module(real_subset)
    dm.prepare_data()  # download=False: touches nothing
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (40, 10, 10)
    assert dm.classes == tool_classes() == CIFAR10_LABEL_NAMES  # the official order, which the labels index

    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64

    train_y, val_y, test_y = (all_images(d)[1] for d in (dm.train_set, dm.val_set, dm.test_set))
    assert np.bincount(train_y + val_y, minlength=10).tolist() == [TRAIN_PER_CLASS] * 10
    assert np.bincount(test_y, minlength=10).tolist() == [TEST_PER_CLASS] * 10


def test_real_labels_match_the_images(real_subset):
    """Every image carries the label of the class folder the tool took it from (decoded again from the archive)."""
    dm = raw_module(real_subset)
    dm.setup()
    classes = tool_classes()
    pixels_of = jpeg_pixels({"train": TRAIN_PER_CLASS, "test": TEST_PER_CLASS}, classes)
    for split, per_class, datasets in (("train", TRAIN_PER_CLASS, (dm.train_set, dm.val_set)),
                                       ("test", TEST_PER_CLASS, (dm.test_set,))):
        expected = pixels_of[split]
        seen = 0
        for dataset in datasets:
            images, labels = all_images(dataset)
            for image, label in zip(images, labels):
                pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy().tobytes()
                assert expected.get(pixels) == label, f"a {split} image labelled {classes[label]} is not from there"
                seen += 1
        assert seen == len(expected) == 10 * per_class


def test_real_pixels_look_like_natural_images(real_subset):
    """Real photos: spread-out values per channel and strongly correlated neighbours (uniform noise has none)."""
    dm = raw_module(real_subset, val_size=0)
    dm.setup()
    x = torch.cat([all_images(dm.train_set)[0], all_images(dm.test_set)[0]])  # (60, 3, 32, 32) in [0, 1]
    assert x.shape == (60, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    per_channel = x.transpose(0, 1).reshape(3, -1)
    assert (per_channel.std(dim=1) > 0.1).all(), per_channel.std(dim=1)
    assert ((per_channel.mean(dim=1) > 0.25) & (per_channel.mean(dim=1) < 0.75)).all(), per_channel.mean(dim=1)
    left, right = x[..., :-1].flatten(), x[..., 1:].flatten()
    neighbours = torch.corrcoef(torch.stack([left, right]))[0, 1]
    assert neighbours > 0.7, f"horizontal neighbours correlate at {neighbours:.3f}; uniform noise gives about 0"
    assert len({img.tobytes() for img in (x * 255).round().to(torch.uint8).numpy()}) == 60  # no duplicates


@pytest.mark.slow
def test_conv4_learns_real_cifar10_while_pruned_to_budget(tmp_path):
    """Conv4 (the paper's width) on 4,000 real training images, 4 epochs, pruned to 90% sparsity: it learns (test
    accuracy of the pruned network well above the 10% of chance) and keeps exactly the budgeted weights."""
    pl.seed_everything(0)
    data_dir = build_subset(tmp_path / "data", train_per_class=400, test_per_class=80)
    dm = CIFAR10DataModule(data_dir=str(data_dir), download=False, verify_checksums=False, batch_size=64,
                           num_workers=0, val_size=400)
    net = Conv4(num_classes=10, input_size=32)
    kept, total = expected_kept(net, 0.9)
    model = PrunedClassifier(net, num_classes=10)  # Adam, lr 1e-3
    budget = BudgetCallback(sparsity=0.9)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[budget], default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert budget.finalized
    assert (budget.report.kept, budget.report.total) == (kept, total)
    assert count_nonzero_weights(make_permanent(model.backbone, inplace=False)) == kept
    accuracy = trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
    assert len(dm.test_set) == 800
    assert accuracy > 0.2, f"test accuracy {accuracy:.3f} after pruning to 10% of the weights; chance is 0.1"
