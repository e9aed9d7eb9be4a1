"""Public Lightning patterns, written as their examples write them (nothing about pruning in the modules)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from plain_modules import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import BudgetCallback


def _images(n: int = 64, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16)


class _NoBatchIdx(pl.LightningModule):
    """Lightning's GAN example writes ``training_step(self, batch)``: Lightning passes ``batch_idx`` only when the
    step asks for it. BatchNorm, so the cut re-estimates statistics through this step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(8 * 64, 2))
        self.validation_calls = 0

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch):
        x, y = batch
        self.validation_calls += 1
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_training_step_without_batch_idx_reaches_the_cut_and_its_batchnorm_is_re_estimated():
    model = _NoBatchIdx()
    callback = BudgetCallback(sparsity=0.8)
    quiet_trainer(max_epochs=3, callbacks=[callback]).fit(model, _images(), _images(32, seed=1))
    assert callback.report.cut_done
    assert callback.report.val_before_cut and callback.report.val_after_cut  # validation_step(self, batch) ran
    assert callback.report.val_after_recalibration  # the BatchNorm pass went through training_step(self, batch)
    bn = model.net[1]
    assert int(bn.num_batches_tracked) > 0 and torch.isfinite(bn.running_var).all()


def test_reparametrize_says_which_layers_it_leaves_dense():
    from lightning_prune import reparametrize

    model = nn.Sequential(nn.Linear(8, 8), torch.nn.utils.parametrizations.spectral_norm(nn.Linear(8, 8)))
    with pytest.warns(UserWarning, match=r"1\.weight \(another parametrization \(_SpectralNorm\)\) stay dense"):
        assert reparametrize(model) == ["0.weight"]


class _MinGPTStyle(pl.LightningModule):
    """minGPT's configure_optimizers: decay / no-decay groups by module type and parameter name, then an assertion
    that every parameter is in one group."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.blocks(x.flatten(1)[:, :8]), y)

    def configure_optimizers(self):
        decay, no_decay = set(), set()
        for mn, m in self.named_modules():
            for pn, _ in m.named_parameters(recurse=False):
                fpn = f"{mn}.{pn}" if mn else pn
                if pn.endswith("bias") or isinstance(m, nn.LayerNorm):
                    no_decay.add(fpn)
                elif pn.endswith("weight") and isinstance(m, nn.Linear):
                    decay.add(fpn)
        params = dict(self.named_parameters())
        missing = params.keys() - (decay | no_decay)
        assert not missing, f"parameters {missing} were not separated into either decay/no_decay set!"
        return torch.optim.AdamW([{"params": [params[n] for n in sorted(decay)], "weight_decay": 0.1},
                                  {"params": [params[n] for n in sorted(no_decay)], "weight_decay": 0.0}])


def test_an_exception_in_configure_optimizers_names_the_renaming_and_the_fix():
    model = _MinGPTStyle()
    with pytest.raises(AssertionError) as caught:
        quiet_trainer(max_epochs=1, callbacks=[BudgetCallback(sparsity=0.5)]).fit(model, _images())
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "parametrizations.weight.original" in notes and "plain_named_parameters" in notes
    assert "configure_optimizers" not in model.__dict__  # the module's own method again after the call


def test_sparse_linear_export_converts_hugging_face_conv1d():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    from lightning_prune import SparseLinear, sparse_linear_export

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(config).eval()
    conv1d = [name for name, m in model.named_modules() if isinstance(m, Conv1D)]
    assert len(conv1d) == 4  # c_attn, c_proj, mlp.c_fc, mlp.c_proj
    with torch.no_grad():
        for name in conv1d:
            weight = model.get_submodule(name).weight
            weight[torch.rand_like(weight) < 0.95] = 0
    exported, report = sparse_linear_export(model, batch_sizes=(1,), timer=lambda dense, sparse, x: (2.0, 1.0))
    assert all(report[name].chosen for name in conv1d)
    assert all(isinstance(exported.get_submodule(name), SparseLinear) for name in conv1d)
    ids = torch.randint(0, 50, (3, 16))
    torch.testing.assert_close(exported(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-4)


def test_a_saved_program_takes_any_batch_and_sequence_length_of_token_ids(tmp_path):
    from lightning_prune import save_smaller

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 4))
    path = save_smaller(model, tmp_path / "tokens.pt2", torch.randint(0, 50, (1, 5)))
    program = torch.export.load(path).module()
    ids = torch.randint(0, 50, (3, 9))
    torch.testing.assert_close(program(ids), model(ids))


class _DQNLightning(pl.LightningModule):
    """Lightning's RL example (DQN): a policy network that the optimizer trains and a target network that it does
    not, synced from it every ``sync_rate`` steps with ``load_state_dict``."""

    def __init__(self, sync_rate: int = 5) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
        self.target_net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
        self.sync_rate = sync_rate
        self.synced_at: list[int] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x.flatten(1)[:, :8]
        with torch.no_grad():
            next_q = self.target_net(x).max(1).values
        q = self.net(x).gather(1, y[:, None]).squeeze(1)
        loss = F.mse_loss(q, 0.9 * next_q + y.float())
        if self.global_step % self.sync_rate == 0:
            self.target_net.load_state_dict(self.net.state_dict())
            self.synced_at.append(self.global_step)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=1e-2)


@pytest.mark.parametrize("exclude", [None, ["target_net*"]])
def test_a_dqn_target_network_stays_out_of_the_budget_and_its_sync_works(exclude):
    from lightning_prune import budget_count, masked_parameters

    model = _DQNLightning()
    callback = BudgetCallback(sparsity=0.9, exclude=exclude)
    quiet_trainer(max_epochs=3, callbacks=[callback]).fit(model, _images())
    masked = [p.name for p in masked_parameters(model)]
    assert masked == ["net.0.weight", "net.2.weight"]  # the target network is left dense
    if exclude is None:
        assert "2 tensors" in callback.report.coverage and "no optimizer trains it" in callback.report.coverage
    kept = sum(int(p.mask.kept.sum()) for p in masked_parameters(model))
    assert kept == budget_count(8 * 32 + 32 * 2, 0.9)  # exact over the policy network alone
    assert model.synced_at and model.synced_at[0] == 0
    model.target_net.load_state_dict(model.net.state_dict())  # the example's sync, after the cut too
    for i in (0, 2):
        torch.testing.assert_close(model.target_net[i].weight, model.net[i].weight, rtol=0, atol=0)
