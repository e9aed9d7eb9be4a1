"""Small models shared by the tests: a Lightning module that knows nothing about pruning, and tiny backbones."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn


def tiny_conv4(in_channels: int = 1, input_size: int = 8, num_classes: int = 10) -> nn.Module:
    from lightning_prune.backbones import Conv4  # here, so that the module classes above import no lightning_prune

    return Conv4(num_classes=num_classes, in_channels=in_channels, input_size=input_size, width=4, hidden=16)


class PlainClassifier(pl.LightningModule):
    """A user's own classifier, written without any knowledge of lightning_prune."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
        )
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def quiet_trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


class CrashAt(Callback):
    """Simulates a machine failure: raises once the trainer has taken ``at_step`` optimizer steps."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


class HostReads:
    """Counts reads of tensor values on the host (``bool()``, ``float()``, ``int()``, ``.item()``, ``.tolist()``,
    ``.numpy()``): each one waits for the device on a GPU."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        for name in ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy"):
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def same_optimizer_state(a: dict, b: dict) -> bool:
    """Whether two optimizer ``state_dict()``s are equal bit for bit: the param groups and every state tensor."""
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    return all(torch.equal(a["state"][k][name], b["state"][k][name]) for k in a["state"] for name in a["state"][k])
