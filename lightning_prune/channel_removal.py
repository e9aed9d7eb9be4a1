"""Physical removal of pruned channels: a plain, smaller network that computes what the masked one computes."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_prune.channel_groups import dependency_graph, torch_pruning
from lightning_prune.export import make_permanent
from lightning_prune.reparametrize import masked_parameters

#: Largest |Δ| between the outputs of the masked and the smaller network that :func:`remove_channels` accepts,
#: relative to the outputs' largest magnitude (float32 rounding of sums taken in another order).
REMOVAL_TOLERANCE = 1e-4


@torch.no_grad()
def remove_channels(model: nn.Module, example_input: Any, check: bool = True) -> nn.Module:
    """A copy of ``model`` with its removed channels taken out: each convolution computes only the kept channels,
    each BatchNorm layer holds only theirs, and the layers that read them only their inputs. The result is a plain
    module of the model's own classes (no parametrization, no hook), whose layers have fewer channels.

    Args:
        model: a model whose channel masks were hardened (``BudgetCallback(structure="channels")`` at the end of fit,
            or :func:`lightning_prune.finalize`). Weight masks, if any, are made permanent (their zeros stay).
        example_input: an input the model takes (one batch is enough), to trace it.
        check: compare the outputs of both networks on ``example_input`` in eval mode and raise when they differ
            (a removed channel that an activation with ``f(0) != 0`` turned into a constant).

    Returns:
        The smaller network, in eval mode.

    Example:
        >>> import torch
        >>> from lightning_prune import finalize
        >>> from lightning_prune.channel_groups import reparametrize_channels
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...                             torch.nn.Conv2d(8, 4, 3))
        >>> _ = reparametrize_channels(model, ["1"])
        >>> _ = finalize(model, sparsity=0.5)
        >>> small = remove_channels(model, torch.randn(1, 3, 8, 8))
        >>> small[0].out_channels, small[1].num_features, small[3].in_channels
        (4, 4, 4)
    """
    tp = torch_pruning()
    params = masked_parameters(model)
    soft = [p.name for p in params if not bool(p.mask.hard)]
    if soft:
        raise ValueError(f"{soft} still have soft masks: finalize the model before removing channels.")
    removed = {
        p.name.rpartition(".")[0]: (~p.mask.kept).nonzero().flatten().tolist()
        for p in params
        if isinstance(p.module, _BatchNorm) and p.param_name == "weight"
    }
    if not removed:
        raise ValueError("The model has no channel mask: train it with BudgetCallback(structure='channels').")
    training = model.training
    model.eval()
    try:
        reference = model(example_input) if check else None
        small = make_permanent(model, inplace=False) if params else model
    finally:
        model.train(training)
    small.eval()
    graph = dependency_graph(small, example_input)
    for name, indices in removed.items():
        if indices:
            graph.get_pruning_group(small.get_submodule(name), tp.prune_batchnorm_out_channels, idxs=indices).prune()
    if check:
        _check_same_outputs(reference, small(example_input))
    return small


def _check_same_outputs(reference: Any, output: Any) -> None:
    pairs = list(zip(_tensors(reference), _tensors(output)))
    for expected, got in pairs:
        scale = float(expected.abs().max().clamp_min(1.0))
        gap = float((expected.float() - got.float()).abs().max()) if expected.shape == got.shape else float("inf")
        if gap > REMOVAL_TOLERANCE * scale:
            raise RuntimeError(
                f"The network with its channels removed computes other outputs (max |Δ| {gap:.3g}): a removed "
                "channel still reaches the output, through an activation with f(0) != 0 (sigmoid, softplus) or an "
                "operation Torch-Pruning did not follow. Exclude that layer's BatchNorm from the channel budget."
            )


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return [t for v in getattr(value, "__dict__", {}).values() for t in _tensors(v)]


def macs_and_parameters(model: nn.Module, example_input: Any) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass of ``example_input`` and parameters (Torch-Pruning's counter)."""
    training = model.training
    model.eval()
    try:
        macs, params = torch_pruning().utils.count_ops_and_params(model, example_input)
    finally:
        model.train(training)
    return int(macs), int(params)


def layer_shapes(model: nn.Module) -> dict[str, list[int]]:
    """The weight shape of each convolution, linear and BatchNorm layer: what a smaller network was cut to."""
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, _BatchNorm)
    return {name: list(m.weight.shape) for name, m in model.named_modules() if isinstance(m, kinds) and
            getattr(m, "weight", None) is not None}


def _two_rows(x: Any) -> Any:
    return x.expand(2, *x.shape[1:]).clone() if isinstance(x, Tensor) and x.ndim > 0 and x.shape[0] == 1 else x


def _dynamic_dims(x: Any) -> dict[int, Any] | None:
    """The dimensions of ``x`` the saved program leaves free: the batch, and a token input's sequence length."""
    if not isinstance(x, Tensor) or x.ndim == 0:
        return None
    free = getattr(torch.export.Dim, "AUTO", None)  # torch >= 2.5: export decides; before: named dimensions
    dims = {0: free or torch.export.Dim("batch")}
    if x.ndim == 2 and not x.is_floating_point() and x.shape[1] > 1:
        dims[1] = free or torch.export.Dim("sequence")
    return dims


def save_smaller(model: nn.Module, path: str | os.PathLike, example_input: Any) -> str:
    """Save the smaller network as a ``torch.export`` program (loads without its classes:
    ``torch.export.load(path).module()``), with its layer shapes in ``<path>.shapes.json``. Returns the program's path.

    The program takes any batch size: the first dimension of every tensor input is dynamic, and so is the second of
    an integer input of two dimensions (token ids: the sequence length). Other sizes (an image's) stay those of
    ``example_input``. An example of one row is traced as two (torch specialises a dimension of size 1).
    """
    model.eval()
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    args = tuple(_two_rows(a) for a in args)
    program = torch.export.export(model, args, dynamic_shapes=tuple(_dynamic_dims(a) for a in args))
    torch.export.save(program, path)
    with open(f"{os.fspath(path)}.shapes.json", "w") as f:
        json.dump(layer_shapes(model), f, indent=1)
    return os.fspath(path)
