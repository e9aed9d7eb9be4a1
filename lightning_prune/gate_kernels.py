"""The elementwise work behind the soft gate ``h_T(θ) = σ((|θ|/s − c)/T)``: values and gradients.

These are the forward and backward bodies of the autograd functions in :mod:`lightning_prune.magnitude_mask`. The
scalar factors are folded into 0-d tensors (``σ(|θ|·(1/(s·T)) − c/T)``: no device synchronisation) and every pass
after the first works in place.

On the CPU a float32 weight of more than :data:`CPU_CHUNK` elements is processed in chunks: the passes over a chunk
stay in the core's cache, and the temporaries are chunk-sized instead of weight-sized. A fresh weight-sized buffer
costs page faults on the CPU (glibc hands large blocks back to the OS and faults them in again), which made up about
half of the reparametrization's CPU overhead on Conv4 (see ``benchmarks/results/README.md``). On a GPU, under
torch.compile, and for other dtypes the same formulas run on the whole tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Elements per chunk on the CPU (1 MiB of float32: a chunk and its two scratch buffers fit a core's L2 cache).
CPU_CHUNK = 1 << 18


def _never() -> bool:
    return False


#: True while torch.compile (dynamo) traces the code (torch.compiler.is_compiling exists from torch 2.3 on).
is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", _never)


def wide(theta: Tensor) -> Tensor:
    """θ in float32 or wider: the gate is computed there whatever the weight's dtype, so a half-precision weight
    cannot cross the threshold through rounding."""
    return theta.float() if theta.dtype in (torch.float16, torch.bfloat16) else theta


def gate_factors(scale: Tensor, threshold: Tensor, temperature: Tensor) -> tuple[Tensor, Tensor]:
    """``(1/(s·T), c/T)``: the gate is ``σ(|θ|·factor − offset)``."""
    return torch.reciprocal(scale * temperature), threshold / temperature


def slope_temperature(temperature: Tensor, floor: Tensor | float) -> Tensor:
    """``T_b = max(T, floor)``: the temperature at which the gradients take the gate's slope."""
    return torch.maximum(temperature, floor) if isinstance(floor, Tensor) else torch.clamp_min(temperature, floor)


def gate(theta: Tensor, scale: Tensor, threshold: Tensor, temperature: Tensor) -> Tensor:
    """``h_T(θ)`` elementwise (float32 or wider, a new tensor)."""
    return _gate_into(wide(theta), *gate_factors(scale, threshold, temperature))


def masked_weight(theta: Tensor, scale: Tensor, threshold: Tensor, temperature: Tensor) -> tuple[Tensor, Tensor]:
    """``θ ⊙ h_T(θ)`` and ``Σ h_T(θ)`` (float32 or wider, 0-d): the reparametrized weight and its soft kept count."""
    factor, offset = gate_factors(scale, threshold, temperature)
    if _chunked(theta):
        flat, out = theta.view(-1), torch.empty_like(theta)
        sums = []
        for i, j in _spans(flat.numel()):
            gate = _gate_into(flat[i:j], factor, offset, out.view(-1)[i:j])
            sums.append(gate.sum())
            gate.mul_(flat[i:j])
        return out, torch.stack(sums).sum()
    gate = _gate_into(wide(theta), factor, offset)
    total = gate.sum()
    return (gate.mul_(theta) if gate.dtype == theta.dtype else theta * gate.to(theta.dtype)), total


