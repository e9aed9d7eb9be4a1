"""BudgetCallback in the Lightning workflows of public projects: checkpoints read in a new process, manual optimization
with two optimizers, loaders without a length, recurrent and weight-normed layers, configure_model, SWA, a second
budget, frozen weights and name-based parameter groups. Each module here is written as those projects write theirs,
without any knowledge of lightning_prune."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging
from plain_modules import PlainClassifier, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_prune import (
    BudgetCallback,
    budget_count,
    coverage,
    make_permanent,
    masked_parameters,
    plain_named_parameters,
)
from lightning_prune.data import DigitsDataModule

TESTS = os.path.dirname(os.path.abspath(__file__))


def _kept(model: nn.Module) -> tuple[int, int]:
    params = masked_parameters(model)
    return sum(int(p.mask.kept.sum()) for p in params), sum(p.numel for p in params)


def _run_python(code: str) -> str:
    """Run ``code`` in a new process (the test folder on the path, lightning_prune not imported unless the code does)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


# ------------------------------------------------------------------ checkpoints in a new process
@pytest.fixture(scope="module")
def pruned_checkpoint(tmp_path_factory):
    """A PlainClassifier fitted with BudgetCallback and ModelCheckpoint; its outputs on fixed inputs after fit."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = PlainClassifier()
    checkpoint = ModelCheckpoint(dirpath=root, save_last=True)
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=8, callbacks=[BudgetCallback(sparsity=0.9), checkpoint],
                            enable_checkpointing=True)
    trainer.fit(model, DigitsDataModule(image_size=16, batch_size=32))
    inputs = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.save(inputs, root / "inputs.pt")
    model.eval()
    with torch.no_grad():
        outputs = model(inputs)
    return root / "last.ckpt", root / "inputs.pt", outputs, model


def test_load_from_checkpoint_in_a_new_process_needs_no_lightning_prune(pruned_checkpoint):
    path, inputs, outputs, _ = pruned_checkpoint
    out = _run_python(
        "import sys, json, torch\n"
        "from plain_modules import PlainClassifier\n"
        f"model = PlainClassifier.load_from_checkpoint({str(path)!r}).eval()\n"
        f"y = model(torch.load({str(inputs)!r}))\n"
        "assert 'lightning_prune' not in sys.modules\n"
        "weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]\n"
        "print(json.dumps({'y': y.tolist(), 'nonzero': sum(int((w != 0).sum()) for w in weights),"
        " 'total': sum(w.numel() for w in weights)}))\n"
    )
    result = json.loads(out.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(result["y"]), outputs, rtol=0, atol=1e-6)
    assert result["nonzero"] == budget_count(result["total"], 0.9)


def test_trainer_test_with_ckpt_path_in_a_new_process_with_the_callback(pruned_checkpoint):
    path, _, _, model = pruned_checkpoint
    expected = quiet_trainer(limit_val_batches=4).validate(model, DigitsDataModule(image_size=16, batch_size=32),
                                                           verbose=False)[0]["val_acc"]
    out = _run_python(
        "import json, torch\n"
        "from plain_modules import PlainClassifier, quiet_trainer\n"
        "from lightning_prune import BudgetCallback, masked_parameters\n"
        "from lightning_prune.data import DigitsDataModule\n"
        "model = PlainClassifier()\n"
        "trainer = quiet_trainer(limit_val_batches=4, callbacks=[BudgetCallback(sparsity=0.9)])\n"
        "dm = DigitsDataModule(image_size=16, batch_size=32)\n"
        f"acc = trainer.validate(model, dm, ckpt_path={str(path)!r}, verbose=False)[0]['val_acc']\n"
        "print(json.dumps({'acc': acc, 'hard': all(bool(p.mask.hard) for p in masked_parameters(model))}))\n"
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["acc"] == pytest.approx(expected, abs=1e-6) and result["hard"]


def test_resuming_from_a_plain_layout_checkpoint_keeps_the_masks(pruned_checkpoint):
    path, inputs, outputs, _ = pruned_checkpoint
    model = PlainClassifier()
    callback = BudgetCallback(sparsity=0.9)
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=8, callbacks=[callback])
    trainer.fit(model, DigitsDataModule(image_size=16, batch_size=32), ckpt_path=str(path))  # nothing left to train
    assert callback.finalized and callback.report.cut_done
    kept, total = _kept(model)
    assert kept == budget_count(total, 0.9)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(torch.load(inputs)), outputs, rtol=0, atol=1e-6)


# --------------------------------------------------------- optimizer steps that are not batches
class _GAN(pl.LightningModule):
    """Lightning's GAN example, small: manual optimization, two optimizers stepped in every batch, BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 64))
        self.discriminator = nn.Sequential(nn.Linear(64, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        (real,) = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], 8)
        ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(self.generator(z)), ones)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        fake = self.generator(z).detach()
        d_loss = (F.binary_cross_entropy_with_logits(self.discriminator(real), ones)
                  + F.binary_cross_entropy_with_logits(self.discriminator(fake), zeros)) / 2
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        self.log("d_loss", d_loss)

    def configure_optimizers(self):
        return (torch.optim.Adam(self.generator.parameters(), lr=2e-3),
                torch.optim.Adam(self.discriminator.parameters(), lr=2e-3))

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(160, 64)), batch_size=16)


