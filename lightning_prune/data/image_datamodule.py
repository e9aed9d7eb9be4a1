"""ImageDataModule: what the on-disk image DataModules (CIFAR10, Tiny ImageNet) share.

The arguments and their checks, the seeded train / validation split, the transforms (random crop with padding and
horizontal flip, then normalisation) and the train / val / test / predict loaders. A subclass only says how to check
and read its files, in :meth:`ImageDataModule.read_splits`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms

from lightning_prune.data.epoch_sampler import EpochSeededSampler


class ImageDataModule(pl.LightningDataModule):
    """Base of the image DataModules: arguments, seeded split, transforms and loaders.

    A subclass sets ``num_classes`` and ``image_shape`` (``(C, H, W)``; the random crop is ``H x W``), keeps an explicit
    ``__init__`` signature with its own defaults (LightningCLI reads it) that passes every argument on to this one,
    and implements :meth:`read_splits` (and usually ``prepare_data``). ``setup`` then builds:

    * train: the training images minus ``val_size`` held out with ``seed``, augmented when ``augment``;
    * val: the held-out images, without augmentation; with ``val_size=0`` the test set validates;
    * test (and predict): the test images.

    Nothing touches the disk before ``prepare_data`` / ``setup``. The arguments are those of the subclasses (see
    :class:`~lightning_prune.data.CIFAR10DataModule`).
    """

    num_classes: int = 0
    image_shape: tuple[int, int, int] = (3, 0, 0)

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 4,
        val_size: int = 5000,
        seed: int = 0,
        augment: bool = True,
        crop_padding: int = 4,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        download: bool = True,
        verify_checksums: bool = True,
    ) -> None:
        super().__init__()
        check_loader_args(batch_size, num_workers, val_size, crop_padding, mean, std)
        self.save_hyperparameters()
        self.data_dir = os.fspath(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.seed = seed
        self.augment = augment
        self.crop_padding = crop_padding
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.download = download
        self.verify_checksums = verify_checksums
        self.classes: list[str] = []
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # ------------------------------------------------------------------ for subclasses
    def read_splits(self) -> tuple[Dataset, Dataset, list[str]]:
        """Check the files and return ``(train, test, class names)``.

        Both datasets yield ``(PIL image, label)`` and have a ``transform`` attribute (``None`` here) that
        :func:`with_transform` sets on shallow copies; the class names are indexed as the labels are.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement read_splits().")

    # ------------------------------------------------------------------ datasets
    def train_transform(self) -> Callable:
        """Augmentation (when ``augment``), conversion to a float tensor in [0, 1] and normalisation."""
        steps: list[Callable] = []
        if self.augment:
            crop = transforms.RandomCrop(tuple(self.image_shape[1:]), padding=self.crop_padding)
            steps += [crop, transforms.RandomHorizontalFlip()]
        return transforms.Compose([*steps, *self.eval_transform().transforms])

    def eval_transform(self) -> transforms.Compose:
        """Conversion to a float tensor in [0, 1] and normalisation."""
        return transforms.Compose([transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])

    def setup(self, stage: str | None = None) -> None:
        """Check the files and build the train / val / test datasets (once; later calls do nothing)."""
        if self.test_set is not None:
            return
        train, test, classes = self.read_splits()
        self.classes = list(classes)
        train_idx, val_idx = seeded_split(len(train), self.val_size, self.seed)
        self.test_set = with_transform(test, self.eval_transform())
        self.train_set = Subset(with_transform(train, self.train_transform()), train_idx)
        if self.val_size:
            self.val_set = Subset(with_transform(train, self.eval_transform()), val_idx)
        else:
            self.val_set = self.test_set

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        return make_loader(self, self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return make_loader(self, self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return make_loader(self, self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


class ArrayImageDataset(Dataset):
    """Images held as a uint8 ``(N, H, W, C)`` array, returned as ``(transform(PIL image), label)``."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], transform: Callable | None = None) -> None:
        self.images = images
        self.labels = list(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform else image), self.labels[index]


# ---------------------------------------------------------------------- helpers
def with_transform(dataset: Dataset, transform: Callable | None) -> Dataset:
    """A shallow copy of ``dataset`` (sharing its images and labels) with ``transform`` set."""
    view = copy.copy(dataset)
    view.transform = transform
    return view


def check_loader_args(
    batch_size: int, num_workers: int, val_size: int, crop_padding: int, mean: Sequence[float], std: Sequence[float]
) -> None:
    """Validate the arguments that the image DataModules share."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (0 loads in the main process), got {num_workers}.")
    if isinstance(val_size, float) or val_size < 0:
        raise ValueError(f"val_size is a number of training images held out for validation (>= 0), got {val_size}.")
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0, got {crop_padding}.")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need one value per RGB channel, got mean={list(mean)}, std={list(std)}.")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be > 0, got {list(std)}.")


def seeded_split(n: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``(train, val)`` of ``n`` items with ``val_size`` of them drawn for validation with ``seed``.

    Example:
        >>> train, val = seeded_split(10, 3, seed=0)
        >>> len(train), len(val), sorted(train + val) == list(range(10))
        (7, 3, True)
    """
    if val_size >= n:
        raise ValueError(f"val_size={val_size} leaves no training image out of {n}: lower val_size.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[val_size:]), sorted(order[:val_size])


def resolve_pin_memory(datamodule: pl.LightningDataModule, pin_memory: bool | None) -> bool:
    """``pin_memory`` if set, else whether the attached trainer runs on a CUDA GPU (no trainer: CUDA is available)."""
    if pin_memory is not None:
        return bool(pin_memory)
    trainer = datamodule.trainer
    if trainer is not None:
        from lightning.pytorch.accelerators import CUDAAccelerator

        return isinstance(trainer.accelerator, CUDAAccelerator)
    return torch.cuda.is_available()


def make_loader(datamodule: Any, dataset: Dataset | None, shuffle: bool) -> DataLoader:
    """A DataLoader with the datamodule's ``batch_size``, ``num_workers``, pinning and persistent workers.

    With ``shuffle`` the order of each epoch depends only on ``datamodule.seed`` and the epoch
    (:class:`~lightning_prune.data.epoch_sampler.EpochSeededSampler`), so a resumed run sees the same batches.
    """
    if dataset is None:
        raise RuntimeError(f"{type(datamodule).__name__}: call setup() before asking for a dataloader.")
    workers = datamodule.num_workers
    return DataLoader(
        dataset,
        batch_size=datamodule.batch_size,
        sampler=EpochSeededSampler(len(dataset), seed=datamodule.seed) if shuffle else None,
        num_workers=workers,
        pin_memory=resolve_pin_memory(datamodule, datamodule.pin_memory),
        persistent_workers=bool(datamodule.persistent_workers and workers > 0),
    )
