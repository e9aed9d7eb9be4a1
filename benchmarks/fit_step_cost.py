"""Cost of a training step inside ``Trainer.fit``: dense vs ``BudgetCallback`` vs Lightning's ``ModelPruning``.

Each step is timed from ``on_train_batch_start`` to ``on_train_batch_end``, so it holds the forward and backward
passes, the optimizer step and every callback hook in between (not the data loading, nor epoch-end hooks). Variants:

* ``dense``: a plain LightningModule (backbone, cross-entropy, SGD lr 0.01 momentum 0.9, or with ``--optimizer adam``
  Adam lr 1e-3, where the budget step is taken in Adam's metric), no pruning callback.
* ``budget``: the same plus ``BudgetCallback(sparsity=0.9, measure_cut=False)`` (no validation passes at the cut,
  which comes in the last, untimed step).
* ``budget_recompute`` (with ``--variants``): the same with ``recompute_masked_weights=True``.
* ``modelpruning``: the same plus ``ModelPruning("l1_unstructured", use_global_unstructured=True)`` on the Conv/Linear
  weights (the ones BudgetCallback prunes), pruning at each epoch end with a schedule that reaches 90% at the last.

Data are random CIFAR-size tensors; an epoch is ``--warmup`` batches, so ModelPruning has pruned once before the
first timed step. Each fit runs ``warmup + steps + 1`` steps: the first ``warmup`` and the last one (BudgetCallback
hardens its masks at the last step) are not timed. Every round runs each variant's fit once, in an order rotated
each round, from the same seed; the figure is the median over rounds of (variant's median step / dense's median
step in the same round). Memory: the peak CUDA memory of the timed steps on a GPU; on the CPU, the bytes of
parameters and buffers + gradients + optimizer state + what one forward pass of ``training_step`` leaves allocated
for the backward pass (torch's profiler: allocations net of frees), measured over one extra forward/backward
(outside the Trainer's loop, in the last, untimed step, so the model is in the state the callbacks give it during
training).

Run (from the repository root; writes benchmarks/results/fit_step_cost_<accelerator>.csv and .json):

    python benchmarks/fit_step_cost.py --models conv4 vgg19 resnet18 --rounds 5 --steps 30 --warmup 5 --threads 2
    python benchmarks/fit_step_cost.py --models conv4 vgg19 resnet18 --rounds 3 --steps 20 --warmup 5 --threads 2 \
        --optimizer adam  # writes fit_step_cost_cpu_adam.*
    python benchmarks/fit_step_cost.py --accelerator gpu --rounds 5 --steps 50 --warmup 10
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings

import lightning
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import BudgetCallback
from lightning_prune.backbones import VGG19, Conv4, ResNet18

BACKBONES = {
    "conv4": lambda: Conv4(num_classes=10, input_size=32),
    "vgg19": lambda: VGG19(num_classes=10),
    "resnet18": lambda: ResNet18(num_classes=10),
}
VARIANTS = ("dense", "budget", "budget_recompute", "modelpruning")
DEFAULT_VARIANTS = ("dense", "budget", "modelpruning")
SPARSITY = 0.9
SEED = 0
#: warnings that every short fit raises (few workers, few batches, the callback's cut ending a short schedule)
NOISE = ".*(num_workers|does not have many|logging interval|LeafSpec|BudgetCallback: just before the cut)"


class Classifier(pl.LightningModule):
    """The smallest LightningModule that trains a backbone: cross-entropy and SGD (or Adam), nothing about pruning."""

    def __init__(self, backbone: nn.Module, optimizer: str = "sgd") -> None:
        super().__init__()
        self.backbone = backbone
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.backbone(x), y)

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class StepTimer(Callback):
    """Times every step (batch start to batch end); measures memory in the timed steps and in the last step."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = warmup, total
        self.times: list[float] = []  # seconds, one per step
        self.peak_cuda = 0  # bytes, max over the timed steps
        self.state_bytes = 0  # parameters + buffers + gradients + optimizer state + saved for backward
        self._start = 0.0
        self.device = "cpu"

    def _clock(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.device = pl_module.device.type
        if trainer.global_step == self.total - 1:  # the untimed last step, before BudgetCallback hardens the masks
            self.state_bytes = _state_bytes(trainer, pl_module, batch, batch_idx)
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self._start = self._clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(self._clock() - self._start)
        if self.device == "cuda" and self.warmup < len(self.times) < self.total:
            self.peak_cuda = max(self.peak_cuda, torch.cuda.max_memory_allocated())


def _state_bytes(trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> int:
    """Bytes of parameters, buffers, gradients (one per trainable parameter), optimizer state, and what one forward
    pass of ``training_step`` leaves allocated for the backward pass (the tensors autograd saves, net of frees, from
    torch's profiler: it sees the masked weights whether they are kept or noted for recomputation)."""
    storages: dict[int, int] = {}

    def add(t: torch.Tensor) -> None:
        storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())

    for t in [*pl_module.parameters(), *pl_module.buffers()]:
        add(t)
    for state in trainer.optimizers[0].state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                add(value)
    trainable = [p for p in pl_module.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with trainer.precision_plugin.forward_context():
            loss = pl_module.training_step(batch, batch_idx)
    saved = sum(e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage for e in prof.events())
    torch.autograd.grad(loss, trainable, allow_unused=True)  # frees the graph; leaves every .grad untouched
    return sum(storages.values()) + grads + saved


def modelpruning_callback(model: nn.Module, epochs: int) -> ModelPruning:
    """Global L1 pruning of the Conv/Linear weights at each epoch end, linear in the share pruned, 90% at the last.

    ``torch.nn.utils.prune`` prunes a share of the weights left, so epoch ``e`` prunes ``1 - keep(e) / keep(e-1)``.
    """

    def keep(epoch: int) -> float:
        return 1.0 - SPARSITY * min(1.0, (epoch + 1) / epochs) if epoch >= 0 else 1.0

    layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return ModelPruning("l1_unstructured", parameters_to_prune=layers, use_global_unstructured=True,
                        amount=lambda epoch: 1.0 - keep(epoch) / keep(epoch - 1))


def run_fit(model_name: str, variant: str, args: argparse.Namespace) -> StepTimer:
    """One fit of ``warmup + steps + 1`` steps; returns its timer."""
    total = args.warmup + args.steps + 1
    epochs = math.ceil(total / args.warmup)
    torch.manual_seed(SEED)
    model = Classifier(BACKBONES[model_name](), args.optimizer)
    images = torch.randn(args.warmup * args.batch_size, 3, 32, 32)
    labels = torch.randint(0, 10, (args.warmup * args.batch_size,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=args.batch_size, num_workers=0)
    timer = StepTimer(args.warmup, total)
    callbacks: list[Callback] = [timer]
    if variant.startswith("budget"):  # the cut's step is not timed
        callbacks.append(BudgetCallback(sparsity=SPARSITY, measure_cut=False,
                                        recompute_masked_weights=variant == "budget_recompute"))
    elif variant == "modelpruning":
        callbacks.append(modelpruning_callback(model, epochs))
    trainer = pl.Trainer(
        max_steps=total, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, accelerator=args.accelerator,
        devices=1, precision=args.precision, callbacks=callbacks,
    )
    trainer.fit(model, loader)
    assert len(timer.times) == total, (model_name, variant, len(timer.times))
    return timer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(BACKBONES), default=list(BACKBONES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=30, help="timed steps per fit")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (>= 1; also the epoch length)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS),
                   help="dense is always run (the baseline)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.warmup < 1 or args.batch_size < 1:
        p.error("--rounds, --steps, --warmup and --batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_prune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    rows = []
    for model_name in args.models:
        variants = ["dense", *(v for v in args.variants if v != "dense")]
        per_round: dict[str, list[tuple[float, int]]] = {v: [] for v in variants}  # (median s, memory bytes)
        for r in range(args.rounds):
            for variant in variants[r % len(variants):] + variants[:r % len(variants)]:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", NOISE)
                    timer = run_fit(model_name, variant, args)
                memory = timer.peak_cuda if timer.device == "cuda" else timer.state_bytes
                measure = "cuda_peak" if timer.device == "cuda" else "state_and_saved"
                per_round[variant].append((statistics.median(timer.times[args.warmup:-1]), memory))
        for variant in variants:
            pairs = list(zip(per_round[variant], per_round["dense"]))
            rows.append({
                "model": model_name, "variant": variant, "accelerator": args.accelerator, "precision": args.precision,
                "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds,
                "median_ms": 1e3 * statistics.median(t for t, _ in per_round[variant]),
                "time_ratio": statistics.median(t / d for (t, _), (d, _) in pairs),
                "memory_mb": statistics.median(m for _, m in per_round[variant]) / 2**20,
                "memory_measure": measure,
                "memory_ratio": statistics.median(m / dm for (_, m), (_, dm) in pairs),
                "round_ms": [round(1e3 * t, 3) for t, _ in per_round[variant]],
            })
    write_results(rows, args, argv)
    print("| model | variant | median ms | time / dense | memory / dense |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | {r['median_ms']:.2f} | {r['time_ratio']:.3f} | "
              f"{r['memory_ratio']:.3f} |")
    return rows


def write_results(rows: list[dict], args: argparse.Namespace, argv: list[str] | None) -> None:
    os.makedirs(args.out, exist_ok=True)
    suffix = "" if args.optimizer == "sgd" else f"_{args.optimizer}"
    stem = os.path.join(args.out, f"fit_step_cost_{args.accelerator}{suffix}")
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "round_ms"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name()
    report = {
        "command": " ".join(["python", "benchmarks/fit_step_cost.py", *(sys.argv[1:] if argv is None else argv)]),
        "torch": torch.__version__, "lightning": lightning.__version__, "machine": machine, "args": vars(args),
        "rows": rows,
    }
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
