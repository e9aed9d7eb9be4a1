"""Which tensors the budget covers, and attaching :class:`MagnitudeMask` to them.

The rule works on parameters, not module classes: by default every weight matrix or kernel that multiplies
activations — a parameter of 2 or more dimensions named ``weight`` or ``*_weight`` (``Linear``, ``ConvNd``, Hugging
Face's ``Conv1D``, ``nn.MultiheadAttention``'s ``in_proj_weight``, timm's layers) or a recurrent layer's
``weight_ih_l0``/``weight_hh_l0``/``weight_hr_l0`` (``LSTM``, ``GRU``, ``RNN``) — and not embeddings (unless
``embeddings=True``), norms, biases, positional tables or class tokens. A tensor shared by several modules (tied
weights) is left dense, so that every module that reads it computes with the same tensor in training and after export.

Weight matrices that another reparametrization computes (``torch.nn.utils.parametrizations.weight_norm``,
``spectral_norm``, ``orthogonal``, and the older hook-based ``weight_norm``/``spectral_norm``) count among the model's
matrix weights but stay dense, with the reason in :class:`Coverage`: the mask needs the trained tensor itself.

``nn.MultiheadAttention`` reads ``in_proj_weight`` up to three times in a forward pass; a masked one is computed once
per forward pass (``parametrize.cached`` for the duration of the layer's forward).
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_prune.batchnorm_gate import gate_batchnorm_shift, is_channel_mask, join_layers, joined_names
from lightning_prune.magnitude_mask import MagnitudeMask, is_compiling

#: Module types whose weight is an embedding table (pruned only with ``embeddings=True``).
EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)

#: The key of a masked tensor's latent θ in a reparametrized module's state_dict.
LATENT_KEY = re.compile(r"^(?:(?P<module>.+)\.)?parametrizations\.(?P<param>[^.]+)\.original$")
_RECURRENT = re.compile(r"^weight_(ih|hh|hr)_l\d+(_reverse)?$")
#: Reasons (prefixes) for which a matrix weight cannot be masked: another reparametrization computes it.
UNSUPPORTED_REASONS = ("hook-based", "another parametrization")
COMPILED = "_orig_mod"  # torch.compile's wrapper holds the module under this name, which enters the keys


@dataclass(frozen=True)
class MaskedParameter:
    """One reparametrized tensor: its qualified name (``"features.0.weight"``), its module, and its mask."""

    name: str
    module: nn.Module
    param_name: str
    mask: MagnitudeMask

    @property
    def latent(self) -> Tensor:
        """The trained latent tensor θ (the ``nn.Parameter`` the optimizer updates)."""
        return self.module.parametrizations[self.param_name].original

    @property
    def numel(self) -> int:
        return self.latent.numel()


def masked_parameters(model: nn.Module) -> list[MaskedParameter]:
    """The reparametrized tensors of ``model``, in module order.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> _ = reparametrize(model)
        >>> [p.name for p in masked_parameters(model)]
        ['0.weight', '2.weight']
    """
    found = []
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for param_name, chain in module.parametrizations.items():
            mask = next((p for p in chain if isinstance(p, MagnitudeMask)), None)
            if mask is not None:
                found.append(MaskedParameter(_join(module_name, param_name), module, param_name, mask))
    return found


@dataclass
class Coverage:
    """What the budget covers: the chosen tensors, and the model's matrix weights and parameters in all.

    ``left_out`` lists the largest matrix weights not covered, as ``(name, numel, why)``.
    """

    names: list[str]
    covered: int
    matrix_weights: int
    parameters: int
    left_out: list[tuple[str, int, str]] = field(default_factory=list)
    untrained: int = 0

    @property
    def share_of_matrix_weights(self) -> float:
        return self.covered / self.matrix_weights if self.matrix_weights else 0.0

    @property
    def share_of_trained_matrix_weights(self) -> float:
        """The share of the matrix weights an optimizer trains (``untrained``: those left out for that reason)."""
        trained = self.matrix_weights - self.untrained
        return self.covered / trained if trained else 0.0

    def summary(self) -> str:
        text = (
            f"the budget covers {len(self.names)} tensors, {self.covered:,} of the model's {self.matrix_weights:,} "
            f"matrix weights ({self.share_of_matrix_weights:.1%}; {self.covered / max(1, self.parameters):.1%} of all "
            f"{self.parameters:,} parameters)"
        )
        if self.left_out:
            text += "; largest left out: " + ", ".join(f"{n} ({k:,}, {why})" for n, k, why in self.left_out[:3])
        return text


def coverage(model: nn.Module, embeddings: bool = False, reasons: Mapping[str, str] | None = None) -> Coverage:
    """Describe what :func:`reparametrize` covered in ``model`` (call it after). ``reasons`` says why a candidate was
    left out (``{name: why}``; "excluded" for the others a pattern left out).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
        >>> _ = reparametrize(model)
        >>> coverage(model).summary()
        "the budget covers 1 tensors, 16 of the model's 56 matrix weights (28.6%; 26.7% of all 60 parameters); largest left out: 0.weight (40, embedding)"
    """
    covered = {p.name: p.numel for p in masked_parameters(model)}
    matrices, why = _matrix_weights(model, embeddings)
    reasons = reasons or {}
    why = {n: w or reasons.get(n, "excluded") for n, w in why.items()}
    left = sorted(((n, t.numel(), why[n]) for n, t in matrices.items() if n not in covered), key=lambda r: -r[1])
    untrained = [n for n in reasons if n in matrices and n not in covered]
    if untrained:  # named together, whatever their size
        left = [(f"{len(untrained)} tensors", sum(matrices[n].numel() for n in untrained), reasons[untrained[0]])] + [
            row for row in left if row[0] not in reasons]
    return Coverage(
        names=list(covered),
        covered=sum(covered.values()),
        matrix_weights=sum(t.numel() for t in matrices.values()),
        parameters=sum(p.numel() for p in model.parameters()),
        left_out=left[:5],
        untrained=sum(matrices[n].numel() for n in untrained),
    )


def prunable_parameters(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    embeddings: bool = False,
    select: Callable[[str, Tensor], bool] | None = None,
) -> dict[str, tuple[nn.Module, str]]:
    """The tensors :func:`reparametrize` would mask: ``{qualified name: (module, parameter name)}``.

    Patterns match a tensor's qualified name (``"features.0.weight"``) or its module's (``"features.0"``); a pattern is
    a glob, or a regular expression matched in full when prefixed with ``re:``. ``select(name, tensor)`` filters
    further. Raises ``ValueError`` naming the candidates when a pattern matches nothing or nothing is left.
    """
    for arg, patterns in (("include", include), ("exclude", exclude)):
        if isinstance(patterns, str):
            raise TypeError(f"`{arg}` takes a list of patterns, got the string {patterns!r}: write [{patterns!r}].")
    matrices, why = _matrix_weights(model, embeddings)
    candidates = {name: _owner(model, name) for name, reason in why.items() if reason == ""}
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no tensor to prune (no weight of 2 or more dimensions outside embeddings, "
            "and not shared between modules). Remove the callback, or pass embeddings=True to prune embeddings."
        )
    keys = {name: _keys(name) for name in candidates}
    for arg, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns or ():
            if not any(_matches(pattern, k) for k in keys.values()):
                tied = [
                    f"{n} ({r})" for n, r in why.items()
                    if r.startswith("shared") and any(_matches(pattern, _keys(m)) for m in (n, r.split()[-1]))
                ]
                hint = f" It matches {', '.join(tied)}, which stays dense (tied weights)." if tied else ""
                raise ValueError(
                    f"The {arg} pattern {pattern!r} matches no prunable tensor.{hint} Prunable tensors: "
                    f"{list(candidates)}. Patterns are globs, or regular expressions prefixed with 're:'."
                )
    chosen = {
        name: owner
        for name, owner in candidates.items()
        if (not include or any(_matches(p, keys[name]) for p in include))
        and not any(_matches(p, keys[name]) for p in exclude or ())
        and (select is None or select(name, matrices[name]))
    }
    if not chosen:
        raise ValueError("include/exclude/select leave no tensor to prune; loosen them.")
    embedding_tables = {id(m.weight) for m in model.modules() if isinstance(m, EMBEDDING_TYPES)}
    tied = [
        f"{name} ({why[name]})"
        for name, tensor in matrices.items()
        if why[name].startswith("shared")
        and (embeddings or id(tensor) not in embedding_tables)  # a head tied to an embedding table: as embeddings
        and (not include or any(_matches(p, _keys(name)) for p in include))
        and not any(_matches(p, _keys(name)) for p in exclude or ())
    ]
    if tied:
        warnings.warn(
            f"{', '.join(tied)}: a tensor shared by several modules (tied weights) stays dense, so that every module "
            "that reads it computes with the same tensor in training and after export. Untie it to prune it.",
            stacklevel=2,
        )
    return chosen


def reparametrize(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    embeddings: bool = False,
    select: Callable[[str, Tensor], bool] | None = None,
    threshold: float = 1.0,
    temperature: float = 0.5,
    grad_temperature: float = 0.1,
    preserve_scale: bool = True,
) -> list[str]:
    """Reparametrize the prunable tensors of ``model`` in place: ``w = θ ⊙ σ((|θ|/s − c)/T)``.

    The trained parameter stays the same ``nn.Parameter`` object (now ``module.parametrizations.<name>.original``),
    so no trainable parameter is added. A tensor that already carries a :class:`MagnitudeMask` is left alone.

    Args:
        model: any ``nn.Module``.
        include: patterns of the tensors to prune (default: every tensor of the rule in this module's docstring).
        exclude: patterns of tensors to leave dense, applied after ``include``.
        embeddings: also prune embedding tables.
        select: ``select(name, tensor) -> bool``, a further filter (Python only).
        threshold: normalised threshold ``c``, shared by all tensors.
        temperature: initial temperature ``T``.
        grad_temperature: floor on the temperature of the backward pass (bounds the gradient near the threshold).
        preserve_scale: rescale θ and ``s`` together so that the effective weight θ·h has the standard deviation
            the initialisation intended (otherwise about half the weights start gated off and a deep network without
            batch norm may not learn).

    Returns:
        The qualified names of the tensors reparametrized by this call.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> before = sum(p.numel() for p in model.parameters())
        >>> reparametrize(model, exclude=["2"])
        ['0.weight']
        >>> sum(p.numel() for p in model.parameters()) == before
        True
    """
    attached = []
    for name, (module, param_name) in prunable_parameters(model, include, exclude, embeddings, select).items():
        if parametrize.is_parametrized(module, param_name):
            continue  # masked already (another parametrization is never a candidate)
        _attach(module, param_name, threshold, temperature, grad_temperature, preserve_scale)
        attached.append(name)
    warn_unsupported(coverage(model, embeddings), stacklevel=3)
    return attached


def warn_unsupported(covered: Coverage, stacklevel: int = 2) -> None:
    """Warn about the weights the mask cannot sit on (another reparametrization computes them): they stay dense."""
    unsupported = [f"{n} ({why})" for n, _, why in covered.left_out if why.startswith(UNSUPPORTED_REASONS)]
    if unsupported:
        warnings.warn(
            f"{', '.join(unsupported)} stay dense: the mask cannot sit on a weight that another reparametrization "
            "computes. Use plain layers there to prune them.",
            stacklevel=stacklevel,
        )


def reparametrize_like(model: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Attach masks to the tensors of ``model`` that are reparametrized in ``state_dict``, so it loads with strict=True.

    Example:
        >>> import torch
        >>> trained = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> _ = reparametrize(trained)
        >>> fresh = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> reparametrize_like(fresh, trained.state_dict())
        ['0.weight']
        >>> fresh.load_state_dict(trained.state_dict(), strict=True)
        <All keys matched successfully>
    """
    modules = dict(model.named_modules())
    attached = []
    for key, value in state_dict.items():
        match = LATENT_KEY.match(key)
        if match is None or key.replace(".original", ".0.hard") not in state_dict:
            continue  # not a tensor masked by lightning_prune (another parametrization)
        module_name, param_name = match["module"] or "", match["param"]
        name = _join(module_name, param_name)
        module = modules.get(module_name)
        masked = module is not None and parametrize.is_parametrized(module, param_name)
        current = module.parametrizations[param_name].original if masked else getattr(module, param_name, None)
        if not isinstance(current, Tensor):
            if any(COMPILED in n.split(".") for n in (module_name, *modules)):
                raise ValueError(
                    f"The state_dict reparametrizes '{name}' but the model has no such tensor: one of the two comes "
                    "from a torch.compile'd module, whose keys contain '_orig_mod.'. Compile the model the same way "
                    "before loading, or add/remove '_orig_mod.' in the state_dict's keys."
                )
            raise ValueError(f"The state_dict reparametrizes '{name}' but the model has no such tensor: "
                             "it comes from another architecture.")
        if tuple(current.shape) != tuple(value.shape):
            raise ValueError(f"'{name}' has shape {tuple(current.shape)} in the model but {tuple(value.shape)} in the "
                             "state_dict: the checkpoint comes from another model.")
        if not masked:
            register_mask(module, param_name, MagnitudeMask(current.shape, 1.0))
            attached.append(name)
        joined = key.replace(".original", ".0.joined")
        if joined in state_dict:  # channels of other BatchNorm layers follow this one's gate
            join_layers(model, module_name, joined_names(state_dict[joined]))
    return attached


def _matrix_weights(model: nn.Module, embeddings: bool) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every weight matrix of ``model`` by qualified name (parametrized ones under their plain name), and why each
    one is not a candidate (``""`` when it is)."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    matrices, why, seen = {}, {}, set()
    for module_name, module in model.named_modules():
        direct = dict(module.named_parameters(recurse=False))
        other: dict[str, str] = {}  # weights that another reparametrization computes, and which one
        if parametrize.is_parametrized(module):
            for n, chain in module.parametrizations.items():
                originals = [t for k, t in chain.named_parameters(recurse=False) if k.startswith("original")]
                direct[n] = max(originals, key=lambda t: t.numel())
                kinds = [type(p).__name__ for p in chain if not isinstance(p, MagnitudeMask)]
                if kinds:
                    other[n] = f"another parametrization ({', '.join(kinds)})"
        for hooked, kind in _hooked_weights(module).items():
            other[hooked] = f"hook-based {kind}"
        for param_name, p in direct.items():
            if p.dim() < 2 or not (param_name in other or _is_matrix_name(param_name)):
                continue
            name = _join(module_name, param_name)
            if id(p) in seen:  # a tied tensor counts once, under the first name it is found at
                continue
            seen.add(id(p))
            matrices[name] = p
            shared = [n for n in owners.get(id(p), []) if not n.startswith(_prefix(module_name))]
            if param_name in other:
                why[name] = other[param_name]
            elif shared:
                why[name] = f"shared with {shared[0]}"
            elif isinstance(module, EMBEDDING_TYPES) and not embeddings:
                why[name] = "embedding"
            else:
                why[name] = ""
    return matrices, why


def _is_matrix_name(param_name: str) -> bool:
    return param_name == "weight" or param_name.endswith("_weight") or bool(_RECURRENT.match(param_name))


def _hooked_weights(module: nn.Module) -> dict[str, str]:
    """Parameters that a forward pre-hook turns into the weight (``nn.utils.weight_norm``: ``weight_v``;
    ``nn.utils.spectral_norm``: ``weight_orig``), by parameter name."""
    found = {}
    for hook in module._forward_pre_hooks.values():
        kind = type(hook).__name__
        if kind in ("WeightNorm", "SpectralNorm"):
            found[f"{hook.name}_v" if kind == "WeightNorm" else f"{hook.name}_orig"] = kind
    return found


def plain_named_parameters(model: nn.Module):
    """``model.named_parameters()`` with each masked tensor under its plain name: ``"fc.weight"`` for the latent
    ``"fc.parametrizations.weight.original"``. For ``configure_optimizers`` that sort parameters into groups by name
    (minGPT's decay / no-decay split, ``"bias" in name``), which would otherwise not recognise the latent.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> _ = reparametrize(model)
        >>> [name for name, _ in model.named_parameters()]
        ['0.bias', '0.parametrizations.weight.original']
        >>> [name for name, _ in plain_named_parameters(model)]
        ['0.bias', '0.weight']
    """
    for name, param in model.named_parameters():
        match = LATENT_KEY.match(name)
        yield (_join(match["module"] or "", match["param"]) if match else name), param


def _prefix(module_name: str) -> str:
    return f"{module_name}." if module_name else ""


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, param_name = name.rpartition(".")
    return model.get_submodule(module_name), param_name


def _join(module_name: str, param_name: str) -> str:
    return f"{module_name}.{param_name}" if module_name else param_name


def _keys(name: str) -> tuple[str, str]:
    """What a pattern may match for a tensor: its qualified name and its module's."""
    return name, name.rpartition(".")[0]


def _matches(pattern: str, names: tuple[str, str]) -> bool:
    regex = re.compile(pattern[3:]) if pattern.startswith("re:") else re.compile(fnmatch.translate(pattern))
    return any(regex.fullmatch(n) for n in names)


def _attach(
    module: nn.Module, param_name: str, threshold: float, temperature: float, grad_temperature: float, rescale: bool
) -> None:
    weight = getattr(module, param_name)
    with torch.no_grad():
        scale = weight.abs().mean().item()
        if not scale > 0 or not torch.isfinite(weight).all():
            raise ValueError(f"Cannot reparametrize {type(module).__name__}.{param_name}: all zeros or not finite.")
        mask = MagnitudeMask(weight.shape, scale, threshold, temperature, grad_temperature).to(weight.device)
        if rescale:
            effective = mask(weight)
            factor = (weight.std() / effective.std().clamp_min(1e-12)).item()
            weight.mul_(factor)
            mask.scale.mul_(factor)
    register_mask(module, param_name, mask)


def register_mask(module: nn.Module, param_name: str, mask: MagnitudeMask) -> None:
    """Register ``mask`` on ``module.<param_name>``. A recurrent layer keeps the weights of its last forward pass in
    ``_flat_weights``; they are computed tensors that ``copy.deepcopy`` refuses, so they are kept detached. A mask on
    a BatchNorm scale masks channels: its gate also multiplies the shift (:mod:`~lightning_prune.batchnorm_gate`)."""
    parametrize.register_parametrization(module, param_name, mask, unsafe=True)
    if is_channel_mask(module, param_name):
        gate_batchnorm_shift(module)
    if isinstance(module, nn.RNNBase) and not getattr(module, "_lightning_prune_detach_hook", False):
        module.register_forward_hook(_detach_flat_weights)
        module._lightning_prune_detach_hook = True
    if isinstance(module, nn.MultiheadAttention) and not getattr(module, "_lightning_prune_cache_hook", False):
        module.register_forward_pre_hook(_cache_masked_weights)
        module.register_forward_hook(_drop_cached_weights, always_call=True)
        module._lightning_prune_cache_hook = True


def _cache_masked_weights(module: nn.MultiheadAttention, args=None) -> None:
    # its forward pass reads in_proj_weight up to three times (the fast path's checks): compute the gate once
    if not is_compiling() and not torch._C._get_tracing_state():  # parametrize refuses to trace a cache
        module._lightning_prune_cache = parametrize.cached()
        module._lightning_prune_cache.__enter__()


def _drop_cached_weights(module: nn.MultiheadAttention, args=None, output=None) -> None:
    cache = module.__dict__.pop("_lightning_prune_cache", None)
    if cache is not None:
        cache.__exit__(None, None, None)


def _detach_flat_weights(module: nn.RNNBase, args=None, output=None) -> None:
    # the next forward pass computes them again (the parametrized weights are new tensors on each access)
    module._flat_weights = [None if w is None else w.detach() for w in module._flat_weights]


def detach_recurrent_weights(model: nn.Module) -> None:
    """Let ``copy.deepcopy(model)`` work: recurrent layers keep computed weights (``module.to`` computes them again)."""
    for module in model.modules():
        if getattr(module, "_lightning_prune_detach_hook", False):
            _detach_flat_weights(module)
