"""Channel masks on BatchNorm layers: the gate of a masked ``γ`` also multiplies ``β``, so a removed channel outputs 0.

In ``structure="channels"`` the budget masks BatchNorm scales: ``γ_c ← γ_c·h_T(γ_c)`` through
:class:`~lightning_prune.magnitude_mask.MagnitudeMask`. A channel is gone only when its whole output is 0, so its
shift must go with it: a forward hook replaces ``β_c`` with ``β_c·h_T(γ_c)`` (the gate without its gradient; ``β``
keeps its own). With the gate at 0 the channel outputs exactly 0, and after any activation with ``f(0) = 0`` (ReLU,
GELU, SiLU, hard-swish) the next layer reads nothing from it: :mod:`~lightning_prune.channel_removal` removes it
without changing the network's outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_prune.magnitude_mask import MagnitudeMask


def is_channel_mask(module: nn.Module, param_name: str) -> bool:
    """Whether a mask on ``module.<param_name>`` masks channels: the scale ``γ`` of an affine BatchNorm layer."""
    return isinstance(module, _BatchNorm) and param_name == "weight"


def channel_gate(module: _BatchNorm) -> Tensor:
    """The gate in use on ``module``'s channels (``h_T(γ)``, or the hard mask), without its gradient."""
    mask = next(p for p in module.parametrizations.weight if isinstance(p, MagnitudeMask))
    return mask.gate_values(module.parametrizations.weight.original)


def _gate_shift(module: _BatchNorm, args, output: Tensor) -> Tensor:
    if module.bias is None:
        return output
    shift = module.bias * (1 - channel_gate(module).to(module.bias.dtype))
    return output - shift.to(output.dtype).view(1, -1, *([1] * (output.dim() - 2)))


def gate_batchnorm_shift(module: _BatchNorm) -> None:
    """Let the channel gate on ``module.weight`` also multiply ``module.bias`` (once)."""
    if _gate_shift not in module._forward_hooks.values():
        module.register_forward_hook(_gate_shift)


@torch.no_grad()
def gated_shift(module: _BatchNorm) -> Tensor | None:
    """``β ⊙ gate``: the shift the layer uses (what a plain layer needs to compute the same)."""
    return None if module.bias is None else module.bias * channel_gate(module).to(module.bias.dtype)


@torch.no_grad()
def fold_batchnorm_shift(module: _BatchNorm) -> None:
    """Write ``β ⊙ gate`` into ``β`` and remove the hook: call before the mask on ``γ`` is removed."""
    if module.bias is not None:
        module.bias.copy_(gated_shift(module))
    for key in [k for k, hook in module._forward_hooks.items() if hook is _gate_shift]:
        del module._forward_hooks[key]
