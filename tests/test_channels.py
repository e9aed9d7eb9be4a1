"""The channel budget (``structure="channels"``): exact zeros for removed channels, which channels may go, the
smaller network computing the same outputs, checkpoints, and the callback in a user's module with BatchNorm."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from plain_modules import CrashAt, PlainClassifier, quiet_trainer
from torch import Tensor, nn

from lightning_prune import (
    BudgetCallback,
    budget_count,
    finalize,
    masked_parameters,
    remove_channels,
    reparametrize_like,
    save_smaller,
)
from lightning_prune.backbones import VGG19, ResNet18
from lightning_prune.batchnorm_gate import followers
from lightning_prune.budget import rounded_budget
from lightning_prune.channel_groups import ChannelGroups, channel_groups, reparametrize_channels
from lightning_prune.channel_removal import layer_shapes, macs_and_parameters
from lightning_prune.checkpoint_format import reparametrized_state_dict, to_plain_checkpoint
from lightning_prune.data import DigitsDataModule

TESTS = os.path.dirname(os.path.abspath(__file__))


def _random_channel_masks(model: nn.Module, x: Tensor, sparsity: float, seed: int = 0) -> ChannelGroups:
    """Mask the channels ``channel_groups`` finds and cut them at ``sparsity`` from random scales (an untrained
    network); every BatchNorm layer, joined or not, gets random statistics."""
    groups = channel_groups(model, x, residual_streams=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.weight.copy_(torch.rand(bn.weight.shape, generator=generator) + 0.1)
                bn.bias.copy_(torch.randn(bn.bias.shape, generator=generator))
                bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=generator) * 0.1)
                bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=generator) + 0.5)
    reparametrize_channels(model, list(groups.removable), joined=groups.joined)
    finalize(model, sparsity=sparsity)
    return groups


class BatchNormClassifier(PlainClassifier):
    """A user's classifier with BatchNorm, written without any knowledge of lightning_prune."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__(lr)
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10),
        )


def test_a_removed_channel_outputs_exactly_zero_and_the_others_are_unchanged():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    plain = nn.BatchNorm2d(6).eval()
    plain.load_state_dict(bn.state_dict())
    reparametrize_channels(nn.Sequential(bn), ["0"])
    kept = torch.tensor([True, False, True, False, True, True])
    bn.parametrizations.weight[0].harden(kept)
    bn.eval()
    x = torch.randn(3, 6, 5, 5)
    y = bn(x)
    assert torch.equal(y[:, ~kept], torch.zeros_like(y[:, ~kept]))
    assert torch.equal(y[:, kept], plain(x)[:, kept])


def test_soft_gate_multiplies_scale_and_shift_alike():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.2, 0.6, 1.0, 1.4]))
        bn.bias.copy_(torch.tensor([1.0, -1.0, 2.0, 0.5]))
    x = torch.randn(5, 4)
    normalised = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    reparametrize_channels(nn.Sequential(bn), ["0"])
    mask = bn.parametrizations.weight[0]
    h = torch.sigmoid((bn.parametrizations.weight.original.abs() / mask.scale - 1.0) / mask.temperature)
    expected = normalised * (bn.parametrizations.weight.original * h) + bn.bias * h
    torch.testing.assert_close(bn(x), expected)


class ResidualClassifier(PlainClassifier):
    """A user's classifier with a residual block (the torchvision ResNet pattern), knowing nothing of pruning."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__(lr)
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
                                   nn.Conv2d(24, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16 * 4, 10))
        del self.net

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(x + self.block(x)))


class _Concatenation(nn.Module):
    """Two branches concatenated, then one BatchNorm over both (the DenseNet pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.norm = nn.BatchNorm2d(8)
        self.out = nn.Conv2d(8, 2, 3)

    def forward(self, x):
        return self.out(torch.relu(self.norm(torch.cat([self.a(x), self.b(x)], 1))))


class _Sigmoid(nn.Module):
    """A BatchNorm layer followed by a function of σ, and optionally a convolution with no BatchNorm adding into it."""

    def __init__(self, function, side: bool = False) -> None:
        super().__init__()
        self.conv, self.bn, self.out = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 3)
        self.side = nn.Conv2d(3, 4, 3, padding=1) if side else None
        self.function = function

    def forward(self, x):
        y = self.function(self.bn(self.conv(x)))
        return self.out(y + self.side(x) if self.side is not None else y)


