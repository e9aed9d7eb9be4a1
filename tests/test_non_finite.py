"""A NaN in the middle of training stops it with NonFiniteError and leaves the last good checkpoint untouched."""

from __future__ import annotations

import types

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from plain_modules import quiet_trainer, tiny_conv4

from lightning_prune import BudgetCallback, NonFiniteError, PrunedClassifier, masked_parameters
from lightning_prune.data import DigitsDataModule

# 10 optimizer steps per epoch (1,258 training digits / 128); checkpoints every 5 steps: step=5, step=10 and last


def _snapshot(directory) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


class _Fault(Callback):
    """Injects a NaN at ``global_step == at`` and photographs the checkpoint folder just before it.

    ``where``: ``"update"``, a latent becomes NaN in the optimizer step (as after an exploding gradient);
    ``"after_check"``, a latent becomes NaN at the end of the step, after BudgetCallback's own check (this callback
    comes after it), just before ModelCheckpoint saves that step; ``"input"``, the batch is NaN, so the loss is.
    """

    def __init__(self, where: str, at: int, ckpt_dir, value: float = float("nan")) -> None:
        self.where, self.at, self.ckpt_dir, self.value = where, at, ckpt_dir, value
        self.before: dict[str, tuple[bytes, int]] | None = None

    def _inject(self, trainer, target: torch.Tensor) -> None:
        self.before = _snapshot(self.ckpt_dir) if self.ckpt_dir is not None else {}
        with torch.no_grad():
            target.view(-1)[0] = self.value

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.where == "input" and trainer.global_step == self.at:
            self._inject(trainer, batch[0])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.where == "update" and trainer.global_step == self.at:
            self._inject(trainer, masked_parameters(pl_module)[1].latent)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.where == "after_check" and trainer.global_step == self.at:
            self._inject(trainer, masked_parameters(pl_module)[1].latent)


def _all_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _all_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _all_tensors(value)


#: On an accelerator (simulated here) the checks stay on the device until step 15's checkpoint, which is refused.
DEFERRED = [
    ("update", 11, r"'backbone\.features\.2\.weight' has non-finite latent weights after step 12, found at step 15: "
     r"on cpu the finite checks are read every log_every_n_steps and before each checkpoint"),
    ("after_check", 15, r"'backbone\.features\.2\.weight' has non-finite latent weights after step 15\. "
     r"The checkpoint of this step was not written\."),
    ("input", 12, r"The training loss was nan at step 12, found at step 15: .* no checkpoint was written after it"),
]


@pytest.fixture
def deferred(monkeypatch):
    """Read the finite checks as on an accelerator: at logging steps and before each checkpoint."""
    monkeypatch.setattr("lightning_prune.non_finite.reads_wait_for_the_device", lambda device: True)


@pytest.mark.parametrize("where, at, message", DEFERRED, ids=["nan_latent_from_the_update", "nan_latent_after_the_check",
                                                               "nan_loss"])
def test_deferred_checks_stop_training_before_any_checkpoint_holds_the_nan(tmp_path, deferred, where, at, message):
    test_nan_stops_training_and_the_last_checkpoint_is_intact(tmp_path, where, at, message)


@pytest.mark.parametrize(
    "where, at, message",
    [
        # the optimizer step taken at global_step 11 (the 12th) produces the NaN
        ("update", 11, r"'backbone\.features\.2\.weight' has non-finite latent weights after step 12\."),
        # NaN after the check of step 15, which ModelCheckpoint would save: the save itself is refused
        ("after_check", 15, r"'backbone\.features\.2\.weight' has non-finite latent weights after step 15\. "
         r"The checkpoint of this step was not written\."),
        ("input", 12, r"The training loss is nan at step 12\. Training stopped before the optimizer step"),
    ],
    ids=["nan_latent_from_the_update", "nan_latent_after_the_check", "nan_loss"],
)
def test_nan_stops_training_and_the_last_checkpoint_is_intact(tmp_path, where, at, message):
    torch.manual_seed(0)
    model = PrunedClassifier(tiny_conv4(input_size=8), num_classes=10)
    fault = _Fault(where, at, tmp_path)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1, save_last=True, filename="{step}")
    trainer = quiet_trainer(
        max_epochs=3, callbacks=[BudgetCallback(sparsity=0.8), fault, checkpoint], enable_checkpointing=True
    )
    with pytest.raises(NonFiniteError, match=message):
        trainer.fit(model, DigitsDataModule(image_size=8, batch_size=128))

    assert fault.before is not None and set(fault.before) == {"step=5.ckpt", "step=10.ckpt", "last.ckpt"}
    assert _snapshot(tmp_path) == fault.before  # nothing written, rewritten or removed by the failure
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert last["global_step"] == 10
    tensors = list(_all_tensors(last["state_dict"])) + list(_all_tensors(last["optimizer_states"]))
    assert tensors and all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
    loaded = PrunedClassifier.load_from_checkpoint(tmp_path / "last.ckpt", backbone=tiny_conv4(input_size=8))
    assert torch.isfinite(loaded.eval()(torch.randn(4, 1, 8, 8))).all()


class _InfLossAt(PrunedClassifier):
    """The training loss is +Inf at one step (a cross-entropy is positive: loss × Inf is +Inf, not NaN)."""

    def __init__(self, at: int) -> None:
        super().__init__(tiny_conv4(input_size=8), num_classes=10)
        self.at = at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.global_step == self.at else loss


