"""PruningInspector and the TensorBoard view of a run: every documented tag is written, with sane values."""

from __future__ import annotations

import csv
import glob
import io
import math
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_prune import BudgetCallback, PrunedClassifier, finalize, masked_parameters, reparametrize
from lightning_prune.backbones import Conv4
from lightning_prune.data import DigitsDataModule
from lightning_prune.pruning_inspector import PruningInspector, layer_snapshots

SPARSITY = 0.8
LAYERS = [
    "backbone.features.0.weight",
    "backbone.features.2.weight",
    "backbone.features.5.weight",
    "backbone.features.7.weight",
    "backbone.classifier.1.weight",
    "backbone.classifier.3.weight",
    "backbone.classifier.5.weight",
]

# The tags the README documents (issue 4), grouped by the range their values must lie in.
SHARES = ["prune/kept_soft", "prune/kept_hard", "prune/target_keep", "prune/kept_final", "prune/kept_hard_before"]
SHARES += [f"prune/kept/{name}" for name in LAYERS]
ACCURACIES = ["train/acc", "val/acc", "test/acc", "prune/before_cut/val/acc", "prune/after_cut/val/acc"]
LOSSES = ["train/loss_step", "train/loss_epoch", "val/loss", "test/loss", "prune/before_cut/val/loss"]
THRESHOLDS = [f"inspect/threshold/{name}" for name in LAYERS]
HISTOGRAMS = [f"inspect/score/{name}" for name in LAYERS]
IMAGES = ["inspect/kept_share"]


def _tiny_model() -> PrunedClassifier:
    return PrunedClassifier(Conv4(num_classes=10, in_channels=1, input_size=8, width=4, hidden=8), num_classes=10)


def _trainer(logger, callbacks, max_epochs: int = 2, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        limit_train_batches=3,
        limit_val_batches=2,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=logger,
        callbacks=callbacks,
        **kwargs,
    )


def _read_events(log_dir: str) -> dict[str, dict]:
    """All scalars, histograms and images of the event files of a run (fit and test write one file each)."""
    out: dict[str, dict] = {"scalars": {}, "histograms": {}, "images": {}}
    for path in sorted(glob.glob(f"{log_dir}/events.out.tfevents.*")):
        events = EventAccumulator(path, size_guidance={"scalars": 0, "histograms": 0, "images": 0})
        events.Reload()
        tags = events.Tags()
        for tag in tags["scalars"]:
            out["scalars"].setdefault(tag, []).extend(events.Scalars(tag))
        for tag in tags["histograms"]:
            out["histograms"].setdefault(tag, []).extend(events.Histograms(tag))
        for tag in tags["images"]:
            out["images"].setdefault(tag, []).extend(events.Images(tag))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pl.seed_everything(0)
    model = _tiny_model()
    data = DigitsDataModule(image_size=8, batch_size=64)
    logger = TensorBoardLogger(tmp_path_factory.mktemp("tb"), name="run")
    trainer = _trainer(logger, [BudgetCallback(sparsity=SPARSITY), PruningInspector(bins=16)])
    trainer.fit(model, data)
    trainer.test(model, data, verbose=False)
    return trainer, model, _read_events(trainer.log_dir)


def test_every_documented_scalar_is_logged_with_sane_values(run):
    _, model, events = run
    scalars = events["scalars"]
    expected = SHARES + ACCURACIES + LOSSES + THRESHOLDS + ["prune/lambda", "prune/temperature"]
    missing = [tag for tag in expected if tag not in scalars]
    assert not missing, f"tags not in the event files: {missing}; found {sorted(scalars)}"
    for tag in expected:
        assert all(math.isfinite(e.value) for e in scalars[tag]), tag
    for tag in SHARES + ACCURACIES:
        assert all(0.0 <= e.value <= 1.0 for e in scalars[tag]), tag
    for tag in LOSSES:
        assert all(e.value >= 0.0 for e in scalars[tag]), tag
    assert max(abs(e.value) for e in scalars["prune/lambda"]) > 0.0  # the budget loop acted
    assert all(e.value >= 0.0 for e in scalars["prune/temperature"])
    assert all(e.value > 0.0 for e in scalars["inspect/threshold/backbone.features.0.weight"])
    total = sum(layer.numel for layer in masked_parameters(model))
    [final] = scalars["prune/kept_final"]
    assert abs(final.value - (1.0 - SPARSITY)) <= 1.0 / total
    # the budget scalars are logged at every step (log_every_n_steps=1) until finalisation
    assert len(scalars["prune/kept_soft"]) == 6


