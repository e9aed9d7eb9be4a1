"""Does the budget hold on workloads it was not tuned for? BudgetCallback with its defaults, on other people's models
and recipes: the share of weights in use just before the cut against the budget, and what the cut does to the
module's own validation metric.

    python benchmarks/budget_tracking.py --json benchmarks/results/budget_tracking.json

Workloads (sparsity 0.9 unless said; every one with `BudgetCallback(sparsity=...)` and nothing else set):

* ``demo_transformer``: Lightning's demo transformer (``lightning.pytorch.demos``) with its own optimizer (SGD, lr 0.1),
  on sequences that follow a fixed rule (next token = 3·token + 1 mod V), 240 steps; metric: held-out loss.
* ``resnet18_4ep`` / ``resnet18_20ep``: torchvision ``resnet18(num_classes=10)`` on the digits at 32 px, Adam 2e-3,
  4 and 20 epochs; metric: validation accuracy (BatchNorm is re-estimated after the cut).
* ``small_cnn_sgd``: a small CNN on the digits, SGD 0.01 with momentum, 10 epochs.
* ``conv4_98``: the package's Conv4 on the digits at 98%, Adam 1e-3, 20 epochs.
* ``bn_cnn_sgd_decay`` / ``bn_cnn_sgd_decay_98``: a BatchNorm CNN on the digits under the paper's recipe (SGD lr 0.1,
  Nesterov momentum 0.9) with weight decay 5e-3 over 972 steps, the total decay of 5e-4 over the 30-epoch CIFAR-10
  run (where the weights fall under the threshold before the target comes down), at 90% and 98%.
* ``bn_cnn_adamw``: the same network under AdamW (lr 1e-3, weight decay 0.05), 972 steps.
* ``mobilenet_v3_small``: torchvision ``mobilenet_v3_small(num_classes=10)`` on the digits at 32 px, Adam 2e-3,
  6 epochs (a small-scale classifier layer next to large-scale depthwise kernels; BatchNorm and hardswish).

A run passes when the hard share before the cut is within 10% (relative) of the budget, the hard share stays within
10% of the target from the end of the ramp to the cut (``worst_gap_after_ramp``, sampled every 5 steps), and the cut
moves the metric by at most 0.5 points (accuracy) or 5% (loss).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.demos.transformer import LightningTransformer, Transformer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_files import write_json  # noqa: E402

from lightning_prune import BudgetCallback  # noqa: E402
from lightning_prune.backbones import Conv4  # noqa: E402
from lightning_prune.data import DigitsDataModule  # noqa: E402


class RuleTransformer(LightningTransformer):
    """Lightning's demo transformer with its own optimizer, on token sequences that follow a rule (no download)."""

    vocab = 32

    def __init__(self) -> None:
        super().__init__(vocab_size=self.vocab)
        self.model = Transformer(vocab_size=self.vocab, ninp=64, nhead=2, nhid=128, nlayers=2, dropout=0.0)

    def prepare_data(self) -> None:  # the demo downloads WikiText2 here
        pass

    def _data(self, seed: int, n: int) -> DataLoader:
        start = torch.randint(0, self.vocab, (n, 1), generator=torch.Generator().manual_seed(seed))
        tokens = [start]
        for _ in range(16):
            tokens.append((3 * tokens[-1] + 1) % self.vocab)
        tokens = torch.cat(tokens, 1)
        return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=16, shuffle=seed == 0)

    def train_dataloader(self) -> DataLoader:
        return self._data(0, 256)

    def val_dataloader(self) -> DataLoader:
        return self._data(1, 64)

    def validation_step(self, batch, batch_idx):
        inputs, target = batch
        self.log("val_loss", F.nll_loss(self(inputs, target), target.reshape(-1)))


class ImageClassifier(pl.LightningModule):
    """Any torch image model, with the optimizer given as a factory: a user's module, unaware of pruning."""

    def __init__(self, net: nn.Module, optimizer) -> None:
        super().__init__()
        self.net = net
        self.make_optimizer = optimizer

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


def _small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def _bn_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def _paper_sgd(weight_decay: float):
    return lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def _resnet18() -> nn.Module:
    import torchvision

    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # the digits are grey
    return net


def _mobilenet_v3_small() -> nn.Module:
    import torchvision

    net = torchvision.models.mobilenet_v3_small(num_classes=10)
    net.features[0][0] = nn.Conv2d(1, 16, 3, 2, 1, bias=False)  # the digits are grey
    return net


class ShareAfterRamp(pl.Callback):
    """The largest relative gap between the hard share in use and the target, from the end of the ramp to the cut."""

    def __init__(self, budget: BudgetCallback, every: int = 5) -> None:
        self.budget, self.every, self.worst = budget, every, 0.0

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        b = self.budget
        if b.finalized or trainer.global_step % self.every or b.progress(trainer.global_step) < b.target_end:
            return
        _, hard, _ = b._shares()
        self.worst = max(self.worst, abs(hard / b.target_keep - 1))


