"""What happens at the cut and around it: BatchNorm re-estimation, runs that end early, runs that are interrupted."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping
from plain_modules import CrashAt, PlainClassifier, quiet_trainer
from torch import nn

from lightning_prune import BudgetCallback, LoopSettings, budget_count, masked_parameters
from lightning_prune.data import DigitsDataModule
from lightning_prune.module_passes import recalibrate_batchnorm


class _BNClassifier(PlainClassifier):
    def __init__(self) -> None:
        super().__init__(lr=3e-3)
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)  # logs inside the recalibration pass must not reach the trainer
        return loss


def _kept(model):
    params = masked_parameters(model)
    return sum(int(p.mask.kept.sum()) for p in params), sum(p.numel for p in params)


def test_batchnorm_recalibration_changes_running_statistics_only():
    torch.manual_seed(0)
    model = _BNClassifier()
    trainer = quiet_trainer(max_epochs=1, callbacks=[BudgetCallback(sparsity=0.5, loop=LoopSettings(finalize_on_fit_end=False))])
    trainer.fit(model, DigitsDataModule(image_size=16, batch_size=64))
    bn = model.net[1]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    bn.running_mean.fill_(5.0)  # stale statistics, as after a cut
    used = recalibrate_batchnorm(trainer, model, num_batches=3)
    assert used == 3
    assert not torch.equal(bn.running_mean, torch.full_like(bn.running_mean, 5.0))
    torch.testing.assert_close(bn.running_mean, stats[0], atol=0.5, rtol=0.5)  # re-estimated from the data
    assert bn.momentum == 0.1  # the layer's own momentum is back
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())  # no weight moved
    assert model.training is True


def test_the_report_holds_the_modules_metric_before_after_the_cut_and_after_recalibration():
    torch.manual_seed(0)
    model = _BNClassifier()
    callback = BudgetCallback(sparsity=0.8)
    quiet_trainer(max_epochs=4, callbacks=[callback]).fit(model, DigitsDataModule(image_size=16, batch_size=64))
    report = callback.report
    assert set(report.val_before_cut) == set(report.val_after_cut) == set(report.val_after_recalibration)
    assert "val_acc" in report.val_after_recalibration and "train_loss" not in report.val_after_recalibration
    assert report.kept == budget_count(report.total, 0.8) == _kept(model)[0]


def test_without_batchnorm_or_when_turned_off_nothing_is_recalibrated():
    torch.manual_seed(0)
    callback = BudgetCallback(sparsity=0.8, recalibrate_batchnorm=False)
    quiet_trainer(max_epochs=2, callbacks=[callback]).fit(_BNClassifier(), DigitsDataModule(image_size=16))
    assert callback.report.val_after_recalibration == {}


def test_early_stopping_ends_the_fit_at_the_budget_with_a_warning():
    torch.manual_seed(0)
    model = PlainClassifier()
    callback = BudgetCallback(sparsity=0.9)
    stop = EarlyStopping(monitor="val_acc", mode="max", patience=0, stopping_threshold=0.0)  # stops at the 1st check
    with pytest.warns(UserWarning, match=r"Fit ended at step 20 of the 200 planned.*EarlyStopping"):
        quiet_trainer(max_epochs=10, callbacks=[callback, stop]).fit(model, DigitsDataModule(image_size=16))
    kept, total = _kept(model)
    assert kept == budget_count(total, 0.9) and all(bool(p.mask.hard) for p in masked_parameters(model))
    assert callback.report.step == 20 and callback.report.kept_hard_before > 0.2


def test_max_time_with_total_steps_reaches_the_budget_before_the_cut():
    torch.manual_seed(0)
    model = PlainClassifier()
    callback = BudgetCallback(sparsity=0.9, total_steps=120)
    trainer = quiet_trainer(max_epochs=-1, max_time={"hours": 1}, max_steps=120, callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, DigitsDataModule(image_size=16, batch_size=64))
    assert not [w for w in caught if "BudgetCallback" in str(w.message)]
    assert abs(callback.report.kept_hard_before / 0.1 - 1) < 0.1
    assert callback.report.step == 120


def test_an_interrupted_fit_is_not_finalised_and_resumes_to_the_budget(tmp_path):
    torch.manual_seed(0)
    model = PlainClassifier()
    callback = BudgetCallback(sparsity=0.9)
    trainer = quiet_trainer(max_epochs=6, callbacks=[callback, CrashAt(50)], enable_checkpointing=True,
                            default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(model, DigitsDataModule(image_size=16, batch_size=64))
    assert not callback.finalized and not any(bool(p.mask.hard) for p in masked_parameters(model))
    assert not callback.report.cut_done and callback.report.kept == 0  # no cut happened
    (ckpt,) = tmp_path.rglob("*.ckpt")
    resumed, callback = PlainClassifier(), BudgetCallback(sparsity=0.9)
    quiet_trainer(max_epochs=6, callbacks=[callback]).fit(resumed, DigitsDataModule(image_size=16, batch_size=64),
                                                          ckpt_path=str(ckpt))
    kept, total = _kept(resumed)
    assert kept == budget_count(total, 0.9) and callback.finalized


def test_the_passes_at_the_cut_leave_the_epochs_metrics_as_they_were():
    """PrunedClassifier accumulates train/val accuracy objects over an epoch; the passes at the cut (validation
    metrics, BatchNorm re-estimation) run on reset copies and give every metric its state back."""
    from lightning_prune import PrunedClassifier
    from lightning_prune.module_passes import validation_metrics

    torch.manual_seed(0)
    model = PrunedClassifier(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 14 * 14, 10)),
                             num_classes=10)
    trainer = quiet_trainer(max_epochs=1, callbacks=[BudgetCallback(sparsity=0.5, loop=LoopSettings(finalize_on_fit_end=False))])
    trainer.fit(model, DigitsDataModule(image_size=16, batch_size=64))
    metrics = [m for m in model.modules() if hasattr(m, "compute") and hasattr(m, "update")]
    batch = next(iter(trainer.train_dataloader))
    for metric in metrics:
        metric.update(model(batch[0]), batch[1])
    before = [float(m.compute()) for m in metrics]
    values = validation_metrics(trainer, model)
    recalibrate_batchnorm(trainer, model, num_batches=2)
    assert "val/acc" in values
    assert [float(m.compute()) for m in metrics] == before


def test_batchnorm_statistics_are_re_estimated_before_each_validation_while_pruning(monkeypatch):
    """Per-epoch validation under BatchNorm describes the network it runs: while the masks move, the running
    statistics are re-estimated before each end-of-epoch validation (not in the sanity check, not after the cut)."""
    import lightning_prune.budget_callback as budget_callback

    calls = []

    def spy(trainer, pl_module, num_batches):
        calls.append((trainer.current_epoch, trainer.sanity_checking, callback.finalized))
        return recalibrate_batchnorm(trainer, pl_module, num_batches)

    monkeypatch.setattr(budget_callback, "recalibrate_batchnorm", spy)
    torch.manual_seed(0)
    model = _BNClassifier()
    callback = BudgetCallback(sparsity=0.8, total_steps=20)
    trainer = quiet_trainer(max_epochs=4, limit_train_batches=10, num_sanity_val_steps=1, callbacks=[callback])
    trainer.fit(model, DigitsDataModule(image_size=16, batch_size=64))
    # epoch 0 validates while pruning; the cut at step 20 (end of epoch 1) re-estimates before it (the "before"
    # figures) and after it; epoch 1's validation and later ones come after the cut
    assert calls == [(0, False, False), (1, False, False), (1, False, True)]
