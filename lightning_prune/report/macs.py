"""Multiply-accumulates (MACs) per input sample of each masked tensor, counted with forward hooks on one input.

A tensor of ``n`` weights applied at ``p`` positions of one sample (output pixels of a convolution, tokens of a
linear layer) costs ``p·n`` MACs dense and ``p·kept`` pruned. ``p`` is read from the tensors its module sees on a
batch of one zero input:

* ``weight`` of ``nn.Linear``, ``nn.Conv1d/2d/3d`` and Hugging Face's ``Conv1D`` (``x @ W``, ``W`` of shape
  ``(in, out)``): output elements per output feature or channel;
* ``nn.MultiheadAttention``: ``in_proj_weight`` on the query's tokens when the key has as many (self-attention;
  otherwise ``None``), ``q_proj_weight`` on the query's tokens, ``k_proj_weight``/``v_proj_weight`` on the key's, and
  ``out_proj.weight`` on the query's (the attention calls its output projection's weight directly, not the module).

Any other tensor gets ``None``: a figure the report cannot infer is left out rather than guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_prune.report.errors import ReportError
from lightning_prune.report.table import TensorRow

#: Module types whose ``weight`` MACs the report counts from the module's output.
MAC_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

# positions of one call of a module, from (module, args, kwargs, output); None: not countable for this call
_Counter = Callable[[nn.Module, tuple, dict, Any], "int | None"]


def count_macs(rows: list[TensorRow], model: nn.Module, input_size: tuple[int, ...]) -> None:
    """Fill ``kind``, ``dense_macs`` and ``pruned_macs`` of each row from one forward of ``model``.

    Raises:
        ReportError: if ``model`` has no tensor of a row's name and shape, or its forward fails on one input of
            ``input_size``.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 2))
        >>> rows = [TensorRow("0.weight", "", (2, 1, 3, 3), 18, 9), TensorRow("2.weight", "", (2, 8), 16, 4)]
        >>> count_macs(rows, net, (1, 4, 4))
        >>> [(r.kind, r.dense_macs, r.pruned_macs) for r in rows]  # the conv: 2x2 positions
        [('Conv2d', 72, 36), ('Linear', 16, 4)]
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    _check_tensors(rows, model, modules)
    positions: dict[str, int | None] = {}
    handles = []
    for row in rows:
        module = modules[row.module_name]
        row.kind = parametrize.type_before_parametrizations(module).__name__
        rule = _rule(row, module, modules)
        if rule is None:
            continue
        hooked, counter = rule
        positions[row.name] = 0

        def hook(m: nn.Module, args: tuple, kwargs: dict, output: Any, name: str = row.name, count=counter) -> None:
            found = count(m, args, kwargs, output)
            seen = positions[name]
            positions[name] = None if found is None or seen is None else seen + found

        handles.append(hooked.register_forward_hook(hook, with_kwargs=True))
    _run(model, input_size, positions, handles)
    for row in rows:
        p = positions.get(row.name)
        row.dense_macs, row.pruned_macs = (p * row.weights, p * row.kept) if p else (None, None)


def _check_tensors(rows: list[TensorRow], model: nn.Module, modules: dict[str, nn.Module]) -> None:
    for row in rows:
        module = modules.get(row.module_name)
        tensor = getattr(module, row.param_name, None) if module is not None else None
        if not isinstance(tensor, Tensor):
            raise ReportError(
                f"the model {type(model).__name__} has no tensor '{row.name}': the file comes from another "
                "architecture (check --model and --model-args)."
            )
        if tuple(tensor.shape) != row.shape:
            raise ReportError(
                f"'{row.name}' has shape {tuple(tensor.shape)} in the model but {row.shape} in the file (check "
                "--model-args)."
            )


def _rule(row: TensorRow, module: nn.Module, modules: dict[str, nn.Module]) -> tuple[nn.Module, _Counter] | None:
    """The module to hook for a row's positions, and how to read them from one of its calls."""
    parent_name, _, own_name = row.module_name.rpartition(".")
    parent = modules.get(parent_name) if row.module_name else None
    if isinstance(parent, nn.MultiheadAttention) and own_name == "out_proj" and row.param_name == "weight":
        return parent, lambda m, args, kwargs, out: _tokens(m, args, kwargs, "query")
    if isinstance(module, nn.MultiheadAttention):
        return {
            "in_proj_weight": (module, _self_attention_tokens),
            "q_proj_weight": (module, lambda m, args, kwargs, out: _tokens(m, args, kwargs, "query")),
            "k_proj_weight": (module, lambda m, args, kwargs, out: _tokens(m, args, kwargs, "key")),
            "v_proj_weight": (module, lambda m, args, kwargs, out: _tokens(m, args, kwargs, "value")),
        }.get(row.param_name)
    if row.param_name != "weight":
        return None
    if isinstance(module, MAC_LAYER_TYPES):  # output (..., out_features) or (N, out_channels, *spatial)
        return module, lambda m, args, kwargs, out: _per_feature(out, row.shape[0])
    if _is_hf_conv1d(module, row.shape):  # x @ W with W of shape (in, out): output (..., out)
        return module, lambda m, args, kwargs, out: _per_feature(out, row.shape[1])
    return None


def _is_hf_conv1d(module: nn.Module, shape: tuple[int, ...]) -> bool:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D``, ``weight`` of shape ``(nx, nf)`` (recognised without
    importing transformers)."""
    return (
        parametrize.type_before_parametrizations(module).__name__ == "Conv1D"
        and (getattr(module, "nx", None), getattr(module, "nf", None)) == shape
    )


def _per_feature(output: Any, features: int) -> int | None:
    return output.numel() // features if isinstance(output, Tensor) and features else None


def _tokens(module: nn.Module, args: tuple, kwargs: dict, which: str) -> int | None:
    """Tokens of one sample in the attention's ``query``, ``key`` or ``value`` (the batch is one sample)."""
    index = ("query", "key", "value").index(which)
    tensor = args[index] if len(args) > index else kwargs.get(which)
    width = {"query": module.embed_dim, "key": module.kdim, "value": module.vdim}[which]
    return tensor.numel() // width if isinstance(tensor, Tensor) and not tensor.is_nested else None


def _self_attention_tokens(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> int | None:
    """``in_proj_weight`` projects the query, key and value: one position count fits only when they have as many
    tokens."""
    counts = {_tokens(module, args, kwargs, which) for which in ("query", "key", "value")}
    return counts.pop() if len(counts) == 1 else None


@torch.no_grad()
def _run(model: nn.Module, input_size: tuple[int, ...], positions: dict[str, int | None], handles: list) -> None:
    """One forward of ``model`` on a batch of one zero input (floating, else token ids for a model that starts with
    an embedding), in eval mode; the hooks are removed afterwards. (The hooks also keep ``nn.TransformerEncoderLayer``
    off its fast path, which would skip its submodules' forward.)"""
    was_training = model.training
    parameter = next(iter(model.parameters()), None)
    floating = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    device = parameter.device if parameter is not None else torch.device("cpu")
    model.eval()
    errors = []
    try:
        for dtype in (floating, torch.long):
            positions.update(dict.fromkeys(positions, 0))  # what a failed attempt counted
            try:
                model(torch.zeros((1, *input_size), dtype=dtype, device=device))
                return
            except Exception as err:  # noqa: BLE001 - any failure of the user's forward means a wrong input
                errors.append(err)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    err, size = errors[0], "x".join(str(d) for d in input_size)
    raise ReportError(
        f"the forward of {type(model).__name__} on one input of size {size} failed ({type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}); pass the size one sample has, e.g. --input-size 1 16 16."
    )
