"""Elementwise passes over the weights fused into one loop each with ``torch.compile``, and the eager fallback.

The gate's forward and backward passes and the budget step each read and write every covered weight. Written as
torch operations they take 6 to 15 passes over memory each; compiled, one. A function is compiled once per process
(dynamic shapes, on 1-D aliases of the tensors, so one graph serves every weight shape: a few seconds on a CPU).
Where compiling fails (no C++ compiler, no Triton) the eager operations serve, with one warning. Tensors under
:data:`FUSED_MIN_NUMEL` weights, and code that torch.compile is tracing already, use the eager operations.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

#: Tensors of at least this many weights use the fused kernels; smaller ones the eager operations.
FUSED_MIN_NUMEL = 1 << 18

_compiled: dict[Callable, Callable] = {}
_state = {"broken": False}


def use_fused(weight: Tensor) -> bool:
    """Whether the passes over ``weight`` use a fused kernel (large enough, on a CPU or CUDA device, not traced)."""
    return (weight.numel() >= FUSED_MIN_NUMEL and weight.device.type in ("cpu", "cuda") and not _state["broken"]
            and not torch.compiler.is_compiling())


def run_fused(fn: Callable[..., Tensor | None], weight: Tensor, *args) -> Tensor | None:
    """``fn(weight, *args)`` compiled, on 1-D aliases of the tensors shaped like ``weight``; the result in ``weight``'s
    shape (``weight`` itself where ``fn`` returns nothing), or ``None`` where compiling failed (the caller computes it
    eagerly)."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    flat = [_flat(a) if isinstance(a, Tensor) and a.shape == weight.shape and a.dim() else a for a in (weight, *args)]
    try:
        result = _compiled[fn](*flat)
    except Exception as err:  # noqa: BLE001 - any compiler failure: the eager operations compute the same
        _state["broken"] = True
        warnings.warn(f"lightning_prune: the fused kernels could not be compiled ({type(err).__name__}: "
                      f"{str(err)[:200]}); using eager operations (slower, same values).", stacklevel=2)
        return None
    return weight if result is None else result.view(weight.shape)


def run_fused_into(fn: Callable[..., Tensor], weight: Tensor, *args) -> bool:
    """``weight.copy_(fn(weight, *args))`` compiled. A contiguous ``weight`` at a 16-byte aligned address is written in
    the kernel (its 1-D alias shares its memory, and no compiler copies it for alignment): one pass, no copy back, and
    ``weight``'s version counter bumped as an eager write would. Other layouts (channels_last) get ``fn``'s result
    copied in. Returns whether it ran (``False``: compiling failed, the caller computes it eagerly)."""
    if weight.is_contiguous() and weight.data_ptr() % 16 == 0:
        if run_fused(_writer(fn), weight, *args) is None:
            return False
        torch.autograd.graph.increment_version(weight)
        return True
    result = run_fused(fn, weight, *args)
    if result is not None:
        weight.copy_(result)
    return result is not None


def _writer(fn: Callable[..., Tensor]) -> Callable[..., None]:
    """``fn`` that writes its result into its first argument (one function per ``fn``: compiled once)."""
    if fn not in _writers:
        def write(weight: Tensor, *args) -> None:
            weight.copy_(fn(weight, *args))
        _writers[fn] = write
    return _writers[fn]


_writers: dict[Callable, Callable] = {}


def _flat(tensor: Tensor) -> Tensor:
    """A 1-D alias of ``tensor`` (a copy if it is not contiguous) that is not a view: the compiled graph then guards
    on its length only."""
    return torch.ops.aten._unsafe_view(tensor.detach().contiguous(), (-1,))
