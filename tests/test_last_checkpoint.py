"""`last.ckpt` holds the finalised network even when the monitored metric stopped improving before the end of fit."""

import os

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from plain_modules import quiet_trainer, tiny_conv4

from lightning_prune import BudgetCallback, PrunedClassifier, budget_count
from lightning_prune.data import DigitsDataModule


def _state(path) -> dict:
    return torch.load(path, weights_only=False)


def _hard_and_kept(checkpoint: dict) -> tuple[bool, int, int]:
    """Whether every mask is hard, and the non-zero weights among the masked ones, in the plain layout."""
    masks = checkpoint["lightning_prune"]["masks"]
    weights = [checkpoint["state_dict"][name] for name in masks]
    hard = all(bool(entry["hard"]) for entry in masks.values())
    return hard, sum(int((w != 0).sum()) for w in weights), sum(w.numel() for w in weights)


@pytest.mark.parametrize("save_last", [True, "link"])
def test_last_checkpoint_is_the_finalised_network_when_the_monitor_stopped_improving(tmp_path, save_last):
    torch.manual_seed(0)
    model = PrunedClassifier(tiny_conv4(input_size=8), num_classes=10)
    # accuracy goes up while training: with mode="min" only the first epoch is a top-1 checkpoint
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="min", save_top_k=1, save_last=save_last)
    trainer = quiet_trainer(
        max_epochs=3, callbacks=[BudgetCallback(sparsity=0.8, measure_cut=False), checkpoint],
        enable_checkpointing=True,
    )
    trainer.fit(model, DigitsDataModule(image_size=8, batch_size=128))
    best = _state(checkpoint.best_model_path)
    assert best["global_step"] < trainer.global_step  # the premise: the top-1 checkpoint is an early one
    last_path = tmp_path / "last.ckpt"
    assert not os.path.islink(last_path)
    last = _state(last_path)
    assert last["global_step"] == trainer.global_step
    hard, kept, total = _hard_and_kept(last)
    assert hard and kept == budget_count(total, 0.8)
    assert not _hard_and_kept(_state(checkpoint.best_model_path))[0]  # the top-k file is untouched
