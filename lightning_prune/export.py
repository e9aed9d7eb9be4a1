"""Export of the pruned network: a plain module, and a compact file whose size scales with the kept share."""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_prune.batchnorm_gate import fold_batchnorm_shift, fold_follow_gate, followers, is_channel_mask
from lightning_prune.reparametrize import detach_recurrent_weights, masked_parameters

COMPACT_FORMAT = "lightning_prune.compact/1"


def make_permanent(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Remove the parametrizations: each weight becomes the plain tensor ``θ ⊙ M``.

    The result is an ordinary module of the original class: its ``state_dict`` loads with ``strict=True`` into a
    freshly built backbone and it computes exactly what the finalised network computed.

    Args:
        model: a model whose masks were hardened by :func:`lightning_prune.finalize` (or ``BudgetCallback``).
        inplace: modify ``model`` itself (default) or a deep copy of it.

    Raises:
        ValueError: if the model is not reparametrized, or was never finalised (its masks are still soft).

    Example:
        >>> import torch
        >>> from lightning_prune import finalize, reparametrize
        >>> model = torch.nn.Sequential(torch.nn.Linear(10, 10))
        >>> _ = reparametrize(model)
        >>> _ = finalize(model, sparsity=0.9)
        >>> plain = make_permanent(model)
        >>> int((plain[0].weight != 0).sum())
        10
    """
    params = masked_parameters(model)
    if not params:
        raise ValueError("The model has no reparametrized tensor: there is nothing to make permanent.")
    soft = [p.name for p in params if not bool(p.mask.hard)]
    if soft:
        raise ValueError(
            f"{soft} still have soft masks: call lightning_prune.finalize(model, sparsity) "
            "(BudgetCallback does it at the end of fit) before exporting."
        )
    if not inplace:
        detach_recurrent_weights(model)
        model = copy.deepcopy(model)
    for name in followers(model):  # joined channels: the leader's gate into γ and β, while its mask gives the gate
        fold_follow_gate(model.get_submodule(name))
    owned = set()
    for p in masked_parameters(model):
        if not inplace and id(p.module) not in owned:
            _own_class(p.module)
            owned.add(id(p.module))
        if is_channel_mask(p.module, p.param_name):
            fold_batchnorm_shift(p.module)  # β ⊙ gate into β, while the mask still gives the gate
        parametrize.remove_parametrizations(p.module, p.param_name, leave_parametrized=True)
    return model


def _own_class(module: nn.Module) -> None:
    """Give a deep-copied parametrized module a class of its own.

    A deep copy shares the ``Parametrized<Class>`` class that torch created for the original, and
    ``remove_parametrizations`` deletes the weight property from that class, which would break the original.
    """
    cls = type(module)
    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))


def save_pruned(model: nn.Module, path: str | os.PathLike) -> None:
    """Save ``model``'s weights compactly: tensors that are mostly zeros as a bitmask plus their non-zero values.

    A finalised reparametrized model is made permanent on a copy first. A tensor is stored sparse only when that
    is smaller (``numel/8 + nnz·itemsize`` bytes against ``numel·itemsize``), so the file size scales with the kept
    share. :func:`load_pruned` reads it back.

    Example:
        >>> import os, tempfile, torch
        >>> from lightning_prune import finalize, reparametrize
        >>> model = torch.nn.Sequential(torch.nn.Linear(100, 100))
        >>> _ = reparametrize(model)
        >>> _ = finalize(model, sparsity=0.95)
        >>> path = os.path.join(tempfile.mkdtemp(), "pruned.pt")
        >>> save_pruned(model, path)
        >>> state = load_pruned(path)
        >>> int((state["0.weight"] != 0).sum())
        500
    """
    if masked_parameters(model):
        model = make_permanent(model, inplace=False)
    dense: dict[str, Tensor] = {}
    sparse: dict[str, dict[str, Any]] = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        nonzero = tensor != 0
        nnz = int(nonzero.sum())
        if tensor.is_floating_point() and tensor.numel() // 8 + nnz * tensor.element_size() < tensor.nbytes:
            bits = np.packbits(nonzero.flatten().numpy())
            sparse[key] = {
                "shape": tuple(tensor.shape),
                "bitmask": torch.from_numpy(bits),
                "values": tensor[nonzero].clone(),
            }
        else:
            dense[key] = tensor.clone()
    torch.save({"format": COMPACT_FORMAT, "class": type(model).__name__, "dense": dense, "sparse": sparse}, path)


def load_pruned(path: str | os.PathLike, model: nn.Module | None = None) -> dict[str, Tensor]:
    """Read a file written by :func:`save_pruned` back into a dense ``state_dict`` (and into ``model``, strictly).

    Raises:
        ValueError: if the file was not written by :func:`save_pruned`.
    """
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != COMPACT_FORMAT:
        raise ValueError(f"{os.fspath(path)} is not a compact pruned file written by lightning_prune.save_pruned.")
    state = dict(payload["dense"])
    for key, entry in payload["sparse"].items():
        shape = tuple(entry["shape"])
        numel = int(np.prod(shape)) if shape else 1
        bits = np.unpackbits(entry["bitmask"].numpy(), count=numel).astype(bool)
        tensor = torch.zeros(numel, dtype=entry["values"].dtype)
        tensor[torch.from_numpy(bits)] = entry["values"]
        state[key] = tensor.view(shape)
    if model is not None:
        model.load_state_dict(state, strict=True)
    return state
