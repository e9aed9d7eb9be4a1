"""Bad input fails with a clear error before any training step: a checkpoint of another model, a backbone with
nothing to prune. (Bad callback arguments, floors above the budget and patterns that match nothing are covered in
test_budget_callback.py; reparametrize_like on its own in test_reparametrize.py.)"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from plain_modules import quiet_trainer
from torch import nn

from lightning_prune import BudgetCallback, PrunedClassifier, masked_parameters
from lightning_prune.backbones import Conv4, ResNet18
from lightning_prune.checkpoint_format import reparametrized_state_dict
from lightning_prune.data import DigitsDataModule


def _conv4(width: int) -> Conv4:
    return Conv4(num_classes=10, in_channels=1, input_size=8, width=width, hidden=16)


class _Counting(PrunedClassifier):
    steps = 0

    def training_step(self, batch, batch_idx):
        type(self).steps += 1
        return super().training_step(batch, batch_idx)


def _checkpoint(path, backbone: nn.Module, pruned: bool) -> str:
    """A real checkpoint after 2 optimizer steps (pruned: with BudgetCallback, so it holds reparametrized weights)."""
    torch.manual_seed(0)
    callbacks = [BudgetCallback(sparsity=0.5)] if pruned else []
    trainer = quiet_trainer(max_steps=2, callbacks=callbacks)
    with nullcontext() if pruned else pytest.warns(UserWarning, match="without a BudgetCallback"):
        trainer.fit(PrunedClassifier(backbone, num_classes=10), DigitsDataModule(image_size=8, batch_size=128))
    trainer.save_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("ckpts")
    return {
        "conv4_w4_pruned": _checkpoint(folder / "conv4_w4_pruned.ckpt", _conv4(4), pruned=True),
        "conv4_w4_dense": _checkpoint(folder / "conv4_w4_dense.ckpt", _conv4(4), pruned=False),
        "resnet_pruned": _checkpoint(folder / "resnet_pruned.ckpt", _resnet(), pruned=True),
        "resnet_dense": _checkpoint(folder / "resnet_dense.ckpt", _resnet(), pruned=False),
    }


def _resnet() -> ResNet18:
    return ResNet18(num_classes=10, in_channels=1, width=2)


def test_the_checkpoints_load_into_the_model_they_come_from(checkpoints):
    """The counterpart of the failures below: the same files load strictly into the right model."""
    for name, backbone in (("conv4_w4_pruned", _conv4(4)), ("conv4_w4_dense", _conv4(4))):
        model = PrunedClassifier.load_from_checkpoint(checkpoints[name], backbone=backbone, strict=True)
        assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("name", ["conv4_w4_pruned", "conv4_w4_dense"])
def test_checkpoint_of_a_narrower_conv4_is_refused_naming_the_layer_and_shapes(checkpoints, name):
    # a pruned checkpoint holds plain weights, like a dense one: torch names the tensor and both shapes
    match = r"size mismatch for backbone\.features\.0\.weight: copying a param with shape torch\.Size\(\[4, 1, 3, 3\]\)"
    with pytest.raises(RuntimeError, match=match):
        PrunedClassifier.load_from_checkpoint(checkpoints[name], backbone=_conv4(8))


@pytest.mark.parametrize("name", ["resnet_pruned", "resnet_dense"])
def test_checkpoint_of_another_backbone_class_is_refused_naming_both(checkpoints, name):
    with pytest.warns(UserWarning, match="trained with a ResNet18 backbone but this PrunedClassifier has a Conv4"):
        with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"backbone\.features\.0\.weight\""):
            PrunedClassifier.load_from_checkpoint(checkpoints[name], backbone=_conv4(4))


def _former_layout(path, tmp_path) -> str:
    """The checkpoint as lightning_prune 0.2 wrote it: the reparametrized module's state_dict."""
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["state_dict"] = reparametrized_state_dict(checkpoint)
    del checkpoint["lightning_prune"]["masks"]
    torch.save(checkpoint, tmp_path / "former.ckpt")
    return str(tmp_path / "former.ckpt")


def test_a_checkpoint_in_the_former_layout_still_loads(checkpoints, tmp_path):
    plain = PrunedClassifier.load_from_checkpoint(checkpoints["conv4_w4_pruned"], backbone=_conv4(4)).eval()
    former = PrunedClassifier.load_from_checkpoint(_former_layout(checkpoints["conv4_w4_pruned"], tmp_path),
                                                   backbone=_conv4(4)).eval()
    assert masked_parameters(former) and not masked_parameters(plain)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(former(x), plain(x), rtol=0, atol=1e-6)


def test_a_former_layout_checkpoint_of_another_backbone_is_refused_naming_the_tensor(checkpoints, tmp_path):
    with pytest.raises(ValueError, match=r"trained with a ResNet18 backbone but this PrunedClassifier has a Conv4.*"
                       r"reparametrizes 'backbone\.conv1\.weight' but the model has no such tensor"):
        PrunedClassifier.load_from_checkpoint(_former_layout(checkpoints["resnet_pruned"], tmp_path),
                                                  backbone=_conv4(4))


def test_resuming_fit_from_another_models_checkpoint_fails_before_any_step(checkpoints):
    """The callback has reparametrized the model when Lightning restores the checkpoint: the shapes are still checked."""
    _Counting.steps = 0
    model = _Counting(_conv4(8), num_classes=10)
    trainer = quiet_trainer(max_steps=4, callbacks=[BudgetCallback(sparsity=0.5)])
    with pytest.raises(ValueError, match=r"'backbone\.features\.0\.weight' has shape \(8, 1, 3, 3\) in the model"):
        trainer.fit(model, DigitsDataModule(image_size=8), ckpt_path=checkpoints["conv4_w4_pruned"])
    assert _Counting.steps == 0 and trainer.global_step == 0


class _CountingData(DigitsDataModule):
    loaders = 0

    def train_dataloader(self):
        type(self).loaders += 1
        return super().train_dataloader()


def test_backbone_with_nothing_to_prune_fails_at_setup():
    _Counting.steps = _CountingData.loaders = 0
    backbone = nn.Sequential(nn.BatchNorm2d(1), nn.ReLU(), nn.AdaptiveAvgPool2d((1, 10)), nn.Flatten())  # 10 logits
    model = _Counting(backbone, num_classes=10)
    trainer = quiet_trainer(max_epochs=1, callbacks=[BudgetCallback(sparsity=0.9)])
    with pytest.raises(ValueError, match=r"_Counting has no tensor to prune \(no weight of 2 or more dimensions.*"
                       r"Remove the callback"):
        trainer.fit(model, _CountingData(image_size=8))
    assert _Counting.steps == 0 and _CountingData.loaders == 0 and trainer.global_step == 0