WORKLOADS = {
    # name: (sparsity, module factory, datamodule factory, Trainer kwargs, metric)
    "demo_transformer": (0.9, RuleTransformer, lambda: None, dict(max_steps=240), "val_loss"),
    "resnet18_4ep": (0.9, lambda: ImageClassifier(_resnet18(), lambda p: torch.optim.Adam(p, lr=2e-3)),
                     lambda: DigitsDataModule(image_size=32), dict(max_epochs=4), "val_acc"),
    "resnet18_20ep": (0.9, lambda: ImageClassifier(_resnet18(), lambda p: torch.optim.Adam(p, lr=2e-3)),
                      lambda: DigitsDataModule(image_size=32), dict(max_epochs=20), "val_acc"),
    "small_cnn_sgd": (0.9, lambda: ImageClassifier(_small_cnn(), lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)),
                      lambda: DigitsDataModule(image_size=16), dict(max_epochs=10), "val_acc"),
    "conv4_98": (0.98, lambda: ImageClassifier(Conv4(in_channels=1, input_size=16),
                                               lambda p: torch.optim.Adam(p, lr=1e-3)),
                 lambda: DigitsDataModule(image_size=16), dict(max_epochs=20), "val_acc"),
    # the paper's recipe (SGD lr 0.1, Nesterov momentum, weight decay), with the decay the 30-epoch CIFAR-10 run
    # gives over its length (lr·wd·steps about 0.5-0.6: 5e-4 over 11,700 steps there, 5e-3 over 972 steps here)
    "bn_cnn_sgd_decay": (0.9, lambda: ImageClassifier(_bn_cnn(), _paper_sgd(5e-3)),
                         lambda: DigitsDataModule(image_size=16, batch_size=16), dict(max_epochs=12), "val_acc"),
    "bn_cnn_sgd_decay_98": (0.98, lambda: ImageClassifier(_bn_cnn(), _paper_sgd(5e-3)),
                            lambda: DigitsDataModule(image_size=16, batch_size=16), dict(max_epochs=12), "val_acc"),
    "bn_cnn_adamw": (0.9, lambda: ImageClassifier(_bn_cnn(), lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05)),
                     lambda: DigitsDataModule(image_size=16, batch_size=16), dict(max_epochs=12), "val_acc"),
    "mobilenet_v3_small": (0.9, lambda: ImageClassifier(_mobilenet_v3_small(), lambda p: torch.optim.Adam(p, lr=2e-3)),
                           lambda: DigitsDataModule(image_size=32), dict(max_epochs=6), "val_acc"),
}


@dataclass
class Row:
    workload: str
    sparsity: float
    steps: int
    budget_share: float
    hard_share_before_cut: float
    relative_gap: float
    worst_gap_after_ramp: float
    metric: str
    before_cut: float
    after_cut: float
    after_batchnorm: float | None
    cut_effect: float
    seconds: float
    passed: bool


def run(name: str, seed: int) -> Row:
    sparsity, make_module, make_data, trainer_kwargs, metric = WORKLOADS[name]
    pl.seed_everything(seed, verbose=False)
    module = make_module()
    callback = BudgetCallback(sparsity=sparsity)
    tracker = ShareAfterRamp(callback)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[callback, tracker], **trainer_kwargs)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        data = make_data()
        trainer.fit(module, datamodule=data) if data is not None else trainer.fit(module)
    seconds = time.perf_counter() - start
    report = callback.report
    before, after = report.val_before_cut[metric], report.val_after_cut[metric]
    after_bn = report.val_after_recalibration.get(metric)
    final = after if after_bn is None else after_bn
    gap = report.kept_hard_before / report.kept_share - 1
    effect = (final - before) / before if metric == "val_loss" else final - before
    ok = abs(gap) <= 0.1 and tracker.worst <= 0.1 and (effect <= 0.05 if metric == "val_loss" else effect >= -0.005)
    return Row(name, sparsity, report.step, report.kept_share, report.kept_hard_before, gap, tracker.worst, metric,
               before, after, after_bn, effect, round(seconds, 1), ok)


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows and the environment here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print("| workload | sparsity | steps | hard share before the cut / budget | worst gap after the ramp | metric | "
          "before cut | after cut (after BN) | pass |\n|---|---:|---:|---:|---:|---|---:|---:|---|")
    for name in args.workloads:
        for seed in args.seeds:
            r = run(name, seed)
            rows.append(r)
            bn = f" ({r.after_batchnorm:.4f})" if r.after_batchnorm is not None else ""
            print(f"| {r.workload} (seed {seed}) | {r.sparsity} | {r.steps} | {r.hard_share_before_cut:.4f} / "
                  f"{r.budget_share:.4f} ({r.relative_gap:+.1%}) | {r.worst_gap_after_ramp:.1%} | {r.metric} | "
                  f"{r.before_cut:.4f} | "
                  f"{r.after_cut:.4f}{bn} | {'yes' if r.passed else 'NO'} |", flush=True)
    if args.json:
        write_json(args.json, {"torch": torch.__version__, "threads": args.threads, "seeds": args.seeds,
                               "rows": [asdict(r) for r in rows]})
    return rows


if __name__ == "__main__":
    main()