def test_manual_optimization_with_two_optimizers_cuts_at_the_end_of_the_run():
    torch.manual_seed(0)
    model = _GAN()
    callback = BudgetCallback(sparsity=0.8)
    trainer = quiet_trainer(max_epochs=3, callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    assert trainer.global_step == 2 * 10 * 3  # two optimizer steps per batch
    assert callback.report.planned_steps == trainer.global_step
    assert callback.report.step == trainer.global_step  # the cut comes at the end, not half-way
    assert not [w for w in caught if "just before the cut" in str(w.message)]
    kept, total = _kept(model)
    assert kept == budget_count(total, 0.8)


def test_batchnorm_is_re_estimated_under_manual_optimization_without_changing_a_weight():
    from lightning_prune.module_passes import recalibrate_batchnorm

    torch.manual_seed(0)
    model = _GAN()
    trainer = quiet_trainer(max_steps=4)
    trainer.fit(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lrs = [g["lr"] for opt in trainer.optimizers for g in opt.param_groups]
    used = recalibrate_batchnorm(trainer, model, num_batches=3)
    assert used == 3
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"generator.1.running_mean", "generator.1.running_var", "generator.1.num_batches_tracked"}
    assert [g["lr"] for opt in trainer.optimizers for g in opt.param_groups] == lrs


class _Stream(IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(64):
            yield torch.randn(64, generator=g), torch.randint(0, 10, (), generator=g)


class _StreamModule(pl.LightningModule):
    """The DQN example's shape: the data is an IterableDataset with no length."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return DataLoader(_Stream(), batch_size=8)


def test_an_iterable_dataset_with_epochs_only_is_refused_before_the_module_changes():
    model = _StreamModule()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="max_steps.*total_steps"):
        quiet_trainer(max_epochs=2, callbacks=[BudgetCallback(sparsity=0.9)]).fit(model)
    assert not masked_parameters(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_an_iterable_dataset_with_max_steps_reaches_the_budget():
    model = _StreamModule()
    callback = BudgetCallback(sparsity=0.9)
    quiet_trainer(max_steps=24, callbacks=[callback]).fit(model)
    assert callback.report.step == callback.report.planned_steps == 24
    kept, total = _kept(model)
    assert kept == budget_count(total, 0.9)


# ------------------------------------------------------------------ coverage that tells the truth
class _Tagger(pl.LightningModule):
    """A sequence model as audio and NLP projects write them: an embedding, an LSTM, a GRU, a head."""

    def __init__(self, head: nn.Module | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.lstm = nn.LSTM(16, 32, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(64, 32, batch_first=True)
        self.head = head if head is not None else nn.Linear(32, 5)

    def forward(self, tokens):
        return self.head(self.gru(self.lstm(self.embed(tokens))[0])[0])

    def training_step(self, batch, batch_idx):
        tokens, tags = batch
        return F.cross_entropy(self(tokens).reshape(-1, 5), tags.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randint(0, 20, (64, 12), generator=g),
                                        torch.randint(0, 5, (64, 12), generator=g)), batch_size=16)


def test_recurrent_weights_are_covered_and_the_export_computes_the_same():
    torch.manual_seed(0)
    model = _Tagger()
    callback = BudgetCallback(sparsity=0.9)
    quiet_trainer(max_epochs=3, callbacks=[callback]).fit(model)
    names = {p.name for p in masked_parameters(model)}
    assert {"lstm.weight_ih_l0", "lstm.weight_hh_l0_reverse", "gru.weight_hh_l0", "head.weight"} <= names
    covered = coverage(model)
    assert [(name, why) for name, _, why in covered.left_out] == [("embed.weight", "embedding")]
    assert covered.covered == covered.matrix_weights - 20 * 16
    kept, total = _kept(model)
    assert kept == budget_count(total, 0.9)
    tokens = torch.randint(0, 20, (3, 12))
    with torch.no_grad():
        plain = make_permanent(model, inplace=False)
        assert (plain.lstm.weight_ih_l0 == 0).float().mean() > 0.5
        torch.testing.assert_close(plain(tokens), model(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["parametrization", "hook"])
def test_weight_normed_layers_are_counted_left_out_and_warned(norm):
    wrap = torch.nn.utils.parametrizations.weight_norm if norm == "parametrization" else torch.nn.utils.weight_norm
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the hook-based weight_norm
        model = _Tagger(head=wrap(nn.Linear(32, 5)))
    callback = BudgetCallback(sparsity=0.9)
    with pytest.warns(UserWarning, match=r"head\.weight(_v)? \(.*(WeightNorm).*\) stay dense"):
        quiet_trainer(max_steps=2, callbacks=[callback]).fit(model)
    assert "head" not in {p.name.rpartition(".")[0] for p in masked_parameters(model)}
    covered = coverage(model)
    assert covered.share_of_matrix_weights < 1.0
    assert any(name.startswith("head.weight") for name, _, _ in covered.left_out)


def test_orthogonal_and_spectral_norm_layers_alone_are_refused_before_any_change():
    from lightning_prune import reparametrize

    model = nn.Sequential(torch.nn.utils.parametrizations.orthogonal(nn.Linear(8, 8)),
                          torch.nn.utils.parametrizations.spectral_norm(nn.Linear(8, 8)))
    with pytest.raises(ValueError, match="no tensor to prune"):
        reparametrize(model)
    assert not masked_parameters(model)


class _LazyBuilt(pl.LightningModule):
    """Layers created in configure_model (the pattern for large models), idempotent as Lightning asks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(64, 16)
        self.body = None

    def configure_model(self):
        if self.body is not None:
            return
        self.body = nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.body(self.stem(x)), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(64, 64, generator=g), torch.randint(0, 10, (64,), generator=g)),
                          batch_size=16)


