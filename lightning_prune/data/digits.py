"""DigitsDataModule: scikit-learn's handwritten digits (real data that ships with the package), offline."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune.data.epoch_sampler import EpochSeededSampler


class DigitsDataModule(pl.LightningDataModule):
    """The 1,797 8x8 digits of ``sklearn.datasets.load_digits``, resized to ``image_size`` and split with a seed.

    Everything is in memory, so it needs no download and no worker processes: it runs offline on any machine.

    Args:
        image_size: side of the (square) images the backbone expects; the 8x8 digits are resized bilinearly.
        channels: 1 (grey) or 3 (the grey image repeated, for RGB backbones).
        val_fraction: share of the data used for validation.
        test_fraction: share of the data used for testing.
        batch_size: batch size of every loader.
        seed: seed of the split and of the shuffling (each epoch's order depends only on the seed and the epoch,
            so a resumed run sees the same batches).

    Example:
        >>> dm = DigitsDataModule(image_size=16)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape[1:]), x.dtype, y.dtype
        ((1, 16, 16), torch.float32, torch.int64)
    """

    num_classes = 10

    def __init__(
        self,
        image_size: int = 16,
        channels: int = 1,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(f"image_size must be >= 4, got {image_size}.")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}.")
        if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
            raise ValueError("val_fraction and test_fraction must be > 0 and leave data to train on (sum < 1).")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.save_hyperparameters()
        self.image_size = image_size
        self.channels = channels
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.batch_size = batch_size
        self.seed = seed
        self.train_set = self.val_set = self.test_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        if self.image_size != 8:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = (x - 0.3) / 0.4  # about zero mean, unit spread
        x = x.repeat(1, self.channels, 1, 1)
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        n_test = int(round(self.test_fraction * len(y)))
        n_val = int(round(self.val_fraction * len(y)))
        test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])
        self.test_set = TensorDataset(x[test], y[test])

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSeededSampler(len(self.train_set), seed=self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
