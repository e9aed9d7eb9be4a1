import math

import lightning.pytorch as pl
import pytest
import torch
from plain_modules import PlainClassifier, quiet_trainer, tiny_conv4

from lightning_prune import (
    BudgetCallback,
    NonFiniteError,
    PrunedClassifier,
    budget_count,
    budget_penalty,
    flush_budget_gradient,
    pruned_layers,
)
from lightning_prune.backbones import Conv4
from lightning_prune.data import DigitsDataModule
from lightning_prune.finalization import layer_floor


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=1.0), r"\[0, 1\)"),
        (dict(sparsity=-0.5), r"\[0, 1\)"),
        (dict(lambda_max=-1.0), "lambda_max"),
        (dict(temperature_start=0.1, temperature_end=0.5), "temperature_end"),
        (dict(temperature_start=0.0), "temperature_start"),
        (dict(lambda_warmup=1.5), "lambda_warmup"),
        (dict(target_start=0.8, target_end=0.5), "target_start"),
        (dict(lambda_schedule="step"), "lambda_schedule"),
        (dict(temperature_schedule="log"), "temperature_schedule"),
        (dict(target_schedule="exp"), "target_schedule"),
        (dict(mode="per_layer"), "mode"),
        (dict(min_layer_keep=2.0), "min_layer_keep"),
        (dict(include="features.*"), "list of patterns"),
        (dict(total_steps=0), "total_steps"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BudgetCallback(**kwargs)


def test_plain_module_reaches_exact_budget_and_keeps_learning():
    """A LightningModule that knows nothing about pruning, trained with only the callback added."""
    torch.manual_seed(0)
    model = PlainClassifier()
    dm = DigitsDataModule(image_size=16, batch_size=64)
    callback = BudgetCallback(sparsity=0.9)
    trainer = quiet_trainer(max_epochs=10, callbacks=[callback])
    trainer.fit(model, dm)
    layers = pruned_layers(model)
    assert [layer.name for layer in layers] == ["net.0", "net.3", "net.7", "net.9"]
    total = sum(layer.numel for layer in layers)
    assert sum(int(layer.mask.mask.sum()) for layer in layers) == round(0.1 * total)
    assert all(bool(layer.mask.hard) for layer in layers)
    # the optimizer was built after reparametrization: it holds the latent tensors
    opt_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(layer.latent) in opt_params for layer in layers)
    assert callback.report["kept_hard_before"] < 0.105  # the budget loss brought the kept share to the target
    assert callback.report["acc_hard"] > 0.9  # it learned, and the hard cut did not break it


def test_schedules_reach_their_ends_and_training_stays_finite():
    torch.manual_seed(0)
    model = PrunedClassifier(tiny_conv4(input_size=8), num_classes=10)
    callback = BudgetCallback(sparsity=0.8, temperature_start=0.5, temperature_end=1e-3, lambda_max=3.0)
    trainer = quiet_trainer(max_epochs=3, callbacks=[callback])
    trainer.fit(model, DigitsDataModule(image_size=8, batch_size=128))
    assert callback.temperature == pytest.approx(1e-3)
    assert callback.target_keep == pytest.approx(0.2)
    assert callback.lam == pytest.approx(3.0)
    for layer in pruned_layers(model):
        assert torch.isfinite(layer.latent).all()
        assert layer.mask.temperature.item() == pytest.approx(1e-3)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_no_layer_is_emptied_with_the_default_floor():
    torch.manual_seed(0)
    model = PrunedClassifier(tiny_conv4(input_size=8), num_classes=10)
    callback = BudgetCallback(sparsity=0.97, min_layer_keep=0.02)
    quiet_trainer(max_epochs=2, callbacks=[callback]).fit(model, DigitsDataModule(image_size=8, batch_size=128))
    for layer in pruned_layers(model):
        assert int(layer.mask.mask.sum()) >= math.ceil(0.02 * layer.numel), layer.name


def test_floors_above_budget_fail_before_training():
    model = PrunedClassifier(tiny_conv4(input_size=8), num_classes=10)
    trainer = quiet_trainer(max_epochs=1, callbacks=[BudgetCallback(sparsity=0.99, min_layer_keep=0.5)])
    with pytest.raises(ValueError, match="min_layer_keep"):
        trainer.fit(model, DigitsDataModule(image_size=8))
    assert trainer.global_step == 0