def test_layers_built_in_configure_model_are_covered():
    model = _LazyBuilt()
    callback = BudgetCallback(sparsity=0.9)
    quiet_trainer(max_epochs=2, callbacks=[callback]).fit(model)
    assert {p.name for p in masked_parameters(model)} == {"stem.weight", "body.0.weight", "body.2.weight"}
    assert coverage(model).share_of_matrix_weights == 1.0
    kept, total = _kept(model)
    assert total == 64 * 16 + 16 * 128 + 128 * 10 and kept == budget_count(total, 0.9)


# ------------------------------------------------------------------ other callbacks, a second budget
def _swa_fit(swa_first: bool, batchnorm: bool):
    from test_channels import BatchNormClassifier

    torch.manual_seed(0)
    model = BatchNormClassifier() if batchnorm else PlainClassifier()
    swa = StochasticWeightAveraging(swa_lrs=1e-3, swa_epoch_start=0.5)
    budget = BudgetCallback(sparsity=0.9)
    average = {}

    class AverageAtEnd(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            average["theta"] = [p.detach().clone() for p in swa._average_model.parameters()]

    callbacks = [swa, budget] if swa_first else [budget, swa]
    dm = DigitsDataModule(image_size=16, batch_size=32)
    quiet_trainer(max_epochs=4, limit_train_batches=6, callbacks=[*callbacks, AverageAtEnd()]).fit(model, dm)
    return model, budget, average["theta"], dm


@pytest.mark.parametrize("batchnorm", [False, True])
def test_stochastic_weight_averaging_in_either_order_ends_with_its_average_cut_to_the_budget(batchnorm):
    """The cut acts on SWA's average (not on the last step's weights), in either order, and the report's last figure
    is the network the fit ends with."""
    runs = [_swa_fit(swa_first, batchnorm) for swa_first in (True, False)]
    for model, budget, theta, dm in runs:
        assert all(torch.equal(a, b) for a, b in zip(theta, model.parameters()))  # the average's latents
        kept, total = _kept(model)
        assert kept == budget_count(total, 0.9) and all(bool(p.mask.hard) for p in masked_parameters(model))
        reported = (budget.report.val_after_recalibration or budget.report.val_after_cut)["val_acc"]
        dm.setup("fit")
        model.eval()
        with torch.no_grad():
            hits = [(model(x).argmax(1) == y).float() for x, y in dm.val_dataloader()]
        assert reported == pytest.approx(float(torch.cat(hits).mean()), abs=1e-6)
    (first, *_), (second, *_) = runs
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_a_second_callback_with_a_higher_sparsity_prunes_on_to_its_budget():
    torch.manual_seed(0)
    model = PlainClassifier()
    dm = DigitsDataModule(image_size=16, batch_size=32)
    quiet_trainer(max_epochs=2, limit_train_batches=8, callbacks=[BudgetCallback(sparsity=0.9)]).fit(model, dm)
    first = [p.mask.kept.clone() for p in masked_parameters(model)]
    second = BudgetCallback(sparsity=0.95)
    quiet_trainer(max_epochs=2, limit_train_batches=8, callbacks=[second]).fit(model, dm)
    kept, total = _kept(model)
    assert kept == budget_count(total, 0.95)
    assert second.report.cut_done and second.report.kept == kept
    # a weight removed by the first cut starts from 0 and is not brought back for free
    regrown = sum(int((p.mask.kept & ~m).sum()) for p, m in zip(masked_parameters(model), first))
    assert regrown < kept / 2


class _PartlyFrozen(PlainClassifier):
    """A backbone kept frozen (transfer learning): only the head trains."""

    def configure_optimizers(self):
        for p in self.net[:4].parameters():
            p.requires_grad_(False)
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def test_a_frozen_backbone_that_no_optimizer_trains_stays_dense_and_out_of_the_budget():
    torch.manual_seed(0)
    model = _PartlyFrozen()
    frozen = {n: p.detach().clone() for n, p in model.net[:4].named_parameters()}
    callback = BudgetCallback(sparsity=0.9, loop=None)
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=8, callbacks=[callback])
    trainer.fit(model, DigitsDataModule(image_size=16, batch_size=32))
    for name, before in frozen.items():  # untouched by the budget step and by the cut
        assert torch.equal(model.net[:4].get_parameter(name), before), name
    assert [p.name for p in masked_parameters(model)] == ["net.7.weight", "net.9.weight"]
    assert "no optimizer trains it" in callback.report.coverage
    kept, total = _kept(model)
    assert total == 16 * 4 * 4 * 64 + 64 * 10 and kept == budget_count(total, 0.9)


