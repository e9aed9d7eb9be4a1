"""Smoke tests of the benchmark scripts: tiny sizes, a few steps, and the files they write hold what they should."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import logging
import math
import os
import sys
import types
import warnings
from dataclasses import fields

import lightning.pytorch as pl
import pytest
import torch

from lightning_prune import BudgetCallback, budget_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the scripts import their shared helpers (result_files.py) from their own folder, as when they run directly
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def _load(name: str):
    """Import ``benchmarks/<name>.py`` (the folder is not a package) under a private module name."""
    module_name = f"_benchmark_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def accuracy():
    return _load("accuracy_at_budget")


@pytest.fixture(autouse=True)
def _restore_global_state():
    """The scripts set torch's thread count and quieten Lightning's loggers: undo both for the tests that follow."""
    threads = torch.get_num_threads()
    names = ("lightning.pytorch", "lightning.fabric", "lightning_prune")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    torch.set_num_threads(threads)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def _read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------- accuracy_at_budget.py
def test_accuracy_at_budget_sgd_recipe_is_the_paper_configs(accuracy):
    args = accuracy.parse_args(["--recipe", "sgd-cosine", "--lr", "0.01", "--epochs", "7"])
    kwargs = accuracy.recipe(args)
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = kwargs["optimizer"](params)
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.01, 0.9, True, 5e-4)
    scheduler = kwargs["lr_scheduler"](optimizer)
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) and scheduler.T_max == 7
    assert set(accuracy.recipe(accuracy.parse_args([]))) == {"optimizer"}  # Adam, no schedule



def test_accuracy_at_budget_passes_the_loop_settings_and_target_end_through(accuracy):
    args = accuracy.parse_args(["--loop", "temperature_end=0.05", "precondition=false", "--target-end", "0.4"])
    settings = accuracy.loop_settings(args)
    assert settings.temperature_end == 0.05 and settings.precondition is False
    assert settings.exempt_share == accuracy.LoopSettings().exempt_share  # the others keep their defaults
    assert args.target_end == 0.4
    assert accuracy.loop_settings(accuracy.parse_args(["--uniform-step"])).precondition is False
    assert accuracy.parse_args([]).target_end == BudgetCallback().target_end
    with pytest.raises(SystemExit, match="temperature_end"):
        accuracy.loop_settings(accuracy.parse_args(["--loop", "temprature_end=0.05"]))

def test_accuracy_at_budget_writes_rows_and_a_summary_for_every_method(accuracy, tmp_path):
    csv_path, json_path = tmp_path / "accuracy.csv", tmp_path / "accuracy.json"
    sparsity = 0.95
    summary = accuracy.main([
        "--seeds", "0", "--epochs", "1", "--sparsities", str(sparsity), "--width", "8", "--hidden", "16",
        "--limit-train-batches", "4", "--threads", "1", "--csv", str(csv_path), "--json", str(json_path),
    ])
    runs = _read_csv(csv_path)
    assert list(runs[0]) == [f.name for f in fields(accuracy.Run)]
    assert sorted(r["method"] for r in runs) == sorted(accuracy.METHODS)
    for r in runs:
        assert r["seed"] == "0"
        assert 0.0 <= float(r["test_acc"]) <= 1.0
        assert float(r["seconds"]) >= 0
        expected_floor = BudgetCallback(sparsity=sparsity).min_layer_keep if r["method"] == "lightning_prune" else 0.0
        assert float(r["min_layer_keep"]) == expected_floor
        if r["method"] == "dense":
            assert float(r["target_sparsity"]) == 0.0 and float(r["achieved_sparsity"]) < 0.01
        else:
            assert float(r["target_sparsity"]) == sparsity
            # every pruning method reaches the budget exactly: ours by finalisation, torch's by its global top-k
            assert float(r["achieved_sparsity"]) == pytest.approx(sparsity, abs=1e-3), r["method"]

    assert [(s.method, s.target_sparsity) for s in summary] == [
        ("dense", 0.0), ("lightning_prune", sparsity), ("modelpruning", sparsity), ("gmp", sparsity),
        ("oneshot", sparsity)]
    for s in summary:  # the figures themselves: test_accuracy_summary_groups_the_seeds_and_divides_by_the_dense_mean
        assert s.runs == 1 and s.acc_std == 0.0
        assert math.isfinite(s.acc_ratio_to_dense) and s.acc_ratio_to_dense >= 0

    report = json.loads(json_path.read_text())
    assert report["environment"]["torch"] == torch.__version__
    assert report["args"]["sparsities"] == [sparsity]
    assert len(report["runs"]) == len(runs) and len(report["summary"]) == len(summary)
    lp = next(s for s in report["summary"] if s["method"] == "lightning_prune")
    assert lp["sparsity_mean"] == pytest.approx(sparsity, abs=1e-3)


def test_accuracy_summary_groups_the_seeds_and_divides_by_the_dense_mean(accuracy):
    """Accuracies chosen so that every figure is known in advance; the runs come in no particular order."""
    def run(method, sparsity, seed, acc):
        return accuracy.Run(method, sparsity, seed, acc, achieved_sparsity=sparsity, seconds=1.0)

    runs = [run("gmp", 0.9, 0, 0.425), run("lightning_prune", 0.9, 1, 0.68), run("dense", 0.0, 0, 0.80),
            run("lightning_prune", 0.95, 0, 0.51), run("lightning_prune", 0.9, 0, 0.85), run("dense", 0.0, 1, 0.90)]
    summary = accuracy.summarize(runs)
    assert [(s.method, s.target_sparsity, s.runs) for s in summary] == [
        ("dense", 0.0, 2), ("lightning_prune", 0.9, 2), ("gmp", 0.9, 1), ("lightning_prune", 0.95, 1)]
    # dense mean 0.85: 0.765 / 0.85 = 0.9, 0.425 / 0.85 = 0.5, 0.51 / 0.85 = 0.6
    assert [s.acc_mean for s in summary] == pytest.approx([0.85, 0.765, 0.425, 0.51], abs=1e-4)
    assert [s.acc_ratio_to_dense for s in summary] == pytest.approx([1.0, 0.9, 0.5, 0.6], abs=1e-4)
    assert summary[1].acc_std == pytest.approx(0.1202, abs=1e-4)  # sample std of 0.85 and 0.68: 0.17 / √2
    assert all(math.isnan(s.acc_ratio_to_dense) for s in accuracy.summarize([r for r in runs if r.method != "dense"]))


@pytest.mark.parametrize("epochs", [1, 5, 20])
@pytest.mark.parametrize("sparsity", [0.9, 0.99])
def test_modelpruning_schedule_reaches_the_target(accuracy, epochs, sparsity):
    """torch prunes a share of the weights still unpruned: the increments compound to the cubic schedule's target."""
    amount = accuracy.GradualAmount(sparsity, epochs)
    kept = 1.0
    for epoch in range(epochs):
        step = amount(epoch)
        assert 0.0 <= step < 1.0
        kept *= 1.0 - step
        assert 1.0 - kept == pytest.approx(accuracy.cumulative_sparsity(epoch, sparsity, epochs), abs=1e-12)
    assert 1.0 - kept == pytest.approx(sparsity, abs=1e-12)


