"""bfloat16 on the CPU: mixed-precision training meets the budget, and the gate arithmetic stays in float32."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from plain_modules import quiet_trainer, tiny_conv4
from torch import nn

from lightning_prune import (
    BudgetCallback,
    PrunedClassifier,
    budget_count,
    finalize,
    masked_parameters,
    reparametrize,
)
from lightning_prune.data import DigitsDataModule
from lightning_prune.magnitude_mask import MagnitudeMask, gate


class _Watch(Callback):
    """Records every training loss, and the dtype the first convolution computes in."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.conv_dtypes: set[torch.dtype] = set()

    def on_fit_start(self, trainer, pl_module) -> None:
        conv = pl_module.backbone.features[0]
        conv.register_forward_hook(lambda module, args, out: self.conv_dtypes.add(out.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("precision, latent_dtype", [("bf16-mixed", torch.float32), ("bf16-true", torch.bfloat16)])
def test_bf16_fit_is_finite_and_meets_the_budget_exactly(precision, latent_dtype):
    torch.manual_seed(0)
    model = PrunedClassifier(tiny_conv4(input_size=8), num_classes=10)
    callback, watch = BudgetCallback(sparsity=0.8), _Watch()
    trainer = quiet_trainer(max_epochs=2, precision=precision, callbacks=[callback, watch])
    trainer.fit(model, DigitsDataModule(image_size=8, batch_size=128))
    assert watch.conv_dtypes == {torch.bfloat16}  # the network really computed in bfloat16
    assert len(watch.losses) == 20 and all(math.isfinite(loss) for loss in watch.losses)
    layers = masked_parameters(model)
    assert all(layer.latent.dtype == latent_dtype and torch.isfinite(layer.latent).all() for layer in layers)
    total = sum(layer.numel for layer in layers)
    assert callback.report.kept == sum(int(layer.mask.kept.sum()) for layer in layers) == budget_count(total, 0.8)
    # the accuracy at finalisation was measured (with "bf16-true" the inputs must be cast like Lightning's loops do)
    assert callback.report.val_after_cut["val/acc"] > 0.1


class _Scales(Callback):
    """The GradScaler's scale at every optimizer step (after the backward pass, before the step it may skip)."""

    def __init__(self) -> None:
        self.scales: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.scales.append(trainer.precision_plugin.scaler.get_scale())


def test_16_mixed_with_a_grad_scaler_skips_overflowing_steps_without_a_non_finite_error():
    """float16 autocast with a GradScaler (on the CPU here; Lightning builds one for a GPU): its first scales make the
    gradients overflow, and the scaler skips those optimizer steps. Inf gradients are the scaler's business: the fit
    goes on, the latent weights stay finite, the loop still brings the share in use to the budget and the cut is exact."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    model = PrunedClassifier(tiny_conv4(input_size=8), num_classes=10)
    callback, watch, scales = BudgetCallback(sparsity=0.8), _Watch(), _Scales()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**24))
    trainer = quiet_trainer(max_epochs=2, plugins=[plugin], callbacks=[callback, watch, scales])
    trainer.fit(model, DigitsDataModule(image_size=8, batch_size=128))
    assert watch.conv_dtypes == {torch.float16}  # the network really computed in float16
    # the premise: some steps overflowed and were skipped (each halves the scale), and later ones were taken
    assert scales.scales[0] == 2.0**24 and scales.scales[-1] < scales.scales[0] and len(set(scales.scales[-5:])) == 1
    assert trainer.global_step == 20 and all(math.isfinite(loss) for loss in watch.losses)
    layers = masked_parameters(model)
    assert all(layer.latent.dtype == torch.float32 and torch.isfinite(layer.latent).all() for layer in layers)
    total = sum(layer.numel for layer in layers)
    assert callback.report.kept == sum(int(layer.mask.kept.sum()) for layer in layers) == budget_count(total, 0.8)
    assert abs(callback.report.kept_hard_before / 0.2 - 1) < 0.1


def test_gates_of_a_bf16_weight_compare_with_the_threshold_in_float32():
    mask = MagnitudeMask((1,), scale=1.0078, threshold=1.0, temperature=1e-6)
    theta = torch.tensor([1.0078125], dtype=torch.bfloat16)  # |θ|/s = 1.0000124 in float32: above c = 1
    assert (theta / mask.scale).item() == 1.0  # in bfloat16 the ratio rounds onto c: the weight would be dropped
    assert mask.score(theta).dtype == torch.float32 and mask.score(theta).item() > 1.0
    assert bool(mask.hard_gate(theta))
    assert gate(theta, mask.scale, mask.threshold, mask.temperature).item() > 0.5  # σ(12.4), not σ(0)


def test_finalize_ranks_bf16_weights_by_their_float32_scores():
    """Two weights whose normalised magnitudes differ in float32 but tie once rounded to bfloat16: a bfloat16
    ranking would keep the first by position; the float32 ranking keeps the larger one."""
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False))
    reparametrize(model, preserve_scale=False)
    model.to(torch.bfloat16)  # what precision="bf16-true" does: latents and buffers in bfloat16
    first, second = masked_parameters(model)
    with torch.no_grad():
        first.latent.fill_(1.015625)
        first.mask.scale.fill_(1.0078125)  # 1.0077519 in float32, 1.0078125 in bfloat16
        second.latent.fill_(1.0078125)
        second.mask.scale.fill_(1.0)  # 1.0078125 in both
    assert (first.latent / first.mask.scale).item() == (second.latent / second.mask.scale).item()  # a bf16 tie
    result = finalize(model, sparsity=0.5)
    assert result.per_layer == {"0.weight": (0, 1), "1.weight": (1, 1)}
