"""Which channels can be removed: a BatchNorm layer's channels, alone or with the layers joined to them, found
with Torch-Pruning's dependency graph, and masking them (``structure="channels"``).

A channel ``c`` can go when every layer that computes it (a convolution or linear layer followed by a BatchNorm
layer) and every layer that reads it (through activations, pooling, flattening, additions) can drop it. Most channels
live in one BatchNorm layer; some live in several, which go together: an expansion's and the depthwise convolution's
after it (MobileNet), or, with ``residual_streams=True``, a residual stream's (each block's last BatchNorm and the
shortcut's). The first of them (the leader) holds the mask, the others follow its gate
(:class:`~lightning_prune.batchnorm_gate.FollowGate`) and the budget counts the group's channels once. A
squeeze-excitation block's scale goes with the channel it multiplies. Channels that a LayerNorm, a concatenation
into a BatchNorm, a grouped convolution, or a layer adding into them with no BatchNorm after it carries on stay.
`Torch-Pruning <https://github.com/VainF/Torch-Pruning>`_'s ``DependencyGraph`` traces the network once (an example
input through autograd) and lists, for a channel, every layer that holds it; it also performs the removal
(:mod:`~lightning_prune.channel_removal`). It handles torchvision, timm and user models alike, where rules written
for our own backbones would not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_prune.batchnorm_gate import join_layers
from lightning_prune.magnitude_mask import MagnitudeMask
from lightning_prune.reparametrize import _matches, register_mask

#: What the budget removes: single weights (the paper) or whole channels.
Structure = Literal["weights", "channels"]
#: Channels start with the score ``|γ|/s = 1/CHANNEL_SCALE`` (the gate open at ``σ(1/T)``): ``s = CHANNEL_SCALE·mean|γ|``.
CHANNEL_SCALE = 0.5


def torch_pruning() -> Any:
    """The ``torch_pruning`` module, or an ImportError that says how to install it."""
    try:
        import torch_pruning
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise ImportError(
            "structure='channels' finds which channels go together with Torch-Pruning: pip install torch-pruning."
        ) from err
    return torch_pruning


@dataclass
class ChannelGroups:
    """The BatchNorm layers whose channels can be removed, the layers joined to them, and why the others cannot."""

    removable: dict[str, int] = field(default_factory=dict)  #: layer name (a group's leader) → channels
    joined: dict[str, list[str]] = field(default_factory=dict)  #: leader → the layers whose channels go with its own
    kept_whole: dict[str, str] = field(default_factory=dict)  #: layer name → why its channels stay

    def summary(self) -> str:
        channels = sum(self.removable.values())
        layers = len(self.removable) + sum(len(v) for v in self.joined.values())
        text = f"the channel budget covers {layers} BatchNorm layer{'s' if layers != 1 else ''}, {channels:,} channels"
        if self.joined:
            groups = f"{len(self.joined)} group{'s' if len(self.joined) > 1 else ''}"
            text += f" ({groups} of joined layers counted once)"
        if self.kept_whole:
            first = next(iter(self.kept_whole.items()))
            text += f"; {len(self.kept_whole)} layers keep all their channels (e.g. {first[0]}: {first[1]})"
        return text


def dependency_graph(model: nn.Module, example_input: Any):
    """Torch-Pruning's ``DependencyGraph`` of ``model``, traced in eval mode (running statistics untouched)."""
    tp = torch_pruning()
    training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    except Exception as err:  # Torch-Pruning's own failures (a reshape it cannot follow, a channel shuffle)
        raise ValueError(
            f"Torch-Pruning could not trace {type(model).__name__} to find which channels go together "
            f"({type(err).__name__}: {err}). Use structure='weights' for this network."
        ) from err
    finally:
        model.train(training)


