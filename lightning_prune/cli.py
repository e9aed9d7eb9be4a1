"""PruneCLI: the LightningCLI behind ``train.py``; after fit it tests the pruned network and exports it."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_prune.budget_callback import BudgetCallback
from lightning_prune.channel_groups import example_batch_input
from lightning_prune.channel_removal import macs_and_parameters, remove_channels, save_smaller
from lightning_prune.export import make_permanent, save_pruned
from lightning_prune.pruned_classifier import PrunedClassifier
from lightning_prune.reparametrize import masked_parameters


class PruneCLI(LightningCLI):
    """``LightningCLI`` for :class:`PrunedClassifier` and any ``LightningDataModule``.

    After ``fit`` it runs ``test`` on the final (hard-pruned) network unless ``--test_after_fit false``, and writes
    into the run's log directory ``pruned_backbone.pt`` (compact, see :func:`lightning_prune.save_pruned`) and
    ``backbone_state_dict.pt`` (a plain ``state_dict`` that loads strictly into the backbone class).
    """

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("model_class", PrunedClassifier)
        kwargs.setdefault("datamodule_class", pl.LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True, help="Run test on the pruned network.")

    def after_fit(self) -> None:
        trainer, model = self.trainer, self.model
        if self.config_init[self.subcommand].get("test_after_fit", True) and _has_test_data(self.datamodule):
            trainer.test(model, datamodule=self.datamodule, ckpt_path=None, verbose=True)
        if not trainer.is_global_zero:
            return
        log_dir = trainer.log_dir or trainer.default_root_dir
        test_acc = trainer.callback_metrics.get("test/acc")
        layers = masked_parameters(model)
        if not layers or not all(bool(layer.mask.hard) for layer in layers):
            summary = ["", "lightning_prune summary (dense: no finalised BudgetCallback in this run)"]
            if test_acc is not None:
                summary.append(f"  test accuracy       {float(test_acc):.4f}")
            summary.append(f"  logs & checkpoints  {log_dir}")
            rank_zero_info("\n".join(summary))
            return
        os.makedirs(log_dir, exist_ok=True)
        backbone = make_permanent(model.backbone if hasattr(model, "backbone") else model, inplace=False)
        compact = os.path.join(log_dir, "pruned_backbone.pt")
        plain = os.path.join(log_dir, "backbone_state_dict.pt")
        save_pruned(backbone, compact)
        torch.save(backbone.state_dict(), plain)
        budget = next((cb for cb in trainer.callbacks if isinstance(cb, BudgetCallback)), None)
        lines = ["", "lightning_prune summary"]
        if budget is not None and budget.report.cut_done:
            r = budget.report
            lines.append(f"  kept {budget.structure:<15}{r.kept}/{r.total} = {r.kept_share:.4%} "
                         f"(asked: {1 - budget.sparsity:.4%})")
            lines.append(f"  in use before cut   {r.kept_hard_before:.4%} of the covered {budget.structure}")
            if r.coverage:
                lines.append(f"  coverage            {r.coverage}")
            before, after, bn = r.val_before_cut, r.val_after_cut, r.val_after_recalibration
            for name in sorted(set(before) & set(after)):
                figures = f"{before[name]:.4f} -> {after[name]:.4f}"
                figures += f" -> {bn[name]:.4f} (BatchNorm re-estimated)" if bn and name in bn else ""
                lines.append(f"  {name + ' at cut':<19} {figures}")
        if test_acc is not None:
            lines.append(f"  test accuracy       {float(test_acc):.4f}")
        lines.append(f"  logs & checkpoints  {log_dir}")
        lines.append(file_line(compact, plain))
        if budget is not None and budget.structure == "channels":
            lines.append(f"  smaller network     {self._save_smaller(model, log_dir)}")
        rank_zero_info("\n".join(lines))


    def _save_smaller(self, model: pl.LightningModule, log_dir: str) -> str:
        """The network with its removed channels taken out, as a torch.export program; a line for the summary."""
        network = model.backbone if hasattr(model, "backbone") else model
        batch = next(iter(self.datamodule.val_dataloader() if self.datamodule is not None else []), None)
        x = example_batch_input(batch)
        if x is None:
            return "not written: no validation batch to trace the network with"
        x = x[:1].to(next(network.parameters()).device)
        small = remove_channels(network, x)
        path = save_smaller(small, os.path.join(log_dir, "smaller_backbone.pt2"), x)
        (dense_macs, dense_params), (macs, params) = macs_and_parameters(network, x), macs_and_parameters(small, x)
        return (f"{path}: {macs / dense_macs:.1%} of the MACs ({macs:,} of {dense_macs:,}), "
                f"{params / dense_params:.1%} of the parameters; torch.export.load(path).module() runs it")


def file_line(compact: str, plain: str) -> str:
    """What each written file is, with its size: the pruned weights' file as a share of the plain one."""
    compact_kb, plain_kb = os.path.getsize(compact) / 1e3, os.path.getsize(plain) / 1e3
    return (f"  pruned model        {compact} ({compact_kb:.1f} kB, {compact_kb / plain_kb:.0%} of the plain file; "
            f"load_pruned reads it), {plain} ({plain_kb:.1f} kB, a plain state_dict of the backbone class)")


def _has_test_data(datamodule) -> bool:
    return datamodule is not None and type(datamodule).test_dataloader is not pl.LightningDataModule.test_dataloader


def main(args=None) -> PruneCLI:
    """Entry point of ``train.py``."""
    return PruneCLI(args=args, save_config_kwargs={"overwrite": True})
