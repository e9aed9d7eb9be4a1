"""The pruning report: numbers of a short quickstart run's checkpoint and exports, one row per masked tensor (any
kind: conv/linear weights, attention projections, Hugging Face Conv1D), MACs, outputs, and errors."""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_prune import budget_count, finalize, reparametrize, save_pruned
from lightning_prune.checkpoint_format import reparametrized_state_dict
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
HAND_POSITIONS = {"features.0.weight": 64, "features.2.weight": 64, "features.5.weight": 16, "features.7.weight": 16}
HAND_POSITIONS.update({"classifier.1.weight": 1, "classifier.3.weight": 1, "classifier.5.weight": 1})
HAND_DENSE_MACS = {"features.0.weight": 2304, "features.2.weight": 9216, "features.5.weight": 4608}
HAND_DENSE_MACS.update({"features.7.weight": 9216})
HAND_DENSE_MACS.update({"classifier.1.weight": 256, "classifier.3.weight": 64, "classifier.5.weight": 80})
MASK = re.compile(r"^(?:(?P<module>.+)\.)?parametrizations\.(?P<param>[^.]+)\.0\.kept$")


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
                    # every epoch's checkpoint: epoch 0's is from before the cut, whichever epoch is best
                    "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                    "--trainer.callbacks.filename=every-{epoch}", "--trainer.callbacks.save_top_k=-1",
                ],
                save_config_kwargs={"overwrite": True},
            )  # fmt: skip
            log_dir = Path(cli.trainer.log_dir).resolve()
            # the end-of-fit state, wherever ModelCheckpoint's `last` happens to point
            cli.trainer.save_checkpoint(log_dir / "checkpoints" / "final.ckpt")
    finally:
        torch.set_num_threads(threads)
    soft = log_dir / "checkpoints" / "every-epoch=0.ckpt"
    return log_dir, soft


def _rows(report):
    return {row.name: row for row in report.tensors}


def _mask_sums(state: dict, prefix: str = "") -> dict[str, int]:
    """``{"<module>.<param>": mask sum}`` read straight from the mask buffers of a state_dict."""
    sums = {}
    for key, value in state.items():
        match = MASK.match(key)
        if match is not None:
            name = f"{match['module']}.{match['param']}" if match["module"] else match["param"]
            sums[name[len(prefix) :]] = int(value.sum())
    return sums


def test_checkpoint_of_a_cli_run_needs_no_flags(run, tmp_path, capsys):
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
    # one row per masked tensor, named <module>.<param>; kept counts are the masks' sums
    checkpoint = torch.load(final, weights_only=True)
    assert {name: row.kept for name, row in rows.items()} == _mask_sums(reparametrized_state_dict(checkpoint), "backbone.")
    assert list(rows) == list(HAND_DENSE_MACS)
    # MACs of every tensor equal the hand count; pruned MACs count only the kept weights
    assert {name: row.dense_macs for name, row in rows.items()} == HAND_DENSE_MACS
    assert {name: row.pruned_macs for name, row in rows.items()} == {
        name: positions * rows[name].kept for name, positions in HAND_POSITIONS.items()
    }
    assert report.pruned_macs == sum(positions * rows[n].kept for n, positions in HAND_POSITIONS.items())
    # the quickstart's budget (sparsity 0.9) is met exactly
    assert report.sparsity == 0.9
    assert report.kept == report.kept_asked == budget_count(report.weights, 0.9) == round(0.1 * report.weights)
    assert "met exactly" in out
    # the cut's validation metrics are those BudgetCallback recorded, before and after
    recorded = checkpoint["callbacks"]["BudgetCallback"]["report"]
    assert report.cut_metrics["before"] == pytest.approx(recorded["val_before_cut"])
    assert report.cut_metrics["after"] == pytest.approx(recorded["val_after_cut"])
    assert set(report.cut_metrics["after"]) == {"val/loss", "val/acc"}
    assert f"val/acc {recorded['val_before_cut']['val/acc']:.4g} -> {recorded['val_after_cut']['val/acc']:.4g}" in out
    assert report.coverage == recorded["coverage"] and "covers 7 tensors" in report.coverage
    # the sizes are those of the exports the CLI wrote beside: save_pruned's file, and torch.save of the dense
    # backbone's state_dict (as a plain dict: the checkpoint does not hold the backbone's state_dict metadata)
    assert report.compact_bytes == os.path.getsize(log_dir / "pruned_backbone.pt")
    plain = tmp_path / "backbone_state_dict.pt"
    torch.save(dict(torch.load(log_dir / "backbone_state_dict.pt", weights_only=True)), plain)
    assert report.dense_bytes == os.path.getsize(plain)
    assert report.source_bytes == os.path.getsize(final)