def channel_groups(
    model: nn.Module,
    example_input: Any,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    residual_streams: bool = False,
) -> ChannelGroups:
    """Sort ``model``'s affine BatchNorm layers into groups whose channels can be removed and the others.

    ``include``/``exclude`` match layer names: a group is in when ``include`` matches one of its layers (or is
    empty) and ``exclude`` none. The channels of a residual stream (joined by an addition) are in only with
    ``residual_streams``.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...                             torch.nn.Conv2d(8, 4, 3), torch.nn.BatchNorm2d(4))
        >>> groups = channel_groups(model, torch.randn(1, 3, 8, 8))
        >>> groups.removable, list(groups.kept_whole)
        ({'1': 8}, ['4'])
    """
    tp = torch_pruning()
    graph = dependency_graph(model, example_input)
    names = {module: name for name, module in model.named_modules()}
    found, seen = ChannelGroups(), set()
    for name, module in model.named_modules():
        if not isinstance(module, _BatchNorm) or not module.affine or name in seen:
            continue
        channels = list(range(module.num_features))
        group = graph.get_pruning_group(module, tp.prune_batchnorm_out_channels, idxs=channels)
        members = [name] + [names[m] for m in _norms(group) if m is not module and m in names]
        seen.update(members)
        if include and not any(_matches(p, (m, m)) for p in include for m in members):
            continue
        excluded = [m for m in members if any(_matches(p, (m, m)) for p in exclude or ())]
        if excluded:
            for m in members:
                if m not in excluded:
                    found.kept_whole[m] = f"joined to {excluded[0]}, which exclude names"
            continue
        why = _why_kept_whole(group, channels, residual_streams)
        if why:
            found.kept_whole.update(dict.fromkeys(members, why))
            continue
        found.removable[name] = module.num_features
        if len(members) > 1:
            found.joined[name] = members[1:]
    return found


#: Layers that normalise channels: a group holding one of them is joined through it.
NORMS = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _norms(group) -> list[nn.Module]:
    return [dep.target.module for dep, _ in group if isinstance(dep.target.module, NORMS)]


def _why_kept_whole(group, channels: list[int], residual_streams: bool) -> str:
    """Why the channels of a group cannot go ("" when they can)."""
    norms, producers, readers, gates, operations = [], [], 0, set(), set()
    for dep, idxs in group:
        module, handler = dep.target.module, dep.handler
        operation = _operation(dep.target)
        operations.add(operation)
        if isinstance(module, (nn.Sigmoid, nn.Hardsigmoid)) or operation in SCALE_GATES:
            role = _sigmoid_role(dep.target)
            if not role:
                return "a sigmoid reads its channels (σ(0) != 0: a removed channel would not be 0)"
            if role == "scale":
                gates.add(id(dep.target))
        elif isinstance(module, NORMS):
            if not isinstance(module, _BatchNorm) or not module.affine:
                return f"joined to the channels of a {type(module).__name__} (only BatchNorm scales can be masked)"
            if module.num_features != len(channels) or [int(getattr(i, "idx", i)) for i in idxs] != channels:
                return "joined to other layers' channels by a concatenation"
            norms.append(module)
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            if _handler_is(handler, "out"):
                groups = getattr(module, "groups", 1)
                if groups > 1 and groups != module.out_channels:
                    return "a grouped convolution carries its channels on"
                producers.append(module)
            elif _handler_is(handler, "in"):
                groups = getattr(module, "groups", 1)
                if groups > 1 and groups != module.in_channels:
                    return "a grouped convolution reads its channels"
                readers += 1
        elif isinstance(module, nn.Module) and not _is_passthrough(dep.target):
            return f"{type(module).__name__} reads its channels"
    # a squeeze-excitation block's last layer computes a scale σ(·) per channel, which multiplies the channel: it
    # goes with the channel (the product of a removed channel is 0), and needs no BatchNorm
    scales = len(gates)
    if not len(norms) <= len(producers) <= len(norms) + scales:
        return ("a layer with no BatchNorm after it adds into its channels" if len(producers) > len(norms) else
                "no convolution or linear layer computes its channels")
    if not readers:
        return "no convolution or linear layer reads its channels (the network's output)"
    if "AddBackward0" in operations and not residual_streams:
        return "a residual stream (residual_streams=True removes its channels from every layer that adds into it)"
    return ""


