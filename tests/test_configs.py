"""The six paper-experiment configs: they parse, and build their trainer, model and datamodule (no download)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_prune import BudgetCallback, PrunedClassifier
from lightning_prune.cli import PruneCLI
from lightning_prune.data import CIFAR10DataModule, TinyImageNetDataModule

try:
    from dataset_fixtures import write_cifar10
except ImportError:  # tests/ imported as a package
    from tests.dataset_fixtures import write_cifar10

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = {
    "cifar10_conv4": (CIFAR10DataModule, "Conv4"),
    "cifar10_vgg19": (CIFAR10DataModule, "VGG19"),
    "cifar10_resnet18": (CIFAR10DataModule, "ResNet18"),
    "tinyimagenet_conv4": (TinyImageNetDataModule, "Conv4"),
    "tinyimagenet_vgg19": (TinyImageNetDataModule, "VGG19"),
    "tinyimagenet_resnet18": (TinyImageNetDataModule, "ResNet18"),
}


@pytest.fixture(autouse=True)
def clean_argv(monkeypatch):
    """LightningCLI warns when both `args` and pytest's own command line are present."""
    monkeypatch.setattr(sys, "argv", ["train.py"])


@pytest.fixture(autouse=True)
def one_thread():
    """Small forward passes on a shared CPU run much faster on one thread than on contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(name: str) -> str:
    return str(REPO / "configs" / f"{name}.yaml")


def test_one_config_per_experiment():
    found = {p.stem for pattern in ("cifar10_*.yaml", "tinyimagenet_*.yaml") for p in (REPO / "configs").glob(pattern)}
    assert found == set(EXPERIMENTS) | {"cifar10_conv4_cpu", "cifar10_vgg19_channels_cpu",
                                        "cifar10_resnet18_channels_cpu", "cifar10_full_resnet18_cpu",
                                        "cifar10_full_vgg19_cpu"}


@pytest.mark.parametrize("name, backbone, width", [("cifar10_full_resnet18_cpu", "ResNet18", 16),
                                                   ("cifar10_full_vgg19_cpu", "VGG19", 16)])
def test_the_full_cifar10_protocol_configs(name, backbone, width, tmp_path, monkeypatch):
    """The README's results protocol: the whole training set (no validation held out), crop and flip, SGD lr 0.1 with
    Nesterov momentum 0.9 and weight decay 5e-4, cosine over the run's 30 epochs, batch 128; the paper's networks at
    a quarter of their width."""
    monkeypatch.chdir(tmp_path)
    cli = PruneCLI(args=["--config", config(name)], run=False)
    model, data = cli.model, cli.datamodule
    assert type(model.backbone).__name__ == backbone
    first = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.out_channels == width
    optimizer = model.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
    group = optimizer.param_groups[0]
    assert (type(optimizer).__name__, group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (
        "SGD", 0.1, 0.9, True, 5e-4)
    assert model.lr_scheduler_factory(optimizer).T_max == cli.trainer.max_epochs == 30
    assert (data.batch_size, data.val_size, data.augment, data.crop_padding) == (128, 0, True, 4)
    assert data.data_dir == "data/cifar10-full"
    [budget] = [cb for cb in cli.trainer.callbacks if isinstance(cb, BudgetCallback)]
    assert budget.sparsity == 0.9 and budget.structure == "weights"


@pytest.mark.parametrize("name, sparsity", [("quickstart_channels", 0.5), ("cifar10_vgg19_channels_cpu", 0.5),
                                            ("cifar10_resnet18_channels_cpu", 0.63)])
def test_channel_configs_ask_for_the_channel_budget(name, sparsity, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = PruneCLI(args=["--config", config(name)], run=False)
    [budget] = [cb for cb in cli.trainer.callbacks if isinstance(cb, BudgetCallback)]
    assert budget.structure == "channels" and budget.sparsity == sparsity
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in cli.model.backbone.modules())


def test_cpu_config_reads_the_prepared_real_images_and_takes_a_sparsity_override(tmp_path, monkeypatch):
    """configs/cifar10_conv4_cpu.yaml: the paper's Conv4 recipe on a subset of the real images (docs/cifar10_real.md)."""
    monkeypatch.chdir(tmp_path)
    args = ["--config", config("cifar10_conv4_cpu"), "--trainer.callbacks.init_args.sparsity", "0.98"]
    cli = PruneCLI(args=args, run=False)
    dm, model, trainer = cli.datamodule, cli.model, cli.trainer
    assert type(dm) is CIFAR10DataModule and dm.data_dir == "data/cifar10-real"
    assert not dm.download and not dm.verify_checksums  # JPEG copies: no download, checksums off
    assert [cb.sparsity for cb in trainer.callbacks if isinstance(cb, BudgetCallback)] == [0.98]
    assert type(model.backbone).__name__ == "Conv4"
    scheduler = model.lr_scheduler_factory(model.optimizer_factory(model.parameters()))
    assert scheduler.T_max == trainer.max_epochs


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_config_builds_model_and_datamodule(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the logger's save_dir is relative
    data_dir = tmp_path / "data"
    cli = PruneCLI(args=["--config", config(name), "--data.init_args.data_dir", str(data_dir)], run=False)
    dm_class, backbone = EXPERIMENTS[name]
    dm, model, trainer = cli.datamodule, cli.model, cli.trainer
    assert not data_dir.exists()  # building the datamodule downloads nothing

    assert type(dm) is dm_class and dm.data_dir == str(data_dir) and dm.download
    assert isinstance(model, PrunedClassifier) and type(model.backbone).__name__ == backbone
    assert model.hparams.num_classes == dm.num_classes
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, *dm.image_shape)).shape == (1, dm.num_classes)

    optimizer = model.optimizer_factory(model.parameters())
    scheduler = model.lr_scheduler_factory(optimizer)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"]
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert scheduler.T_max == trainer.max_epochs >= 100

    budget = [cb for cb in trainer.callbacks if isinstance(cb, BudgetCallback)]
    assert len(budget) == 1 and budget[0].sparsity == 0.9
    checkpoint = trainer.checkpoint_callback
    assert isinstance(checkpoint, ModelCheckpoint) and checkpoint.monitor == "val/acc" and checkpoint.mode == "max"
    assert checkpoint.save_last
    assert isinstance(trainer.logger, TensorBoardLogger) and trainer.logger.name == name
    assert trainer.precision == "32-true"


