"""The pruning report: numbers of a short quickstart run's checkpoint and exports, outputs, and errors."""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_prune import finalize, reparametrize, save_pruned
from lightning_prune.cli import PruneCLI
from lightning_prune.report import main, pruning_report

ROOT = Path(__file__).resolve().parents[1]
CONV4_ARGS = {"num_classes": 10, "in_channels": 1, "input_size": 8, "width": 4, "hidden": 8}
# Conv4(width=4, hidden=8) on 1x8x8 inputs, counted by hand (3x3 convolutions, padding 1, 2x2 max-pooling):
#   features.0  Conv2d(1, 4):  8x8 positions x 4*1*9 weights  = 64 x 36  = 2304 MACs
#   features.2  Conv2d(4, 4):  8x8 positions x 4*4*9 weights  = 64 x 144 = 9216
#   features.5  Conv2d(4, 8):  4x4 positions x 8*4*9 weights  = 16 x 288 = 4608
#   features.7  Conv2d(8, 8):  4x4 positions x 8*8*9 weights  = 16 x 576 = 9216
#   classifier.1 Linear(8*2*2=32, 8) = 256, classifier.3 Linear(8, 8) = 64, classifier.5 Linear(8, 10) = 80
HAND_POSITIONS = {"features.0": 64, "features.2": 64, "features.5": 16, "features.7": 16}
HAND_DENSE_MACS = {"features.0": 2304, "features.2": 9216, "features.5": 4608, "features.7": 9216}
HAND_DENSE_MACS.update({"classifier.1": 256, "classifier.3": 64, "classifier.5": 80})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`train.py fit --config configs/quickstart.yaml`, tiny: checkpoints, config.yaml and both exports."""
    tmp = tmp_path_factory.mktemp("quickstart")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run far faster on one thread of a shared CPU
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(tmp)
            cli = PruneCLI(
                args=[
                    "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
                    "--model.init_args.backbone.init_args.width", "4",
                    "--model.init_args.backbone.init_args.hidden", "8",
                    "--model.init_args.backbone.init_args.input_size", "8",
                    "--data.init_args.image_size", "8",
                    "--trainer.accelerator", "cpu", "--trainer.max_epochs", "2",
                    "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
                    "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false",
                    "--trainer.enable_model_summary", "false",
                ],
                save_config_kwargs={"overwrite": True},
            )  # fmt: skip
            log_dir = Path(cli.trainer.log_dir).resolve()
            # the end-of-fit state, wherever ModelCheckpoint's `last` happens to point
            cli.trainer.save_checkpoint(log_dir / "checkpoints" / "final.ckpt")
    finally:
        torch.set_num_threads(threads)
    soft = next(p for p in (log_dir / "checkpoints").glob("epoch=0-*.ckpt"))
    return log_dir, soft


def _rows(report):
    return {row.name: row for row in report.layers}


def _mask_sums(checkpoint: Path) -> dict[str, int]:
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    suffix = ".parametrizations.weight.0.mask"
    return {k[len("backbone.") : -len(suffix)]: int(v.sum()) for k, v in state.items() if k.endswith(suffix)}


def test_checkpoint_of_a_cli_run_needs_no_flags(run, capsys):
    log_dir, _ = run
    final = log_dir / "checkpoints" / "final.ckpt"
    assert main([str(final)]) == 0
    out = capsys.readouterr().out
    assert f"lightning_prune.backbones.Conv4 (from {log_dir / 'config.yaml'}), input 1x8x8" in out
    assert "masks hard (finalised at step 6)" in out
    report = pruning_report(final)
    rows = _rows(report)
    assert report.masks == "hard" and report.model == "lightning_prune.backbones.Conv4"
    assert report.input_size == (1, 8, 8)
    # kept counts are the masks' sums
    assert {name: row.kept for name, row in rows.items()} == _mask_sums(final)
    # MACs of every layer equal the hand count; pruned MACs count only the kept weights
    assert {name: row.dense_macs for name, row in rows.items()} == HAND_DENSE_MACS
    for name, positions in HAND_POSITIONS.items():
        assert rows[name].pruned_macs == positions * rows[name].kept
    assert rows["classifier.1"].pruned_macs == rows["classifier.1"].kept
    # the quickstart's budget (sparsity 0.9) is met exactly; both accuracies of the finalisation are reported
    assert report.sparsity == 0.9
    assert report.kept == report.kept_asked == round(0.1 * report.weights)
    assert "met exactly" in out
    assert set(report.accuracy) == {"acc_soft", "acc_hard"}
    assert 0 < report.compact_bytes < report.dense_bytes < report.source_bytes


def test_exports_give_the_rows_of_the_checkpoint(run):
    log_dir, _ = run
    final = pruning_report(log_dir / "checkpoints" / "final.ckpt")
    for name in ("pruned_backbone.pt", "backbone_state_dict.pt"):
        export = pruning_report(log_dir / name)
        assert export.masks == "non-zero weights"
        assert [(r.name, r.shape, r.kept, r.dense_macs, r.pruned_macs) for r in export.layers] == [
            (r.name, r.shape, r.kept, r.dense_macs, r.pruned_macs) for r in final.layers
        ]
        assert export.sparsity == 0.9  # from config.yaml next to the export
        assert export.source_bytes == os.path.getsize(log_dir / name)
    assert pruning_report(log_dir / "pruned_backbone.pt").compact_bytes == final.compact_bytes


def test_soft_checkpoint_counts_weights_above_the_threshold(run):
    _, soft = run
    report = pruning_report(soft)
    assert report.masks == "soft"
    state = torch.load(soft, weights_only=True)["state_dict"]
    for row in report.layers:
        prefix = f"backbone.{row.name}.parametrizations.weight."
        theta, scale, c = state[prefix + "original"], state[prefix + "0.scale"], state[prefix + "0.threshold"]
        assert row.kept == int((theta.abs() / scale > c).sum())
    assert "not finalised" in report.table()


def test_csv_json_and_plot(run, tmp_path, capsys):
    log_dir, _ = run
    paths = [tmp_path / "r.csv", tmp_path / "r.json", tmp_path / "r.png"]
    argv = [str(log_dir / "pruned_backbone.pt"), "--csv", str(paths[0]), "--json", str(paths[1]), "--plot", str(paths[2])]
    assert main(argv) == 0
    rows = list(csv.DictReader(paths[0].open()))
    report = json.loads(paths[1].read_text())
    assert [r["layer"] for r in rows][-1] == "total"
    assert int(rows[-1]["kept"]) == report["totals"]["kept"] == sum(int(r["kept"]) for r in rows[:-1])
    assert int(rows[0]["dense_macs"]) == HAND_DENSE_MACS["features.0"]
    assert report["budget"]["met"] is True and report["budget"]["kept_asked"] == report["totals"]["kept"]
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {paths[2]}" in capsys.readouterr().out


def test_export_elsewhere_needs_the_model_for_convolutions(run, tmp_path, capsys):
    log_dir, _ = run
    export = tmp_path / "pruned_backbone.pt"
    shutil.copy(log_dir / "pruned_backbone.pt", export)  # no config.yaml next to it
    report = pruning_report(export)
    rows = _rows(report)
    assert rows["features.0"].dense_macs is None and rows["classifier.1"].dense_macs == 256
    assert report.dense_macs is None and report.sparsity is None
    assert "n/a" in report.table() and "asked: unknown" in report.table()
    argv = [str(export), "--model", "lightning_prune.backbones.Conv4", "--model-args", json.dumps(CONV4_ARGS)]
    assert main(argv) == 0  # the input size 1x8x8 comes from the model's arguments
    out = capsys.readouterr().out
    assert "input 1x8x8" in out and f"{sum(HAND_DENSE_MACS.values()):,}" in out


def test_known_convolution_with_stride_and_groups(tmp_path):
    def net() -> nn.Module:
        return nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2), nn.Flatten(), nn.Linear(8 * 5 * 5, 3))

    torch.manual_seed(0)
    model = net()
    reparametrize(model)
    result = finalize(model, sparsity=0.5)
    save_pruned(model, tmp_path / "net.pt")
    report = pruning_report(tmp_path / "net.pt", input_size=(4, 9, 9), model=net())
    conv = report.layers[0]
    # 9x9 input, stride 2, padding 1 -> 5x5 positions; weight 8 x (4/2) x 3 x 3 = 144 -> 25 * 144 MACs
    assert (conv.kind, conv.weights, conv.dense_macs) == ("Conv2d", 144, 3600)
    assert conv.kept == result.per_layer["0"][0] and conv.pruned_macs == 25 * conv.kept
    assert report.layers[1].dense_macs == 200 * 3


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    files["text"] = tmp_path / "notes.txt"
    files["text"].write_text("hello\n")
    files["pickle"] = tmp_path / "object.pkl"
    files["pickle"].write_bytes(pickle.dumps(ValueError("not a checkpoint")))
    files["dict"] = tmp_path / "dict.pt"
    torch.save({"epoch": 3, "lr": 0.1}, files["dict"])
    files["dense_ckpt"] = tmp_path / "dense.ckpt"
    torch.save({"state_dict": nn.Linear(4, 2).state_dict(), "pytorch-lightning_version": "2.6.6"}, files["dense_ckpt"])
    files["dense_state"] = tmp_path / "dense_state.pt"
    torch.save(nn.Sequential(nn.Linear(4, 2)).state_dict(), files["dense_state"])
    files["missing"] = tmp_path / "missing.ckpt"
    return files


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("text", "torch.load"),
        ("pickle", "torch.load"),
        ("dict", "holds a dict"),
        ("dense_ckpt", "not trained with lightning_prune.BudgetCallback"),
        ("dense_state", "no pruned weight"),
        ("missing", "does not exist"),
    ],
)
def test_file_that_is_not_of_this_package_exits_2(kind, match, tmp_path, capsys):
    assert main([str(_bad_files(tmp_path)[kind])]) == 2
    err = capsys.readouterr().err
    assert match in err and "Expected a Lightning checkpoint (.ckpt)" in err


def test_wrong_model_or_arguments_exit_2(run, capsys):
    log_dir, _ = run
    export = str(log_dir / "pruned_backbone.pt")
    other = json.dumps({**CONV4_ARGS, "width": 8})
    assert main([export, "--model", "lightning_prune.backbones.Conv4", "--model-args", other]) == 2
    assert "has a weight of shape" in capsys.readouterr().err
    assert main([export, "--model", "lightning_prune.backbones.Conv4", "--model-args", "{num_classes: 10}"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main([export, "--model", "lightning_prune.backbones.Conv4", "--model-args", json.dumps(CONV4_ARGS),
                 "--input-size", "1", "12", "12"]) == 2  # fmt: skip
    assert "pass the size one sample has" in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a checkpoint\n")
    result = subprocess.run(
        [sys.executable, "-m", "lightning_prune.report", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "is not a checkpoint of lightning_prune" in result.stderr
