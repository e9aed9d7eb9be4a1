"""The reparametrization: a weight is used through a smooth function of itself, w = θ ⊙ σ((|θ|/s − c)/T)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_prune.fused_kernels import run_fused, use_fused

#: True while torch.compile (dynamo) traces the code.
is_compiling = torch.compiler.is_compiling


def wide(theta: Tensor) -> Tensor:
    """θ in float32 or wider: gates and scores are computed there whatever the weight's dtype, so rounding a
    half-precision weight cannot move it across the threshold."""
    return theta.float() if theta.dtype in (torch.float16, torch.bfloat16) else theta


def gate(theta: Tensor, scale: Tensor, threshold: Tensor, temperature: Tensor) -> Tensor:
    """``h_T(θ) = σ((|θ|/s − c)/T)`` elementwise, in float32 or wider; ``T = 0`` gives the step ``1{|θ|/s > c}``."""
    return _gate_of_score(wide(theta).abs().div_(scale), threshold, temperature)


def _gate_of_score(score: Tensor, threshold: Tensor, temperature: Tensor) -> Tensor:
    """``σ((score − c)/T)``, computed in place in ``score`` (one weight-sized buffer for the whole gate)."""
    return score.sub_(threshold).div_(temperature.clamp_min(1e-12)).sigmoid_()


def _forward_math(theta: Tensor, scale: Tensor, threshold: Tensor, temperature: Tensor, step: bool) -> Tensor:
    score = wide(theta).abs() / scale
    if step:
        return torch.where(score > threshold, theta, torch.zeros_like(theta))
    return (wide(theta) * torch.sigmoid((score - threshold) / temperature.clamp_min(1e-12))).to(theta.dtype)


def _backward_math(theta: Tensor, grad_out: Tensor, scale: Tensor, threshold: Tensor, temperature: Tensor,
                   grad_temperature: Tensor, step: bool) -> Tensor:
    slope_t = torch.maximum(temperature, grad_temperature)
    score = wide(theta).abs() / scale
    h_b = torch.sigmoid((score - threshold) / slope_t)
    h = (score > threshold).to(score.dtype) if step else torch.sigmoid((score - threshold) / temperature.clamp_min(1e-12))
    return (grad_out * (h + score / slope_t * h_b * (1 - h_b))).to(theta.dtype)


class _MaskedWeight(torch.autograd.Function):
    """``w = θ·h_T(θ)``; the backward pass takes the slope of ``h`` at ``T_b = max(T, grad_temperature)``.

    ``dw/dθ = h_T + θ·h'_{T_b} = h_T + (|θ|/(s·T_b))·h_b(1 − h_b)``, bounded by ``1 + (|θ|/s)/(4·T_b)`` however small
    ``T`` gets. Only θ is saved (``h`` is recomputed in the backward pass): the reparametrization keeps one tensor.
    """

    @staticmethod
    def forward(ctx, theta: Tensor, scale: Tensor, threshold: Tensor, temperature: Tensor, grad_temperature: Tensor,
                step: bool = False):
        ctx.save_for_backward(theta, scale, threshold, temperature, grad_temperature)
        ctx.step = step
        fused = run_fused(_forward_math, theta, scale, threshold, temperature, step) if use_fused(theta) else None
        if fused is not None:  # one pass (large tensors); else the eager passes below
            return fused
        if step:  # T = 0, known on the host: the step gate without the sigmoid's passes
            return torch.where(wide(theta).abs().div_(scale) > threshold, theta, theta.new_zeros(()))
        return gate(theta, scale, threshold, temperature).mul_(theta).to(theta.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        theta, scale, threshold, temperature, grad_temperature = ctx.saved_tensors
        if use_fused(theta):
            fused = run_fused(_backward_math, theta, grad_out, scale, threshold, temperature, grad_temperature, ctx.step)
            if fused is not None:
                return fused, None, None, None, None, None
        slope_t = torch.maximum(temperature, grad_temperature)
        # in place on three weight-sized buffers: score, h_b and h
        score = wide(theta).abs().div_(scale)
        h_b = _gate_of_score(score.clone(), threshold, slope_t)
        h = score > threshold if ctx.step else _gate_of_score(score.clone(), threshold, temperature)
        local = h_b.addcmul_(h_b, h_b, value=-1).mul_(score).div_(slope_t).add_(h)  # h + (|θ|/(s·T_b))·h_b(1 − h_b)
        return local.mul_(grad_out).to(theta.dtype), None, None, None, None, None


class MagnitudeMask(nn.Module):
    """Parametrization ``w = θ ⊙ h_T(θ)``, ``h_T(θ) = σ((|θ|/s − c)/T)``: the pruning mask is implied by the weight.

    It adds no trainable parameter: ``s`` (scale), ``c`` (threshold), ``T`` (temperature) and the backward pass's
    temperature floor are buffers, saved in checkpoints and set by :class:`~lightning_prune.BudgetCallback`. ``T = 0``
    makes the gate the step ``1{|θ|/s > c}`` in the forward pass (the backward pass keeps a bounded slope). Once
    :meth:`harden` has been called the layer computes ``θ ⊙ M`` with a fixed binary mask ``M``. Change ``T`` with
    :meth:`set_temperature`, not by writing the buffer: it also picks the cheaper forward pass at ``T = 0``. Likewise
    :meth:`harden` and :meth:`reopen` set the ``hard`` buffer (saved) and its host copy ``is_hard``, which the forward
    pass reads (a load refreshes it): no read from the device per layer and step.

    Register it with :func:`lightning_prune.reparametrize` rather than by hand.

    Args:
        shape: shape of the tensor it masks.
        scale: per-tensor scale ``s`` (``mean|θ|`` at attach time).
        threshold: normalised threshold ``c``.
        temperature: temperature ``T`` (>= 0).
        grad_temperature: floor on the temperature of the backward pass (> 0).

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
        if not temperature >= 0 or not grad_temperature > 0:
            raise ValueError(f"need temperature >= 0 and grad_temperature > 0, got {temperature}, {grad_temperature}.")
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.register_buffer("grad_temperature", torch.tensor(float(grad_temperature)))
        self.register_buffer("hard", torch.tensor(False))
        self.register_buffer("kept", torch.ones(shape, dtype=torch.bool))
        self._register_load_state_dict_pre_hook(_renamed_buffer)
        self.register_load_state_dict_post_hook(_read_hard_flag)
        self.is_hard = False  # `hard` on the host, for the forward pass: no device read per layer and step
        self.step_gate = False  # set by set_temperature; T = 0 in the buffer alone gives the same gate, through σ

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "is_hard" not in self.__dict__:  # a module pickled by lightning_prune 0.4.0 or older
            self.is_hard = bool(self.hard)
            self.step_gate = bool(self.temperature == 0)
        if _read_hard_flag not in self._load_state_dict_post_hooks.values():
            self.register_load_state_dict_post_hook(_read_hard_flag)

    def forward(self, theta: Tensor) -> Tensor:
        if is_compiling():
            # no branch on a tensor under torch.compile (a graph break per layer): both, selected by the flag (a
            # buffer, so hardening needs no recompilation)
            return torch.where(self.hard, self._masked(theta), self._soft(theta))
        return self.masked_weight(theta, self.is_hard, self.step_gate)

    def masked_weight(self, theta: Tensor, hard: bool, step: bool) -> Tensor:
        """``w`` computed as the forward pass computes it with the flags ``hard`` (:attr:`is_hard`) and ``step``
        (:attr:`step_gate`): the masked weight of a forward pass can be computed again in its backward pass."""
        return self._masked(theta) if hard else self._soft(theta, step)

    def _soft(self, theta: Tensor, step: bool = False) -> Tensor:
        return _MaskedWeight.apply(theta, self.scale, self.threshold, self.temperature, self.grad_temperature, step)

    def set_temperature(self, temperature: float) -> None:
        """Set ``T`` (the buffer), and let the forward pass use the cheaper step gate when it is 0."""
        self.temperature.fill_(temperature)
        self.step_gate = temperature == 0

    def _masked(self, theta: Tensor) -> Tensor:
        # a select: autograd keeps the boolean mask (a buffer) for the backward, not a float copy of it
        return torch.where(self.kept, theta, theta.new_zeros(()))

    def score(self, theta: Tensor) -> Tensor:
        """Normalised magnitude ``|θ|/s`` (float32 or wider): what the budget ranks across tensors."""
        return wide(theta.detach()).abs() / self.scale

    def hard_gate(self, theta: Tensor) -> Tensor:
        """The binary mask in use: the fixed mask once hardened, else ``1{|θ|/s > c}``."""
        return self.kept if self.is_hard else self.score(theta) > self.threshold

    def gate_values(self, theta: Tensor) -> Tensor:
        """The gate the forward pass applies, without its gradient: ``h_T(θ)``, the step gate at ``T = 0``, or the
        fixed mask once hardened (float32 or wider)."""
        if self.is_hard:
            return self.kept.to(wide(theta).dtype)
        if self.step_gate:
            return (self.score(theta) > self.threshold).to(wide(theta).dtype)
        return gate(theta.detach(), self.scale, self.threshold, self.temperature)

    def harden(self, mask: Tensor) -> None:
        """Fix the binary mask: from now on the layer computes ``θ ⊙ mask``."""
        if mask.shape != self.kept.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from the weight's {tuple(self.kept.shape)}.")
        self.kept.copy_(mask.to(torch.bool))
        self.hard.fill_(True)
        self.is_hard = True

    def reopen(self) -> None:
        """Undo :meth:`harden`: every weight kept, the gate soft again (the caller sets the removed weights' θ)."""
        self.kept.fill_(True)
        self.hard.fill_(False)
        self.is_hard = False

    def extra_repr(self) -> str:
        return f"scale={self.scale.item():.4g}, threshold={self.threshold.item():.4g}, hard={bool(self.hard)}"


def _read_hard_flag(module: MagnitudeMask, incompatible_keys) -> None:
    """After a load, the host copy of ``hard`` follows the loaded buffer (one read per load)."""
    module.is_hard = bool(module.hard)


def _renamed_buffer(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    """Checkpoints of lightning_prune 0.2 call the hard mask ``mask``; it is ``kept`` now."""
    if prefix + "mask" in state_dict and prefix + "kept" not in state_dict:
        state_dict[prefix + "kept"] = state_dict.pop(prefix + "mask")
