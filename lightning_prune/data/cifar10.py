"""CIFAR10DataModule: CIFAR10 (32x32, 10 classes) from torchvision's download, with checked files and a seeded split."""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from lightning_prune.data.image_datamodule import (  # noqa: F401  (re-exported: they used to live here)
    ArrayImageDataset,
    ImageDataModule,
    check_loader_args,
    make_loader,
    resolve_pin_memory,
    seeded_split,
)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_META_FILE = "batches.meta"
# md5 of the files inside the official archive (the same as torchvision's list)
CIFAR10_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class CIFAR10DataModule(ImageDataModule):
    """CIFAR10: 50,000 training and 10,000 test images of 32x32 pixels in 10 classes.

    ``prepare_data`` downloads and extracts the official archive with torchvision (only when files are missing and
    ``download=True``); it sets no state. ``setup`` checks the files (all present, md5 when ``verify_checksums``, every
    pickle readable, with the same number of rows, labels in range, every class present), then builds:

    * train: the training set minus ``val_size`` images held out with ``seed``, with the standard augmentation
      (random 32x32 crop of the image padded by ``crop_padding``, horizontal flip) when ``augment``;
    * val: the held-out images, without augmentation; with ``val_size=0`` the test set validates;
    * test (and predict): the 10,000 test images.

    Inputs are normalised with ``mean`` / ``std``. Nothing touches the disk before ``prepare_data`` / ``setup``, so the
    module can be built (e.g. by LightningCLI) on a machine without the data.

    Args:
        data_dir: folder that holds (or will hold) ``cifar-10-batches-py/``.
        batch_size: batch size of every loader.
        num_workers: worker processes of every loader (0 loads in the main process).
        val_size: number of training images held out for validation (0: validate on the test set).
        seed: seed of the train / validation split and of the shuffling (each epoch's order depends only on the
            seed and the epoch, so a resumed run sees the same batches).
        augment: random crop with padding and horizontal flip on the training images.
        crop_padding: padding (pixels) of the random crop.
        mean: per-channel mean subtracted from the [0, 1] images.
        std: per-channel standard deviation the images are divided by.
        pin_memory: pin host memory in the loaders; ``None``: only when the trainer runs on a CUDA GPU (without a
            trainer: when CUDA is available).
        persistent_workers: keep the worker processes between epochs (only used when ``num_workers > 0``).
        download: download the data in ``prepare_data`` when it is missing.
        verify_checksums: check the md5 of every file against the official release in ``setup``.

    Example:
        >>> dm = CIFAR10DataModule(data_dir="data", batch_size=128, val_size=5000)
        >>> dm.num_classes, dm.image_shape
        (10, (3, 32, 32))
    """

    num_classes = 10
    image_shape = (3, 32, 32)

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 4,
        val_size: int = 5000,
        seed: int = 0,
        augment: bool = True,
        crop_padding: int = 4,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        download: bool = True,
        verify_checksums: bool = True,
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            batch_size=batch_size,
            num_workers=num_workers,
            val_size=val_size,
            seed=seed,
            augment=augment,
            crop_padding=crop_padding,
            mean=mean,
            std=std,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            download=download,
            verify_checksums=verify_checksums,
        )

    @property
    def folder(self) -> str:
        """The folder of the pickled batches, ``<data_dir>/cifar-10-batches-py``."""
        return os.path.join(self.data_dir, CIFAR10_FOLDER)

    # ------------------------------------------------------------------ data on disk
    def prepare_data(self) -> None:
        """Download and extract the official archive when files are missing and ``download=True``; sets no state."""
        if not self.download or not self._missing_files():
            return
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(
                CIFAR10_URL,
                self.data_dir,
                filename=CIFAR10_ARCHIVE,
                md5=CIFAR10_ARCHIVE_MD5 if self.verify_checksums else None,
            )
        except Exception as err:  # network errors, a corrupt archive, ...
            archive = os.path.join(self.data_dir, CIFAR10_ARCHIVE)
            raise RuntimeError(
                f"Could not download or extract CIFAR10 from {CIFAR10_URL} into {self.data_dir!r} ({err}). "
                f"If {archive} exists, delete it and re-run; or place the data by hand (see the README)."
            ) from err

    def _missing_files(self) -> list[str]:
        names = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE, CIFAR10_META_FILE)
        return [name for name in names if not os.path.isfile(os.path.join(self.folder, name))]

    def _check_files(self) -> None:
        missing = self._missing_files()
        if missing:
            if self.download:
                how = "call prepare_data() before setup() (the Trainer does) to download it"
            else:
                how = "set download=True to download it"
            raise FileNotFoundError(
                f"CIFAR10 is missing or incomplete: looked in {self.folder} and did not find {', '.join(missing)}. "
                f"To get the data, {how}, or download {CIFAR10_URL} yourself and extract it into {self.data_dir} "
                f"so that {os.path.join(self.folder, 'data_batch_1')} exists (delete a partial {CIFAR10_FOLDER}/ "
                "first)."
            )
        if not self.verify_checksums:
            return
        from torchvision.datasets.utils import calculate_md5

        for name, expected in CIFAR10_MD5.items():
            path = os.path.join(self.folder, name)
            actual = calculate_md5(path)
            if actual != expected:
                raise RuntimeError(
                    f"CIFAR10 file {path} is corrupt: its md5 is {actual}, the official release's is {expected}. "
                    f"Delete {self.folder} (and {os.path.join(self.data_dir, CIFAR10_ARCHIVE)} if present) and "
                    "re-run with download=True, or pass verify_checksums=False for data you made yourself."
                )

    def _read_batch(self, name: str) -> tuple[np.ndarray, list[int]]:
        path = os.path.join(self.folder, name)
        entry = _load_pickle(path)
        data, labels = entry.get("data"), entry.get("labels")
        if not isinstance(data, np.ndarray) or labels is None:
            raise RuntimeError(f"CIFAR10 file {path} has no 'data' array or no 'labels': it is not a CIFAR10 batch.")
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise RuntimeError(
                f"CIFAR10 file {path} holds a {data.dtype} array of shape {data.shape}; expected uint8 (N, 3072)."
            )
        labels = [int(label) for label in labels]
        if len(labels) != len(data):
            raise RuntimeError(f"CIFAR10 file {path} holds {len(data)} images but {len(labels)} labels.")
        if labels and not 0 <= min(labels) <= max(labels) < self.num_classes:
            raise RuntimeError(f"CIFAR10 file {path} has labels outside [0, {self.num_classes}).")
        return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels  # N, H, W, C for PIL

    def _read_all(self) -> tuple[np.ndarray, list[int], np.ndarray, list[int], list[str]]:
        self._check_files()
        batches = {name: self._read_batch(name) for name in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)}
        rows = {name: len(batch[1]) for name, batch in batches.items()}
        if len(set(rows.values())) != 1 or 0 in rows.values():
            raise RuntimeError(
                f"CIFAR10 batches in {self.folder} hold different numbers of images ({rows}); every batch, the test "
                "batch included, must hold as many (10,000 in the official release). The data is partial or "
                "corrupt: delete the folder and re-run with download=True."
            )
        train_x = np.concatenate([batches[name][0] for name in CIFAR10_TRAIN_FILES])
        train_y = [label for name in CIFAR10_TRAIN_FILES for label in batches[name][1]]
        absent = sorted(set(range(self.num_classes)) - set(train_y))
        if absent:
            raise RuntimeError(f"CIFAR10 training batches in {self.folder} have no image of class(es) {absent}.")
        meta = _load_pickle(os.path.join(self.folder, CIFAR10_META_FILE))
        names = meta.get("label_names")
        if names is None or len(names) != self.num_classes:
            raise RuntimeError(
                f"CIFAR10 file {os.path.join(self.folder, CIFAR10_META_FILE)} should list {self.num_classes} "
                "label_names."
            )
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        test_x, test_y = batches[CIFAR10_TEST_FILE]
        return train_x, train_y, test_x, test_y, classes

    # ------------------------------------------------------------------ datasets
    def read_splits(self) -> tuple[Dataset, Dataset, list[str]]:
        """Check the files and return the training and test images (without transform) and the class names."""
        train_x, train_y, test_x, test_y, classes = self._read_all()
        return ArrayImageDataset(train_x, train_y), ArrayImageDataset(test_x, test_y), classes


def _load_pickle(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as err:  # a truncated pickle raises UnpicklingError, EOFError, ValueError, ... depending on where
        raise RuntimeError(
            f"CIFAR10 file {path} is truncated or corrupt and cannot be read ({type(err).__name__}: {err}). Delete "
            f"{os.path.dirname(path)} and re-run with download=True."
        ) from err
    if not isinstance(entry, dict):
        return {}  # not a CIFAR10 file: the caller reports the missing keys
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