@pytest.mark.parametrize("read", ["at_once", "deferred"])
@pytest.mark.parametrize("fault", ["inf_loss", "inf_latent", "minus_inf_latent"])
def test_an_inf_stops_training_as_a_nan_does(monkeypatch, read, fault):
    """A NaN is not the only non-finite value: +Inf in the loss, ±Inf in a latent weight stop the fit alike (read at
    once on a CPU, or deferred to the next logging step as on an accelerator)."""
    if read == "deferred":
        monkeypatch.setattr("lightning_prune.non_finite.reads_wait_for_the_device", lambda device: True)
    torch.manual_seed(0)
    if fault == "inf_loss":
        model, callbacks = _InfLossAt(3), []
        message = r"The training loss (is|was) inf at step 3"
    else:
        model = PrunedClassifier(tiny_conv4(input_size=8), num_classes=10)
        callbacks = [_Fault("update", 3, None, value=float("inf") if fault == "inf_latent" else -float("inf"))]
        message = r"'backbone\.features\.2\.weight' has non-finite latent weights after step 4"
    found_at = 5 if read == "deferred" else 3 if fault == "inf_loss" else 4  # deferred: the next logging step
    trainer = quiet_trainer(max_steps=8, log_every_n_steps=5, callbacks=[BudgetCallback(sparsity=0.8), *callbacks])
    with pytest.raises(NonFiniteError, match=message):
        trainer.fit(model, DigitsDataModule(image_size=8, batch_size=128))
    assert trainer.global_step == found_at


def test_check_finite_false_lets_the_nan_through(tmp_path):
    """The counterpart of the test above: without the checks the NaN reaches the checkpoint on disk."""
    torch.manual_seed(0)
    model = PrunedClassifier(tiny_conv4(input_size=8), num_classes=10)
    fault = _Fault("update", 11, tmp_path)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1, save_last=True, filename="{step}")
    trainer = quiet_trainer(
        max_steps=15, callbacks=[BudgetCallback(sparsity=0.8, check_finite=False), fault, checkpoint],
        enable_checkpointing=True,
    )
    trainer.fit(model, DigitsDataModule(image_size=8, batch_size=128))
    state = torch.load(tmp_path / "step=15.ckpt", weights_only=False)["state_dict"]
    assert not torch.isfinite(state["backbone.features.2.weight"]).all()


def test_deferred_checks_are_read_at_logging_steps(deferred):
    """No checkpoint at all: the NaN loss of step 3 is reported at step 5, the first logging step after it."""
    torch.manual_seed(0)
    model = PrunedClassifier(tiny_conv4(input_size=8), num_classes=10)
    fault = _Fault("input", 3, None)
    trainer = quiet_trainer(max_epochs=3, log_every_n_steps=5, callbacks=[BudgetCallback(sparsity=0.8), fault])
    with pytest.raises(NonFiniteError, match=r"loss was nan at step 3, found at step 5"):
        trainer.fit(model, DigitsDataModule(image_size=8, batch_size=128))
    assert trainer.global_step == 5


def test_deferred_checks_are_read_before_the_cut(deferred):
    """A NaN in the last steps, with no logging step or checkpoint after it, stops the fit before the cut."""
    torch.manual_seed(0)
    model = PrunedClassifier(tiny_conv4(input_size=8), num_classes=10)
    callback = BudgetCallback(sparsity=0.8)
    trainer = quiet_trainer(max_steps=14, log_every_n_steps=100, callbacks=[callback, _Fault("update", 12, None)])
    with pytest.raises(NonFiniteError, match=r"after step 13, found at step 14"):
        trainer.fit(model, DigitsDataModule(image_size=8, batch_size=128))
    assert not callback.finalized and not any(bool(p.mask.hard) for p in masked_parameters(model))


def test_a_weights_only_checkpoint_keeps_the_checks_read_at_once(tmp_path, deferred):
    """ModelCheckpoint(save_weights_only=True) saves without the callbacks' on_save_checkpoint: with one, the checks
    are read every step on any device, and the NaN never reaches a file."""
    torch.manual_seed(0)
    model = PrunedClassifier(tiny_conv4(input_size=8), num_classes=10)
    fault = _Fault("update", 11, tmp_path)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1, save_last=True,
                                 filename="{step}", save_weights_only=True)
    trainer = quiet_trainer(max_epochs=3, callbacks=[BudgetCallback(sparsity=0.8), fault, checkpoint],
                            enable_checkpointing=True)
    with pytest.raises(NonFiniteError, match=r"after step 12\. Training stopped before any checkpoint"):
        trainer.fit(model, DigitsDataModule(image_size=8, batch_size=128))
    assert _snapshot(tmp_path) == fault.before and set(fault.before) == {"step=5.ckpt", "step=10.ckpt", "last.ckpt"}


def test_deferred_checks_name_the_ranks_where_the_nan_came_first(monkeypatch):
    """Rank 1's loss is inf at step 12; the all-reduced gradients make rank 0's NaN at step 13: rank 1 is named."""
    from lightning_prune import non_finite

    params = [types.SimpleNamespace(latent=torch.zeros(3), name="layer.weight")]
    watch = non_finite.FiniteWatch()
    watch.deferred, watch._loss = True, torch.tensor([13.0, float("nan")])
    rows = torch.tensor([[13.0, float("nan"), -1.0, 0.0], [12.0, float("inf"), -1.0, 0.0]])
    monkeypatch.setattr(non_finite, "gather_ranks", lambda trainer, tensor: rows)
    trainer = types.SimpleNamespace(global_step=15)
    with pytest.raises(NonFiniteError, match=r"^The training loss was inf on rank 1 at step 12, found at step 15"):
        watch.read(trainer, params)
    rows = torch.tensor([[-1.0, -1.0, 14.0, 1.0], [-1.0, -1.0, 12.0, 1.0]])
    watch._latents = torch.tensor([14.0, 1.0])
    with pytest.raises(NonFiniteError, match=r"^'layer.weight' has non-finite latent weights on rank 1 after step 12"):
        watch.read(trainer, params)