#: Autograd operations of a squeeze-excitation gate (a scale in (0, 1) per channel).
SCALE_GATES = ("SigmoidBackward0", "HardsigmoidBackward0")


def _sigmoid_role(node) -> str:
    """``"scale"``: a squeeze-excitation gate (a convolution or linear layer's output through σ, multiplying the
    channels); ``"swish"``: ``y·σ(y)`` (0 for a removed channel); "" otherwise (``σ(0) != 0`` reaches the next layer)."""
    products = [out for out in node.outputs if _operation(out) == "MulBackward0"]
    if not products:
        return ""
    layers = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    if any(isinstance(source.module, layers) for source in node.inputs):
        return "scale"
    sources = {id(source) for source in node.inputs}
    return "swish" if any(id(i) in sources for product in products for i in product.inputs) else ""


def _operation(node) -> str:
    """The autograd operation of a graph node (``"MulBackward0"``), "" when it has none."""
    grad_fn = getattr(node, "grad_fn", None)
    return grad_fn.name() if grad_fn is not None and hasattr(grad_fn, "name") else ""


def _handler_is(handler, side: str) -> bool:
    return f"prune_{side}_channels" in getattr(handler, "__name__", str(handler))


def _is_passthrough(node) -> bool:
    """Torch-Pruning's internal nodes (functional operations, names with ``_``) and modules that keep a zero channel at
    zero; a functional activation with ``f(0) != 0`` is caught by ``remove_channels``' output check."""
    return type(node.module).__name__.startswith("_") or isinstance(
        node.module, (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Dropout, nn.Identity,
                      nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Sequential)
    )


def reparametrize_channels(
    model: nn.Module,
    names: list[str],
    temperature: float = 0.5,
    grad_temperature: float = 0.1,
    joined: dict[str, list[str]] | None = None,
) -> list[str]:
    """Mask the channels of the BatchNorm layers ``names`` (from :func:`channel_groups`): ``γ ← γ·h_T(γ)``, and
    ``β ← β·h_T(γ)``; the layers ``joined[name]`` multiply their outputs by the same gate. Returns the masked tensors'
    names (``"<layer>.weight"``)."""
    attached = []
    for name in names:
        module = model.get_submodule(name)
        masked = isinstance(getattr(module, "parametrizations", None), nn.ModuleDict) and "weight" in module.parametrizations
        if not masked:
            with torch.no_grad():
                scale = CHANNEL_SCALE * float(module.weight.abs().mean())
            if not scale > 0:
                raise ValueError(f"Cannot mask the channels of {name}: its scales γ are all zero.")
            mask = MagnitudeMask(module.weight.shape, scale, 1.0, temperature, grad_temperature).to(module.weight.device)
            register_mask(module, "weight", mask)
            attached.append(f"{name}.weight")
        if (joined or {}).get(name):
            join_layers(model, name, joined[name])
    return attached


def example_batch_input(batch: Any) -> Tensor | None:
    """The network's input in a batch: the batch itself, or the first element of a tuple/list batch."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    return None


def example_input(trainer: Any, pl_module: nn.Module) -> Any:
    """An input of the module, to trace it: its ``example_input_array``, else the first batch of its training data."""
    if getattr(pl_module, "example_input_array", None) is not None:
        return pl_module.example_input_array
    loader = None
    if getattr(trainer, "datamodule", None) is not None:
        loader = trainer.datamodule.train_dataloader()
    else:
        source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
        loader = source.dataloader() if source is not None and source.is_defined() else None
    found = example_batch_input(next(iter(loader))) if loader is not None else None
    if isinstance(found, Tensor):
        found = found[:2].to(next(pl_module.parameters()).device)  # two samples are enough to trace
    if found is None:
        raise ValueError(
            "BudgetCallback: structure='channels' traces the network once to find which channels go together, and "
            "needs an input: set `self.example_input_array` in your LightningModule (one batch of inputs)."
        )
    return found
