"""LightningDataModules: scikit-learn digits (offline quickstart), CIFAR10 and TinyImageNet."""

from lightning_prune.data.cifar10 import CIFAR10DataModule
from lightning_prune.data.digits import DigitsDataModule
from lightning_prune.data.image_datamodule import ImageDataModule
from lightning_prune.data.tinyimagenet import TinyImageNetDataModule

__all__ = ["CIFAR10DataModule", "DigitsDataModule", "ImageDataModule", "TinyImageNetDataModule"]
