"""BudgetCallback dropped into projects it has never seen: other people's models and the Trainer features people use.

Each run checks what a user relies on: fit ends without error, the budget is exact, the budget covers the model's
weight matrices, and the exported network computes what the trained one computed.
"""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.transformer import LightningTransformer, Transformer
from plain_modules import PlainClassifier, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import (
    BudgetCallback,
    budget_count,
    coverage,
    load_pruned,
    make_permanent,
    masked_parameters,
    save_pruned,
)
from lightning_prune.data import DigitsDataModule


def _kept(model: nn.Module) -> tuple[int, int]:
    params = masked_parameters(model)
    return sum(int(p.mask.kept.sum()) for p in params), sum(p.numel for p in params)


def _assert_export_matches(model: nn.Module, *inputs, tmp_path=None, output=lambda out: out) -> None:
    """make_permanent (and the compact file, when tmp_path is given) computes what the finalised network computes."""
    model.eval()
    with torch.no_grad():
        trained = output(model(*inputs))
        plain = make_permanent(model, inplace=False).eval()
        assert not masked_parameters(plain)
        torch.testing.assert_close(output(plain(*inputs)), trained, rtol=0, atol=0)
        if tmp_path is not None:
            save_pruned(plain, tmp_path / "pruned.pt")
            fresh = copy.deepcopy(plain)
            load_pruned(tmp_path / "pruned.pt", fresh)
            torch.testing.assert_close(output(fresh(*inputs)), trained, rtol=0, atol=0)


def _no_budget_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "BudgetCallback" in str(w.message) or "tied" in str(w.message)]


# -------------------------------------------------------------------- Lightning's demo transformer
class _DemoTransformer(LightningTransformer):
    """Lightning's demo, as a user would extend it: a validation_step, data of its own (no download)."""

    def __init__(self) -> None:
        super().__init__(vocab_size=32)
        self.model = Transformer(vocab_size=32, ninp=32, nhead=2, nhid=64, nlayers=1, dropout=0.0)

    def prepare_data(self) -> None:  # the demo downloads WikiText2 here
        pass

    def _data(self, seed: int) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, 32, (64, 9), generator=g)
        return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=16)

    def train_dataloader(self) -> DataLoader:
        return self._data(0)

    def val_dataloader(self) -> DataLoader:
        return self._data(1)

    def validation_step(self, batch, batch_idx):
        inputs, target = batch
        self.log("val_loss", F.nll_loss(self(inputs, target), target.reshape(-1)))


def test_lightning_demo_transformer_with_a_validation_step(tmp_path):
    torch.manual_seed(0)
    model = _DemoTransformer()
    callback = BudgetCallback(sparsity=0.9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_epochs=10, callbacks=[callback]).fit(model)
    assert not _no_budget_warnings(caught)
    kept, total = _kept(model)
    assert kept == budget_count(total, 0.9)
    names = [p.name for p in masked_parameters(model)]
    assert "model.transformer.encoder.layers.0.self_attn.in_proj_weight" in names
    assert coverage(model).share_of_matrix_weights > 0.9
    assert set(callback.report.val_after_cut) == {"val_loss"}  # measured through the module's own step
    inputs, target = next(iter(model.val_dataloader()))
    _assert_export_matches(model.model, inputs, target)


# ----------------------------------------------------------- a language model with a tied decoder
class _TiedLM(pl.LightningModule):
    def __init__(self, vocab: int = 40, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
        self.decoder = nn.Linear(dim, vocab, bias=False)
        self.decoder.weight = self.embed.weight  # tied
        self.vocab = vocab

    def forward(self, tokens):
        return self.decoder(self.body(self.embed(tokens))).reshape(-1, self.vocab)  # flattened (B·T, V)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y.reshape(-1))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y.reshape(-1)))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def _token_loaders():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 40, (96, 13), generator=g)
    data = TensorDataset(tokens[:, :-1], tokens[:, 1:])
    return DataLoader(data, batch_size=16), DataLoader(data, batch_size=32)


def test_a_tied_embedding_language_model_with_flattened_logits_exports_what_it_trained(tmp_path):
    torch.manual_seed(0)
    model = _TiedLM()
    callback = BudgetCallback(sparsity=0.9)
    train, val = _token_loaders()
    quiet_trainer(max_epochs=4, callbacks=[callback]).fit(model, train, val)
    names = [p.name for p in masked_parameters(model)]
    assert names == ["body.0.weight", "body.2.weight"]  # the tied decoder/embedding tensor stays dense
    assert model.decoder.weight is model.embed.weight and bool((model.embed.weight != 0).all())
    kept, total = _kept(model)
    assert kept == budget_count(total, 0.9)
    assert "shared with" in callback.report.coverage
    _assert_export_matches(model, next(iter(val))[0], tmp_path=tmp_path)


def test_pruning_a_tied_tensor_on_purpose_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"matches embed\.weight \(shared with decoder\.weight\), which stays dense"):
        BudgetCallback(include=["decoder.*"]).setup(quiet_trainer(max_steps=2), _TiedLM(), "fit")


