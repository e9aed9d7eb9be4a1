"""Exact resume from a checkpoint written in the middle of an epoch, and strict loading of that checkpoint."""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from plain_modules import CrashAt, quiet_trainer, same_optimizer_state, tiny_conv4
from torch.utils.data import DataLoader

from lightning_prune import BudgetCallback, PrunedClassifier, budget_count, masked_parameters
from lightning_prune.data import DigitsDataModule

STEPS_PER_EPOCH = 10  # 1,258 training digits / 128


class _ResumableLoader(DataLoader):
    """A DataLoader that Lightning saves in the checkpoint (it has state_dict/load_state_dict) and that skips, on
    resume, the batches of the interrupted epoch that were already trained on.

    Lightning's fetcher does not read ahead from a loader whose length it knows, so when the checkpoint is written in
    the middle of an epoch every batch drawn so far has been trained on.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._drawn = 0
        self._skip: tuple[int, int] | None = None  # (epoch, batches to skip)

    def __iter__(self):
        epoch = self.sampler.epoch
        skip = self._skip[1] if self._skip is not None and self._skip[0] == epoch else 0
        self._skip = None
        self._drawn = skip
        for i, batch in enumerate(super().__iter__()):
            if i < skip:
                continue
            self._drawn += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "consumed": self._drawn}

    def load_state_dict(self, state_dict: dict) -> None:
        self._skip = (state_dict["epoch"], state_dict["consumed"])


class _ResumableDigits(DigitsDataModule):
    def train_dataloader(self) -> DataLoader:
        loader = super().train_dataloader()
        return _ResumableLoader(loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler)


def _fit(ckpt_dir, ckpt_path=None, crash_at=None, seed=0, stateful=True, max_epochs=3):
    torch.manual_seed(seed)  # a resumed run starts from other random weights: the checkpoint must overwrite them
    model = PrunedClassifier(tiny_conv4(input_size=8), num_classes=10)
    callback = BudgetCallback(sparsity=0.8, measure_cut=False)
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir, every_n_train_steps=5, save_top_k=-1, save_last=True, filename="{step}"
    )
    callbacks = [callback, checkpoint]
    if crash_at is not None:
        callbacks.append(CrashAt(crash_at))
    trainer = quiet_trainer(max_epochs=max_epochs, callbacks=callbacks, deterministic=True, enable_checkpointing=True)
    dm = (_ResumableDigits if stateful else DigitsDataModule)(image_size=8, batch_size=128)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return model, callback, trainer


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    ckpt_dir = tmp_path_factory.mktemp("full")
    model, callback, trainer = _fit(ckpt_dir)
    return ckpt_dir, model, callback, trainer


def test_mid_epoch_checkpoint_holds_the_run_state_exactly(full_run, tmp_path):
    full_dir = full_run[0]
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path, crash_at=17)
    part = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert part["global_step"] == 15  # batch 5 of 10 in the second epoch
    ref = torch.load(full_dir / "step=15.ckpt", weights_only=False)
    for key, value in ref["state_dict"].items():
        assert torch.equal(value, part["state_dict"][key]), key
    assert same_optimizer_state(ref["optimizer_states"][0], part["optimizer_states"][0])
    (cb_key,) = [k for k in part["callbacks"] if k.startswith("BudgetCallback")]
    assert part["callbacks"][cb_key] == ref["callbacks"][cb_key]
    assert part["callbacks"][cb_key]["controller"]["engaged"] == [True]  # the loop's state is in the checkpoint


def test_mid_epoch_resume_continues_exactly(full_run, tmp_path):
    _, full, full_cb, full_trainer = full_run
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path, crash_at=17)
    resumed, resumed_cb, trainer = _fit(tmp_path, ckpt_path=str(tmp_path / "last.ckpt"), seed=1)
    assert trainer.global_step == full_trainer.global_step == 3 * STEPS_PER_EPOCH
    assert resumed_cb.finalized and full_cb.finalized
    assert resumed_cb.state_dict() == full_cb.state_dict()  # the budget loop's integral, the report
    for a, b in zip(masked_parameters(full), masked_parameters(resumed)):
        assert torch.equal(a.mask.kept, b.mask.kept), a.name
        assert torch.equal(a.latent, b.latent), a.name
    assert same_optimizer_state(
        full_trainer.optimizers[0].state_dict(), trainer.optimizers[0].state_dict()
    )
    layers = masked_parameters(resumed)
    assert sum(int(layer.mask.kept.sum()) for layer in layers) == budget_count(
        sum(layer.numel for layer in layers), 0.8
    )


def test_mid_epoch_resume_with_a_plain_loader_replays_batches_but_keeps_the_budget(full_run, tmp_path):
    """Without a stateful loader Lightning restarts the interrupted epoch's loader from its first batch: the schedules,
    step count and optimizer state continue exactly, the budget is met, but the latents (hence masks) can differ."""
    _, full, full_cb, _ = full_run
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path, crash_at=17, stateful=False)
    with pytest.warns(UserWarning, match="resuming from a checkpoint that ended before the epoch ended"):
        resumed, resumed_cb, trainer = _fit(tmp_path, ckpt_path=str(tmp_path / "last.ckpt"), stateful=False)
    assert trainer.global_step == 3 * STEPS_PER_EPOCH
    assert (resumed_cb.temperature, resumed_cb.target_keep, resumed_cb.step) == (
        full_cb.temperature, full_cb.target_keep, full_cb.step
    )
    layers = masked_parameters(resumed)
    assert all(bool(layer.mask.hard) for layer in layers)
    assert sum(int(layer.mask.kept.sum()) for layer in layers) == budget_count(
        sum(layer.numel for layer in layers), 0.8
    )
    replayed = any(not torch.equal(a.latent, b.latent) for a, b in zip(masked_parameters(full), layers))
    assert replayed  # documents the limit: a plain loader replays the epoch's first batches


def test_mid_epoch_checkpoint_loads_strictly(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path, crash_at=7, max_epochs=1)
    path = tmp_path / "last.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["global_step"] == 5
    loaded = PrunedClassifier.load_from_checkpoint(path, backbone=tiny_conv4(input_size=8), strict=True)
    # a fresh LightningModule: Lightning's own on_load_checkpoint hook attaches the masks, then strict load
    fresh = PrunedClassifier(tiny_conv4(input_size=8), num_classes=10)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    for a, b in zip(masked_parameters(loaded), masked_parameters(fresh)):
        assert not bool(a.mask.hard)  # soft masks mid-training
        assert torch.equal(a.latent, b.latent) and torch.equal(a.mask.temperature, b.mask.temperature)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(loaded.eval()(x), fresh.eval()(x))
