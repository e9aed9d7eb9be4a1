"""torch.compile on the CPU: a reparametrized model compiles into one graph, trains like eager, and BudgetCallback
works with a compiled LightningModule or a compiled backbone.

``aot_eager`` runs dynamo and AOTAutograd (where graph breaks, buffers read as constants or an untraceable custom
autograd function would show) without inductor's C++ code generation, so it stays fast; the ``inductor`` variants are
the default backend, slower to compile.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from plain_modules import quiet_trainer, tiny_conv4

from lightning_prune import (
    BudgetCallback,
    PrunedClassifier,
    budget_count,
    finalize,
    masked_parameters,
    reparametrize,
    reparametrize_like,
)
from lightning_prune.budget import budget_step
from lightning_prune.data import DigitsDataModule

INDUCTOR = pytest.param("inductor", marks=pytest.mark.slow)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counters
    yield
    torch._dynamo.reset()


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _set_temperature(model, value: float) -> None:
    with torch.no_grad():
        for layer in masked_parameters(model):
            layer.mask.temperature.fill_(value)


@pytest.mark.parametrize("backend", ["aot_eager", INDUCTOR])
def test_compiled_reparametrized_model_trains_like_eager_in_one_graph(backend):
    torch.manual_seed(0)
    eager = tiny_conv4(input_size=8)
    reparametrize(eager)
    twin = tiny_conv4(input_size=8)
    reparametrize_like(twin, eager.state_dict())
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(twin, backend=backend, fullgraph=True)  # fullgraph: any graph break is an error
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (eager, twin)]
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))

    def step(label: str, budget: bool = True) -> None:
        for model, forward, optimizer in ((eager, eager, optimizers[0]), (twin, compiled, optimizers[1])):
            optimizer.zero_grad()
            F.cross_entropy(forward(x), y).backward()
            if budget:
                budget_step(masked_parameters(model), torch.full((len(masked_parameters(model)),), 0.05))
            optimizer.step()
        for a, b in zip(masked_parameters(eager), masked_parameters(twin)):
            torch.testing.assert_close(b.latent, a.latent, rtol=1e-5, atol=1e-6, msg=f"{a.name}, {label}")

    for i in range(4):
        for model in (eager, twin):
            _set_temperature(model, 0.5 * 0.4**i)  # moved between steps as BudgetCallback does: a buffer
        step(f"step {i}")
        if i == 0:
            graphs = _graphs()
    finalize(eager, 0.7)
    finalize(twin, 0.7)
    for a, b in zip(masked_parameters(eager), masked_parameters(twin)):
        assert torch.equal(a.mask.kept, b.mask.kept), a.name
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)  # now θ ⊙ M, the hard masks
    step("after finalisation", budget=False)  # the gradient through the hard masks too
    assert graphs == 1 and _graphs() == graphs  # new temperatures and the hardening reused the graph


def _fit(model, tmp_path, **trainer_kwargs):
    callback = BudgetCallback(sparsity=0.8, measure_cut=False)
    trainer = quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=[callback], **trainer_kwargs)
    trainer.fit(model, DigitsDataModule(image_size=8, batch_size=128))
    trainer.save_checkpoint(tmp_path / "pruned.ckpt")
    return callback


def _exact(module) -> bool:
    layers = masked_parameters(module)
    kept = sum(int(layer.mask.kept.sum()) for layer in layers)
    return all(bool(layer.mask.hard) for layer in layers) and kept == budget_count(sum(x.numel for x in layers), 0.8)


@pytest.mark.parametrize("backend", ["aot_eager", INDUCTOR])
def test_budget_callback_with_a_compiled_lightning_module(backend, tmp_path):
    """torch.compile(module) before fit: Lightning compiles its steps lazily, after the callback reparametrized."""
    torch.manual_seed(0)
    module = PrunedClassifier(tiny_conv4(input_size=8), num_classes=10)
    _fit(torch.compile(module, backend=backend), tmp_path)
    assert _graphs() >= 1  # the training step really ran compiled
    assert [layer.name for layer in masked_parameters(module)][:2] == ["backbone.features.0.weight", "backbone.features.2.weight"]
    assert _exact(module)
    plain = PrunedClassifier.load_from_checkpoint(tmp_path / "pruned.ckpt", backbone=tiny_conv4(input_size=8))
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(plain.eval()(x), module.eval()(x), rtol=1e-5, atol=1e-6)


def test_budget_callback_with_a_compiled_backbone(tmp_path):
    """PrunedClassifier(torch.compile(backbone)): the compiled wrapper puts '_orig_mod.' in the layer names and the
    checkpoint's keys; PrunedClassifier loads that checkpoint into an uncompiled backbone, and the other way round."""
    torch.manual_seed(0)
    module = PrunedClassifier(torch.compile(tiny_conv4(input_size=8), backend="aot_eager"), num_classes=10)
    _fit(module, tmp_path)
    assert _graphs() >= 1
    assert masked_parameters(module)[0].name == "backbone._orig_mod.features.0.weight"
    assert _exact(module)
    # the checkpoint holds plain weights: it loads into an uncompiled backbone with the zeros where pruned
    plain = PrunedClassifier.load_from_checkpoint(tmp_path / "pruned.ckpt", backbone=tiny_conv4(input_size=8))
    assert not masked_parameters(plain)
    weights = [m.weight for m in plain.backbone.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sum(int((w != 0).sum()) for w in weights) == budget_count(sum(w.numel() for w in weights), 0.8)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(plain.eval()(x), module.eval()(x), rtol=1e-5, atol=1e-6)
    # and back: the uncompiled model's checkpoint into a compiled backbone
    torch.save({"state_dict": plain.state_dict()}, tmp_path / "plain.ckpt")
    recompiled = PrunedClassifier(torch.compile(tiny_conv4(input_size=8), backend="aot_eager"), num_classes=10)
    recompiled.on_load_checkpoint(checkpoint := torch.load(tmp_path / "plain.ckpt", weights_only=False))
    recompiled.load_state_dict(checkpoint["state_dict"], strict=True)
    torch.testing.assert_close(recompiled.eval()(x), module.eval()(x), rtol=1e-5, atol=1e-6)


def test_reparametrize_like_names_torch_compile_when_only_one_side_is_compiled():
    trained = torch.compile(tiny_conv4(input_size=8), backend="aot_eager")
    reparametrize(trained)
    with pytest.raises(ValueError, match=r"torch\.compile'd module, whose keys contain '_orig_mod\.'"):
        reparametrize_like(tiny_conv4(input_size=8), trained.state_dict())


def test_a_model_compiled_and_run_before_reparametrization_recompiles():
    """Compiling (and even running) the model before BudgetCallback/reparametrize attaches the masks is fine: the new
    parametrized modules fail dynamo's guards and the model is traced again, with the masks."""
    torch.manual_seed(0)
    model = tiny_conv4(input_size=8)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(4, 1, 8, 8)
    dense = compiled(x)
    reparametrize(model)
    with torch.no_grad():
        for layer in masked_parameters(model):
            layer.mask.temperature.fill_(1e-3)  # nearly hard gates: far from the dense output
    torch.testing.assert_close(compiled(x), model(x))
    assert not torch.allclose(compiled(x), dense) and _graphs() == 2