# ------------------------------------------------------------------------------------ gradual_magnitude_pruning.py
GMP_SPARSITY, GMP_EPOCHS, GMP_EVERY = 0.9, 5, 4
GMP_STEPS = GMP_EPOCHS * 10  # 40 samples in batches of 4


class _TinyNet(torch.nn.Module):
    """A conv and two linear layers; the conv's weights are 4x larger, so one global threshold keeps more of them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.fc1 = torch.nn.Linear(4 * 6 * 6, 24)
        self.fc2 = torch.nn.Linear(24, 3)
        with torch.no_grad():
            self.conv.weight.mul_(4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


class _ZeroWatch(pl.Callback):
    """Checks in every forward pass that the weights outside GMP's masks are zero, and that masks only shrink."""

    def __init__(self, gmp) -> None:
        self.gmp, self.violations, self.forwards, self.shrinks_only = gmp, [], 0, True
        self._previous = None

    def on_fit_start(self, trainer, pl_module) -> None:
        for index, (module, name) in enumerate(self.gmp._params):
            module.register_forward_pre_hook(lambda module, args, index=index, name=name: self._check(module, index))

    def _check(self, module, index: int) -> None:
        self.forwards += 1
        pruned = ~self.gmp.masks[index]
        if bool(module.weight[pruned].ne(0).any()):
            self.violations.append(index)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        masks = [m.clone() for m in self.gmp.masks]
        if self._previous is not None:
            self.shrinks_only &= all(bool((new & ~old).sum() == 0) for new, old in zip(masks, self._previous))
        self._previous = masks


