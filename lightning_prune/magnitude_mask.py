"""The reparametrization: a weight is used through a smooth function of itself, w = θ ⊙ σ((|θ|/s − c)/T)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _MaskedWeight(torch.autograd.Function):
    """w = θ·h(θ) with h = σ((|θ|/s − c)/T); the backward pass bounds dh/dθ by evaluating it at max(T, T_grad).

    Saving only θ (and recomputing h in backward) keeps the memory cost of the reparametrization at one tensor.
    The elementwise passes over the weight reuse their buffers in place (one allocation forward, two or three
    backward): 5 passes forward, 7 to 10 backward (fewer while T ≥ T_grad on the CPU, where the two gates are the same).
    """

    @staticmethod
    def forward(ctx, theta: Tensor, scale: Tensor, threshold: Tensor, temperature: Tensor, grad_temperature: Tensor):
        ctx.save_for_backward(theta, scale, threshold, temperature, grad_temperature)
        gate = _sigmoid_gate(theta, scale, threshold, temperature)
        return gate.mul_(theta) if gate.dtype == theta.dtype else theta * gate.to(theta.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        theta, scale, threshold, temperature, grad_temperature = ctx.saved_tensors
        magnitude = _wide(theta).abs()
        t_b = torch.maximum(temperature, grad_temperature)
        same = _same_temperature(temperature, t_b)  # then the two gates are the same: one pass and buffer fewer
        gate = None if same else _gate_from_magnitude(magnitude, scale, threshold, temperature)
        scaled = magnitude.mul_(torch.reciprocal(scale * t_b))  # |θ|/(s·T_b): the gate's input and the slope's factor
        gate_b = torch.sigmoid_(scaled - threshold / t_b)
        gate = gate_b if same else gate
        # d(θ·h)/dθ = h + θ·h'(θ) = h + (|θ|/(s·T_b))·h_b(1 − h_b)
        local = gate.add_(_sigmoid_slope(scaled, gate_b))
        if local.dtype == grad_out.dtype and not grad_out.requires_grad:
            return local.mul_(grad_out), None, None, None, None
        return (grad_out * local).to(theta.dtype), None, None, None, None


class _SoftGate(torch.autograd.Function):
    """h(θ) = σ((|θ|/s − c)/T) with the same bounded surrogate gradient as :class:`_MaskedWeight`.

    ``grad_temperature`` may be a float (the budget loss passes one: no tensor to build per layer and step).
    """

    @staticmethod
    def forward(
        ctx, theta: Tensor, scale: Tensor, threshold: Tensor, temperature: Tensor, grad_temperature: Tensor | float
    ):
        if isinstance(grad_temperature, Tensor):
            ctx.save_for_backward(theta, scale, threshold, temperature, grad_temperature)
        else:
            ctx.save_for_backward(theta, scale, threshold, temperature)
            ctx.grad_temperature = grad_temperature
        return _sigmoid_gate(theta, scale, threshold, temperature).to(theta.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        theta, scale, threshold, temperature, *floor = ctx.saved_tensors
        t_b = torch.maximum(temperature, floor[0]) if floor else torch.clamp_min(temperature, ctx.grad_temperature)
        coef = torch.reciprocal(scale * t_b)
        gate_b = _gate_from_magnitude(_wide(theta).abs(), scale, threshold, t_b, inplace=True)
        if grad_out.dim() and all(stride == 0 for stride in grad_out.stride()):
            # the gradient of a sum is one value expanded: fold it into the scalar factor (one pass fewer)
            coef = coef * grad_out.as_strided((), ()).float()
            grad_out = None
        # h_b(1 − h_b)·sign(θ)/(s·T_b), in place in the gate's buffer: a second weight-sized buffer alive at the same
        # time (sign(θ)) costs more on the CPU than the passes (fresh pages)
        grad = _with_sign_of(gate_b.addcmul_(gate_b, gate_b, value=-1.0), theta).mul_(coef)
        if grad_out is not None:
            grad = grad * grad_out
        return grad.to(theta.dtype), None, None, None, None


def _wide(theta: Tensor) -> Tensor:
    # the gate is computed in float32 (or wider) whatever the weight's dtype, so a half-precision weight cannot
    # move a weight across the threshold through rounding
    return theta.float() if theta.dtype in (torch.float16, torch.bfloat16) else theta


def _gate_from_magnitude(
    magnitude: Tensor, scale: Tensor, threshold: Tensor, temperature: Tensor, inplace: bool = False
) -> Tensor:
    """σ((|θ|/s − c)/T) from |θ|, as σ(|θ|·(1/(s·T)) − c/T): the scalar factors are folded into two 0-d tensors
    (no device synchronisation) and the remaining passes work in place (``inplace`` overwrites ``magnitude``)."""
    factor = torch.reciprocal(scale * temperature)
    logit = magnitude.mul_(factor) if inplace else magnitude * factor
    return logit.sub_(threshold / temperature).sigmoid_()


def _with_sign_of(x: Tensor, theta: Tensor) -> Tensor:
    """x·sign(θ) for x ≥ 0, in place: copysign, then 0 where θ = ±0 as sign(0) = 0 (softshrink's backward at 0)."""
    if _is_compiling():
        return x * torch.sign(theta)
    x.copysign_(theta)
    return torch.ops.aten.softshrink_backward.grad_input(x, theta, 0.0, grad_input=x)


def _sigmoid_slope(x: Tensor, gate: Tensor) -> Tensor:
    """x·h(1 − h) from h = σ(·) in one pass, in place on ``x`` (sigmoid's own backward kernel)."""
    if _is_compiling():
        return torch.ops.aten.sigmoid_backward(x, gate)
    return torch.ops.aten.sigmoid_backward.grad_input(x, gate, grad_input=x)


def _same_temperature(temperature: Tensor, t_b: Tensor) -> bool:
    # only looked at on the CPU, where reading the value costs no device synchronisation, and not under
    # torch.compile, where reading it would break the graph
    return temperature.device.type == "cpu" and not _is_compiling() and bool(temperature == t_b)


def _never() -> bool:
    return False


#: True while torch.compile (dynamo) traces the code (torch.compiler.is_compiling exists from torch 2.3 on).
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", _never)


def _sigmoid_gate(theta: Tensor, scale: Tensor, threshold: Tensor, temperature: Tensor) -> Tensor:
    """σ((|θ|/s − c)/T) in float32 or wider (the caller casts it to the weight's dtype)."""
    return _gate_from_magnitude(_wide(theta).abs(), scale, threshold, temperature, inplace=True)


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

    def forward(self, theta: Tensor) -> Tensor:
        if _is_compiling():
            # no branch on a tensor under torch.compile (it would split the graph at every layer): both paths, and
            # the hard one selected by the flag (a buffer, so hardening needs no recompilation)
            soft = _MaskedWeight.apply(theta, *self._gate_args())
            return torch.where(self.hard, self._masked(theta), soft)
        if self.hard:
            return self._masked(theta)
        return _MaskedWeight.apply(theta, *self._gate_args())

    def _masked(self, theta: Tensor) -> Tensor:
        # θ ⊙ M as a select: autograd keeps only the boolean mask (a buffer) for the backward, where θ·M.float() would
        # keep a float copy of the mask per layer
        return torch.where(self.mask, theta, theta.new_zeros(()))

    def soft_gate(self, theta: Tensor, grad_temperature: float | None = None) -> Tensor:
        """``h_T(θ)`` in [0, 1], differentiable; the budget loss sums it.

        Its gradient is that of ``σ((|θ|/s − c)/T_b)`` with ``T_b = max(T, grad_temperature)`` (the mask's own
        ``grad_temperature`` unless given): a wider ``T_b`` lets the budget reach weights far from the threshold.
        """
        scale, threshold, temperature, floor = self._gate_args()
        # a float goes straight through (no tensor built per layer and step)
        floor_or_float = floor if grad_temperature is None else grad_temperature
        return _SoftGate.apply(theta, scale, threshold, temperature, floor_or_float)

    def score(self, theta: Tensor) -> Tensor:
        """Normalised magnitude ``|θ|/s``: the quantity ranked across layers at finalisation.

        Computed in float32 (or wider) like the gates: with a bfloat16 ``θ`` the ratio would be rounded to bfloat16,
        which moves weights within 0.4% of the threshold onto or across it.
        """
        return _wide(theta.detach()).abs() / self.scale

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

    def _gate_args(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.scale, self.threshold, self.temperature, self.grad_temperature

    def extra_repr(self) -> str:
        return f"scale={self.scale.item():.4g}, threshold={self.threshold.item():.4g}, hard={bool(self.hard)}"
