"""Two-process DDP runs on the CPU (gloo) for tests/test_ddp.py; each rank saves what it saw.

Run as ``python tests/ddp_worker.py OUT_DIR SCENARIO [SCENARIO ...]``: the scenarios run one after the other in the
same two processes (Lightning's DDP launcher starts rank 1 by running the same command again), and each rank saves
``OUT_DIR/<scenario>.rank<r>.pt``. Importing this module runs nothing.

Scenarios:
    fit: 2 epochs of PrunedClassifier(tiny Conv4) + BudgetCallback. Every rank starts from other random weights
        (DDP broadcasts rank 0's), and the validation loader is passed to ``fit``, so Lightning shards it per rank.
    nan_loss_rank1: as ``fit``, but the loss is NaN on rank 1 only, at step 3.
    nan_latent_rank1: as ``fit``, but one latent weight of rank 1 becomes NaN in the optimizer step of step 4.
    unused_on_rank1: as ``fit`` with ``find_unused_parameters=True`` and one more Linear layer that only rank 0's
        loss uses: the budget gradient of that layer must still be the same on both ranks.
"""

from __future__ import annotations

import os
import sys
import traceback

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from plain_modules import tiny_conv4

from lightning_prune import BudgetCallback, PrunedClassifier, masked_parameters
from lightning_prune.data import DigitsDataModule

FAULT_STEP = {"nan_loss_rank1": 3, "nan_latent_rank1": 4}
SPARSITY = 0.8


class BeforeBudget(Callback):
    """Listed before BudgetCallback: the latents at every optimizer step just before the budget step."""

    def __init__(self) -> None:
        self.latents: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.latents.append([x.latent.detach().clone() for x in masked_parameters(pl_module)])


class Recorder(Callback):
    """At every optimizer step, after BudgetCallback's hook: the schedules, the masks' buffers, the gradient of each
    latent as the optimizer sees it (the task's, all-reduced) and the latents before and after the budget step; after
    the optimizer step, the latents. Injects the ``nan_latent_rank1`` fault."""

    def __init__(self, budget: BudgetCallback, scenario: str, before: BeforeBudget) -> None:
        self.budget = budget
        self.scenario = scenario
        self.before = before
        self.steps: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        layers = masked_parameters(pl_module)
        self.steps.append(
            {
                "before_budget": self.before.latents[-1],
                "after_budget": [x.latent.detach().clone() for x in layers],
                "global_step": trainer.global_step,
                "schedule": (
                    None if self.budget.budget_loop.latest_lambda is None else self.budget.budget_loop.latest_lambda.tolist(),
                    self.budget.temperature,
                    self.budget.target_keep,
                ),
                "buffers": [
                    (float(x.mask.temperature), float(x.mask.threshold), float(x.mask.grad_temperature)) for x in layers
                ],
                "grads": [x.latent.grad.detach().clone() for x in layers],
            }
        )
        fault = FAULT_STEP.get(self.scenario)
        if self.scenario == "nan_latent_rank1" and trainer.global_step == fault and trainer.global_rank == 1:
            with torch.no_grad():
                layers[1].latent.view(-1)[0] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps[-1]["latents"] = [x.latent.detach().clone() for x in masked_parameters(pl_module)]


class FaultyClassifier(PrunedClassifier):
    def __init__(self, scenario: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scenario = scenario
        if scenario == "unused_on_rank1":
            self.extra = torch.nn.Linear(8, 8)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.scenario == "unused_on_rank1" and self.global_rank == 0:
            loss = loss + 0.01 * self.extra(torch.ones(1, 8)).square().sum()
        if self.scenario == "nan_loss_rank1" and self.global_step == FAULT_STEP["nan_loss_rank1"]:
            if self.global_rank == 1:
                loss = loss * float("nan")
        return loss


def run(out_dir: str, scenario: str) -> None:
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.manual_seed(100 + rank)  # other initial weights on each rank: DDP must broadcast rank 0's
    model = FaultyClassifier(scenario, backbone=tiny_conv4(input_size=8), num_classes=10)
    budget = BudgetCallback(sparsity=SPARSITY)
    before = BeforeBudget()
    recorder = Recorder(budget, scenario, before)
    trainer = pl.Trainer(
        strategy="ddp_find_unused_parameters_true" if scenario == "unused_on_rank1" else "ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=2,
        callbacks=[before, budget, recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    dm = DigitsDataModule(image_size=8, batch_size=64)
    dm.setup("fit")
    result: dict = {}
    try:
        trainer.fit(model, train_dataloaders=dm.train_dataloader(), val_dataloaders=dm.val_dataloader())
    except Exception as error:  # noqa: BLE001 - saved for the test to look at
        result["error"] = (type(error).__name__, str(error))
        result["traceback"] = traceback.format_exc()
    layers = masked_parameters(model)
    result.update(
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        backend=torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        global_step=trainer.global_step,
        steps=recorder.steps,
        callback_state=budget.state_dict(),
        latents={x.name: x.latent.detach().clone() for x in layers},
        masks={x.name: x.mask.kept.clone() for x in layers},
        hard=[bool(x.mask.hard) for x in layers],
        scales=[float(x.mask.scale) for x in layers],
    )
    torch.save(result, os.path.join(out_dir, f"{scenario}.rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name in sys.argv[2:]:
        run(sys.argv[1], name)
