import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from plain_modules import CrashAt, quiet_trainer, same_optimizer_state, tiny_conv4

from lightning_prune import BudgetCallback, PrunedClassifier, budget_count, masked_parameters
from lightning_prune.data import DigitsDataModule


def _fit(tmp_path, ckpt_path=None, crash_at=None, seed=0):
    torch.manual_seed(seed)  # a resumed run starts from other random weights: the checkpoint must overwrite them
    model = PrunedClassifier(tiny_conv4(input_size=8), num_classes=10)
    callback = BudgetCallback(sparsity=0.8)
    callbacks = [callback, ModelCheckpoint(dirpath=tmp_path, save_last=True)]
    if crash_at is not None:
        callbacks.append(CrashAt(crash_at))
    trainer = quiet_trainer(max_epochs=4, callbacks=callbacks, deterministic=True, enable_checkpointing=True)
    trainer.fit(model, DigitsDataModule(image_size=8, batch_size=128), ckpt_path=ckpt_path)
    return model, callback, trainer


def test_resume_between_epochs_continues_exactly(tmp_path):
    """Resumed at the end of epoch 2 with other random weights, the run ends bit for bit as the uninterrupted one:
    latents, masks, the optimizer's moments and the callback's state (the loop's integral, the report)."""
    full, full_cb, full_trainer = _fit(tmp_path / "full")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path / "part", crash_at=23)  # 10 steps per epoch: last.ckpt is the end of epoch 2
    part = torch.load(tmp_path / "part" / "last.ckpt", weights_only=False)
    assert part["global_step"] == 20
    resumed, resumed_cb, trainer = _fit(tmp_path / "part", ckpt_path=str(tmp_path / "part" / "last.ckpt"), seed=1)
    assert trainer.global_step == full_trainer.global_step == 40
    assert resumed_cb.finalized and full_cb.finalized
    assert (resumed_cb.temperature, resumed_cb.target_keep) == (full_cb.temperature, full_cb.target_keep)
    # the budget loop's integral came back from the checkpoint (it cannot be recomputed from the step)
    assert resumed_cb.state_dict() == full_cb.state_dict()
    for a, b in zip(masked_parameters(full), masked_parameters(resumed)):
        assert torch.equal(a.mask.kept, b.mask.kept), a.name
        assert torch.equal(a.latent, b.latent), a.name
    assert same_optimizer_state(full_trainer.optimizers[0].state_dict(), trainer.optimizers[0].state_dict())


def test_final_checkpoint_is_hard_pruned_and_loads_strictly(tmp_path):
    model, callback, _ = _fit(tmp_path)
    loaded = PrunedClassifier.load_from_checkpoint(
        tmp_path / "last.ckpt", backbone=tiny_conv4(input_size=8), strict=True
    )
    layers = masked_parameters(loaded)
    assert all(bool(layer.mask.hard) for layer in layers)
    total = sum(layer.numel for layer in layers)
    assert sum(int(layer.mask.kept.sum()) for layer in layers) == budget_count(total, 0.8)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