def test_exports_give_the_rows_of_the_checkpoint(run):
    log_dir, _ = run
    final = pruning_report(log_dir / "checkpoints" / "final.ckpt")
    for name in ("pruned_backbone.pt", "backbone_state_dict.pt"):
        export = pruning_report(log_dir / name)
        assert export.masks == "non-zero weights"
        assert [(r.name, r.kind, r.shape, r.kept, r.dense_macs, r.pruned_macs) for r in export.tensors] == [
            (r.name, r.kind, r.shape, r.kept, r.dense_macs, r.pruned_macs) for r in final.tensors
        ]
        assert export.sparsity == 0.9  # from config.yaml next to the export
        assert export.source_bytes == os.path.getsize(log_dir / name)
    assert pruning_report(log_dir / "pruned_backbone.pt").compact_bytes == final.compact_bytes


def test_soft_checkpoint_counts_weights_above_the_threshold(run):
    _, soft = run
    report = pruning_report(soft)
    assert report.masks == "soft"
    state = reparametrized_state_dict(torch.load(soft, weights_only=True))
    for row in report.tensors:
        prefix = f"backbone.{row.module_name}.parametrizations.{row.param_name}."
        theta, scale, c = state[prefix + "original"], state[prefix + "0.scale"], state[prefix + "0.threshold"]
        assert row.kept == int((theta.abs() / scale > c).sum())
        assert bool(state[prefix + "0.kept"].all())  # a soft mask's buffer is all ones: it would count every weight
    assert report.kept < report.weights
    assert "not finalised" in report.table()


def test_csv_json_and_plot(run, tmp_path, capsys):
    log_dir, _ = run
    paths = [tmp_path / "r.csv", tmp_path / "r.json", tmp_path / "r.png"]
    argv = [str(log_dir / "pruned_backbone.pt"), "--csv", str(paths[0]), "--json", str(paths[1]), "--plot", str(paths[2])]
    assert main(argv) == 0
    rows = list(csv.DictReader(paths[0].open()))
    report = json.loads(paths[1].read_text())
    assert [r["tensor"] for r in rows] == [*HAND_DENSE_MACS, "total"]
    assert [t["name"] for t in report["tensors"]] == list(HAND_DENSE_MACS)
    assert {r["tensor"]: int(r["dense_macs"]) for r in rows[:-1]} == HAND_DENSE_MACS
    assert int(rows[-1]["dense_macs"]) == report["totals"]["dense_macs"] == sum(HAND_DENSE_MACS.values())
    assert int(rows[-1]["kept"]) == report["totals"]["kept"] == sum(int(r["kept"]) for r in rows[:-1])
    assert report["budget"]["met"] is True and report["budget"]["kept_asked"] == report["totals"]["kept"]
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {paths[2]}" in capsys.readouterr().out


