"""Accuracy at a channel budget: ``BudgetCallback(structure="channels")`` against Lightning's
``ModelPruning("ln_structured")`` and Torch-Pruning's one-shot magnitude pruning with fine-tuning.

Same backbone (``--backbone``: Conv4 with BatchNorm, VGG19 with batch norm at ``--width-multiplier`` of its width, or
ResNet18 at ``--resnet-width``, where only each block's first convolution loses channels), data, epochs, optimizer
(``--recipe``) and seed for every method; each removes the share ``s`` of the channels of the convolutions (the Linear
layers stay whole):

* ``dense``: no pruning;
* ``channels``: ``PrunedClassifier`` + ``BudgetCallback(sparsity=s, structure="channels")`` with its defaults (the
  masks hard at the end, no fine-tuning); the smaller network is built with ``remove_channels`` and tested;
* ``ln_structured``: ``ModelPruning("ln_structured", pruning_norm=1, pruning_dim=0)`` on the convolutions' weights,
  the share of each layer's output channels along the same cubic schedule as ours, pruned at epoch ends (masks only:
  the network keeps its size, and BatchNorm's shift still feeds the next layer from a pruned channel);
* ``scratch``: the smaller network that ``channels`` built in the same seed (same layer widths), its weights drawn
  anew and trained from scratch for all the epochs with the same recipe: what training the smaller architecture
  directly gives (needs ``channels`` before it in ``--methods``);
* ``tp_oneshot``: dense training up to 60% of the epochs (where our target reaches the budget), then Torch-Pruning's
  ``MagnitudePruner`` (L1 importance, global ranking, the Linear layers ignored) removes ``s`` of the channels at once,
  and the smaller network trains on for the remaining epochs with the same optimizer and schedule.

Each row: test accuracy, the share of channels removed and of the MACs removed (measured on the network tested;
``ln_structured`` keeps its size: none removed).

Usage (digits; ``--cifar10-dir`` for the real CIFAR-10 subset, as in ``accuracy_at_budget.py``)::

    python benchmarks/channel_accuracy.py --threads 2 --seeds 0 1 2 --epochs 20 --sparsities 0.3 0.5 \
        --json benchmarks/results/channel_accuracy_digits.json
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import lightning.pytorch as pl
import torch
from accuracy_at_budget import TARGET_END, GradualAmount, Setup, recipe, test_accuracy
from lightning.pytorch.callbacks import ModelPruning
from result_files import write_json
from torch import nn

from lightning_prune import BudgetCallback, LoopSettings, PrunedClassifier, remove_channels
from lightning_prune.backbones import VGG19, Conv4, ResNet18
from lightning_prune.channel_groups import torch_pruning
from lightning_prune.channel_removal import macs_and_parameters

METHODS = ("dense", "channels", "scratch", "ln_structured", "tp_oneshot")


@dataclass
class Row:
    method: str
    sparsity: float
    seed: int
    test_acc: float
    channels_removed: float
    macs_removed: float
    seconds: float
    widths: list[int]  #: output channels of each convolution of the network tested


class BatchNormSetup(Setup):
    def backbone(self) -> nn.Module:
        a = self.args
        size, channels = (32, 3) if a.cifar10_dir else (a.image_size, 1)
        if a.backbone == "vgg19":
            return VGG19(num_classes=10, in_channels=channels, width_multiplier=a.width_multiplier)
        if a.backbone == "resnet18":
            return ResNet18(num_classes=10, in_channels=channels, width=a.resnet_width)
        return Conv4(num_classes=10, in_channels=channels, input_size=size, width=a.width, hidden=a.hidden,
                     batch_norm=True)


def convs(backbone: nn.Module) -> list[nn.Conv2d]:
    return [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]


def fit(setup: Setup, seed: int, callbacks: list, epochs: int, model: PrunedClassifier | None = None, dm=None):
    a = setup.args
    if model is None:
        pl.seed_everything(seed, workers=True, verbose=False)
        dm = setup.datamodule(seed)
        model = PrunedClassifier(setup.backbone(), num_classes=10, **recipe(a))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(workers|val_dataloader|LeafSpec|trained without).*")
        trainer.fit(model, datamodule=dm)
    return model, dm


def reinitialized(network: nn.Module) -> nn.Module:
    """A copy of ``network`` (same layer shapes) with every layer's parameters and running statistics drawn anew."""
    fresh = copy.deepcopy(network).train()
    for module in fresh.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        if hasattr(module, "reset_running_stats"):
            module.reset_running_stats()
    return fresh