def _gmp_fit(gmp_module, **kwargs):
    """A GMP run on the tiny net; returns the callback, the watcher, the network and a snapshot per pruning step."""
    from lightning_prune import PrunedClassifier

    pl.seed_everything(0, verbose=False)
    x = torch.randn(40, 1, 8, 8)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True)
    net = _TinyNet()
    model = PrunedClassifier(net, num_classes=3, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    gmp = gmp_module.GradualMagnitudePruning(sparsity=GMP_SPARSITY, **kwargs)
    snapshots = []
    update = gmp.update_masks

    def spy(kept: int, step: int = -1) -> float:
        before = [getattr(m, n).detach().clone() for m, n in gmp._params]
        masks_before = [m.clone() for m in gmp.masks]
        threshold = update(kept, step)
        snapshots.append({"step": step, "kept": kept, "weights": before, "masks_before": masks_before,
                          "masks": [m.clone() for m in gmp.masks], "threshold": threshold})
        return threshold

    gmp.update_masks = spy
    watch = _ZeroWatch(gmp)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=GMP_EPOCHS, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[gmp, watch])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train_dataloaders=loader)
    assert trainer.global_step == GMP_STEPS
    return gmp, watch, net, snapshots


@pytest.fixture(scope="module")
def gmp_run():
    torch.set_num_threads(1)
    return _gmp_fit(_load("gradual_magnitude_pruning"), prune_every=GMP_EVERY)


def test_gmp_masks_follow_the_cubic_schedule_on_optimizer_steps(gmp_run):
    gmp, _, _, snapshots = gmp_run
    ramp = math.ceil(0.6 * GMP_STEPS)  # BudgetCallback's target_end: the budget is reached at 60% of training
    assert gmp.ramp_steps == ramp == 30 and gmp.every == GMP_EVERY
    # every 4 steps while the ramp lasts, and at its end (30 is not a multiple of 4)
    assert [s["step"] for s in snapshots] == [4, 8, 12, 16, 20, 24, 28, 30]
    total = sum(m.numel() for m in snapshots[0]["masks"])
    assert total == 4 * 9 + 144 * 24 + 24 * 3
    for snap in snapshots:
        r = snap["step"] / ramp
        expected_kept = (1 - GMP_SPARSITY * (1 - (1 - r) ** 3)) * total
        kept = sum(int(m.sum()) for m in snap["masks"])
        assert kept == snap["kept"]
        assert abs(kept - expected_kept) <= 1, (snap["step"], kept, expected_kept)
    assert [h["kept"] for h in gmp.history] == [s["kept"] for s in snapshots]


def test_gmp_threshold_is_global_across_layers(gmp_run):
    _, _, _, snapshots = gmp_run
    for snap in snapshots:
        kept = torch.cat([w.abs()[m] for w, m in zip(snap["weights"], snap["masks"])])
        pruned_now = torch.cat([w.abs()[mb & ~m] for w, m, mb in zip(snap["weights"], snap["masks"],
                                                                      snap["masks_before"])])
        assert pruned_now.numel() > 0
        # one threshold: every weight pruned at this step, in any layer, is no larger than every weight kept
        assert float(pruned_now.max()) <= float(kept.min()) == snap["threshold"]
    # and not one share per layer: the conv (weights 4x larger) keeps a larger share than the linear layers
    shares = [float(m.float().mean()) for m in snapshots[-1]["masks"]]
    assert shares[0] > 2 * max(shares[1:]), shares


def test_gmp_meets_the_sparsity_exactly_and_trains_on_with_fixed_masks(gmp_run):
    gmp, _, net, snapshots = gmp_run
    total = sum(m.numel() for m in gmp.masks)
    final = snapshots[-1]
    assert final["kept"] == budget_count(total, GMP_SPARSITY) == round(0.1 * total)
    weights = [net.conv.weight, net.fc1.weight, net.fc2.weight]
    assert sum(int(w.ne(0).sum()) for w in weights) == budget_count(total, GMP_SPARSITY)
    assert all(torch.equal(m, f) for m, f in zip(gmp.masks, final["masks"]))
    # the 20 steps after the last pruning step trained the kept weights
    assert any(not torch.equal(w.detach()[m], b[m]) for w, m, b in zip(weights, gmp.masks, final["weights"]))