def test_which_channels_go_alone_and_which_go_together():
    x = torch.randn(2, 3, 32, 32)
    vgg = channel_groups(VGG19(width_multiplier=0.25), x)
    assert len(vgg.removable) == 16 and not vgg.kept_whole and not vgg.joined
    blocks = channel_groups(ResNet18(width=8), x)  # by default the residual streams stay whole
    assert sorted(blocks.removable) == sorted(f"layer{i}.{j}.bn1" for i in range(1, 5) for j in range(2))
    assert not blocks.joined and "residual stream" in blocks.kept_whole["bn1"]
    assert blocks.kept_whole["layer4.1.bn2"] == blocks.kept_whole["bn1"]
    resnet = channel_groups(ResNet18(width=8), x, residual_streams=True)
    streams = {"bn1": ["layer1.0.bn2", "layer1.1.bn2"]} | {
        f"layer{i}.0.bn2": [f"layer{i}.0.shortcut.1", f"layer{i}.1.bn2"] for i in (2, 3, 4)}
    assert resnet.joined == streams and not resnet.kept_whole
    assert sorted(resnet.removable) == sorted([f"layer{i}.{j}.bn1" for i in range(1, 5) for j in range(2)] + list(streams))
    assert sum(resnet.removable.values()) == 2 * (8 + 16 + 32 + 64) + (8 + 16 + 32 + 64)  # a stream counts once
    assert "20 BatchNorm layers, 360 channels (4 groups of joined layers counted once)" in resnet.summary()
    concatenated = channel_groups(_Concatenation(), x)
    assert set(concatenated.kept_whole) == {"a.1", "b.1", "norm"} and not concatenated.removable
    assert "concatenation" in concatenated.kept_whole["b.1"]
    excluded = channel_groups(ResNet18(width=8), x, exclude=["layer1.1.bn2"], residual_streams=True)
    assert "bn1" not in excluded.removable and "exclude" in excluded.kept_whole["layer1.0.bn2"]
    sigmoid = channel_groups(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sigmoid(), nn.Conv2d(4, 2, 3)), x)
    assert not sigmoid.removable and "sigmoid" in sigmoid.kept_whole["1"]  # σ(0) = 0.5: a gated channel is not 0
    doubled = channel_groups(_Sigmoid(lambda y: torch.sigmoid(y) * 2), x)  # a product, but not with the channel
    assert not doubled.removable and "sigmoid" in doubled.kept_whole["bn"]
    assert list(channel_groups(_Sigmoid(lambda y: y * torch.sigmoid(y)), x).removable) == ["bn"]  # swish: 0·σ(0) = 0
    swish_and_side = channel_groups(_Sigmoid(lambda y: y * torch.sigmoid(y), side=True), x, residual_streams=True)
    assert not swish_and_side.removable and "no BatchNorm after it" in swish_and_side.kept_whole["bn"]
    last = channel_groups(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), x)
    assert not last.removable and "output" in last.kept_whole["1"]