def test_pattern_matching_nothing_fails_before_training():
    trainer = quiet_trainer(max_epochs=1, callbacks=[BudgetCallback(include=["encoder.*"])])
    with pytest.raises(ValueError, match="matches no prunable layer"):
        trainer.fit(PlainClassifier(), DigitsDataModule(image_size=16))
    assert trainer.global_step == 0


class _NaNAfter(PlainClassifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= 3 else loss


def test_non_finite_loss_stops_before_the_step_with_a_clear_error():
    model = _NaNAfter()
    trainer = quiet_trainer(max_epochs=1, callbacks=[BudgetCallback(sparsity=0.5)])
    with pytest.raises(NonFiniteError, match="step 3"):
        trainer.fit(model, DigitsDataModule(image_size=16))
    for layer in pruned_layers(model):
        assert torch.isfinite(layer.latent).all()


def test_state_dict_round_trip_continues_schedules_exactly():
    a = BudgetCallback(sparsity=0.9)
    a._total = 100
    a._apply_schedules(37)
    b = BudgetCallback(sparsity=0.9)
    b.load_state_dict(a.state_dict())
    assert b._total == 100
    for step in (37, 38, 99, 100):
        a._apply_schedules(step)
        b._apply_schedules(step)
        assert (a.lam, a.temperature, a.target_keep) == (b.lam, b.temperature, b.target_keep)



def _conv4_classifier() -> PrunedClassifier:
    return PrunedClassifier(Conv4(num_classes=10, in_channels=1, input_size=16), num_classes=10)


@pytest.mark.parametrize("sparsity", [0.9, 0.98, 0.99, 0.995])
def test_default_layer_floor_fits_any_budget(sparsity):
    """1% of each layer, rounded up per layer, exceeds a 1% budget: the default floor is capped at half the keep share."""
    model = _conv4_classifier()
    callback = BudgetCallback(sparsity=sparsity)
    assert callback.min_layer_keep == min(0.01, (1 - sparsity) / 2)
    callback.setup(quiet_trainer(max_epochs=1), model, "fit")  # raises when the floors exceed the budget
    sizes = [layer.numel for layer in pruned_layers(model)]
    assert sum(layer_floor(n, callback.min_layer_keep) for n in sizes) <= budget_count(sum(sizes), sparsity)


def test_an_explicit_floor_is_used_as_given():
    callback = BudgetCallback(sparsity=0.99, min_layer_keep=0.01)
    assert callback.min_layer_keep == 0.01
    with pytest.raises(ValueError, match="lower min_layer_keep"):  # Conv4's 1% floors, rounded up, exceed 1%
        callback.setup(quiet_trainer(max_epochs=1), _conv4_classifier(), "fit")


class _BudgetGradientProbe(pl.Callback):
    """Records θ.grad before and after BudgetCallback's hook and the gradient autograd gives for λ·budget_loss."""

    def __init__(self, budget: BudgetCallback) -> None:
        self.budget, self.before, self.checked = budget, None, 0

    def snapshot(self, pl_module) -> None:
        self.before = [layer.latent.grad.clone() for layer in pruned_layers(pl_module)]

    def check(self, pl_module) -> None:
        layers = pruned_layers(pl_module)
        added = [layer.latent.grad - before for layer, before in zip(layers, self.before)]
        for got, expected in zip(added, _budget_gradient_reference(self.budget, layers)):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
        self.checked += 1


def _budget_gradient_reference(budget: BudgetCallback, layers) -> tuple[torch.Tensor, ...]:
    """∂(λ·budget_loss)/∂θ with the gates recomputed from θ (no count cache) and differentiated by autograd."""
    thetas = [layer.latent.detach().clone().requires_grad_(True) for layer in layers]
    kept = sum(layer.mask.soft_gate(t, budget.budget_grad_temperature).sum() for layer, t in zip(layers, thetas))
    loss = budget.lam * budget_penalty(kept / sum(layer.numel for layer in layers), budget.target_keep)
    return torch.autograd.grad(loss, thetas)


class _Before(pl.Callback):
    def __init__(self, probe: _BudgetGradientProbe) -> None:
        self.probe = probe

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.probe.snapshot(pl_module)


class _After(pl.Callback):
    def __init__(self, probe: _BudgetGradientProbe) -> None:
        self.probe = probe

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.probe.check(pl_module)


def test_budget_gradient_in_the_loop_matches_autograd_with_gradient_accumulation():
    """Two micro-batches per optimizer step: the callback adds λ·∂L_budget/∂θ once, from the forward's kept counts."""
    torch.manual_seed(0)
    model = PlainClassifier()
    budget = BudgetCallback(sparsity=0.8, lambda_warmup=0.0)
    probe = _BudgetGradientProbe(budget)
    trainer = quiet_trainer(
        max_steps=4, accumulate_grad_batches=2, limit_val_batches=0, callbacks=[_Before(probe), budget, _After(probe)]
    )
    trainer.fit(model, DigitsDataModule(image_size=16, batch_size=32))
    assert probe.checked == 4


class _StepGradientProbe(pl.Callback):
    """After BudgetCallback: θ.grad must be the task loss's gradient (recomputed on the same batch) plus λ·∂L_budget/∂θ."""

    def __init__(self, budget: BudgetCallback) -> None:
        self.budget, self.batch, self.checked = budget, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch = batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        layers = pruned_layers(pl_module)
        x, y = self.batch
        task = torch.autograd.grad(
            torch.nn.functional.cross_entropy(pl_module(x), y), [layer.latent for layer in layers], allow_unused=True
        )
        for layer, task_grad, budget_grad in zip(layers, task, _budget_gradient_reference(self.budget, layers)):
            expected = budget_grad if task_grad is None else task_grad + budget_grad
            torch.testing.assert_close(layer.latent.grad, expected, rtol=1e-4, atol=1e-6)
        self.checked += 1


class _UnusedLayerClassifier(PlainClassifier):
    """A Linear that the forward pass never calls: no backward pass reaches its weight."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Linear(8, 8)


@pytest.mark.parametrize("module_cls, flushed", [(PlainClassifier, 0), (_UnusedLayerClassifier, 1)])
def test_the_backward_pass_adds_the_budget_gradient_and_the_rest_is_flushed(monkeypatch, module_cls, flushed):
    """Without gradient accumulation the backward pass itself adds λ·∂L_budget/∂θ; a layer it does not reach gets it
    before the optimizer step. Either way θ.grad is the task's gradient plus the budget's, once."""
    import lightning_prune.budget_callback as budget_callback_module

    counts = []

    def counting_flush(layers):
        counts.append(flush_budget_gradient(layers))
        return counts[-1]

    monkeypatch.setattr(budget_callback_module, "flush_budget_gradient", counting_flush)
    torch.manual_seed(0)
    budget = BudgetCallback(sparsity=0.8, lambda_warmup=0.0)
    probe = _StepGradientProbe(budget)
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[budget, probe])
    trainer.fit(module_cls(), DigitsDataModule(image_size=16, batch_size=32))
    assert probe.checked == 3
    assert counts == [flushed] * 3  # the requests went through the backward pass (not flushed), except the unused


class _PathProbe(pl.Callback):
    """After BudgetCallback: whether each step requested the budget gradient from the backward pass."""

    def __init__(self, budget: BudgetCallback) -> None:
        self.budget, self.requested = budget, []

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.requested.append(self.budget._requested)


@pytest.mark.parametrize(
    "trainer_kwargs, in_backward",
    [
        (dict(), True),
        (dict(precision="bf16-mixed"), True),  # autocast, no GradScaler: the loss is not scaled
        (dict(accumulate_grad_batches=2), False),  # two backward passes per optimizer step
    ],
)
def test_the_budget_gradient_goes_into_the_backward_pass_only_when_that_is_exact(trainer_kwargs, in_backward):
    torch.manual_seed(0)
    budget = BudgetCallback(sparsity=0.8, lambda_warmup=0.0)
    probe = _PathProbe(budget)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[budget, probe], **trainer_kwargs)
    trainer.fit(PlainClassifier(), DigitsDataModule(image_size=16, batch_size=32))
    assert probe.requested and set(probe.requested) == {in_backward}


class _FailsBeforeBackward(PlainClassifier):
    """Raises in its own on_before_backward, which runs after BudgetCallback's has made its requests."""

    def on_before_backward(self, loss) -> None:
        self.pending = [layer.mask._pending_budget_grad.request is not None for layer in pruned_layers(self)]
        raise RuntimeError("failed before backward")


def test_requests_that_a_failed_step_left_behind_are_dropped():
    module = _FailsBeforeBackward()
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[BudgetCallback(lambda_warmup=0.0)])
    with pytest.raises(RuntimeError, match="failed before backward"):
        trainer.fit(module, DigitsDataModule(image_size=16, batch_size=32))
    assert module.pending and all(module.pending)  # there were requests when the step failed
    assert all(layer.mask.take_budget_grad() is None for layer in pruned_layers(module))  # and none is left
