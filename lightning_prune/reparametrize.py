"""Attach :class:`MagnitudeMask` to the prunable weights of any torch model, and find them again."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_prune.magnitude_mask import MagnitudeMask

#: Module types whose ``weight`` is pruned by default.
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

_LATENT_SUFFIX = ".parametrizations.weight.original"
_COMPILED = "_orig_mod"  # torch.compile's wrapper holds the module under this name, which enters the keys


@dataclass(frozen=True)
class PrunedLayer:
    """One reparametrized weight: the module's qualified name, the module, and its mask."""

    name: str
    module: nn.Module
    mask: MagnitudeMask

    @property
    def latent(self) -> Tensor:
        """The trained latent tensor θ (a ``torch.nn.Parameter``)."""
        return self.module.parametrizations.weight.original

    @property
    def numel(self) -> int:
        return self.latent.numel()


def pruned_layers(model: nn.Module) -> list[PrunedLayer]:
    """The reparametrized weights of ``model``, in module order.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> _ = reparametrize(model)
        >>> [layer.name for layer in pruned_layers(model)]
        ['0', '2']
    """
    layers = []
    for name, module in model.named_modules():
        mask = _mask_of(module)
        if mask is not None:
            layers.append(PrunedLayer(name, module, mask))
    return layers


def is_reparametrized(model: nn.Module) -> bool:
    """True when at least one weight of ``model`` carries a :class:`MagnitudeMask`."""
    return any(_mask_of(m) is not None for m in model.modules())


def prunable_modules(
    model: nn.Module, layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES
) -> dict[str, nn.Module]:
    """The modules of ``model`` that :func:`reparametrize` can prune: of ``layer_types``, with a tensor ``weight``."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, tuple(layer_types)) and isinstance(getattr(module, "weight", None), Tensor)
    }


def reparametrize(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    threshold: float = 1.0,
    temperature: float = 0.5,
    grad_temperature: float = 0.1,
    preserve_scale: bool = True,
    layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES,
    compile_gate: bool = False,
) -> list[str]:
    """Reparametrize the ``weight`` of every prunable layer of ``model`` in place: ``w = θ ⊙ σ((|θ|/s − c)/T)``.

    The trained parameter stays the same ``nn.Parameter`` object (now ``module.parametrizations.weight.original``),
    so the parameter count is unchanged and no trainable parameter is added. A layer that already carries a
    :class:`MagnitudeMask` is left alone: calling this twice never wraps a weight twice.

    Args:
        model: any ``nn.Module``.
        include: module-name patterns to prune (default: every layer of ``layer_types``). A pattern is a glob
            (``"features.*"``) or, prefixed with ``re:``, a regular expression matched in full (``"re:layer[34]\\..*"``).
        exclude: module-name patterns to leave dense (same syntax), applied after ``include``.
        threshold: normalised threshold ``c``, shared by all layers.
        temperature: initial temperature ``T`` (the callback's ``temperature_start``).
        grad_temperature: floor on the temperature of the backward pass (bounds the gradient near the threshold).
        preserve_scale: rescale θ and ``s`` together so that the effective weight θ·h has the standard deviation
            the backbone's initialisation intended (without it, half the weights start gated off and a deep network
            without batch norm may not learn).
        layer_types: module types whose ``weight`` is prunable.
        compile_gate: run the masks' forward and backward as fused kernels compiled by torch.compile (see
            :mod:`lightning_prune.compiled_gate`): faster, needs a C++ compiler on the CPU or Triton on a GPU.

    Returns:
        The names of the modules reparametrized by this call (empty when all were already).

    Raises:
        ValueError: if nothing is prunable, or a pattern matches no prunable layer (the message lists the names).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> before = sum(p.numel() for p in model.parameters())
        >>> reparametrize(model, exclude=["2"])
        ['0']
        >>> sum(p.numel() for p in model.parameters()) == before
        True
    """
    candidates = prunable_modules(model, layer_types)
    if not candidates:
        kinds = ", ".join(t.__name__ for t in layer_types)
        raise ValueError(
            f"{type(model).__name__} has no prunable layer (no module of type {kinds} with a weight). "
            "Pass `layer_types` with the module types to prune."
        )
    chosen = _select(candidates, include, exclude)
    attached = []
    for name in chosen:
        module = candidates[name]
        if _mask_of(module) is not None:
            continue
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(
                f"{name}.weight already has another parametrization ({module.parametrizations.weight}); "
                "remove it or exclude the layer."
            )
        _attach(module, threshold, temperature, grad_temperature, preserve_scale)
        _mask_of(module).compile_gate = compile_gate
        attached.append(name)
    return attached


def reparametrize_like(model: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Attach masks to the layers of ``model`` that are reparametrized in ``state_dict``, so it loads with strict=True.

    Use it to load a checkpoint of a reparametrized model into a freshly built one.

    Example:
        >>> import torch
        >>> trained = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> _ = reparametrize(trained)
        >>> fresh = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> reparametrize_like(fresh, trained.state_dict())
        ['0']
        >>> fresh.load_state_dict(trained.state_dict(), strict=True)
        <All keys matched successfully>
    """
    modules = dict(model.named_modules())
    attached = []
    for key, value in state_dict.items():
        if not key.endswith(_LATENT_SUFFIX):
            continue
        name = key[: -len(_LATENT_SUFFIX)]
        module = modules.get(name)
        if module is None or not isinstance(getattr(module, "weight", None), Tensor):
            if any(_COMPILED in n.split(".") for n in (name, *modules)):
                raise ValueError(
                    f"The state_dict reparametrizes '{name}.weight' but the model has no such weight: one of the two "
                    "comes from a torch.compile'd module, whose keys contain '_orig_mod.'. Compile the model the same "
                    "way before loading, or add/remove '_orig_mod.' in the state_dict's keys."
                )
            raise ValueError(
                f"The state_dict reparametrizes '{name}.weight' but the model has no such weight: "
                "it comes from another architecture."
            )
        masked = _mask_of(module) is not None
        shape = tuple((module.parametrizations.weight.original if masked else module.weight).shape)
        if shape != tuple(value.shape):
            raise ValueError(
                f"'{name}.weight' has shape {shape} in the model but {tuple(value.shape)} "
                "in the state_dict: the checkpoint comes from another model."
            )
        if masked:
            continue
        mask = MagnitudeMask(module.weight.shape, scale=1.0)
        parametrize.register_parametrization(module, "weight", mask, unsafe=True)
        attached.append(name)
    return attached


