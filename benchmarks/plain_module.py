"""A LightningModule that knows nothing about pruning, trained dense and with only BudgetCallback added.

    python benchmarks/plain_module.py --epochs 10 --sparsity 0.9 --seeds 0 1 2

Prints, per seed, the test accuracy of the dense run and of the pruned run, the kept share reached (exact budget)
and the accuracy ratio pruned / dense measured in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune import BudgetCallback
from lightning_prune.data import DigitsDataModule


class UserClassifier(pl.LightningModule):
    """Written without any knowledge of lightning_prune."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
        )
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def run(seed: int, epochs: int, sparsity: float | None) -> tuple[float, float]:
    pl.seed_everything(seed, verbose=False)
    model = UserClassifier()
    callbacks = [] if sparsity is None else [BudgetCallback(sparsity=sparsity)]
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, limit_val_batches=0,
    )
    dm = DigitsDataModule(image_size=16, seed=seed)
    trainer.fit(model, dm)
    acc = trainer.test(model, dm, verbose=False)[0]["test_acc"]
    weights = [m.weight for m in model.net if isinstance(m, (nn.Conv2d, nn.Linear))]
    kept = sum(int((w != 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return acc, kept


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rows = []
    print(f"torch {torch.__version__}, lightning {pl.__version__}, threads {torch.get_num_threads()}")
    print(f"{'seed':>4} {'dense acc':>9} {'pruned acc':>10} {'kept share':>10} {'ratio':>6}")
    for seed in args.seeds:
        dense, _ = run(seed, args.epochs, None)
        pruned, kept = run(seed, args.epochs, args.sparsity)
        rows.append(dict(seed=seed, dense=dense, pruned=pruned, kept=kept, ratio=pruned / dense))
        print(f"{seed:>4} {dense:>9.4f} {pruned:>10.4f} {kept:>10.4%} {pruned / dense:>6.3f}", flush=True)
    if len(rows) > 1:
        print(f"mean {statistics.mean(r['dense'] for r in rows):>9.4f} {statistics.mean(r['pruned'] for r in rows):>10.4f}"
              f" {'':>10} {statistics.mean(r['ratio'] for r in rows):>6.3f}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