# ------------------------------------------------------------------------------- torchvision
class _ImageClassifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _image_loaders(size: int = 32, n: int = 32):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=8), DataLoader(data, batch_size=16)


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "resnet18"])
def test_torchvision_models(arch, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _ImageClassifier(getattr(torchvision.models, arch)(num_classes=10))
    callback = BudgetCallback(sparsity=0.9)
    train, val = _image_loaders()
    quiet_trainer(max_epochs=2, callbacks=[callback]).fit(model, train, val)
    kept, total = _kept(model)
    assert kept == budget_count(total, 0.9)
    assert coverage(model).share_of_matrix_weights > 0.99
    assert callback.report.val_after_recalibration  # BatchNorm re-estimated and measured after the cut
    _assert_export_matches(model, next(iter(val))[0], tmp_path=tmp_path)


# ------------------------------------------------------------------------ Hugging Face and timm
def _fit_for_coverage(net: nn.Module, forward, inputs, sparsity: float = 0.9) -> nn.Module:
    """A few steps of a plain LightningModule around ``net``; returns it finalised."""

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            return forward(self.net, batch[0]).float().pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    module = Module()
    quiet_trainer(max_steps=4, callbacks=[BudgetCallback(sparsity=sparsity)]).fit(
        module, DataLoader(TensorDataset(inputs), batch_size=len(inputs))
    )
    kept, total = _kept(module)
    assert kept == budget_count(total, sparsity)
    return module.net


def test_hugging_face_gpt2_and_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    tokens = torch.randint(0, 64, (4, 16))
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=64, n_layer=2, n_head=4)
    )
    gpt2 = _fit_for_coverage(gpt2, lambda net, x: net(x).logits, tokens)
    assert coverage(gpt2).share_of_matrix_weights > 0.9  # transformers' Conv1D layers are covered
    assert "transformer.h.0.attn.c_attn.weight" in [p.name for p in masked_parameters(gpt2)]
    _assert_export_matches(gpt2, tokens, output=lambda out: out.logits)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=16,
    ))
    bert = _fit_for_coverage(bert, lambda net, x: net(x).last_hidden_state, tokens)
    assert coverage(bert).share_of_matrix_weights > 0.9
    _assert_export_matches(bert, tokens, output=lambda out: out.last_hidden_state)


@pytest.mark.parametrize("name, kwargs", [
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8)),
    ("convnext_atto", {}),
])
def test_timm_models(name, kwargs):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    net = _fit_for_coverage(timm.create_model(name, pretrained=False, num_classes=10, **kwargs), lambda n, x: n(x), images)
    assert coverage(net).share_of_matrix_weights > 0.9
    _assert_export_matches(net, images)


# ------------------------------------------------------------------------- Trainer features
class _WithTest(PlainClassifier):
    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())


def test_testing_the_best_checkpoint_of_before_the_cut_tests_a_network_at_the_budget(tmp_path):
    """ModelCheckpoint(monitor=...) can keep a checkpoint from before the cut as "best"; testing it must not test an
    unpruned network without a word."""
    torch.manual_seed(0)
    model = _WithTest()
    # the worst validation accuracy is the first epoch's: "best" with mode="min" is a checkpoint of before the cut
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_acc", mode="min", save_top_k=1)
    trainer = quiet_trainer(max_epochs=4, callbacks=[BudgetCallback(sparsity=0.9), checkpoint], enable_checkpointing=True)
    dm = DigitsDataModule(image_size=16, batch_size=64)
    trainer.fit(model, dm)
    assert "epoch=0" in checkpoint.best_model_path
    with pytest.warns(UserWarning, match="come from before the cut"):
        trainer.test(model, dm, ckpt_path="best", verbose=False)
    kept, total = _kept(model)
    assert kept == budget_count(total, 0.9)
    nonzero = sum(int((p.module.weight != 0).sum()) for p in masked_parameters(model))
    assert nonzero <= budget_count(total, 0.9)  # the network under test is at the budget


def test_accumulation_and_bf16_reach_the_budget():
    torch.manual_seed(0)
    model = PlainClassifier()
    callback = BudgetCallback(sparsity=0.9)
    trainer = quiet_trainer(max_epochs=6, accumulate_grad_batches=2, precision="bf16-mixed", callbacks=[callback])
    trainer.fit(model, DigitsDataModule(image_size=16, batch_size=32))
    kept, total = _kept(model)
    assert kept == budget_count(total, 0.9)
    assert abs(callback.report.kept_hard_before / 0.1 - 1) < 0.1