def test_histograms_hold_every_weight_of_the_layer(run):
    _, model, events = run
    sizes = {layer.name: layer.numel for layer in masked_parameters(model)}
    for tag in HISTOGRAMS:
        entries = events["histograms"].get(tag)
        assert entries is not None and len(entries) == 2, tag  # one per epoch
        for entry in entries:
            value = entry.histogram_value
            assert value.num == sizes[tag.removeprefix("inspect/score/")]
            assert sum(value.bucket) == value.num
            assert value.min >= 0.0


def test_kept_share_image_per_epoch_and_threshold_after_finalisation(run):
    trainer, model, events = run
    images = events["images"]["inspect/kept_share"]
    assert [img.step for img in images] == [3, 6]
    assert all(img.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and img.width > 100 for img in images)
    # after finalisation the logged threshold is the smallest kept |θ|/s of the layer
    layer = masked_parameters(model)[0]
    kept_scores = layer.mask.score(layer.latent)[layer.mask.kept]
    last = events["scalars"][f"inspect/threshold/{layer.name}"][-1]
    assert last.value == pytest.approx(float(kept_scores.min()), rel=1e-5)
    [inspector] = [cb for cb in trainer.callbacks if isinstance(cb, PruningInspector)]
    assert inspector.state_dict() == {"inspected_hard": True}


@pytest.mark.parametrize("inspector_first", [False, True])
def test_finalisation_after_the_last_inspection_is_inspected_at_train_end(tmp_path, inspector_first):
    pl.seed_everything(0)
    logger = TensorBoardLogger(tmp_path, name="run")
    callbacks = [BudgetCallback(sparsity=SPARSITY), PruningInspector(every_n_epochs=2)]
    trainer = _trainer(logger, callbacks[::-1] if inspector_first else callbacks, max_epochs=3)
    trainer.fit(_tiny_model(), DigitsDataModule(image_size=8, batch_size=64))
    events = _read_events(trainer.log_dir)
    assert [img.step for img in events["images"]["inspect/kept_share"]] == [6, 9]  # epoch 2, then at train end
    assert [e.step for e in events["scalars"]["inspect/threshold/backbone.features.0.weight"]] == [5, 9]


def test_other_logger_warns_once_and_still_gets_the_scalars(tmp_path):
    pl.seed_everything(0)
    logger = CSVLogger(tmp_path, name="run")
    trainer = _trainer(logger, [BudgetCallback(sparsity=SPARSITY), PruningInspector()])
    with pytest.warns(UserWarning, match="need a TensorBoardLogger") as record:
        trainer.fit(_tiny_model(), DigitsDataModule(image_size=8, batch_size=64))
    assert sum("TensorBoardLogger" in str(w.message) for w in record) == 1
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    values = [float(r["inspect/threshold/backbone.features.0.weight"]) for r in rows if r["inspect/threshold/backbone.features.0.weight"]]
    assert len(values) == 2 and all(v > 0 for v in values)


def test_no_logger_warns_and_does_not_crash(tmp_path):
    trainer = _trainer(False, [BudgetCallback(sparsity=SPARSITY), PruningInspector()], max_epochs=1)
    with pytest.warns(UserWarning, match="no logger"):
        trainer.fit(_tiny_model(), DigitsDataModule(image_size=8, batch_size=64))


def test_without_matplotlib_the_image_is_skipped_with_one_warning(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    inspector = PruningInspector()
    with pytest.warns(UserWarning, match="needs matplotlib"):
        assert not inspector._matplotlib_available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not inspector._matplotlib_available()  # warned once only


def test_layer_snapshots_counts_thresholds_and_clamped_range():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    reparametrize(model)
    layers = masked_parameters(model)
    soft = layer_snapshots(layers, bins=8, max_score=0.5)  # most scores lie above 0.5: they go to the last bin
    assert [int(s.counts.sum()) for s in soft] == [256, 64]
    assert all(s.threshold == 1.0 and s.soft_share is not None and not s.hard for s in soft)
    finalize(model, sparsity=0.75)
    hard = layer_snapshots(layers, bins=8)
    for layer, snap in zip(layers, hard):
        assert snap.hard and snap.kept == int(layer.mask.kept.sum())
        assert snap.threshold == pytest.approx(float(layer.mask.score(layer.latent)[layer.mask.kept].min()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_epochs": 0}, "every_n_epochs must be an integer >= 1"),
        ({"every_n_epochs": 1.5}, "every_n_epochs"),
        ({"bins": 1}, r"bins must be an integer in \[2, 10000\]"),
        ({"max_score": 0.0}, "max_score must be > 0"),
    ],
)
def test_invalid_arguments_say_what_is_expected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruningInspector(**kwargs)


def test_png_is_a_real_image(run):
    from PIL import Image

    _, _, events = run
    image = Image.open(io.BytesIO(events["images"]["inspect/kept_share"][-1].encoded_image_string))
    assert image.size[0] > image.size[1] > 100