def masked_weight_grad(
    theta: Tensor,
    grad_out: Tensor,
    scale: Tensor,
    threshold: Tensor,
    temperature: Tensor,
    grad_temperature: Tensor,
    budget: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``grad_out · d(θ·h_T(θ))/dθ`` with the slope of ``h`` taken at ``T_b = max(T, grad_temperature)``.

    ``d(θ·h)/dθ = h + θ·h' = h_T + (|θ|/(s·T_b))·h_b(1 − h_b)``: bounded by ``1 + (|θ|/s)/(4·T_b)`` however small
    ``T`` gets.

    ``budget = (coef, T_budget)`` (0-d tensors) also adds ``coef · dh_{T_budget}(θ)/dθ`` (:func:`gate_grad`) in the
    same pass over θ: the budget loss's gradient, without reading θ and writing ``θ.grad`` a second time.
    """
    t_b = slope_temperature(temperature, grad_temperature)
    same = same_value(temperature, t_b)  # then the two gates are the same: one pass and buffer fewer
    factor_b, offset_b = gate_factors(scale, threshold, t_b)
    factor, offset = (factor_b, offset_b) if same else gate_factors(scale, threshold, temperature)
    if _chunked(theta, grad_out) and not grad_out.requires_grad:
        if budget is not None:
            same_budget = same_value(budget[1], t_b)
            factor_budget, offset_budget = gate_factors(scale, threshold, budget[1])
            budget_slope = factor_budget * budget[0].float()
        flat, grad_flat = theta.view(-1), grad_out.view(-1)
        out = torch.empty_like(theta)
        size = min(flat.numel(), CPU_CHUNK)
        x_buf, h_buf = torch.empty(size, dtype=theta.dtype), torch.empty(size, dtype=theta.dtype)
        for i, j in _spans(flat.numel()):
            chunk, local = flat[i:j], out.view(-1)[i:j]
            scaled = torch.abs(chunk, out=x_buf[: j - i]).mul_(factor_b)  # |θ|/(s·T_b)
            gate_b = torch.sub(scaled, offset_b, out=h_buf[: j - i]).sigmoid_()
            slope = _sigmoid_slope(scaled, gate_b)  # (|θ|/(s·T_b))·h_b(1 − h_b)
            if same:
                torch.add(slope, gate_b, out=local)
            else:
                _gate_into(chunk, factor, offset, local).add_(slope)
            local.mul_(grad_flat[i:j])
            if budget is not None:  # x_buf is free again; h_buf still holds h_b
                gate_budget = gate_b if same_budget else _gate_into(chunk, factor_budget, offset_budget, h_buf[: j - i])
                local.addcmul_(_signed_slope(chunk, gate_budget, x_buf[: j - i]), budget_slope)
        return out
    gate = None if same else _gate_into(wide(theta), factor, offset)
    scaled = wide(theta).abs().mul_(factor_b)
    gate_b = torch.sigmoid_(scaled - offset_b)
    local = (gate_b if same else gate).add_(_sigmoid_slope(scaled, gate_b))
    if local.dtype == grad_out.dtype and not grad_out.requires_grad:
        grad = local.mul_(grad_out)
    else:
        grad = (grad_out * local).to(theta.dtype)
    if budget is not None:
        add_gate_grad(grad, theta, scale, threshold, budget[1], budget[0])
    return grad


def gate_sum(theta: Tensor, scale: Tensor, threshold: Tensor, temperature: Tensor) -> Tensor:
    """``Σ h_T(θ)`` (float32 or wider, 0-d), without a weight-sized buffer on the CPU."""
    factor, offset = gate_factors(scale, threshold, temperature)
    if _chunked(theta):
        flat = theta.view(-1)
        buf = torch.empty(min(flat.numel(), CPU_CHUNK), dtype=theta.dtype)
        sums = [_gate_into(flat[i:j], factor, offset, buf[: j - i]).sum() for i, j in _spans(flat.numel())]
        return torch.stack(sums).sum()
    return _gate_into(wide(theta), factor, offset).sum()


def gate_grad(
    theta: Tensor, scale: Tensor, threshold: Tensor, temperature: Tensor, coef: Tensor | None = None
) -> Tensor:
    """``coef · dh_T(θ)/dθ = coef · h(1 − h)·sign(θ)/(s·T)`` elementwise, in θ's dtype.

    ``coef`` is a 0-d tensor (the gradient of a sum of gates) or None (1).
    """
    factor, offset = gate_factors(scale, threshold, temperature)
    slope_factor = factor if coef is None else factor * coef.float()
    if _chunked(theta):
        flat, out = theta.view(-1), torch.empty_like(theta)
        gate_buf = torch.empty(min(flat.numel(), CPU_CHUNK), dtype=theta.dtype)
        for i, j in _spans(flat.numel()):
            gate = _gate_into(flat[i:j], factor, offset, gate_buf[: j - i])
            _signed_slope(flat[i:j], gate, out.view(-1)[i:j]).mul_(slope_factor)
        return out
    gate = _gate_into(wide(theta), factor, offset)
    # h(1 − h)·sign(θ)·factor in the gate's own buffer: a second weight-sized buffer (sign(θ)) costs more on the CPU
    # than the passes
    return _with_sign_of(gate.addcmul_(gate, gate, value=-1.0), theta).mul_(slope_factor).to(theta.dtype)


def add_gate_grad(
    grad: Tensor, theta: Tensor, scale: Tensor, threshold: Tensor, temperature: Tensor, coef: Tensor
) -> None:
    """``grad += coef · dh_T(θ)/dθ`` in place (``coef`` a 0-d tensor): :func:`gate_grad` without its output tensor."""
    if not _chunked(theta, grad):
        grad.add_(gate_grad(theta, scale, threshold, temperature, coef).to(grad.dtype))
        return
    factor, offset = gate_factors(scale, threshold, temperature)
    slope_factor = factor * coef.float()
    flat, grad_flat = theta.view(-1), grad.view(-1)
    size = min(flat.numel(), CPU_CHUNK)
    gate_buf, slope_buf = torch.empty(size, dtype=theta.dtype), torch.empty(size, dtype=theta.dtype)
    for i, j in _spans(flat.numel()):
        gate = _gate_into(flat[i:j], factor, offset, gate_buf[: j - i])
        grad_flat[i:j].addcmul_(_signed_slope(flat[i:j], gate, slope_buf[: j - i]), slope_factor)


def _signed_slope(theta: Tensor, gate: Tensor, out: Tensor) -> Tensor:
    """``sign(θ)·h(1 − h)`` into ``out`` in two passes (sign, then sigmoid's own backward kernel)."""
    signs = torch.sign(theta, out=out)
    return torch.ops.aten.sigmoid_backward.grad_input(signs, gate, grad_input=signs)


def _gate_into(theta: Tensor, factor: Tensor, offset: Tensor, out: Tensor | None = None) -> Tensor:
    """``σ(|θ|·factor − offset)`` written into ``out`` (a new tensor when None; ``out`` may be ``theta`` itself)."""
    magnitude = theta.abs() if out is None else torch.abs(theta, out=out)
    return magnitude.mul_(factor).sub_(offset).sigmoid_()


def _with_sign_of(x: Tensor, theta: Tensor) -> Tensor:
    """x·sign(θ) for x ≥ 0, in place: copysign, then 0 where θ = ±0 as sign(0) = 0 (softshrink's backward at 0)."""
    if is_compiling():
        return x * torch.sign(theta)
    x.copysign_(theta)
    return torch.ops.aten.softshrink_backward.grad_input(x, theta, 0.0, grad_input=x)


def _sigmoid_slope(x: Tensor, gate: Tensor) -> Tensor:
    """x·h(1 − h) from h = σ(·) in one pass, in place on ``x`` (sigmoid's own backward kernel)."""
    if is_compiling():
        return torch.ops.aten.sigmoid_backward(x, gate)
    return torch.ops.aten.sigmoid_backward.grad_input(x, gate, grad_input=x)


def same_value(temperature: Tensor, t_b: Tensor) -> bool:
    """True when the two temperatures (0-d) are known to be equal, so that one gate serves for both.

    Only read on the CPU, where reading a value costs no device synchronisation, and not under torch.compile, where
    reading it would break the graph: False otherwise.
    """
    return temperature.device.type == "cpu" and not is_compiling() and bool(temperature == t_b)


def _chunked(theta: Tensor, *others: Tensor) -> bool:
    return (
        theta.device.type == "cpu"
        and theta.dtype == torch.float32
        and theta.numel() > CPU_CHUNK
        and not is_compiling()
        and theta.is_contiguous()
        and all(o.dtype == theta.dtype and o.shape == theta.shape and o.is_contiguous() for o in others)
    )


def _spans(n: int) -> list[tuple[int, int]]:
    return [(i, min(n, i + CPU_CHUNK)) for i in range(0, n, CPU_CHUNK)]
