"""Masked weights computed again in the backward pass instead of kept from the forward pass.

A layer that uses a masked weight ``w = θ ⊙ h(θ)`` saves ``w`` for its backward pass (a convolution needs it for the
gradient of its input): one more weight-sized tensor per layer than the dense network, alive from the forward pass to
the backward pass. With :func:`recompute_masked_weights` the layer saves a note instead (θ, the gate's flags and the
view it took) and the backward pass computes ``w`` again from θ when it needs it: one weight-sized tensor less per
layer, one more pass over the weights per step. It is activation checkpointing for the masked weights alone.

The notes are taken through :class:`torch.autograd.graph.saved_tensors_hooks`, active during the forward pass of each
module that owns a masked weight (nested ones share the outermost), and only while autograd records. Code traced by
``torch.compile``, and code inside other saved-tensor hooks (activation checkpointing, ``save_on_cpu``), keeps the
weights as usual. What autograd checks still holds: a saved tensor changed in place between the passes (θ, the mask's
scale, threshold, temperature or kept mask, or any other tensor the layer saved) makes the backward pass raise; a
masked weight that the layer changed in place before saving it is kept, not noted. A graph retained for a second
backward pass after θ changed (an optimizer step between two ``backward(retain_graph=True)``) raises too. Under
autocast, or with a ``channels_last`` convolution, the layer saves its own cast or reformatted copy of the weight, which
is not recomputed: there the option saves nothing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_prune.magnitude_mask import MagnitudeMask, is_compiling
from lightning_prune.reparametrize import masked_parameters

#: What autograd says when a saved tensor changed before the backward pass; the same words for the tensors saved here.
CHANGED = ("one of the variables needed for gradient computation has been modified by an inplace operation (a {what} "
           "saved in a module whose masked weights are recomputed: recompute_masked_weights)")


def _versions(mask: MagnitudeMask, theta: Tensor) -> tuple[int, ...]:
    """Version counters of everything a masked weight is computed from."""
    return theta._version, mask.scale._version, mask.threshold._version, mask.temperature._version, mask.kept._version


@dataclass(frozen=True)
class _Source:
    """What a masked weight of the forward pass was computed from: θ, the mask, its flags and the versions of both."""

    mask: MagnitudeMask
    theta: Tensor
    hard: bool
    step: bool
    versions: tuple[int, ...]

    def weight(self) -> Tensor:
        if _versions(self.mask, self.theta) != self.versions:
            raise RuntimeError(CHANGED.format(what="masked weight's θ, or its mask's scale, threshold, temperature or "
                                                   "kept mask"))
        # in the backward pass's grad mode: with create_graph=True the weight is part of the graph again
        return self.mask.masked_weight(self.theta, self.hard, self.step)


@dataclass
class _Note:
    """What the backward pass needs to compute a saved view of a masked weight again."""

    source: _Source
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    def weight(self) -> Tensor:
        return self.source.weight().as_strided(self.size, self.stride, self.offset)


@dataclass
class _Kept:
    """Any other saved tensor, detached (autograd re-attaches it on unpacking; holding the tensor itself would keep
    an output and the node that saved it alive through each other), with its version to check as autograd does."""

    tensor: Tensor
    version: int

    def get(self) -> Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError(CHANGED.format(what=f"tensor of shape {tuple(self.tensor.shape)}"))
        return self.tensor


@dataclass
class _Recorder:
    """The masked weights computed in the current forward pass, by storage; they are held until it ends (so that no
    other tensor can take their memory meanwhile)."""

    weights: dict[int, tuple[Tensor, int, _Source]] = field(default_factory=dict)  # (weight, its version, source)

    def pack(self, tensor: Tensor) -> Any:
        weight, version, source = self.weights.get(_storage(tensor), (None, None, None))
        if weight is None or tensor.dtype != weight.dtype or tensor._version != version:
            return _Kept(tensor.detach(), tensor._version)  # not a masked weight, or one changed since
        return _Note(source, tuple(tensor.size()), tuple(tensor.stride()), tensor.storage_offset())

    @staticmethod
    def unpack(saved: Any) -> Tensor:
        return saved.weight() if isinstance(saved, _Note) else saved.get()


def _storage(tensor: Tensor) -> int | None:
    """The address of a dense tensor's memory; None for tensors without one (sparse, nested, meta)."""
    if tensor.layout != torch.strided or tensor.is_nested or tensor.device.type == "meta":
        return None
    try:
        return tensor.untyped_storage().data_ptr()
    except (NotImplementedError, RuntimeError):  # tensor subclasses without a storage
        return None