class _MinGPTStyle(PlainClassifier):
    """minGPT's configure_optimizers: decay for the weights of Linear/Conv, none for biases, by parameter name."""

    def configure_optimizers(self):
        decay, no_decay = set(), set()
        for name, _ in plain_named_parameters(self):
            (no_decay if name.endswith("bias") else decay).add(name)
        params = dict(plain_named_parameters(self))
        assert decay | no_decay == set(params), "parameters not sorted into decay / no_decay"
        return torch.optim.AdamW([
            {"params": [params[n] for n in sorted(decay)], "weight_decay": 0.1},
            {"params": [params[n] for n in sorted(no_decay)], "weight_decay": 0.0},
        ], lr=self.lr)


def test_name_based_parameter_groups_see_the_plain_names():
    model = _MinGPTStyle()
    callback = BudgetCallback(sparsity=0.9)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=6, callbacks=[callback])
    trainer.fit(model, DigitsDataModule(image_size=16, batch_size=32))
    decay = trainer.optimizers[0].param_groups[0]["params"]
    assert {id(p.latent) for p in masked_parameters(model)} <= {id(p) for p in decay}
    kept, total = _kept(model)
    assert kept == budget_count(total, 0.9)


# ------------------------------------------------------------------ LightningCLI: fit, then test in a new process
_USER_CLI = """
from lightning.pytorch.cli import LightningCLI
from plain_modules import PlainClassifier
from lightning_prune.data import DigitsDataModule

if __name__ == "__main__":
    LightningCLI(PlainClassifier, DigitsDataModule, save_config_kwargs={"overwrite": True})
"""


def test_a_users_lightning_cli_fits_with_the_callback_then_validates_the_checkpoint_in_a_new_process(tmp_path):
    script = tmp_path / "my_cli.py"
    script.write_text(_USER_CLI)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    common = ["--data.image_size", "16", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
              "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2"]
    fit = [sys.executable, str(script), "fit", *common, "--trainer.max_epochs", "2", "--trainer.limit_train_batches",
           "6", "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks+=lightning_prune.BudgetCallback",
           "--trainer.callbacks.sparsity", "0.8"]
    done = subprocess.run(fit, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (config,) = tmp_path.rglob("config.yaml")
    (ckpt,) = tmp_path.rglob("*.ckpt")
    validate = [sys.executable, str(script), "validate", "--config", str(config), "--ckpt_path", str(ckpt)]
    done = subprocess.run(validate, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "val_acc" in done.stdout
    checkpoint = torch.load(ckpt, weights_only=False)
    weights = [checkpoint["state_dict"][name] for name in checkpoint["lightning_prune"]["masks"]]
    assert sum(int((w != 0).sum()) for w in weights) == budget_count(sum(w.numel() for w in weights), 0.8)