def run(setup: Setup, method: str, s: float, seed: int, reference: tuple[int, int], built: dict) -> Row:
    """One row; ``built`` holds the smaller networks of the ``channels`` runs, by (seed, sparsity), for ``scratch``."""
    a = setup.args
    start = time.perf_counter()
    x = None
    if method in ("dense", "channels"):
        loop = LoopSettings(exempt_share=a.exempt_share)
        callbacks = ([BudgetCallback(sparsity=s, structure="channels", target_end=a.target_end, loop=loop,
                                     exclude=a.exclude, residual_streams=a.residual_streams)]
                     if method == "channels" else [])
        model, dm = fit(setup, seed, callbacks, a.epochs)
        x = next(iter(dm.test_dataloader()))[0][:1]
        network = remove_channels(model.backbone, x) if method == "channels" else model.backbone
        if method == "channels":
            built[(seed, s)] = network
    elif method == "scratch":
        if (seed, s) not in built:
            raise SystemExit("--methods scratch trains the network that channels builds: list channels before it")
        pl.seed_everything(seed, workers=True, verbose=False)
        dm = setup.datamodule(seed)
        model = PrunedClassifier(reinitialized(built[(seed, s)]), num_classes=10, **recipe(a))
        model, dm = fit(setup, seed, [], a.epochs, model, dm)
        network = model.backbone
    elif method == "ln_structured":
        def make(backbone: nn.Module) -> ModelPruning:
            return ModelPruning("ln_structured", parameters_to_prune=[(c, "weight") for c in convs(backbone)],
                                amount=GradualAmount(s, a.epochs, a.target_end), pruning_norm=1, pruning_dim=0,
                                use_global_unstructured=False, make_pruning_permanent=True,
                                use_lottery_ticket_hypothesis=False)
        pl.seed_everything(seed, workers=True, verbose=False)
        dm = setup.datamodule(seed)
        backbone = setup.backbone()
        model = PrunedClassifier(backbone, num_classes=10, **recipe(a))
        model, dm = fit(setup, seed, [make(backbone)], a.epochs, model, dm)
        network = model.backbone
    else:  # tp_oneshot
        tp = torch_pruning()
        first = max(1, round(a.target_end * a.epochs))
        model, dm = fit(setup, seed, [], first)
        x = next(iter(dm.test_dataloader()))[0][:1]
        ignored = [m for m in model.backbone.modules() if isinstance(m, nn.Linear)]
        model.backbone.eval()
        pruner = tp.pruner.MagnitudePruner(model.backbone, x, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=s, global_pruning=True, ignored_layers=ignored)
        pruner.step()
        model.backbone.train()
        rest = copy.deepcopy(model)  # a fresh optimizer and schedule for the fine-tuning epochs
        model, dm = fit(setup, seed, [], a.epochs - first, rest, dm)
        network = model.backbone
    x = next(iter(dm.test_dataloader()))[0][:1] if x is None else x
    widths = [c.out_channels for c in convs(network)]
    removed = 1 - sum(widths) / reference[0]
    if method == "ln_structured":  # masks only: zero rows, but the network runs at its full size
        removed = sum(int((c.weight.flatten(1).abs().sum(1) == 0).sum()) for c in convs(network)) / reference[0]
        macs = reference[1]
    else:
        macs = macs_and_parameters(network, x)[0]
    row = Row(method, s if method != "dense" else 0.0, seed, test_accuracy(network, dm.test_dataloader()),
              round(removed, 4), round(1 - macs / reference[1], 4), round(time.perf_counter() - start, 1),
              widths)
    print(f"  seed {seed} {method:14s} s={row.sparsity:.2f}: acc {row.test_acc:.4f}, channels removed "
          f"{row.channels_removed:.3f}, MACs removed {row.macs_removed:.3f} ({row.seconds:.0f} s)", flush=True)
    return row


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--backbone", choices=("conv4", "vgg19", "resnet18"), default="conv4")
    p.add_argument("--width-multiplier", type=float, default=0.25, help="VGG19's width (0.25: a quarter of the paper's)")
    p.add_argument("--resnet-width", type=int, default=16, help="ResNet18's first width (64: the paper's)")
    p.add_argument("--width", type=int, default=64, help="Conv4's width")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--recipe", choices=("adam", "sgd-cosine"), default="adam")
    p.add_argument("--cifar10-dir", default=None)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--target-end", type=float, default=TARGET_END,
                   help="share of training at which the channel budget is reached (BudgetCallback's target_end; "
                        "tp_oneshot prunes there)")
    p.add_argument("--exempt-share", type=float, default=LoopSettings.exempt_share,
                   help="share of the budget, the largest scales, that the budget step leaves alone (LoopSettings)")
    p.add_argument("--exclude", nargs="*", default=None,
                   help="BatchNorm layers whose channels (and those joined to them) stay whole (BudgetCallback's exclude)")
    p.add_argument("--residual-streams", action="store_true",
                   help="also remove channels of residual streams (BudgetCallback's residual_streams)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.limit_train_batches = 1.0
    if args.backbone == "vgg19" and not args.cifar10_dir and args.image_size < 32:
        p.error("--backbone vgg19 halves the image five times: give --cifar10-dir, or --image-size 32 or more")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_prune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = BatchNormSetup(args)
    probe = setup.backbone().eval()
    shape = (1, 3, 32, 32) if args.cifar10_dir else (1, 1, args.image_size, args.image_size)
    reference = (sum(c.out_channels for c in convs(probe)), macs_and_parameters(probe, torch.randn(shape))[0])
    rows, built = [], {}
    for seed in args.seeds:
        if "dense" in args.methods:
            rows.append(run(setup, "dense", 0.0, seed, reference, built))
        for s in args.sparsities:
            rows += [run(setup, m, s, seed, reference, built) for m in args.methods if m != "dense"]
    summary = []
    for key in sorted({(r.method, r.sparsity) for r in rows}, key=lambda k: (k[1], METHODS.index(k[0]))):
        accs = [r.test_acc for r in rows if (r.method, r.sparsity) == key]
        macs = [r.macs_removed for r in rows if (r.method, r.sparsity) == key]
        summary.append({"method": key[0], "sparsity": key[1], "runs": len(accs), "acc_mean": round(statistics.mean(accs), 4),
                        "acc_std": round(statistics.stdev(accs), 4) if len(accs) > 1 else 0.0,
                        "macs_removed": round(statistics.mean(macs), 4)})
    print("| channels removed | method | test acc (mean ± std) | runs | MACs removed |\n|---:|---|---:|---:|---:|")
    for r in summary:
        print(f"| {r['sparsity']:.2f} | {r['method']} | {r['acc_mean']:.4f} ± {r['acc_std']:.4f} | {r['runs']} | "
              f"{r['macs_removed']:.1%} |")
    result = {"args": vars(args), "rows": [asdict(r) for r in rows], "summary": summary}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