class _Scope(threading.local):
    depth = 0
    recorder: _Recorder | None = None
    hooks: torch.autograd.graph.saved_tensors_hooks | None = None


_scope = _Scope()


def _enter(module: nn.Module, args: Any) -> None:
    if is_compiling():
        return
    _scope.depth += 1
    if _scope.depth == 1 and torch.is_grad_enabled() and _no_other_hooks() and not torch._C._get_tracing_state():
        _scope.recorder = _Recorder()
        _scope.hooks = torch.autograd.graph.saved_tensors_hooks(_scope.recorder.pack, _Recorder.unpack)
        _scope.hooks.__enter__()


def _no_other_hooks() -> bool:
    """Saved-tensor hooks are allowed here and no other code has set any (activation checkpointing, ``save_on_cpu``):
    those decide what their region keeps."""
    return (torch._C._autograd._saved_tensors_hooks_is_enabled()
            and torch._C._autograd._top_saved_tensors_default_hooks(False) is None)


def _exit(module: nn.Module, args: Any, output: Any) -> None:
    if is_compiling() or _scope.depth == 0:
        return
    _scope.depth -= 1
    if _scope.depth == 0 and _scope.hooks is not None:
        _scope.hooks.__exit__(None, None, None)
        _scope.recorder.weights.clear()  # each saved tensor holds the hooks: let the weights go now
        _scope.hooks = _scope.recorder = None


def _record(mask: MagnitudeMask, args: tuple[Tensor], weight: Tensor) -> None:
    recorder = _scope.recorder
    if recorder is None or is_compiling() or not weight.requires_grad:
        return
    address = _storage(weight)
    whole = address is not None and weight.is_contiguous() and weight.storage_offset() == 0
    if whole and weight.untyped_storage().nbytes() == weight.numel() * weight.element_size():
        theta = args[0]
        source = _Source(mask, theta, mask.is_hard, mask.step_gate, _versions(mask, theta))
        recorder.weights[address] = (weight, weight._version, source)


def recompute_masked_weights(model: nn.Module) -> list[RemovableHandle]:
    """Let the layers of ``model`` that use a masked weight save a note of it, and its backward pass compute it again.

    Args:
        model: a module reparametrized by :func:`~lightning_prune.reparametrize` (or the channel budget).

    Returns:
        The hooks' handles: ``handle.remove()`` on each turns it off.

    Example:
        >>> import torch
        >>> from lightning_prune import reparametrize
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> _ = reparametrize(model)
        >>> handles = recompute_masked_weights(model)
        >>> model(torch.randn(4, 8)).sum().backward()
        >>> model[0].parametrizations.weight.original.grad.shape
        torch.Size([8, 8])
        >>> for handle in handles:
        ...     handle.remove()
    """
    owners: dict[int, tuple[nn.Module, list[MagnitudeMask]]] = {}
    for p in masked_parameters(model):
        owners.setdefault(id(p.module), (p.module, []))[1].append(p.mask)
    handles: list[RemovableHandle] = []
    for module, masks in owners.values():
        if _enter in module._forward_pre_hooks.values():  # hooked already
            continue
        handles.append(module.register_forward_pre_hook(_enter))
        handles.append(module.register_forward_hook(_exit, always_call=True))
        handles.extend(mask.register_forward_hook(_record) for mask in masks)
    return handles
