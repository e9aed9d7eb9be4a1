"""PrunedClassifier: a LightningModule that trains any backbone for classification, ready for BudgetCallback."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_prune.checkpoint_format import CHECKPOINT_KEY
from lightning_prune.reparametrize import COMPILED, reparametrize_like


class PrunedClassifier(pl.LightningModule):
    """Trains a backbone with cross-entropy; :class:`~lightning_prune.BudgetCallback` prunes it while it trains (the
    callback applies its budget step once each step's gradients are final, before the optimizer step).

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc`` (top-1, torchmetrics);
    the callback logs the ``prune/...`` scalars. A checkpoint of a pruned run loads back with ``strict=True``
    through ``PrunedClassifier.load_from_checkpoint(path, backbone=...)``.

    Args:
        backbone: any ``nn.Module`` that maps a batch of inputs to ``num_classes`` logits.
        num_classes: number of classes.
        optimizer: optimizer factory (LightningCLI: ``class_path`` + ``init_args``); default Adam.
        lr_scheduler: optional LR scheduler factory, stepped every epoch.
        label_smoothing: label smoothing of the cross-entropy.

    Example:
        >>> import torch
        >>> from lightning_prune.backbones import Conv4
        >>> model = PrunedClassifier(Conv4(num_classes=10, in_channels=1, input_size=16), num_classes=10)
        >>> model(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        self.backbone = backbone
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.label_smoothing = label_smoothing
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def _shared_step(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        _update_metric(metric, logits.detach(), y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=stage != "test", sync_dist=not on_step)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train", self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).argmax(dim=1)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    def on_fit_start(self) -> None:
        from lightning_prune.budget_callback import BudgetCallback

        if not any(isinstance(cb, BudgetCallback) for cb in self.trainer.callbacks):
            rank_zero_warn("PrunedClassifier is trained without a BudgetCallback: the network stays dense.")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault(CHECKPOINT_KEY, {})["backbone"] = _class_name(self.backbone)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY, {}).get("backbone")
        current = _class_name(self.backbone)
        other_class = (
            f"The checkpoint was trained with a {saved} backbone but this PrunedClassifier has a {current}: build it "
            f"with the checkpoint's backbone (PrunedClassifier.load_from_checkpoint(path, backbone={saved}(...)) with "
            "the arguments used in training)."
            if saved is not None and saved != current
            else None
        )
        _align_compiled_keys(self, checkpoint["state_dict"])
        # a checkpoint of a pruned run holds reparametrized weights: attach the masks so that it loads strictly
        try:
            reparametrize_like(self, checkpoint["state_dict"])
        except ValueError as error:
            if other_class is None:
                raise
            raise ValueError(f"{other_class} {error}") from error
        if other_class is not None:  # it may still fit (a renamed class, strict=False): say it, do not refuse
            rank_zero_warn(other_class)


@torch.compiler.disable
def _update_metric(metric: MulticlassAccuracy, logits: Tensor, target: Tensor) -> None:
    # outside torch.compile: torchmetrics counts its updates in an integer attribute, on which a compiled
    # training_step would guard and so recompile at every step
    metric(logits, target)




def _class_name(module: nn.Module) -> str:
    return type(getattr(module, COMPILED, module)).__qualname__


def _align_compiled_keys(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Rename, in place, the keys of a checkpoint saved with (or without) a ``torch.compile``'d submodule so that they
    match ``model``: the compiled wrapper adds ``_orig_mod.`` to the keys of the module it wraps."""
    wrappers = {name for name, module in model.named_modules() if isinstance(getattr(module, COMPILED, None), nn.Module)}

    def own(key: str) -> str:
        path: list[str] = []
        for part in key.split("."):
            if part == COMPILED:
                continue
            if ".".join(path) in wrappers:
                path.append(COMPILED)
            path.append(part)
        return ".".join(path)

    items = [(own(key), value) for key, value in state_dict.items()]
    if [key for key, _ in items] != list(state_dict):
        state_dict.clear()
        state_dict.update(items)