@pytest.mark.parametrize("name", ["cifar10_resnet18", "quickstart", "quickstart_98"])
def test_sparsity_override_on_the_command_line(name, tmp_path, monkeypatch):
    """The README's override sets the last callback of a config's list: the BudgetCallback in every config."""
    monkeypatch.chdir(tmp_path)
    args = ["--config", config(name), "--trainer.callbacks.init_args.sparsity", "0.95"]
    trainer = PruneCLI(args=args, run=False).trainer
    assert [cb.sparsity for cb in trainer.callbacks if isinstance(cb, BudgetCallback)] == [0.95]


def test_loop_settings_are_set_from_the_command_line_and_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "loop.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_prune.BudgetCallback\n      init_args:\n"
        "        sparsity: 0.8\n        loop:\n          temperature_end: 0.01\n          response_steps: 4\n"
    )
    args = ["--config", config("quickstart"), "--config", str(tmp_path / "loop.yaml")]
    (budget,) = [cb for cb in PruneCLI(args=args, run=False).trainer.callbacks if isinstance(cb, BudgetCallback)]
    assert (budget.sparsity, budget.loop.temperature_end, budget.loop.response_steps) == (0.8, 0.01, 4)
    args = ["--config", config("quickstart"), "--trainer.callbacks.init_args.loop.temperature_end", "0.03"]
    (budget,) = [cb for cb in PruneCLI(args=args, run=False).trainer.callbacks if isinstance(cb, BudgetCallback)]
    assert budget.loop.temperature_end == 0.03 and budget.loop.temperature_start == 0.5


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_print_config(name, capsys):
    with pytest.raises(SystemExit) as stop:
        PruneCLI(args=["fit", "--config", config(name), "--print_config"])
    assert stop.value.code in (0, None)
    printed = capsys.readouterr().out
    assert f"name: {name}" in printed and "class_path: lightning_prune.BudgetCallback" in printed


def test_train_py_print_config(tmp_path):
    """The documented command, as a user types it (one config: a fresh interpreter takes seconds)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "fit", "--config", config("tinyimagenet_resnet18"), "--print_config"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "class_path: lightning_prune.data.TinyImageNetDataModule" in result.stdout
    assert not (tmp_path / "data").exists() and not (tmp_path / "logs").exists()


def test_fit_through_the_cli_on_fake_data(tmp_path, monkeypatch):
    """`train.py fit --config configs/cifar10_conv4.yaml` end to end (tiny widths, a few steps, fake CIFAR10)."""
    monkeypatch.chdir(tmp_path)
    write_cifar10(tmp_path / "data", rows_per_batch=20)
    cli = PruneCLI(
        args=[
            "fit", "--config", config("cifar10_conv4"),
            "--data.init_args.verify_checksums", "false", "--data.init_args.num_workers", "0",
            "--data.init_args.val_size", "20", "--data.init_args.batch_size", "16",
            "--model.init_args.backbone.init_args.width", "4", "--model.init_args.backbone.init_args.hidden", "8",
            "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
            "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
            "--trainer.enable_progress_bar", "false",
        ],
    )
    log_dir = Path(cli.trainer.log_dir).resolve()
    assert log_dir.is_relative_to(tmp_path.resolve() / "logs" / "cifar10_conv4")
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    assert (log_dir / "pruned_backbone.pt").is_file()
    assert "test/acc" in cli.trainer.callback_metrics