class _UnnormalisedResidual(nn.Module):
    """A residual addition of a convolution with no BatchNorm after it: its channels cannot be gated."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 2, 3)

    def forward(self, x):
        x = self.stem(x)
        return self.out(x + self.branch(x))


def test_which_channels_go_in_torchvision_networks():
    torchvision = pytest.importorskip("torchvision")
    x = torch.randn(2, 3, 32, 32)
    squeeze_excitation = channel_groups(torchvision.models.mobilenet_v3_small(num_classes=10), x, residual_streams=True)
    assert len(squeeze_excitation.removable) + sum(map(len, squeeze_excitation.joined.values())) == 34
    assert not squeeze_excitation.kept_whole  # the scales go with the channels they multiply
    grouped = channel_groups(torchvision.models.regnet_y_400mf(num_classes=10), x, residual_streams=True)
    assert grouped.removable and all("grouped convolution" in why for why in grouped.kept_whole.values())
    assert "trunk_output.block1.block1-0.f.a.1" in grouped.kept_whole  # read by a grouped 3x3 convolution
    unnormalised = channel_groups(_UnnormalisedResidual(), x)
    assert not unnormalised.removable and "no BatchNorm after it" in unnormalised.kept_whole["stem.1"]
    with pytest.raises(ValueError, match="Torch-Pruning could not trace ShuffleNetV2.*structure='weights'"):
        channel_groups(torchvision.models.shufflenet_v2_x0_5(num_classes=10), x)


@pytest.mark.parametrize("backbone", ["vgg19", "resnet18", "mobilenet_v2", "mobilenet_v3_small"])
def test_the_smaller_network_computes_what_the_masked_one_computes(backbone):
    torch.manual_seed(0)
    if backbone.startswith("mobilenet"):  # depthwise convolutions; v3: squeeze-excitation scales
        model = getattr(pytest.importorskip("torchvision").models, backbone)(num_classes=10)
        x = torch.randn(2, 3, 32, 32)
    else:
        model, x = (VGG19(width_multiplier=0.25) if backbone == "vgg19" else ResNet18(width=8)), torch.randn(4, 3, 32, 32)
    groups = _random_channel_masks(model, x, sparsity=0.5)
    kept = {p.name.rpartition(".")[0]: int(p.mask.kept.sum()) for p in masked_parameters(model)}
    assert sum(kept.values()) == budget_count(sum(groups.removable.values()), 0.5)
    small = remove_channels(model, x, check=False)
    model.eval()
    torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-5)
    shapes = layer_shapes(small)
    for name, count in kept.items():
        assert shapes[name] == [count]
        for follower in groups.joined.get(name, ()):
            assert shapes[follower] == [count], follower  # a residual stream loses its channels in every layer
    assert macs_and_parameters(small, x)[0] < 0.6 * macs_and_parameters(model, x)[0]
    assert not masked_parameters(small) and masked_parameters(model)  # the model itself keeps its masks
    assert followers(model) and not followers(small) if groups.joined else True


def test_a_removed_channel_of_a_residual_stream_is_zero_in_every_layer_that_adds_into_it():
    torch.manual_seed(0)
    model = ResNet18(width=8).eval()
    _random_channel_masks(model, torch.randn(2, 3, 32, 32), sparsity=0.5)
    removed = ~model.layer2[0].bn2.parametrizations.weight[0].kept
    assert removed.any() and not removed.all()
    outputs = {}
    for name in ("layer2.0.bn2", "layer2.0.shortcut.1", "layer2.1.bn2", "layer2"):
        model.get_submodule(name).register_forward_hook(lambda m, a, out, name=name: outputs.update({name: out}))
    model(torch.randn(2, 3, 32, 32))
    for name, out in outputs.items():
        assert torch.equal(out[:, removed], torch.zeros_like(out[:, removed])), name
        assert (out[:, ~removed] != 0).any(), name


def test_removing_soft_channels_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3))
    reparametrize_channels(model, ["1"])
    with pytest.raises(ValueError, match="soft masks"):
        remove_channels(model, torch.randn(1, 3, 8, 8))


def test_a_checkpoint_before_the_cut_loads_into_a_plain_module_that_computes_the_same():
    torch.manual_seed(0)
    model = BatchNormClassifier().eval()
    reparametrize_channels(model, ["net.1", "net.5"])
    with torch.no_grad():
        model.net[1].bias.normal_()
    x = torch.randn(3, 1, 16, 16)
    checkpoint = {"state_dict": model.state_dict()}
    to_plain_checkpoint(checkpoint, model)
    fresh = BatchNormClassifier().eval()
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=1e-6)
    raw = checkpoint["lightning_prune"]["masks"]["net.1.weight"]["shift"]
    torch.testing.assert_close(raw, model.net[1].bias.detach())  # the shift as trained, for a resume


@pytest.fixture(scope="module")
def channel_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("channels")
    torch.manual_seed(0)
    model = BatchNormClassifier()
    callback = BudgetCallback(sparsity=0.5, structure="channels")
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=10, enable_checkpointing=True,
                            callbacks=[callback, ModelCheckpoint(dirpath=root, save_last=True)])
    trainer.fit(model, DigitsDataModule(image_size=16, batch_size=32))
    return root / "last.ckpt", model, callback


def test_the_callback_cuts_a_users_module_to_the_channel_budget(channel_run):
    _, model, callback = channel_run
    params = masked_parameters(model)
    assert sorted(p.name for p in params) == ["net.1.weight", "net.10.weight", "net.5.weight"]
    assert all(bool(p.mask.hard) for p in params)
    assert callback.report.kept == budget_count(16 + 32 + 64, 0.5) == sum(int(p.mask.kept.sum()) for p in params)
    assert "3 BatchNorm layers, 112 channels" in callback.report.coverage
    x = torch.randn(8, 1, 16, 16)
    small = remove_channels(model, x)
    assert small.net[0].out_channels + small.net[4].out_channels + small.net[9].out_features == callback.report.kept


def _outputs_in_a_new_process(module_class: str, path, x: Tensor, tmp_path) -> Tensor:
    """``module_class.load_from_checkpoint(path)(x)`` in a new process that imports no lightning_prune code."""
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import json, torch\n"
        f"from test_channels import {module_class}\n"
        f"model = {module_class}.load_from_checkpoint({str(path)!r}).eval()\n"
        f"print(json.dumps(model(torch.load({str(tmp_path / 'x.pt')!r})).tolist()))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))


def test_a_channel_checkpoint_loads_in_a_new_process_without_lightning_prune(channel_run, tmp_path):
    path, model, _ = channel_run
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    got = _outputs_in_a_new_process("BatchNormClassifier", path, x, tmp_path)
    torch.testing.assert_close(got, model.eval()(x), rtol=0, atol=1e-5)


def test_the_saved_smaller_network_runs_without_its_classes_at_any_batch_size(channel_run, tmp_path):
    """Traced with one input, as docs/channels.md shows; run at batch 1, 16 and 64 in a new process."""
    _, model, _ = channel_run
    x = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    small = remove_channels(model, x[:1])
    path = save_smaller(small, tmp_path / "small.pt2", x[:1])
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import json, torch\n"
        f"program = torch.export.load({str(path)!r}).module()\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        "print(json.dumps([program(x[:b]).tolist() for b in (1, 16, 64)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = json.loads(done.stdout.strip().splitlines()[-1])
    expected = model.eval()(x)
    for batch, got in zip((1, 16, 64), outputs):
        torch.testing.assert_close(torch.tensor(got), expected[:batch], rtol=0, atol=1e-5)
    shapes = json.loads((tmp_path / "small.pt2.shapes.json").read_text())
    assert shapes["net.1"] == [small.net[1].num_features] and shapes["net.1"][0] < 16


def test_a_module_without_batchnorm_is_refused_before_any_change():
    model = PlainClassifier()
    with pytest.raises(ValueError, match="no channel to prune"):
        _fit(model, BudgetCallback(structure="channels"))
    assert not masked_parameters(model) and not any("parametrizations" in n for n, _ in model.named_parameters())


class _DictBatches(BatchNormClassifier):
    """A module whose batches are dicts (Hugging Face style): no input to trace without example_input_array."""

    def train_dataloader(self):
        data = [{"x": torch.randn(1, 16, 16), "y": torch.tensor(0)} for _ in range(8)]
        return torch.utils.data.DataLoader(data, batch_size=4)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["x"]), batch["y"])


def test_without_an_input_to_trace_the_error_names_example_input_array():
    model = _DictBatches()
    with pytest.raises(ValueError, match="example_input_array"):
        quiet_trainer(max_epochs=1, callbacks=[BudgetCallback(structure="channels")]).fit(model)
    model.example_input_array = torch.randn(2, 1, 16, 16)
    callback = BudgetCallback(sparsity=0.5, structure="channels")
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(model)
    assert callback.report.kept == budget_count(112, 0.5)


def _fit(model: pl.LightningModule, callback: BudgetCallback) -> None:
    quiet_trainer(max_epochs=1, limit_train_batches=2, callbacks=[callback]).fit(
        model, DigitsDataModule(image_size=16, batch_size=32)
    )


def _residual_fit(root, ckpt_path=None, crash_at=None, seed=0):
    torch.manual_seed(seed)  # a resumed run starts from other random weights: the checkpoint must overwrite them
    model = ResidualClassifier()
    callback = BudgetCallback(sparsity=0.5, structure="channels", residual_streams=True)
    callbacks = [callback, ModelCheckpoint(dirpath=root, save_last=True)]
    if crash_at is not None:
        callbacks.append(CrashAt(crash_at))
    trainer = quiet_trainer(max_epochs=3, limit_train_batches=5, limit_val_batches=2, enable_checkpointing=True,
                            deterministic=True, callbacks=callbacks)
    trainer.fit(model, DigitsDataModule(image_size=16, batch_size=32), ckpt_path=ckpt_path)
    return model, callback


@pytest.fixture(scope="module")
def residual_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("residual")
    model, callback = _residual_fit(root / "full")
    return root, model, callback


def test_the_callback_removes_a_residual_streams_channels_from_every_layer(residual_run):
    _, model, callback = residual_run
    assert sorted(p.name for p in masked_parameters(model)) == ["block.1.weight", "stem.1.weight"]
    assert followers(model) == {"block.4": model.stem[1]}
    assert callback.report.kept == budget_count(16 + 24, 0.5)
    assert "3 BatchNorm layers, 40 channels (1 group of joined layers counted once)" in callback.report.coverage
    small = remove_channels(model, torch.randn(4, 1, 16, 16))  # checks the outputs
    stream = int(model.stem[1].parametrizations.weight[0].kept.sum())
    assert small.stem[0].out_channels == small.block[3].out_channels == small.block[4].num_features == stream
    assert small.block[0].in_channels == stream and small.head[2].in_features == 4 * stream


def test_a_residual_checkpoint_loads_plain_in_a_new_process_and_with_its_gates_in_validate(residual_run, tmp_path):
    root, model, _ = residual_run
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    path = root / "full" / "last.ckpt"
    expected = model.eval()(x)
    torch.testing.assert_close(_outputs_in_a_new_process("ResidualClassifier", path, x, tmp_path), expected,
                               rtol=0, atol=1e-5)
    fresh = ResidualClassifier()
    quiet_trainer(callbacks=[BudgetCallback(sparsity=0.5, structure="channels", residual_streams=True)]).validate(
        fresh, DigitsDataModule(image_size=16, batch_size=32), ckpt_path=path, verbose=False)
    assert set(followers(fresh)) == {"block.4"} and followers(fresh)["block.4"] is fresh.stem[1]
    torch.testing.assert_close(fresh.eval()(x), expected, rtol=0, atol=1e-6)


def test_a_residual_checkpoint_before_the_cut_loads_plain_and_resumes_as_trained():
    torch.manual_seed(0)
    model = ResidualClassifier().eval()
    x = torch.randn(3, 1, 16, 16)
    groups = channel_groups(model, x, residual_streams=True)
    reparametrize_channels(model, list(groups.removable), joined=groups.joined)
    with torch.no_grad():
        for bn in (model.stem[1], model.block[4]):
            bn.bias.normal_()
        model.block[4].weight.uniform_(0.5, 1.5)
        model.stem[1].parametrizations.weight.original.uniform_(0.2, 1.5)  # soft gates from 0.01 to 1
    checkpoint = {"state_dict": model.state_dict()}
    to_plain_checkpoint(checkpoint, model)
    plain = ResidualClassifier().eval()
    plain.load_state_dict(checkpoint["state_dict"], strict=True)
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=1e-6)
    entry = checkpoint["lightning_prune"]["masks"]["stem.1.weight"]
    assert entry["joined"] == ["block.4"]
    torch.testing.assert_close(entry["joined_state"]["block.4.weight"], model.block[4].weight.detach())
    resumed = ResidualClassifier().eval()
    reparametrize_channels(resumed, list(groups.removable), joined=groups.joined)
    resumed.load_state_dict(reparametrized_state_dict(checkpoint), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_resuming_a_residual_run_between_epochs_continues_exactly(residual_run):
    root, full, full_cb = residual_run
    with pytest.raises(RuntimeError, match="simulated crash"):
        _residual_fit(root / "part", crash_at=7)  # 5 steps per epoch: last.ckpt is the end of epoch 1
    resumed, resumed_cb = _residual_fit(root / "part", ckpt_path=str(root / "part" / "last.ckpt"), seed=1)
    assert resumed_cb.state_dict() == full_cb.state_dict()
    for key, value in full.state_dict().items():  # the followers' γ and β included
        assert torch.equal(resumed.state_dict()[key], value), key


def test_residual_streams_are_opt_in_and_need_the_channel_budget():
    with pytest.raises(ValueError, match="residual_streams=True .* needs structure='channels'"):
        BudgetCallback(residual_streams=True)
    with pytest.raises(ValueError, match="residual_streams takes True or False"):
        BudgetCallback(structure="channels", residual_streams="yes")
    model = ResidualClassifier()
    callback = BudgetCallback(sparsity=0.5, structure="channels")
    _fit(model, callback)
    assert [p.name for p in masked_parameters(model)] == ["block.1.weight"] and not followers(model)
    assert "2 layers keep all their channels (e.g. stem.1: a residual stream" in callback.report.coverage


def test_a_weights_only_state_dict_says_which_layers_are_joined():
    """ModelCheckpoint(save_weights_only=True) skips the callbacks: the raw state_dict must carry the joined layers."""
    torch.manual_seed(0)
    x = torch.randn(3, 1, 16, 16)
    model = ResidualClassifier().eval()
    groups = channel_groups(model, x, residual_streams=True)
    reparametrize_channels(model, list(groups.removable), joined=groups.joined)
    finalize(model, sparsity=0.5)
    fresh = ResidualClassifier().eval()
    assert sorted(reparametrize_like(fresh, model.state_dict())) == ["block.1.weight", "stem.1.weight"]
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert set(followers(fresh)) == {"block.4"} and followers(fresh)["block.4"] is fresh.stem[1]
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    other = nn.Module()
    other.stem, other.block = ResidualClassifier().stem, nn.Sequential(*list(ResidualClassifier().block)[:3])
    with pytest.raises(ValueError, match="'block.4' are joined to 'stem.1' .* another architecture"):
        reparametrize_like(other, {k: v for k, v in model.state_dict().items() if k.startswith(("stem", "block.1"))})


class _AfterReopen(pl.Callback):
    """Records the module's state at the start of training, after BudgetCallback reopened the cut masks."""

    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def test_pruning_a_cut_network_on_to_another_budget_starts_from_its_plain_checkpoint(residual_run):
    """In process or from a plain checkpoint, the removed channels start from 0 in every layer of their group."""
    _, model, _ = residual_run
    kept = model.stem[1].parametrizations.weight[0].kept.clone()
    assert not kept.all()
    reopened = _AfterReopen()
    callback = BudgetCallback(sparsity=0.7, structure="channels", residual_streams=True)
    quiet_trainer(max_epochs=1, limit_train_batches=2, callbacks=[callback, reopened]).fit(
        copy.deepcopy(model), DigitsDataModule(image_size=16, batch_size=32))
    for key in ("stem.1.bias", "block.4.weight", "block.4.bias", "stem.1.parametrizations.weight.original"):
        assert torch.equal(reopened.state[key][~kept], torch.zeros_like(reopened.state[key][~kept])), key
        assert (reopened.state[key][kept] != 0).all(), key


