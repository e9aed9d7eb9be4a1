import glob
import os
import subprocess
import sys

import torch

from lightning_prune import load_pruned
from lightning_prune.backbones import Conv4
from lightning_prune.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")


def test_quickstart_config_fits_tests_and_exports(tmp_path):
    cli = main(
        [
            "fit", "--config", QUICKSTART,
            "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "4",
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        ]
    )
    log_dir = cli.trainer.log_dir
    assert log_dir.startswith(str(tmp_path))
    assert os.path.exists(os.path.join(log_dir, "checkpoints", "last.ckpt"))
    assert glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))
    assert "test/acc" in cli.trainer.callback_metrics
    backbone = Conv4(num_classes=10, in_channels=1, input_size=16)
    plain = torch.load(os.path.join(log_dir, "backbone_state_dict.pt"), weights_only=True)
    backbone.load_state_dict(plain, strict=True)
    weights = [m.weight for m in backbone.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    total = sum(w.numel() for w in weights)
    assert sum(int((w != 0).sum()) for w in weights) == round(0.1 * total)
    compact = load_pruned(os.path.join(log_dir, "pruned_backbone.pt"), Conv4(num_classes=10, in_channels=1, input_size=16))
    for key, value in plain.items():
        assert torch.equal(compact[key], value)


def test_print_config_runs():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "fit", "--config", QUICKSTART, "--print_config"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout
    assert "lightning_prune.BudgetCallback" in out and "sparsity: 0.9" in out


def test_unknown_key_is_refused():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "fit", "--config", QUICKSTART, "--model.init_args.nope", "1"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert out.returncode != 0 and "nope" in out.stderr


def test_the_summary_says_what_each_written_file_is(tmp_path):
    """A channel run's pruned_backbone.pt is as large as the plain file: the line says so instead of 'compact'."""
    from lightning_prune.cli import file_line

    pruned, plain = tmp_path / "pruned_backbone.pt", tmp_path / "backbone_state_dict.pt"
    pruned.write_bytes(b"0" * 3000)
    plain.write_bytes(b"0" * 3000)
    line = file_line(str(pruned), str(plain))
    assert "(3.0 kB, 100% of the plain file" in line and "compact" not in line
    pruned.write_bytes(b"0" * 400)
    assert "(0.4 kB, 13% of the plain file" in file_line(str(pruned), str(plain))
