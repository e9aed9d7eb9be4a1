"""Where reading a tensor on the host waits for the device (a GPU), a training step of the callback reads none: the
per-step finite checks stay on the device until a logging step or a checkpoint, and the masked layers keep their
hard/soft flag on the host. Simulated on the CPU by counting ``bool()``, ``.item()`` and ``.tolist()`` calls."""

from __future__ import annotations

from collections import Counter

import torch
from plain_modules import HostReads, quiet_trainer, tiny_conv4

from lightning_prune import BudgetCallback, PrunedClassifier
from lightning_prune.budget_loop import FLOOR_CHECK_EVERY
from lightning_prune.data import DigitsDataModule

HOOKS = ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step", "on_train_batch_end")


def _fit_counting_reads(monkeypatch, **trainer_args) -> tuple[BudgetCallback, Counter]:
    """A short fit of a small CNN; the host reads made in each of the callback's per-step hooks, by (step, hook)."""
    torch.manual_seed(0)
    model = PrunedClassifier(tiny_conv4(input_size=8), num_classes=10)
    callback = BudgetCallback(sparsity=0.8)
    reads = HostReads(monkeypatch)
    counts: Counter = Counter()
    for name in HOOKS:
        hook = getattr(callback, name)

        def counted(trainer, *args, _hook=hook, _name=name):
            step, before = trainer.global_step, reads.count
            _hook(trainer, *args)
            counts[(step, _name)] += reads.count - before

        setattr(callback, name, counted)
    quiet_trainer(callbacks=[callback], **trainer_args).fit(model, DigitsDataModule(image_size=8, batch_size=128))
    return callback, counts


def test_a_training_step_reads_nothing_back_between_logging_steps_on_an_accelerator(monkeypatch):
    monkeypatch.setattr("lightning_prune.non_finite.reads_wait_for_the_device", lambda device: True)
    callback, counts = _fit_counting_reads(monkeypatch, max_steps=30, log_every_n_steps=7)

    expected = {(s, "on_before_optimizer_step") for s in range(30) if s % FLOOR_CHECK_EVERY == 0}  # the floors
    expected |= {(s, "on_train_batch_end") for s in range(1, 31) if s % 7 == 0 or s == 30}  # logging; the cut
    reading = {key for key, n in counts.items() if n}
    assert {step for step, _ in counts} == set(range(31))  # every step was counted (batch end: after it)
    assert reading <= expected and reading & expected, sorted(reading - expected)
    assert callback.finalized


def test_on_a_cpu_each_step_reads_its_checks_at_once(monkeypatch):
    """The counterpart: on a CPU a read costs nothing, and the loss and the latents are read every step."""
    _, counts = _fit_counting_reads(monkeypatch, max_steps=12, log_every_n_steps=50)
    assert all(counts[(s, "on_before_backward")] > 0 and counts[(s, "on_train_batch_end")] > 0 for s in range(1, 11))
