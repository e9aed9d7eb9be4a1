"""Checkpoints of a pruned run in the network's own names, so that they load anywhere a Lightning checkpoint loads.

A checkpoint written while :class:`~lightning_prune.BudgetCallback` is attached holds, under ``"state_dict"``, each
masked tensor under its plain name (``"backbone.l1.weight"``) with the weight the network computes with (``θ ⊙ M``
once the masks are hard, ``θ·h_T(θ)`` before), so ``MyModule.load_from_checkpoint(path)`` and
``trainer.test(ckpt_path=path)`` work in a new process with no lightning_prune code. What the budget needs to go on
training (the latent θ before the cut, each mask's buffers) sits beside it under ``checkpoint["lightning_prune"]``;
a ``load_state_dict`` pre-hook (:class:`PlainLayoutLoader`, registered by the callback at ``setup``) puts the masks
back when a run resumes or evaluates from that file.

Example:
    >>> import torch
    >>> from lightning_prune import finalize, reparametrize
    >>> trained = torch.nn.Sequential(torch.nn.Linear(8, 8))
    >>> _ = reparametrize(trained)
    >>> _ = finalize(trained, sparsity=0.75)
    >>> checkpoint = {"state_dict": trained.state_dict()}
    >>> to_plain_checkpoint(checkpoint, trained)
    >>> sorted(checkpoint["state_dict"])  # a plain nn.Linear loads it
    ['0.bias', '0.weight']
    >>> plain = torch.nn.Sequential(torch.nn.Linear(8, 8))
    >>> plain.load_state_dict(checkpoint["state_dict"])
    <All keys matched successfully>
    >>> int((plain[0].weight != 0).sum())
    16
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_prune.batchnorm_gate import (
    encode_joined,
    gated_follower,
    gated_shift,
    is_channel_mask,
    join_layers,
    joined_layers,
    joined_names,
)
from lightning_prune.magnitude_mask import MagnitudeMask
from lightning_prune.reparametrize import masked_parameters, register_mask

#: The checkpoint's entry that holds the masks (and the latents before the cut).
CHECKPOINT_KEY = "lightning_prune"
MASK_BUFFERS = ("scale", "threshold", "temperature", "grad_temperature", "hard", "kept")


def _latent_key(name: str) -> str:
    module_name, _, param_name = name.rpartition(".")
    return f"{module_name}.parametrizations.{param_name}." if module_name else f"parametrizations.{param_name}."


@torch.no_grad()
def to_plain_checkpoint(checkpoint: dict[str, Any], model: nn.Module) -> None:
    """Rewrite ``checkpoint["state_dict"]`` (``model``'s) in place: plain weights under the plain names, the masks
    under ``checkpoint["lightning_prune"]["masks"]``. Tensors absent from the state_dict (a sharded one) are left."""
    state = checkpoint["state_dict"]
    masks = {}
    for p in masked_parameters(model):
        prefix = _latent_key(p.name)
        if prefix + "original" not in state:
            continue
        entry = {key: state.pop(prefix + "0." + key) for key in MASK_BUFFERS}
        joined = state.pop(prefix + "0.joined", None)  # the layers that follow its gate: entry["joined"] below
        latent = state.pop(prefix + "original")
        hard = bool(entry["hard"])
        if not hard:
            entry["original"] = latent
            del entry["kept"]  # all ones before the cut
        state[p.name] = getattr(p.module, p.param_name).detach().to(latent.dtype)  # the weight the network uses
        shift = _shift_key(p)
        if shift in state:  # a channel mask: the layer uses β ⊙ gate
            if not hard:
                entry["shift"] = state[shift]
            state[shift] = gated_shift(p.module).to(state[shift].dtype)
        if joined is not None:  # its gate also multiplies these layers' γ and β
            entry["joined"] = joined_names(joined)
            raw = {}
            for follower in entry["joined"]:
                for key, value in gated_follower(model.get_submodule(follower)).items():
                    key = f"{follower}.{key}"
                    if key in state:
                        raw[key] = state[key]
                        state[key] = value.to(raw[key].dtype)
            if not hard:
                entry["joined_state"] = raw  # as trained, for a resume
        masks[p.name] = entry
    if masks:
        checkpoint.setdefault(CHECKPOINT_KEY, {})["masks"] = masks


def checkpoint_masks(checkpoint: Mapping[str, Any]) -> dict[str, dict[str, Tensor]]:
    """The masks a checkpoint written by :func:`to_plain_checkpoint` holds, ``{tensor name: buffers}``."""
    section = checkpoint.get(CHECKPOINT_KEY)
    return dict(section.get("masks", {})) if isinstance(section, Mapping) else {}


def attach_masks(model: nn.Module, masks: Mapping[str, Mapping[str, Tensor]]) -> list[str]:
    """Attach a :class:`MagnitudeMask` to each tensor of ``model`` named in ``masks`` that has none yet (their buffers
    come with the ``load_state_dict`` that follows). Returns the names attached.

    Raises:
        ValueError: naming the tensor, when the model has no such tensor or it has another shape (another model),
            before anything is changed.
    """
    targets = []
    for name, entry in masks.items():
        module_name, _, param_name = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            module = None
        tensor = _plain_or_latent(module, param_name)
        if tensor is None:
            raise ValueError(
                f"The checkpoint prunes '{name}' but {type(model).__name__} has no such tensor: the checkpoint comes "
                "from another architecture (or a torch.compile'd one: its keys hold '_orig_mod.')."
            )
        saved = entry.get("kept", entry.get("original"))
        if saved is not None and tuple(saved.shape) != tuple(tensor.shape):
            raise ValueError(
                f"'{name}' has shape {tuple(tensor.shape)} in the model but {tuple(saved.shape)} in the checkpoint: "
                "the checkpoint comes from another model."
            )
        joined_layers(model, name.rpartition(".")[0], entry.get("joined", ()))  # checked before any change
        targets.append((name, module, param_name, tensor, list(entry.get("joined", ()))))
    attached = []
    for name, module, param_name, tensor, joined in targets:
        if not _is_masked(module, param_name):
            register_mask(module, param_name, MagnitudeMask(tensor.shape, 1.0))
            attached.append(name)
        if joined:
            join_layers(model, name.rpartition(".")[0], joined)
    return attached


class PlainLayoutLoader:
    """``load_state_dict`` pre-hook of a module trained with masks: a checkpoint in the plain layout
    (:func:`to_plain_checkpoint`) loads into it. The masks come from the checkpoint its Trainer is loading (tensors
    that have none yet get one); a masked tensor that the checkpoint holds plain takes the plain weight as θ.

    Args:
        model: the module (the hook is registered on it); its Trainer, when it has one, is looked up at load time.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        connector = getattr(getattr(self.model, "_trainer", None), "_checkpoint_connector", None)
        masks = checkpoint_masks(getattr(connector, "_loaded_checkpoint", None) or {})
        attach_masks(self.model, {n: e for n, e in masks.items() if prefix + n in state_dict})
        for p in masked_parameters(self.model):
            defaults = {key: getattr(p.mask, key) for key in MASK_BUFFERS}
            _to_latent(state_dict, prefix, p.name, masks.get(p.name, {}), defaults)


def loads_plain_layout(model: nn.Module) -> None:
    """Register :class:`PlainLayoutLoader` on ``model`` (once)."""
    if not any(isinstance(h, PlainLayoutLoader) for h in model._load_state_dict_pre_hooks.values()):
        model._register_load_state_dict_pre_hook(PlainLayoutLoader(model))


class MaskedTwinLoader:
    """``load_state_dict`` pre-hook of a plain layer whose twin elsewhere is masked (a DQN's target network, a
    teacher or an EMA copy left out of the budget): the twin's entries (``<prefix>parametrizations.<param>.original``
    and its mask's buffers) load as the weight the twin computes with, so ``target.load_state_dict(net.state_dict())``
    works as it did before the callback.

    Args:
        param_name: the layer's parameter (``"weight"``).
    """

    def __init__(self, param_name: str) -> None:
        self.param_name = param_name

    @torch.no_grad()
    def __call__(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        latent = f"{prefix}parametrizations.{self.param_name}."
        if latent + "original" not in state_dict or prefix + self.param_name in state_dict:
            return
        theta = state_dict.pop(latent + "original")
        buffers = {key: state_dict.pop(latent + "0." + key) for key in (*MASK_BUFFERS, "joined")
                   if latent + "0." + key in state_dict}
        mask = MagnitudeMask(theta.shape, scale=1.0).to(theta.device)
        mask.load_state_dict({**mask.state_dict(), **{k: v for k, v in buffers.items() if k in MASK_BUFFERS}})
        mask.set_temperature(float(mask.temperature))
        state_dict[prefix + self.param_name] = mask(theta)


def accept_masked_twins(model: nn.Module, names: Mapping[str, tuple[nn.Module, str]]) -> None:
    """Register :class:`MaskedTwinLoader` (once) on each plain layer of ``names`` (``{name: (module, param)}``)."""
    for module, param_name in names.values():
        if _is_masked(module, param_name):
            continue
        hooks = module._load_state_dict_pre_hooks.values()
        if not any(isinstance(h, MaskedTwinLoader) and h.param_name == param_name for h in hooks):
            module._register_load_state_dict_pre_hook(MaskedTwinLoader(param_name))


def _to_latent(
    state: dict[str, Tensor], prefix: str, name: str, entry: Mapping[str, Tensor], defaults: Mapping[str, Tensor]
) -> None:
    """Put the plain entry ``name`` of ``state`` back in the reparametrized layout, in place."""
    plain, latent = prefix + name, prefix + _latent_key(name)
    if plain not in state or latent + "original" in state:
        return
    weight = state.pop(plain)
    state[latent + "original"] = entry.get("original", weight)
    if "shift" in entry:  # a channel mask before the cut: the BatchNorm shift as trained
        state[plain.rpartition(".")[0] + ".bias"] = entry["shift"]
    for key, value in entry.get("joined_state", {}).items():  # the joined layers' γ and β as trained
        state[prefix + key] = value
    if "joined" in entry:  # the names of the layers joined to this one, in the mask's state
        state[latent + "0.joined"] = encode_joined(entry["joined"])
    for key in MASK_BUFFERS:
        default = torch.ones(weight.shape, dtype=torch.bool) if key == "kept" else defaults[key]
        state[latent + "0." + key] = entry.get(key, default)


def reparametrized_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """The checkpoint's ``state_dict`` in the layout of the reparametrized module (``...parametrizations.weight.
    original`` and the mask's buffers), whichever layout it was saved in."""
    state = dict(checkpoint["state_dict"])
    defaults = {key: torch.tensor(False) if key == "hard" else torch.tensor(1.0) for key in MASK_BUFFERS}
    for name, entry in checkpoint_masks(checkpoint).items():
        _to_latent(state, "", name, entry, defaults)
    return state


def _shift_key(p) -> str:
    """The state_dict key of the shift ``β`` that a channel mask also gates ("" for a weight mask)."""
    return f"{p.name.rpartition('.')[0]}.bias" if is_channel_mask(p.module, p.param_name) else ""


def _is_masked(module: nn.Module, param_name: str) -> bool:
    return parametrize.is_parametrized(module, param_name) and any(
        isinstance(p, MagnitudeMask) for p in module.parametrizations[param_name]
    )


def _plain_or_latent(module: nn.Module | None, param_name: str) -> Tensor | None:
    if module is None:
        return None
    if parametrize.is_parametrized(module, param_name):
        return getattr(module.parametrizations[param_name], "original", None)
    tensor = getattr(module, param_name, None)
    return tensor if isinstance(tensor, Tensor) else None
