"""The reparametrization: a weight is used through a smooth function of itself, w = θ ⊙ σ((|θ|/s − c)/T)."""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from lightning_prune.compiled_gate import fused_masked_weight, fused_masked_weight_grad
from lightning_prune.gate_kernels import (
    gate,
    gate_grad,
    gate_sum,
    is_compiling,
    masked_weight,
    masked_weight_grad,
    slope_temperature,
    wide,
)


class _PendingBudgetGrad:
    """A budget gradient ``coef · dh/dθ`` (``coef`` and the slope's temperature, 0-d tensors) left for the layer's
    next backward pass, which adds it in its own pass over θ (see :meth:`MagnitudeMask.request_budget_grad`)."""

    __slots__ = ("request",)

    def __init__(self) -> None:
        self.request: tuple[Tensor, Tensor] | None = None

    def take(self) -> tuple[Tensor, Tensor] | None:
        request, self.request = self.request, None
        return request


class _MaskedWeight(torch.autograd.Function):
    """w = θ·h(θ) with h = σ((|θ|/s − c)/T); the backward pass bounds dh/dθ by evaluating it at max(T, T_grad).

    Also returns Σh (not differentiable), which the budget loss reuses instead of computing the gates again. Only θ
    is saved (h is recomputed in backward), so the memory cost of the reparametrization stays at one tensor. The
    backward also adds the mask's pending budget gradient, if any (``pending``; None under torch.compile).
    """

    @staticmethod
    def forward(
        ctx,
        theta: Tensor,
        scale: Tensor,
        threshold: Tensor,
        temperature: Tensor,
        grad_temperature: Tensor,
        pending: _PendingBudgetGrad | None = None,
        fused: bool = False,
    ):
        ctx.save_for_backward(theta, scale, threshold, temperature, grad_temperature)
        ctx.pending, ctx.fused = pending, fused
        result = fused_masked_weight(theta, scale, threshold, temperature) if fused else None
        weight, total = result if result is not None else masked_weight(theta, scale, threshold, temperature)
        ctx.mark_non_differentiable(total)
        return weight, total

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_total: Tensor | None):
        theta, *gate_inputs = ctx.saved_tensors  # s, c, T, T_grad
        args = (theta, grad_out, *gate_inputs)
        budget = ctx.pending.take() if ctx.pending is not None else None
        grad = fused_masked_weight_grad(*args, budget) if ctx.fused else None
        if grad is None:
            grad = masked_weight_grad(*args, budget)
        return grad, None, None, None, None, None, None


