"""The budget step of one optimizer step, in one place: the sample, the controller, the floors, the metric, the step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_prune.budget import (
    BudgetMode,
    budget_step,
    common_unit,
    layer_floor,
    margin_gap,
    optimizer_metric,
    sample_indices,
    update_floor_thresholds,
)
from lightning_prune.budget_controller import BudgetController
from lightning_prune.reparametrize import MaskedParameter

#: Optimizer steps between two updates of the thresholds of tensors near their floor.
FLOOR_CHECK_EVERY = 10
#: The masks' normalised threshold ``c``: the scale ``s`` of each tensor sets the unit.
THRESHOLD = 1.0


@dataclass
class LoopSettings:
    """The closed loop's settings. The defaults are the measured choices of ``docs/method.md``; a run rarely changes
    any. From YAML: ``init_args: {loop: {temperature_end: 0.01}}``.

    Args:
        target_start: share of training at which the target starts to move, in [0, ``target_end``].
        temperature_start: temperature of the gate at the start (> 0).
        temperature_end: temperature at ``target_end`` (in (0, temperature_start]); 0 (the step) after it.
        grad_temperature: floor on the temperature of the backward pass (bounds the gradient near the threshold).
        response_steps: time constant of the loop, in optimizer steps; default a 16th of the target's ramp, between 2
            and 10 steps.
        max_step: largest budget step per optimizer step, in units of each tensor's scale.
        exempt_share: share of the budget, the weights with the largest scores, that the budget step leaves alone.
        precondition: under an optimizer that keeps running means of squared gradients (Adam, RMSprop, ...), shrink
            each weight in proportion to the step the optimizer gives it (``1/√v``); under SGD the step is uniform.
        recalibration_batches: training batches used to re-estimate BatchNorm statistics after the cut.
        finalize_on_fit_end: harden the masks when fit ends (off: the masks stay soft, call ``finalize`` yourself).

    Example:
        >>> LoopSettings(temperature_end=0.01).temperature_end
        0.01
        >>> LoopSettings(temperature_end=2.0)
        Traceback (most recent call last):
        ...
        ValueError: LoopSettings: need 0 < temperature_end <= temperature_start, got 2.0 and 0.5: the temperature goes down during training.
    """

    target_start: float = 0.0
    temperature_start: float = 0.5
    temperature_end: float = 0.02
    grad_temperature: float = 0.1
    response_steps: float | None = None
    max_step: float = 1.0
    exempt_share: float = 0.5
    precondition: bool = True
    recalibration_batches: int = 32
    finalize_on_fit_end: bool = True

    def __post_init__(self) -> None:
        checks = (
            (0 <= self.target_start <= 1, f"target_start is a share of training in [0, 1], got {self.target_start}."),
            (
                0 < self.temperature_end <= self.temperature_start,
                f"need 0 < temperature_end <= temperature_start, got {self.temperature_end} and "
                f"{self.temperature_start}: the temperature goes down during training.",
            ),
            (self.grad_temperature > 0, f"grad_temperature must be > 0, got {self.grad_temperature}."),
            (
                self.response_steps is None or self.response_steps >= 1,
                f"response_steps must be >= 1, got {self.response_steps}.",
            ),
            (self.max_step > 0, f"max_step must be > 0, got {self.max_step}."),
            (0 <= self.exempt_share < 1, f"exempt_share is a share of the budget in [0, 1), got {self.exempt_share}."),
            (self.recalibration_batches >= 1, f"recalibration_batches must be >= 1, got {self.recalibration_batches}."),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"LoopSettings: {message}")


class BudgetLoop:
    """The budget's closed loop over the masked tensors: each call of :meth:`step` draws one sample of the weights,
    measures the gap to the target (:func:`~lightning_prune.budget.margin_gap`), sets λ with the
    :class:`~lightning_prune.budget_controller.BudgetController`, and takes the budget step
    (:func:`~lightning_prune.budget.budget_step`, in the optimizer's metric when ``settings.precondition``) on the
    tensors the optimizer trains. A tensor at its floor feels no pressure; in global mode every ``FLOOR_CHECK_EVERY``
    steps the tensors near their floor compute with their floor's largest weights.

    Args:
        settings: the loop's settings.
        mode: ``"global"`` (one budget over all tensors) or ``"layer"`` (each tensor on its own).
        min_layer_keep: share of each tensor kept at least.
        keep: the budget's keep share (``1 − sparsity``): ``settings.exempt_share`` is a share of it.

    Example:
        >>> import torch
        >>> from lightning_prune import masked_parameters, reparametrize
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> _ = reparametrize(model)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> loop = BudgetLoop(LoopSettings(response_steps=2), "global", 0.01, keep=0.5)
        >>> loop.attach(masked_parameters(model))
        >>> for step in range(20):
        ...     loop.step(optimizer, step, target_keep=0.5)
        >>> share = float(loop.shares_in_use()[0])
        >>> 0.4 < share < 0.6
        True
    """

    def __init__(self, settings: LoopSettings, mode: BudgetMode, min_layer_keep: float, keep: float) -> None:
        self.settings = settings
        self.keep = keep
        self.mode = mode
        self.min_layer_keep = min_layer_keep
        self.controller = BudgetController(settings.response_steps or 10.0, settings.max_step)
        self.params: list[MaskedParameter] = []
        self.floors: list[int] = []
        self.latest_lambda: Tensor | None = None
        self._shares: Tensor | None = None

    def attach(self, params: list[MaskedParameter]) -> None:
        """Take the masked tensors (again, after a strategy wrapped the module or a checkpoint restored the scales)."""
        self.params = params
        self._ids = {id(p.latent): i for i, p in enumerate(params)}
        self.floors = [layer_floor(p.numel, self.min_layer_keep) for p in params]
        self._unit = common_unit(params) if params and self.mode == "global" else None

    def set_ramp(self, ramp_steps: float) -> None:
        """The default time constant follows the ramp's length: a 16th of it, between 2 and 10 steps."""
        self.controller.set_response(self.settings.response_steps or min(10.0, max(2.0, ramp_steps / 16)))

    def trained_by(self, optimizer: torch.optim.Optimizer) -> list[int]:
        """Indices of the masked tensors that ``optimizer`` trains now (in a group, ``requires_grad``)."""
        found = {self._ids[id(p)] for g in optimizer.param_groups for p in g["params"] if id(p) in self._ids}
        return sorted(i for i in found if self.params[i].latent.requires_grad)

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer, step: int, target_keep: float) -> None:
        """The budget step of optimizer step ``step`` toward ``target_keep``, on the tensors ``optimizer`` trains."""
        trained = self.trained_by(optimizer)
        if not trained:
            return
        params, s = self.params, self.settings
        indices = sample_indices(params, step)
        sample = margin_gap(
            params, target_keep, self.mode, step, THRESHOLD, self.floors if self.mode == "global" else None,
            exempt=s.exempt_share * self.keep, indices=indices,
        )
        self._shares = sample.shares
        first = self._share_in_use(sample.shares) if self.controller.start_share is None else None
        self.latest_lambda = self.controller.update(sample.gap, first, target_keep, self.keep)
        lam = self.latest_lambda
        if self._unit is None:
            rates = lam.expand(len(params))
        else:  # a growing step is at most |λ| in a tensor's own units: a small-scale tensor's zeros rise slowly
            rates = torch.where(lam > 0, lam * self._unit, lam * self._unit.clamp_max(1.0))
        # a tensor at its floor feels no shrinking pressure; a growing step reaches every tensor
        rates = torch.where((sample.shares > self.min_layer_keep) | (rates < 0), rates, torch.zeros_like(rates))
        metric = optimizer_metric(params, optimizer, step, indices) if s.precondition else None
        exempt = sample.exempt_above.expand(len(params))
        if len(trained) < len(params):
            subset = [params[i] for i in trained]
            if metric is not None:
                metric = metric._replace(second_moments=[metric.second_moments[i] for i in trained])
            # stacked views, not an index tensor: that would be a copy from the host, which waits for the device
            budget_step(subset, torch.stack([rates[i] for i in trained]), torch.stack([exempt[i] for i in trained]),
                        metric)
        else:
            budget_step(params, rates, exempt, metric)
        if self.mode == "global" and step % FLOOR_CHECK_EVERY == 0:
            update_floor_thresholds(params, sample.shares, self.floors, self.min_layer_keep, THRESHOLD)

    def _share_in_use(self, shares: Tensor) -> Tensor:
        """The share in use the gap is measured against: over all tensors (global mode), or each tensor's. Called
        once, at the loop's first step."""
        if self.mode != "global":
            return shares
        numels = torch.tensor([float(p.numel) for p in self.params], device=shares.device)
        return (shares * numels).sum().div(numels.sum()).reshape(1)

    def shares_in_use(self) -> Tensor:
        """Each tensor's sampled share in use at the last step (NaN before the first)."""
        return self._shares if self._shares is not None else torch.full((len(self.params),), float("nan"))