def test_gmp_masked_weights_stay_zero_in_every_forward_pass(gmp_run):
    _, watch, _, _ = gmp_run
    assert watch.forwards == 3 * GMP_STEPS
    assert watch.violations == []
    assert watch.shrinks_only


def test_gmp_default_interval_is_a_small_share_of_the_ramp():
    gmp_module = _load("gradual_magnitude_pruning")
    module = _TinyNet()
    trainer = types.SimpleNamespace(global_step=0)
    for total, every in ((1000, 9), (480, 4), (20, 1)):
        gmp = gmp_module.GradualMagnitudePruning(sparsity=0.9, total_steps=total)
        gmp.on_fit_start(trainer, module)
        assert gmp.ramp_steps == math.ceil(0.6 * total) and gmp.every == every
        assert gmp.pruning_steps()[-1] == gmp.ramp_steps
    with pytest.raises(ValueError, match="sparsity"):
        gmp_module.GradualMagnitudePruning(sparsity=1.0)


# --------------------------------------------------------------------------------------------- budget_tracking.py
def test_budget_tracking_measures_the_share_before_the_cut_and_the_cut(tmp_path):
    tracking = _load("budget_tracking")
    rows = tracking.main(["--workloads", "demo_transformer", "--threads", "1", "--json", str(tmp_path / "t.json")])
    (row,) = rows
    assert row.workload == "demo_transformer" and row.steps == 240 and row.metric == "val_loss"
    assert row.budget_share == pytest.approx(0.1, abs=1e-4)
    assert row.relative_gap == pytest.approx(row.hard_share_before_cut / row.budget_share - 1)
    assert row.passed == (abs(row.relative_gap) <= 0.1 and row.cut_effect <= 0.05)
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["rows"][0]["hard_share_before_cut"] == row.hard_share_before_cut


def test_step_phases_times_each_phase_fused_and_eager(tmp_path, monkeypatch):
    phases = _load("step_phases")
    tiny = lambda num_classes: phases.Conv4(num_classes=num_classes, width=8, hidden=16)  # noqa: E731
    monkeypatch.setitem(phases.MODELS, "conv4", tiny)
    threads = torch.get_num_threads()
    try:
        result = phases.main(["--model", "conv4", "--threads", "1", "--rounds", "2", "--json", str(tmp_path / "p.json")])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "p.json").read_text()) == result
    assert {(r["phase"], r["kind"]) for r in result["rows"]} == {
        (p, k) for p in ("gate, T > 0", "gate, T = 0", "recompute", "loop", "budget_step", "finite_check")
        for k in ("fused", "eager")
    }
    assert all(r["ms"] > 0 for r in result["rows"])


def test_channel_accuracy_compares_the_channel_budget_with_ln_structured_and_torch_pruning(tmp_path):
    channel = _load("channel_accuracy")
    result = channel.main(["--threads", "1", "--seeds", "0", "--epochs", "2", "--width", "8", "--hidden", "16",
                           "--sparsities", "0.5", "--json", str(tmp_path / "c.json")])
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == set(channel.METHODS)
    # ours and Torch-Pruning take out half of the 48 channels; ModelPruning's masks zero them but keep the size
    assert rows["channels"]["channels_removed"] == rows["tp_oneshot"]["channels_removed"] == 0.5
    assert rows["ln_structured"]["channels_removed"] == pytest.approx(0.5, abs=0.07)
    assert rows["ln_structured"]["macs_removed"] == 0.0 and rows["dense"]["macs_removed"] == 0.0
    assert 0.5 < rows["channels"]["macs_removed"] < 0.9
    # the smaller network trained from scratch has the channel run's layer widths; the masks-only one keeps all 48
    assert rows["scratch"]["widths"] == rows["channels"]["widths"] and sum(rows["channels"]["widths"]) == 24
    assert rows["scratch"]["macs_removed"] == rows["channels"]["macs_removed"]
    assert rows["ln_structured"]["widths"] == rows["dense"]["widths"] == [8, 8, 16, 16]
    assert all(0 <= r["test_acc"] <= 1 for r in rows.values())