def test_export_elsewhere_needs_the_model_for_macs(run, tmp_path, capsys):
    log_dir, _ = run
    export = tmp_path / "pruned_backbone.pt"
    shutil.copy(log_dir / "pruned_backbone.pt", export)  # no config.yaml next to it
    report = pruning_report(export)
    rows = _rows(report)
    # without the model the report cannot tell how often a tensor is applied: no figure rather than a guess
    assert all(row.dense_macs is None and row.pruned_macs is None for row in rows.values())
    assert rows["features.0.weight"].kind == "Conv2d?" and rows["classifier.1.weight"].kind == "Linear?"
    assert report.dense_macs is None and report.sparsity is None and report.model is None
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
    conv, linear = report.tensors
    # 9x9 input, stride 2, padding 1 -> 5x5 positions; weight 8 x (4/2) x 3 x 3 = 144 -> 25 * 144 MACs
    assert (conv.name, conv.kind, conv.weights, conv.dense_macs) == ("0.weight", "Conv2d", 144, 3600)
    assert conv.kept == result.per_layer["0.weight"][0] and conv.pruned_macs == 25 * conv.kept
    assert (linear.name, linear.dense_macs, linear.pruned_macs) == ("2.weight", 200 * 3, linear.kept)


class _Attention(nn.Module):
    """Tokens (T, 4) -> a linear embedding, one self-attention, a post-norm transformer layer, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.layer(h).mean(1))


# _Attention on 5 tokens, counted by hand (E = 8): each tensor applied once per token, the head once per sample
ATTENTION_MACS = {
    "embed.weight": 5 * 8 * 4,
    "attn.in_proj_weight": 5 * 3 * 8 * 8,  # q, k and v projections of the 5 tokens
    "attn.out_proj.weight": 5 * 8 * 8,
    "layer.self_attn.in_proj_weight": 5 * 3 * 8 * 8,
    "layer.self_attn.out_proj.weight": 5 * 8 * 8,
    "layer.linear1.weight": 5 * 16 * 8,
    "layer.linear2.weight": 5 * 8 * 16,
    "head.weight": 3 * 8,
}


def test_checkpoint_with_attention_projections(tmp_path):
    torch.manual_seed(0)
    model = _Attention()
    assert set(reparametrize(model)) == set(ATTENTION_MACS)  # in_proj_weight is masked as a tensor of its own
    result = finalize(model, sparsity=0.9)
    state = model.state_dict()
    assert "attn.parametrizations.in_proj_weight.original" in state
    path = tmp_path / "attention.ckpt"
    torch.save({"state_dict": state, "global_step": 12}, path)

    report = pruning_report(path)
    rows = _rows(report)
    assert set(rows) == set(ATTENTION_MACS)
    in_proj = rows["attn.in_proj_weight"]
    assert (in_proj.shape, in_proj.weights, in_proj.kind) == ((24, 8), 192, "MultiheadAttention?")
    # kept counts: the masks' sums in the file, and what finalize kept
    assert {name: row.kept for name, row in rows.items()} == _mask_sums(state)
    assert {name: row.kept for name, row in rows.items()} == {name: k for name, (k, _) in result.per_layer.items()}
    assert 0 < in_proj.kept < in_proj.weights
    assert report.kept == result.kept == budget_count(report.weights, 0.9)
    assert report.masks == "hard" and report.step == 12 and report.dense_macs is None  # no model, no MACs

    # with the model: every tensor's MACs, attention projections included, match the hand count
    report = pruning_report(path, input_size=(5, 4), model=_Attention())
    rows = _rows(report)
    assert {name: row.dense_macs for name, row in rows.items()} == ATTENTION_MACS
    assert {name: row.pruned_macs for name, row in rows.items()} == {
        name: macs // rows[name].weights * rows[name].kept for name, macs in ATTENTION_MACS.items()
    }
    assert rows["attn.in_proj_weight"].kind == "MultiheadAttention"
    assert "attn.in_proj_weight" in report.table() and "n/a" not in report.table()


def test_macs_the_report_cannot_infer_are_none(tmp_path):
    class Cross(nn.Module):
        """Cross-attention of 3 query tokens on 5 key tokens, and a tensor used through F.linear by hand."""

        def __init__(self) -> None:
            super().__init__()
            self.same = nn.MultiheadAttention(8, 2, batch_first=True)  # in_proj_weight: 3 q rows, 5 k/v rows
            self.apart = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True)
            self.mix_weight = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):  # x: (N, 8, 8) = 3 query tokens, 5 key tokens
            q, k = x[:, :3], x[:, 3:]
            h = self.same(q, k, k, need_weights=False)[0] + self.apart(q, k[..., :6], k[..., :6], need_weights=False)[0]
            return nn.functional.linear(h, self.mix_weight)

    torch.manual_seed(0)
    model = Cross()
    reparametrize(model)
    finalize(model, sparsity=0.5)
    path = tmp_path / "cross.pt"
    torch.save(model.state_dict(), path)
    report = pruning_report(path, input_size=(8, 8), model=Cross())
    macs = {row.name: row.dense_macs for row in report.tensors}
    assert macs == {
        "same.in_proj_weight": None,  # queries and keys have different token counts: no one figure fits
        "same.out_proj.weight": 3 * 8 * 8,
        "apart.q_proj_weight": 3 * 8 * 8,
        "apart.k_proj_weight": 5 * 8 * 6,
        "apart.v_proj_weight": 5 * 8 * 6,
        "apart.out_proj.weight": 3 * 8 * 8,
        "mix_weight": None,  # a module's own tensor used by hand: no rule
    }
    assert report.dense_macs is None and "MACs n/a for same.in_proj_weight, mix_weight" in report.table()


def test_hugging_face_conv1d_macs(tmp_path):
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D

    def net() -> nn.Module:  # tokens (4, 6) -> Conv1D(nf=10, nx=6): x @ W, W of shape (6, 10)
        return nn.Sequential(conv1d(10, 6), nn.ReLU(), conv1d(3, 10))

    torch.manual_seed(0)
    model = net()
    reparametrize(model)
    result = finalize(model, sparsity=0.75)
    save_pruned(model, tmp_path / "gpt.pt")
    report = pruning_report(tmp_path / "gpt.pt", input_size=(4, 6), model=net())
    rows = _rows(report)
    assert {n: (r.kind, r.shape, r.dense_macs) for n, r in rows.items()} == {
        "0.weight": ("Conv1D", (6, 10), 4 * 60),
        "2.weight": ("Conv1D", (10, 3), 4 * 30),
    }
    assert [r.pruned_macs for r in rows.values()] == [4 * result.per_layer[n][0] for n in rows]


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
    assert "'features.0.weight' has shape (8, 1, 3, 3) in the model but (4, 1, 3, 3) in the file" in (
        capsys.readouterr().err
    )
    linear = json.dumps({"in_features": 4, "out_features": 2})
    assert main([export, "--model", "torch.nn.Linear", "--model-args", linear]) == 2
    assert "has no tensor 'features.0.weight'" in capsys.readouterr().err
    assert main([export, "--model", "lightning_prune.backbones.Conv4", "--model-args", "{num_classes: 10}"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main([export, "--model", "lightning_prune.backbones.Conv4", "--model-args", json.dumps(CONV4_ARGS),
                 "--input-size", "1", "12", "12"]) == 2  # fmt: skip
    assert "pass the size one sample has" in capsys.readouterr().err


def test_python_dash_m_entry_point(run, tmp_path):
    log_dir, _ = run
    bad = tmp_path / "notes.txt"
    bad.write_text("not a checkpoint\n")
    command = [sys.executable, "-m", "lightning_prune.report"]
    result = subprocess.run([*command, str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "is not a checkpoint of lightning_prune" in result.stderr
    result = subprocess.run(
        [*command, str(log_dir / "pruned_backbone.pt")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"^features\.0\.weight +Conv2d +4x1x3x3 +36 ", result.stdout, flags=re.M)