def test_round_to_keeps_channel_counts_in_multiples_and_the_budget_exact_in_those_units():
    torch.manual_seed(0)
    model = BatchNormClassifier()  # BatchNorm widths 16, 32 and 64
    callback = BudgetCallback(sparsity=0.63, structure="channels", round_to=8)
    _fit(model, callback)
    kept = {p.name: int(p.mask.kept.sum()) for p in masked_parameters(model)}
    assert all(k % 8 == 0 and k >= 8 for k in kept.values()), kept
    assert sum(kept.values()) == rounded_budget(112, 0.63, 8) == 40  # 41.44 channels: 5 units of 8
    small = remove_channels(model, torch.randn(2, 1, 16, 16))
    assert [m.num_features for m in small.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == list(
        kept.values())


def test_round_to_ranks_units_by_their_weakest_channel():
    model = nn.Sequential(nn.BatchNorm1d(8), nn.BatchNorm1d(8))
    reparametrize_channels(model, ["0", "1"])
    with torch.no_grad():  # layer 0's second unit: three strong channels and a weak one (mean 6.8, weakest 0.1)
        model[0].parametrizations.weight.original.copy_(torch.tensor([9.0, 9, 9, 9, 9, 9, 9, 0.1]))
        model[1].parametrizations.weight.original.copy_(torch.full((8,), 1.0))
    result = finalize(model, sparsity=0.25, round_to=4)  # 12 channels: one unit each, then the better weakest channel
    assert result.per_layer == {"0.weight": (4, 8), "1.weight": (8, 8)}


def test_round_to_with_a_width_that_is_not_a_multiple_keeps_its_last_unit_whole_or_not_at_all():
    from lightning_prune.finalization import _unit_counts

    scores = [torch.tensor([5.0, 5, 5, 5, 4, 4]), torch.arange(8, 0, -1).double()]  # widths 6 and 8, unit 4
    assert _unit_counts(scores, [4, 4], 10, 4) == [6, 4]  # the floors, then layer 0's last 2 (weakest 4 against 1)
    assert _unit_counts(scores, [4, 4], 12, 4) == [6, 4]  # then layer 1's unit of 4 does not fit in the 2 left
    assert _unit_counts(scores, [4, 4], 14, 4) == [6, 8]


def test_round_to_is_refused_without_the_channel_budget():
    with pytest.raises(ValueError, match="round_to=8 rounds channel counts: it needs structure='channels'"):
        BudgetCallback(round_to=8)
    with pytest.raises(ValueError, match="round_to takes a whole number of channels"):
        BudgetCallback(structure="channels", round_to=0)