def _attach(module: nn.Module, threshold: float, temperature: float, grad_temperature: float, rescale: bool) -> None:
    weight = module.weight
    with torch.no_grad():
        scale = weight.abs().mean().item()
        if not scale > 0 or not torch.isfinite(weight).all():
            raise ValueError(f"Cannot reparametrize a weight that is all zeros or not finite ({type(module).__name__}).")
        mask = MagnitudeMask(weight.shape, scale, threshold, temperature, grad_temperature).to(weight.device)
        if rescale:
            effective = weight * mask.soft_gate(weight)
            factor = (weight.std() / effective.std().clamp_min(1e-12)).item()
            weight.mul_(factor)
            mask.scale.mul_(factor)
    parametrize.register_parametrization(module, "weight", mask, unsafe=True)


def _mask_of(module: nn.Module) -> MagnitudeMask | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:
        if isinstance(p, MagnitudeMask):
            return p
    return None


def _compile(pattern: str) -> re.Pattern[str]:
    if pattern.startswith("re:"):
        return re.compile(pattern[3:])
    return re.compile(fnmatch.translate(pattern))


def _select(candidates: Mapping[str, nn.Module], include: Iterable[str] | None, exclude: Iterable[str] | None):
    names = list(candidates)
    for arg, patterns in (("include", include), ("exclude", exclude)):
        if isinstance(patterns, str):
            raise TypeError(f"`{arg}` takes a list of patterns, got the string {patterns!r}: write [{patterns!r}].")
        for pattern in patterns or ():
            if not any(_compile(pattern).fullmatch(n) for n in names):
                raise ValueError(
                    f"The {arg} pattern {pattern!r} matches no prunable layer. Prunable layers: {names}. "
                    "Patterns are globs, or regular expressions prefixed with 're:'."
                )
    if include:
        names = [n for n in names if any(_compile(p).fullmatch(n) for p in include)]
    if exclude:
        names = [n for n in names if not any(_compile(p).fullmatch(n) for p in exclude)]
    if not names:
        raise ValueError("include/exclude leave no layer to prune; loosen the patterns.")
    return names
