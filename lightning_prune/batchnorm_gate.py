"""Channel masks on BatchNorm layers: the gate of a masked ``γ`` also multiplies ``β``, so a removed channel outputs 0.

In ``structure="channels"`` the budget masks BatchNorm scales: ``γ_c ← γ_c·h_T(γ_c)`` through
:class:`~lightning_prune.magnitude_mask.MagnitudeMask`. A channel is gone only when its whole output is 0, so its
shift must go with it: a forward hook replaces ``β_c`` with ``β_c·h_T(γ_c)`` (the gate without its gradient; ``β``
keeps its own). With the gate at 0 the channel outputs exactly 0, and after any activation with ``f(0) = 0`` (ReLU,
GELU, SiLU, hard-swish) the next layer reads nothing from it: :mod:`~lightning_prune.channel_removal` removes it
without changing the network's outputs.

Channels joined by a residual addition or a depthwise convolution live in several BatchNorm layers: one of them, the
leader, holds the mask, and each other layer of the group (a follower) multiplies its output by the leader's gate
(:class:`FollowGate`), so a removed channel is 0 in every layer that holds it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_prune.magnitude_mask import MagnitudeMask


def is_channel_mask(module: nn.Module, param_name: str) -> bool:
    """Whether a mask on ``module.<param_name>`` masks channels: the scale ``γ`` of an affine BatchNorm layer."""
    return isinstance(module, _BatchNorm) and param_name == "weight"


def channel_gate(module: _BatchNorm) -> Tensor:
    """The gate in use on ``module``'s channels (``h_T(γ)``, or the hard mask), without its gradient."""
    return _mask(module).gate_values(module.parametrizations.weight.original)


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


class FollowGate:
    """Forward hook of a BatchNorm layer whose channels are joined to ``leader``'s (a residual addition, a depthwise
    convolution): the layer's output is multiplied by the leader's gate, without its gradient, so a channel the leader
    removes is 0 here too.

    Args:
        leader: the BatchNorm layer whose scale ``γ`` holds the channel mask of the group.
    """

    def __init__(self, leader: _BatchNorm) -> None:
        self.leader = leader

    def __call__(self, module: _BatchNorm, args, output: Tensor) -> Tensor:
        gate = channel_gate(self.leader).to(output.dtype)
        return output * gate.view(1, -1, *([1] * (output.dim() - 2)))


def follow_gate(follower: _BatchNorm, leader: _BatchNorm) -> None:
    """Let ``leader``'s channel gate also multiply ``follower``'s output (once)."""
    if not any(isinstance(hook, FollowGate) for hook in follower._forward_hooks.values()):
        follower.register_forward_hook(FollowGate(leader))


def record_joined(mask: MagnitudeMask, names: Sequence[str]) -> None:
    """Keep the names of the layers that follow ``mask``'s gate in the mask's state (buffer ``joined``, UTF-8 JSON), so
    that any state_dict of the model says which layers to join again (weights-only checkpoints included)."""
    data = encode_joined(names).to(mask.kept.device)
    if isinstance(getattr(mask, "joined", None), Tensor) and torch.equal(mask.joined.cpu(), data.cpu()):
        return
    mask.register_buffer("joined", data)


def encode_joined(names: Sequence[str]) -> Tensor:
    """The ``joined`` buffer of a leader's mask: the names as UTF-8 JSON bytes."""
    return torch.tensor(list(json.dumps(list(names)).encode()), dtype=torch.uint8)


def joined_names(data: Tensor) -> list[str]:
    """The layer names a ``joined`` buffer (:func:`record_joined`) holds."""
    return json.loads(bytes(data.cpu().tolist()).decode())


def join_layers(model: nn.Module, leader_name: str, names: Sequence[str]) -> None:
    """Let the channel mask of the BatchNorm layer ``leader_name`` gate the layers ``names`` too (once), and record them.

    Raises:
        ValueError: naming the layer, when ``model`` has no such layer (another architecture), before any change.
    """
    leader = model.get_submodule(leader_name)
    for layer in joined_layers(model, leader_name, names):
        follow_gate(layer, leader)
    record_joined(_mask(leader), names)


def joined_layers(model: nn.Module, leader_name: str, names: Sequence[str]) -> list[nn.Module]:
    """The layers ``names`` of ``model``, joined to ``leader_name``'s channels.

    Raises:
        ValueError: naming the layer, when ``model`` has no such layer (another architecture).
    """
    layers = []
    for name in names:
        try:
            layers.append(model.get_submodule(name))
        except AttributeError:
            raise ValueError(
                f"The channels of '{name}' are joined to '{leader_name}' but {type(model).__name__} has no such layer: "
                "the checkpoint comes from another architecture."
            ) from None
    return layers


def _mask(module: _BatchNorm) -> MagnitudeMask:
    return next(p for p in module.parametrizations.weight if isinstance(p, MagnitudeMask))


def followers(model: nn.Module) -> dict[str, nn.Module]:
    """``{follower name: its leader}`` for the BatchNorm layers of ``model`` that follow another's channel gate."""
    found = {}
    for name, module in model.named_modules():
        for hook in module._forward_hooks.values():
            if isinstance(hook, FollowGate):
                found[name] = hook.leader
    return found


@torch.no_grad()
def gated_follower(module: _BatchNorm) -> dict[str, Tensor]:
    """``{"weight": γ ⊙ gate, "bias": β ⊙ gate}`` of a follower: what a plain layer needs to compute the same."""
    hook = next(h for h in module._forward_hooks.values() if isinstance(h, FollowGate))
    gate = channel_gate(hook.leader)
    return {key: getattr(module, key) * gate.to(getattr(module, key).dtype)
            for key in ("weight", "bias") if getattr(module, key, None) is not None}


@torch.no_grad()
def fold_follow_gate(module: _BatchNorm) -> None:
    """Write the leader's gate into a follower's ``γ`` and ``β`` and remove its hook: call before the leader's mask
    is removed."""
    for key, value in gated_follower(module).items():
        getattr(module, key).copy_(value)
    for key in [k for k, hook in module._forward_hooks.items() if isinstance(hook, FollowGate)]:
        del module._forward_hooks[key]


@torch.no_grad()
def clear_removed_channels(model: nn.Module, leader: _BatchNorm, kept: Tensor) -> None:
    """Set to 0 the shift ``β`` of ``leader`` and the ``γ``, ``β`` of the layers that follow it, in the channels not
    ``kept``: what a plain checkpoint of the cut network holds, so that pruning on to another budget starts alike."""
    joined = getattr(_mask(leader), "joined", None)
    layers = [leader] + [model.get_submodule(name) for name in (joined_names(joined) if joined is not None else ())]
    for layer in layers:
        for key in ("weight", "bias") if layer is not leader else ("bias",):
            value = getattr(layer, key, None)
            if value is not None:
                value.mul_(kept.to(value.dtype))
