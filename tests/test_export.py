import os

import pytest
import torch

from lightning_prune import finalize, load_pruned, make_permanent, masked_parameters, reparametrize, save_pruned
from lightning_prune.backbones import Conv4, ResNet18


def _finalised(model, sparsity):
    reparametrize(model)
    with torch.no_grad():  # train-like perturbation so the masks differ from the init ranking
        for layer in masked_parameters(model):
            layer.latent.add_(0.01 * torch.randn_like(layer.latent))
    finalize(model, sparsity)
    return model


@pytest.mark.parametrize("make", [lambda: Conv4(width=4, hidden=8), lambda: ResNet18(width=4)])
def test_make_permanent_gives_a_plain_module_that_loads_strictly(make):
    torch.manual_seed(0)
    model = _finalised(make(), 0.9).eval()
    total = sum(layer.numel for layer in masked_parameters(model))
    x = torch.randn(3, 3, 32, 32)
    expected = model(x)
    plain = make_permanent(model, inplace=False).eval()
    assert not masked_parameters(plain)
    fresh = make().eval()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), expected)
    nonzero = sum(int((m.weight != 0).sum()) for m in fresh.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert nonzero == round(0.1 * total)


def test_soft_model_cannot_be_exported():
    model = Conv4(width=4, hidden=8)
    reparametrize(model)
    with pytest.raises(ValueError, match="finalize"):
        make_permanent(model)
    with pytest.raises(ValueError, match="no reparametrized tensor"):
        make_permanent(Conv4(width=4, hidden=8))


@pytest.mark.parametrize("sparsity", [0.8, 0.95])
def test_compact_file_holds_the_kept_values_and_one_bit_per_weight(tmp_path, sparsity):
    torch.manual_seed(0)
    model = _finalised(Conv4(), sparsity)
    dense_path, compact_path = tmp_path / "dense.pt", tmp_path / "compact.pt"
    plain = make_permanent(model, inplace=False)
    torch.save(plain.state_dict(), dense_path)
    save_pruned(model, compact_path)
    # float32 values of the kept share plus a one-bit mask (1/32 of a float): a byte-per-weight mask (1/4) or dense
    # storage of the values would not fit; 1% of slack for the dense biases and the file's framing
    ratio = os.path.getsize(compact_path) / os.path.getsize(dense_path)
    kept = 1 - sparsity
    assert kept < ratio < kept + 1 / 32 + 0.01, ratio
    fresh = Conv4()
    state = load_pruned(compact_path, fresh)
    for key, value in plain.state_dict().items():
        assert torch.equal(state[key], value), key
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh.eval()(x), plain.eval()(x))


def test_load_pruned_rejects_other_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"a": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a compact pruned file"):
        load_pruned(path)


def test_copy_export_leaves_the_original_usable():
    torch.manual_seed(0)
    model = _finalised(Conv4(width=4, hidden=8), 0.9).eval()
    x = torch.randn(2, 3, 32, 32)
    first = make_permanent(model, inplace=False)
    second = make_permanent(model, inplace=False)
    torch.testing.assert_close(first(x), model(x))
    torch.testing.assert_close(second(x), model(x))
    assert masked_parameters(model)
