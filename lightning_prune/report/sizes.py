"""What the weights of a file cost on disk: ``torch.save`` of the dense ``state_dict`` against the compact save."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.export import save_pruned


def saved_sizes(dense: dict[str, Tensor], class_name: str = "Module") -> tuple[int, int]:
    """Bytes of ``torch.save(dense)`` and of :func:`~lightning_prune.save_pruned` of the same weights.

    Example:
        >>> import torch
        >>> weight = torch.zeros(100, 100)
        >>> weight[0] = 1.0
        >>> dense_bytes, compact_bytes = saved_sizes({"weight": weight})
        >>> compact_bytes < dense_bytes / 10
        True
    """
    holder = type(class_name, (_StateDictHolder,), {})(dense)  # save_pruned records the class name
    with tempfile.TemporaryDirectory() as tmp:
        # the names of LightningCLI's exports (they enter the archive), so that the sizes are those of these files
        dense_path, compact_path = os.path.join(tmp, "backbone_state_dict.pt"), os.path.join(tmp, "pruned_backbone.pt")
        torch.save(dense, dense_path)
        save_pruned(holder, compact_path)
        return os.path.getsize(dense_path), os.path.getsize(compact_path)


class _StateDictHolder(nn.Module):
    """Hands a ready ``state_dict`` to :func:`save_pruned`, which asks a module for it."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        super().__init__()
        self._state = state

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:  # type: ignore[override]
        return self._state
