"""Closed-loop budget: a PI controller sets the size λ of the budget step from how far the weights are from the target."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class BudgetController:
    """λ_t = clip(I_t + k_p·e_t, −λ_max, λ_max), I_t = clip(I_{t−1} + k_i·e_t, −λ_max, λ_max), with ``e_t`` the margin
    gap (:func:`lightning_prune.budget.margin_gap`, in units of the score ``|θ|/s``) and λ the budget step per
    optimizer step in the same units: λ > 0 shrinks the weights, λ < 0 grows them.

    The loop engages when the kept share first reaches the target, or when the target falls to the share the network
    had at the loop's first step or reaches the budget, whichever comes first (before that λ = 0: the target is still above the share the
    network starts with, and growing every weight toward it would undo the network's own choice). From then on it
    holds the share at the target from both sides, so that the cut at the end of fit neither removes weights the
    network uses nor adds weights it never trained with. The second condition matters where the weights fall under
    the threshold by themselves, faster than the target falls (SGD at lr 0.1 with weight decay: a weight under the
    threshold loses the task's gradient through its gate while the decay goes on shrinking it).

    The weights' response to λ is about one score unit per unit of λ whatever the optimizer, so the gains need no
    tuning per workload: ``k_p = 2/τ`` and ``k_i = 1/τ²`` (a critically damped loop with time constant ``τ`` steps).
    The integral holds the pressure that balances the task's pull on the weights at the margin; the proportional term
    turns the pressure round at once when the kept share falls under the target, so the loop cannot drive a network
    to zero.

    Args:
        response_steps: the loop's time constant ``τ``, in optimizer steps (:meth:`set_response` changes it).
        max_step: ``λ_max``, the largest step, in units of each tensor's scale ``s``.

    Example:
        >>> import torch
        >>> controller = BudgetController(response_steps=10)
        >>> [round(float(controller.update(torch.tensor([0.5]))), 3) for _ in range(3)]
        [0.105, 0.11, 0.115]
        >>> round(float(controller.update(torch.tensor([-0.5]))), 3)  # under the target: the weights grow
        -0.09
    """

    def __init__(self, response_steps: float = 10.0, max_step: float = 1.0) -> None:
        if not max_step > 0:
            raise ValueError(f"max_step must be > 0, got {max_step}.")
        self.set_response(response_steps)
        self.max_step = float(max_step)
        self.integral: Tensor | None = None
        self.engaged: Tensor | None = None
        self.start_share: Tensor | None = None

    def set_response(self, response_steps: float) -> None:
        """Set the time constant ``τ`` (optimizer steps, >= 1) and with it the gains; the loop's state is kept."""
        if not response_steps >= 1:
            raise ValueError(f"response_steps is a number of optimizer steps >= 1, got {response_steps}.")
        self.response_steps = float(response_steps)
        self.gain = 2.0 / response_steps
        self.integral_gain = 1.0 / response_steps**2

    def update(self, gap: Tensor, share: Tensor | None = None, target_keep: float | None = None,
               final_keep: float | None = None) -> Tensor:
        """Take the gap of this step; return λ (same shape as ``gap``). ``share``: the share in use, recorded at the
        first step (pass it while :attr:`start_share` is None); the loop also engages once ``target_keep`` is at or
        under that share, or at ``final_keep`` (the budget: the target has reached it)."""
        if self.integral is None or self.integral.shape != gap.shape:
            self.integral, self.engaged = torch.zeros_like(gap), torch.zeros_like(gap, dtype=torch.bool)
        self.integral, self.engaged = self.integral.to(gap.device), self.engaged.to(gap.device)
        self.engaged |= gap > 0  # no tensor read back to the host: no device synchronisation
        if share is not None and self.start_share is None:
            self.start_share = share.detach().clone()
        if target_keep is not None:
            if self.start_share is not None:
                self.start_share = self.start_share.to(gap.device)
                self.engaged |= self.start_share >= target_keep
            if final_keep is not None and target_keep <= final_keep:
                self.engaged |= True
        self.integral = torch.where(self.engaged, self.integral + self.integral_gain * gap, 0.0)
        self.integral = self.integral.clamp(-self.max_step, self.max_step)
        step = (self.integral + self.gain * gap).clamp(-self.max_step, self.max_step)
        return torch.where(self.engaged, step, 0.0)

    def state_dict(self) -> dict[str, Any]:
        start = None if self.start_share is None else self.start_share.detach().cpu().tolist()
        if self.integral is None:
            return {"integral": None, "engaged": None, "start_share": start}
        return {"integral": self.integral.detach().cpu().tolist(), "engaged": self.engaged.cpu().tolist(),
                "start_share": start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        integral, engaged = state.get("integral"), state.get("engaged")
        self.integral = None if integral is None else torch.tensor(integral)
        self.engaged = None if engaged is None else torch.tensor(engaged, dtype=torch.bool)
        start = state.get("start_share")  # absent from checkpoints of 0.4.0: the next step records it
        self.start_share = None if start is None else torch.tensor(start)
