"""SparseLinear and sparse_linear_export: same outputs as the dense layers, decisions from (mocked) timings, save/load."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lightning_prune import finalize, make_permanent, reparametrize
from lightning_prune.backbones import Conv4
from lightning_prune.sparse_export import SparseLayerReport, SparseLinear, report_table, sparse_linear_export


def _pruned_linear(in_features: int, out_features: int, sparsity: float, bias: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight[torch.rand(out_features, in_features) < sparsity] = 0
    return linear


def _density_timer(calls: list):
    """A fake timer: dense takes 1 s, sparse 10·density s (faster below 10% density), at every batch size."""

    def timer(dense, sparse, x):
        calls.append((type(dense).__name__, type(sparse).__name__, tuple(x.shape)))
        return 1.0, 10.0 * sparse.density

    return timer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 64), (2, 3, 64), (2, 3, 4, 64), (1, 64), (1, 1, 64), (64,), (0, 64)])
def test_sparse_linear_computes_what_the_dense_layer_computes(shape, bias):
    dense = _pruned_linear(64, 48, 0.9, bias=bias)
    sparse = SparseLinear.from_dense(dense)
    assert sparse.nnz == int((dense.weight != 0).sum()) and 0 < sparse.nnz < 64 * 48
    assert sparse.crow_indices.dtype == torch.int32
    x = torch.randn(shape)
    with torch.no_grad():
        expected, got = dense(x), sparse(x)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.to_dense_weight(), dense.weight.detach())


def test_sparse_linear_with_no_nonzero_weight_gives_the_bias():
    dense = _pruned_linear(16, 8, 1.0)
    sparse = SparseLinear.from_dense(dense)
    assert sparse.nnz == 0
    torch.testing.assert_close(sparse(torch.randn(3, 16)), dense.bias.detach().expand(3, 8))


def test_sparse_linear_state_dict_round_trip_holds_the_csr_parts():
    sparse = SparseLinear.from_dense(_pruned_linear(64, 48, 0.95))
    state = sparse.state_dict()
    assert set(state) == {"crow_indices", "col_indices", "values", "bias"}
    assert state["values"].numel() == sparse.nnz and state["crow_indices"].numel() == 49
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = SparseLinear(64, 48)  # other number of non-zeros: loading resizes the buffers
    assert fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    other = SparseLinear.from_dense(_pruned_linear(64, 48, 0.5, seed=1))  # a cached CSR of other weights
    other(torch.randn(1, 64))
    other.load_state_dict(state, strict=True)
    x = torch.randn(5, 64)
    torch.testing.assert_close(fresh(x), sparse(x), rtol=0, atol=0)
    torch.testing.assert_close(other(x), sparse(x), rtol=0, atol=0)


def test_from_dense_refuses_what_is_not_a_plain_linear():
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseLinear.from_dense(nn.Conv2d(3, 4, 3))
    model = nn.Sequential(nn.Linear(8, 8))
    reparametrize(model)
    with pytest.raises(TypeError, match="make_permanent"):
        SparseLinear.from_dense(model[0])


def test_a_95_percent_sparse_layer_is_chosen_only_when_measured_faster():
    model = nn.Sequential(_pruned_linear(512, 512, 0.95), nn.ReLU(), _pruned_linear(512, 256, 0.7, seed=1))
    calls: list = []
    # 95% sparse: 10·0.05 = 0.5 s against 1 s -> chosen; 70% sparse: 10·0.3 = 3 s against 1 s -> stays dense
    exported, report = sparse_linear_export(model, batch_sizes=(1, 64), timer=_density_timer(calls))
    assert isinstance(exported[0], SparseLinear) and report["0"].chosen
    assert type(exported[2]) is nn.Linear and not report["2"].chosen and report["2"].density == pytest.approx(0.3, 0.1)
    assert [c[2] for c in calls] == [(1, 512), (64, 512), (1, 512), (64, 512)]
    assert all(c[:2] == ("Linear", "SparseLinear") for c in calls)

    def faster(dense, sparse, x):  # sparse 4x faster at every batch size
        return 4.0, 1.0

    exported, report = sparse_linear_export(model, timer=faster)
    assert isinstance(exported[0], SparseLinear) and isinstance(exported[2], SparseLinear)
    assert report["0"].chosen and report["0"].speedup == {1: 4.0, 64: 4.0}
    assert report["0"].dense_us == {1: 4e6, 64: 4e6} and report["0"].density == pytest.approx(0.05, abs=0.01)

    def slower_at_64(dense, sparse, x):  # faster at batch 1, slower at 64: never slower -> stays dense
        return (4.0, 1.0) if x.shape[0] == 1 else (1.0, 2.0)

    exported, report = sparse_linear_export(model, timer=slower_at_64)
    assert type(exported[0]) is nn.Linear and not report["0"].chosen
    assert report["0"].speedup == {1: 4.0, 64: 0.5} and "0.50x" in report["0"].reason
    assert type(model[0]) is nn.Linear  # the input model is never modified


def test_min_speedup_is_the_threshold():
    model = nn.Sequential(_pruned_linear(128, 128, 0.95))
    _, report = sparse_linear_export(model, batch_sizes=(1,), timer=lambda d, s, x: (1.2, 1.0), min_speedup=1.1)
    assert report["0"].chosen
    _, report = sparse_linear_export(model, batch_sizes=(1,), timer=lambda d, s, x: (1.05, 1.0), min_speedup=1.1)
    assert not report["0"].chosen


def test_a_dense_layer_stays_dense_and_is_not_timed():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), _pruned_linear(256, 256, 0.6))
    calls: list = []
    exported, report = sparse_linear_export(model, timer=lambda d, s, x: calls.append(x.shape) or (9.0, 1.0))
    assert report["0"].density == 1.0 and not report["0"].chosen and report["0"].reason == "too dense"
    assert report["0"].dense_us == {} and type(exported[0]) is nn.Linear
    assert report["2"].chosen and len(calls) == 2  # 60% sparse: under max_density, timed at two batch sizes
    assert [row["layer"] for row in report_table(report)] == ["0", "2"]


def test_convolutions_and_linear_subclasses_stay_dense():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 8))
    attention = nn.MultiheadAttention(16, 2)
    with torch.no_grad():
        for m in (model[0], model[2], attention.out_proj):
            m.weight.zero_()
    exported, report = sparse_linear_export(model, timer=lambda d, s, x: (9.0, 1.0))
    assert type(exported[0]) is nn.Conv2d and isinstance(exported[2], SparseLinear) and list(report) == ["2"]
    exported, report = sparse_linear_export(attention, timer=lambda d, s, x: (9.0, 1.0))
    assert not report["out_proj"].chosen and type(exported.out_proj) is type(attention.out_proj)


def test_bad_batch_sizes_are_refused():
    with pytest.raises(ValueError, match="batch_sizes"):
        sparse_linear_export(nn.Linear(4, 4), batch_sizes=())


@pytest.mark.parametrize("permanent", [True, False])
def test_after_reparametrize_finalize_make_permanent(permanent):
    torch.manual_seed(0)
    model = Conv4(width=4, hidden=32, input_size=16)
    reparametrize(model)
    finalize(model, sparsity=0.95)
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    source = make_permanent(model, inplace=False) if permanent else model  # a finalised model is made permanent
    exported, report = sparse_linear_export(source, timer=lambda d, s, x: (2.0, 1.0))
    assert set(report) == {"classifier.1", "classifier.3", "classifier.5"}
    assert all(isinstance(exported.get_submodule(n), SparseLinear) == r.chosen for n, r in report.items())
    assert any(r.chosen for r in report.values())
    assert all(type(m) is nn.Conv2d for m in exported.features if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        torch.testing.assert_close(exported(x), expected, rtol=1e-5, atol=1e-5)
    buffer = io.BytesIO()
    torch.save(exported, buffer)  # the whole module pickles, CSR cache included
    buffer.seek(0)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), expected, rtol=1e-5, atol=1e-5)


def test_real_timer_on_a_tiny_layer_fills_the_report():
    model = nn.Sequential(_pruned_linear(64, 64, 0.95))
    exported, report = sparse_linear_export(model, batch_sizes=(1, 2), threads=1)
    entry = report["0"]
    assert isinstance(entry, SparseLayerReport) and set(entry.dense_us) == set(entry.sparse_us) == {1, 2}
    assert all(t > 0 for t in (*entry.dense_us.values(), *entry.sparse_us.values()))
    assert isinstance(exported[0], SparseLinear) == entry.chosen