@pytest.mark.parametrize("backbone", ["vgg19", "resnet18"])
def test_channel_accuracy_on_vgg19_and_resnet18(backbone):
    channel = _load("channel_accuracy")
    result = channel.main(["--threads", "1", "--seeds", "0", "--epochs", "1", "--image-size", "32", "--sparsities", "0.5",
                           "--backbone", backbone, "--width-multiplier", "0.125", "--resnet-width", "4",
                           "--methods", "dense", "channels"])
    rows = {r["method"]: r for r in result["rows"]}
    network = channel.BatchNormSetup(argparse.Namespace(**result["args"])).backbone()
    assert type(network).__name__ == {"vgg19": "VGG19", "resnet18": "ResNet18"}[backbone]
    if backbone == "vgg19":  # every convolution's channels can go: half of them went
        assert rows["channels"]["channels_removed"] == pytest.approx(0.5, abs=0.01)
    else:  # only each block's first convolution loses channels: half of its 120 of the 300 at width 4
        assert rows["channels"]["channels_removed"] == pytest.approx(60 / 300, abs=1e-3)
    assert rows["channels"]["macs_removed"] > 0.15 and rows["dense"]["macs_removed"] == 0.0


def test_channel_accuracy_refuses_vgg19_on_small_images(capsys):
    channel = _load("channel_accuracy")
    with pytest.raises(SystemExit) as exit_info:
        channel.main(["--backbone", "vgg19", "--image-size", "16", "--seeds", "0"])
    assert exit_info.value.code == 2 and "halves the image five times" in capsys.readouterr().err


def test_channel_accuracy_scratch_draws_every_weight_anew():
    channel = _load("channel_accuracy")
    torch.manual_seed(0)
    trained = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    with torch.no_grad():
        for p in trained.parameters():
            p.fill_(7.0)
        trained[1].running_mean.fill_(3.0)
    fresh = channel.reinitialized(trained.eval())
    assert fresh.training and [p.shape for p in fresh.parameters()] == [p.shape for p in trained.parameters()]
    assert not any(bool((p == 7.0).any()) for name, p in fresh.named_parameters() if not name.startswith("1."))
    assert torch.equal(fresh[1].weight, torch.ones(4)) and torch.equal(fresh[1].running_mean, torch.zeros(4))
    assert bool((trained[0].weight == 7.0).all())  # the trained network is left as it was


def test_channel_accuracy_scratch_needs_the_channel_run_first():
    channel = _load("channel_accuracy")
    with pytest.raises(SystemExit, match="list channels before it"):
        channel.main(["--threads", "1", "--seeds", "0", "--epochs", "1", "--width", "8", "--hidden", "16",
                      "--sparsities", "0.5", "--methods", "scratch"])


def test_cifar10_full_appends_a_row_per_run_and_skips_the_rows_it_has(tmp_path, monkeypatch):
    """The full-CIFAR protocol's driver on fake files: the config's recipe with the row's method, a row appended when
    its run ends, and a second call that finds the rows and trains nothing."""
    from dataset_fixtures import write_cifar10

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["cifar10_full.py"])
    write_cifar10(tmp_path / "data", rows_per_batch=20)
    full = _load("cifar10_full")
    out = tmp_path / "rows.jsonl"
    args = ["--methods", "dense", "budget", "gmp", "--sparsities", "0.9", "--epochs", "1", "--data-dir",
            str(tmp_path / "data"), "--out", str(out)]
    rows = full.main(args)
    assert [(r["method"], r["sparsity"]) for r in rows] == [("dense", 0.0), ("budget", 0.9), ("gmp", 0.9)]
    dense, budget, gmp = rows
    assert dense["zeros"] < 0.01 and budget["zeros"] >= 0.9 and gmp["zeros"] >= 0.9
    assert 0.0 < budget["in_use_before_cut"] <= 1.0 and budget["epochs"] == 1
    assert [json.loads(line)["method"] for line in out.read_text().splitlines()] == ["dense", "budget", "gmp"]
    assert full.main(args) == []  # all three rows are there: nothing runs again