class _SoftGate(torch.autograd.Function):
    """h(θ) = σ((|θ|/s − c)/T) with the slope taken at ``T_b = max(T, grad_temperature)``."""

    @staticmethod
    def forward(
        ctx, theta: Tensor, scale: Tensor, threshold: Tensor, temperature: Tensor, grad_temperature: Tensor | float
    ):
        _save_gate_inputs(ctx, theta, scale, threshold, temperature, grad_temperature)
        return gate(theta, scale, threshold, temperature).to(theta.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        theta, scale, threshold, t_b = _saved_gate_inputs(ctx)
        return gate_grad(theta, scale, threshold, t_b) * grad_out, None, None, None, None


class _SoftGateSum(torch.autograd.Function):
    """Σh(θ), the soft kept count of a layer, with the same surrogate slope as :class:`_SoftGate`.

    ``total`` is the sum already computed by the layer's forward pass for this θ and T (or None): the budget loss
    then costs no pass over the weight in its forward.
    """

    @staticmethod
    def forward(
        ctx,
        theta: Tensor,
        scale: Tensor,
        threshold: Tensor,
        temperature: Tensor,
        grad_temperature: Tensor | float,
        total: Tensor | None,
    ):
        _save_gate_inputs(ctx, theta, scale, threshold, temperature, grad_temperature)
        return total.clone() if total is not None else gate_sum(theta, scale, threshold, temperature)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        theta, scale, threshold, t_b = _saved_gate_inputs(ctx)
        return gate_grad(theta, scale, threshold, t_b, coef=grad_out), None, None, None, None, None


def _save_gate_inputs(
    ctx, theta: Tensor, scale: Tensor, threshold: Tensor, temperature: Tensor, grad_temperature: Tensor | float
) -> None:
    # a float floor (the budget loss passes one) is kept as a float: no tensor built per layer and step
    if isinstance(grad_temperature, Tensor):
        ctx.save_for_backward(theta, scale, threshold, temperature, grad_temperature)
    else:
        ctx.save_for_backward(theta, scale, threshold, temperature)
        ctx.grad_temperature = grad_temperature


def _saved_gate_inputs(ctx) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """θ, s, c and the slope's temperature T_b = max(T, floor)."""
    theta, scale, threshold, temperature, *floor = ctx.saved_tensors
    return theta, scale, threshold, slope_temperature(temperature, floor[0] if floor else ctx.grad_temperature)


class MagnitudeMask(nn.Module):
    """Parametrization ``w = θ ⊙ h_T(θ)``, ``h_T(θ) = σ((|θ|/s − c)/T)``: the pruning mask is implied by the weight.

    It adds no trainable parameter: ``s`` (scale), ``c`` (threshold), ``T`` (temperature) and the bounded-gradient
    temperature are buffers, saved in checkpoints and set by :class:`~lightning_prune.BudgetCallback`. Once
    :meth:`harden` has been called the layer computes ``θ ⊙ M`` with a fixed binary mask ``M``.

    The gradient ``dw/dθ = h + θ·h'`` peaks near the threshold at about ``(|θ|/s)/(4T)``; the backward pass evaluates
    ``h'`` at ``max(T, grad_temperature)`` so the amplification stays bounded however small ``T`` gets.

    Register it with :func:`lightning_prune.reparametrize` (or ``torch.nn.utils.parametrize``) rather than by hand.

    Args:
        shape: shape of the weight it will mask.
        scale: per-tensor scale ``s`` (``mean|θ|`` at attach time).
        threshold: normalised threshold ``c``.
        temperature: temperature ``T`` (> 0).
        grad_temperature: floor on the temperature used by the backward pass.
        compile_gate: compute the gate's forward and backward with fused kernels compiled by torch.compile
            (:mod:`lightning_prune.compiled_gate`; needs a C++ compiler on the CPU, Triton on a GPU). Faster; the
            same values up to float rounding. Not saved in checkpoints: a setting of this process, like torch.compile.

    Example:
        >>> import torch
        >>> from torch.nn.utils import parametrize
        >>> layer = torch.nn.Linear(4, 2)
        >>> mask = MagnitudeMask(layer.weight.shape, scale=float(layer.weight.detach().abs().mean()))
        >>> parametrize.register_parametrization(layer, "weight", mask)
        ParametrizedLinear(...)
        >>> bool(mask.hard)
        False
    """

    def __init__(
        self,
        shape: torch.Size | tuple[int, ...],
        scale: float,
        threshold: float = 1.0,
        temperature: float = 0.5,
        grad_temperature: float = 0.1,
        compile_gate: bool = False,
    ) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"MagnitudeMask needs a positive scale, got {scale} (is the weight all zeros?).")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.register_buffer("grad_temperature", torch.tensor(float(grad_temperature)))
        self.register_buffer("hard", torch.tensor(False))
        self.register_buffer("mask", torch.ones(shape, dtype=torch.bool))

        self._kept_count: tuple[tuple, Tensor] | None = None
        self._pending_budget_grad = _PendingBudgetGrad()
        #: Run the gate as compiled fused kernels (:mod:`lightning_prune.compiled_gate`) instead of eager passes.
        self.compile_gate = compile_gate

    def forward(self, theta: Tensor) -> Tensor:
        if is_compiling():
            # no branch on a tensor under torch.compile (it would split the graph at every layer): both paths, and
            # the hard one selected by the flag (a buffer, so hardening needs no recompilation). A compiled backward
            # cannot read a request made after tracing: pending budget gradients are left to flush_budget_gradient.
            soft, _ = _MaskedWeight.apply(theta, *self._gate_args(), None)
            return torch.where(self.hard, self._masked(theta), soft)
        if self.hard:
            return self._masked(theta)
        weight, kept = _MaskedWeight.apply(theta, *self._gate_args(), self._pending_budget_grad, self.compile_gate)
        if torch.is_grad_enabled():  # a training step: its budget loss reads the count instead of recomputing it
            self._kept_count = (self._inputs_state(theta), kept)
        return weight

    def _masked(self, theta: Tensor) -> Tensor:
        # θ ⊙ M as a select: autograd keeps only the boolean mask (a buffer) for the backward, where θ·M.float() would
        # keep a float copy of the mask per layer
        return torch.where(self.mask, theta, theta.new_zeros(()))

    def soft_gate(self, theta: Tensor, grad_temperature: float | None = None) -> Tensor:
        """``h_T(θ)`` in [0, 1] elementwise, differentiable (the budget loss uses its sum, :meth:`soft_kept_count`).

        Its gradient is that of ``σ((|θ|/s − c)/T_b)`` with ``T_b = max(T, grad_temperature)`` (the mask's own
        ``grad_temperature`` unless given): a wider ``T_b`` lets the budget reach weights far from the threshold.
        """
        scale, threshold, temperature, floor = self._gate_args()
        # a float goes straight through (no tensor built per layer and step)
        floor_or_float = floor if grad_temperature is None else grad_temperature
        return _SoftGate.apply(theta, scale, threshold, temperature, floor_or_float)

    def soft_kept_count(self, theta: Tensor, grad_temperature: float | None = None) -> Tensor:
        """``Σ h_T(θ)`` (0-d, float32 or wider), differentiable with the surrogate slope of :meth:`soft_gate`.

        The budget loss sums this. It reuses the count computed by the layer's last forward pass with gradients on,
        when θ, ``s``, ``c`` and ``T`` are the same tensors at the same versions (no in-place change since).
        """
        scale, threshold, temperature, floor = self._gate_args()
        floor_or_float = floor if grad_temperature is None else grad_temperature
        return _SoftGateSum.apply(theta, scale, threshold, temperature, floor_or_float, self._cached_kept_count(theta))

    def slope_temperature(self, grad_temperature: float | None = None) -> Tensor:
        """``T_b = max(T, floor)``, the temperature at which the gradients take the gate's slope; the floor is
        ``grad_temperature`` when given, else the mask's own."""
        floor = self.grad_temperature if grad_temperature is None else grad_temperature
        return slope_temperature(self.temperature, floor)

    def request_budget_grad(self, coef: Tensor, temperature: Tensor) -> None:
        """Leave ``coef · dh_T(θ)/dθ`` (at ``T = temperature``) for the next backward pass through this mask to add.

        The backward pass adds it to the gradient it returns for θ in the same pass over the weight, once: a second
        backward pass adds nothing. :meth:`take_budget_grad` returns a request no backward pass consumed. Used by
        :func:`lightning_prune.add_budget_gradient` with ``in_backward=True``.
        """
        self._pending_budget_grad.request = (coef.detach(), temperature.detach())

    def take_budget_grad(self) -> tuple[Tensor, Tensor] | None:
        """The pending budget-gradient request ``(coef, temperature)``, removed; None when there is none."""
        return self._pending_budget_grad.take()

    def _inputs_state(self, theta: Tensor) -> tuple:
        return tuple((weakref.ref(t), t._version) for t in (theta, self.scale, self.threshold, self.temperature))

    def _cached_kept_count(self, theta: Tensor) -> Tensor | None:
        if self._kept_count is None or is_compiling():
            return None
        state, kept = self._kept_count
        current = (theta, self.scale, self.threshold, self.temperature)
        if all(ref() is t and t._version == version for (ref, version), t in zip(state, current)):
            return kept
        return None

    def __getstate__(self) -> dict:
        # the cached count holds weak references, which cannot be pickled (torch.save(model), ddp_spawn)
        state = self.__dict__.copy()
        state["_kept_count"] = None
        state["_pending_budget_grad"] = _PendingBudgetGrad()  # a copy does not share the original's requests
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_pending_budget_grad", _PendingBudgetGrad())  # pickled by an earlier version
        self.__dict__.setdefault("compile_gate", False)

    def score(self, theta: Tensor) -> Tensor:
        """Normalised magnitude ``|θ|/s``: the quantity ranked across layers at finalisation.

        Computed in float32 (or wider) like the gates: with a bfloat16 ``θ`` the ratio would be rounded to bfloat16,
        which moves weights within 0.4% of the threshold onto or across it.
        """
        return wide(theta.detach()).abs() / self.scale

    def hard_gate(self, theta: Tensor) -> Tensor:
        """The binary mask in use: the fixed mask once hardened, else ``1{|θ|/s > c}``."""
        if self.hard:
            return self.mask
        return self.score(theta) > self.threshold

    def harden(self, mask: Tensor) -> None:
        """Fix the binary mask: from now on the layer computes ``θ ⊙ mask``."""
        if mask.shape != self.mask.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from the weight's {tuple(self.mask.shape)}.")
        self.mask.copy_(mask.to(torch.bool))
        self.hard.fill_(True)
        self._kept_count = None
        self._pending_budget_grad.take()

    def _gate_args(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.scale, self.threshold, self.temperature, self.grad_temperature

    def extra_repr(self) -> str:
        return f"scale={self.scale.item():.4g}, threshold={self.threshold.item():.4g}, hard={bool(self.hard)}"
