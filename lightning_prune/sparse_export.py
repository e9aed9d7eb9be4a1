"""A faster unstructured export for ``nn.Linear``: weights as sparse CSR tensors, kept only where measured faster.

:func:`lightning_prune.make_permanent` gives a plain module whose pruned weights are zeros: it computes with the dense
kernels, so it is exactly as fast as the unpruned network. :func:`sparse_linear_export` replaces each ``nn.Linear``
whose weight is sparse enough by a :class:`SparseLinear`, which stores the weight in compressed sparse row (CSR) form
and multiplies with torch's sparse kernel, but only where timing both forms on this machine, at the batch sizes the
caller names, finds the sparse one faster. Convolutions (and every other module) stay dense: torch has no sparse
convolution kernel on CPU that beats its dense one at these sparsities.

Which sparse product (measured on a 2-core x86 CPU with torch 2.14, one thread, ``768x3072``, ``3072x768`` and
``256x8192`` weights at 90-98% sparsity): for two rows or more, ``torch.addmm(b[:, None], W_csr, x.T).T`` was the
fastest or tied among ``torch.sparse.mm(W_csr, x.T).T``, ``torch.mm(W_csr, x.T).T``, ``F.linear(x, W_csr, b)`` and
``x @ W_csr.T`` (the last two 3-6x slower at batch 64); for a single row, ``torch.addmv(b, W_csr, x)`` was 2-3x faster
than all of them. 32-bit indices were 5-20% faster than 64-bit ones.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

import torch
from torch import Tensor, nn

from lightning_prune.reparametrize import masked_parameters

#: ``timer(dense, sparse, x) -> (dense_seconds, sparse_seconds)``: the time of one forward pass of each on ``x``.
Timer = Callable[[nn.Module, nn.Module, Tensor], Tuple[float, float]]

_BETA_WARNING = "Sparse CSR tensor support is in beta state"


@contextmanager
def _quiet_csr():
    """Silence torch's "CSR support is in beta" warning (raised once per process) around CSR construction."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_BETA_WARNING)
        yield


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored as a sparse CSR tensor: the inference form of a pruned ``nn.Linear``.

    The CSR parts are buffers (``crow_indices``, ``col_indices`` as int32 where they fit, and ``values``), so the
    module moves with ``.to()`` and saves and loads with ``state_dict``; loading resizes the buffers to the file's
    number of non-zeros, so a state_dict loads into a ``SparseLinear`` built with other weights or with
    ``SparseLinear(in_features, out_features)``. The bias stays a dense ``nn.Parameter``; the weight is not trainable
    (this is an export form). Inputs of any number of leading dimensions are flattened to 2-D and back, as in
    ``nn.Linear``.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: whether the layer has a bias (zeros until loaded or set by :meth:`from_dense`).

    Example:
        >>> import torch
        >>> dense = torch.nn.Linear(64, 32)
        >>> with torch.no_grad():
        ...     dense.weight[torch.rand(32, 64) < 0.9] = 0
        >>> sparse = SparseLinear.from_dense(dense)
        >>> x = torch.randn(2, 5, 64)
        >>> torch.allclose(sparse(x), dense(x), atol=1e-5)
        True
        >>> sparse.nnz == int((dense.weight != 0).sum())
        True
        >>> fresh = SparseLinear(64, 32)
        >>> fresh.load_state_dict(sparse.state_dict())
        <All keys matched successfully>
        >>> torch.equal(fresh(x), sparse(x))
        True
    """

    crow_indices: Tensor
    col_indices: Tensor
    values: Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("crow_indices", torch.zeros(out_features + 1, dtype=torch.int32))
        self.register_buffer("col_indices", torch.zeros(0, dtype=torch.int32))
        self.register_buffer("values", torch.zeros(0))
        self.bias: Optional[nn.Parameter] = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._csr: Optional[Tensor] = None
        self._csr_parts: Optional[tuple[Tensor, Tensor, Tensor]] = None

    @classmethod
    @torch.no_grad()
    def from_dense(cls, linear: nn.Linear) -> SparseLinear:
        """The ``SparseLinear`` that computes what ``linear`` computes (its zeros left out of the CSR form).

        Raises:
            TypeError: if ``linear`` is not an ``nn.Linear`` or its weight is still parametrized (soft-masked).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense takes an nn.Linear, got {type(linear).__name__}.")
        if torch.nn.utils.parametrize.is_parametrized(linear, "weight"):
            raise TypeError("The weight is still parametrized: call lightning_prune.make_permanent(model) first.")
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with _quiet_csr():
            csr = weight.to_sparse_csr()
        index = torch.int32 if weight.numel() < 2**31 else torch.int64
        module.crow_indices = csr.crow_indices().to(index)
        module.col_indices = csr.col_indices().to(index)
        module.values = csr.values().clone()
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return module.to(weight.device)

    @property
    def nnz(self) -> int:
        """Number of stored (non-zero) weights."""
        return self.values.numel()

    @property
    def density(self) -> float:
        """Share of the weight matrix that is stored."""
        return self.nnz / max(1, self.in_features * self.out_features)

    def weight_csr(self) -> Tensor:
        """The weight as a sparse CSR tensor sharing the buffers' memory (rebuilt only when a buffer is replaced)."""
        buffers = self._buffers  # direct access: this runs on every forward pass
        parts = (buffers["crow_indices"], buffers["col_indices"], buffers["values"])
        cached = self._csr_parts
        if cached is None or parts[0] is not cached[0] or parts[1] is not cached[1] or parts[2] is not cached[2]:
            with _quiet_csr():
                self._csr = torch.sparse_csr_tensor(
                    *parts, size=(self.out_features, self.in_features), check_invariants=False
                )
            self._csr_parts = parts
        return self._csr

    def __getstate__(self) -> dict[str, Any]:
        # copies and pickles rebuild the CSR view from their own buffers
        return {**self.__dict__, "_csr": None, "_csr_parts": None}

    def to_dense_weight(self) -> Tensor:
        """The weight as a dense ``(out_features, in_features)`` tensor, zeros where pruned."""
        return self.weight_csr().to_dense()

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        weight = self.weight_csr()
        if flat.shape[0] == 1:  # one row: the sparse matrix-vector product is 2-3x faster than the matrix product
            out = torch.mv(weight, flat[0]) if self.bias is None else torch.addmv(self.bias, weight, flat[0])
            return out.reshape(*lead, self.out_features)
        # (out, in) CSR @ (in, rows): the CSR weight multiplies from the left
        out = torch.mm(weight, flat.t()) if self.bias is None else torch.addmm(self.bias.unsqueeze(1), weight, flat.t())
        # contiguous like nn.Linear's output (callers may .view() it); the copy costs ~15-30% at batch 64
        return out.t().contiguous().reshape(*lead, self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # The number of non-zeros (and the index dtype) comes from the file: resize the buffers before the copy.
        for name in ("crow_indices", "col_indices", "values"):
            incoming = state_dict.get(prefix + name)
            if isinstance(incoming, Tensor):
                current = getattr(self, name)
                setattr(self, name, torch.empty(incoming.shape, dtype=incoming.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"density={self.density:.4f}"
        )


@dataclass
class SparseLayerReport:
    """What :func:`sparse_linear_export` measured and decided for one ``nn.Linear``.

    ``dense_us`` and ``sparse_us`` map each batch size to the median time of one forward pass in microseconds (empty
    when the layer was too dense to try). ``reason`` says why the layer was or was not replaced.
    """

    density: float
    chosen: bool
    reason: str
    dense_us: dict[int, float] = field(default_factory=dict)
    sparse_us: dict[int, float] = field(default_factory=dict)

    @property
    def speedup(self) -> dict[int, float]:
        """Dense time over sparse time, per batch size."""
        return {b: self.dense_us[b] / self.sparse_us[b] for b in self.dense_us if self.sparse_us.get(b)}


def time_pair(
    dense: nn.Module, sparse: nn.Module, x: Tensor, repeats: int = 7, block_s: float = 2e-3
) -> tuple[float, float]:
    """Median seconds per forward pass of ``dense`` and ``sparse`` on ``x``, timed alternately.

    Each of ``repeats`` rounds times a block of calls of one and then of the other (the order swapping every round),
    each block about ``block_s`` long, so machine noise hits both alike.
    """
    modules = (dense, sparse)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.no_grad():
        calls = []
        for module in modules:
            module(x)  # warm-up (and the CSR tensor is built)
            sync()
            start = time.perf_counter()
            module(x)
            sync()
            calls.append(max(1, int(block_s / max(time.perf_counter() - start, 1e-7))))
        times: tuple[list[float], list[float]] = ([], [])
        for r in range(repeats):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                start = time.perf_counter()
                for _ in range(calls[i]):
                    modules[i](x)
                sync()
                times[i].append((time.perf_counter() - start) / calls[i])
    return statistics.median(times[0]), statistics.median(times[1])


@contextmanager
def _threads(n: int | None):
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sparse_linear_export(
    model: nn.Module,
    batch_sizes: Sequence[int] = (1, 64),
    threads: int | None = None,
    min_speedup: float = 1.1,
    max_density: float = 0.5,
    timer: Timer | None = None,
) -> tuple[nn.Module, dict[str, SparseLayerReport]]:
    """A copy of ``model`` where each ``nn.Linear`` that is measured faster in sparse CSR form is a :class:`SparseLinear`.
    Hugging Face's ``Conv1D`` (GPT-2's layers, a Linear with its weight stored transposed) is treated as the
    ``nn.Linear`` it computes.

    Each ``nn.Linear`` whose weight keeps at most ``max_density`` of its entries is timed dense and sparse, on a
    random input of ``(batch, in_features)`` for each batch size in ``batch_sizes``, on this machine (so call it where
    the model will run, with the thread count it will run with; on a machine shared with other jobs, set
    ``OMP_WAIT_POLICY=PASSIVE`` or time with one thread, as spinning OpenMP threads then stall every kernel). It is replaced only if the sparse form is at least
    ``min_speedup`` times faster at *every* batch size, so no layer gets slower at the sizes named; the others stay
    dense. Convolutions and every other module stay dense (no sparse CPU kernel of torch's beats the dense ones for
    them), and so do subclasses of ``nn.Linear`` such as ``nn.MultiheadAttention``'s ``out_proj``, whose weight the
    parent reads directly. ``model`` itself is not modified; a finalised model that is still reparametrized is made
    permanent on the copy first.

    Args:
        model: a plain module after :func:`lightning_prune.make_permanent` (zeros where pruned), or a finalised one.
        batch_sizes: the batch sizes (rows of the 2-D input) at which the sparse form must be faster.
        threads: torch's intra-op thread count during the timing (default: leave it as it is).
        min_speedup: how much faster the sparse form must be at every batch size to be chosen.
        max_density: layers keeping more than this share of their weights are not tried.
        timer: ``timer(dense, sparse, x) -> (dense_seconds, sparse_seconds)``; default :func:`time_pair`.

    Returns:
        ``(exported, report)``: the copy, and ``{qualified name of each nn.Linear: SparseLayerReport}``.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
        >>> with torch.no_grad():
        ...     model[0].weight[torch.rand(256, 256) < 0.98] = 0
        >>> exported, report = sparse_linear_export(model, batch_sizes=(1,), min_speedup=1.0)
        >>> sorted(report), report["2"].chosen, report["2"].reason
        (['0', '2'], False, 'too dense')
        >>> isinstance(exported[0], SparseLinear) == report["0"].chosen
        True
        >>> x = torch.randn(3, 256)
        >>> torch.allclose(exported(x), model(x), atol=1e-5)
        True
    """
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must name at least one batch size >= 1, got {tuple(batch_sizes)}.")
    if masked_parameters(model):
        from lightning_prune.export import make_permanent

        exported = make_permanent(model, inplace=False)
    else:
        exported = copy.deepcopy(model)
    timer = timer or time_pair
    report: dict[str, SparseLayerReport] = {}
    targets = [(name, m) for name, m in exported.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]
    with _threads(threads):
        for name, linear in targets:
            if is_conv1d(linear) and not torch.nn.utils.parametrize.is_parametrized(linear):
                linear = conv1d_as_linear(linear)  # Hugging Face's transposed Linear (GPT-2): the same product
            if torch.nn.utils.parametrize.is_parametrized(linear):
                report[name] = SparseLayerReport(density=1.0, chosen=False, reason="parametrized")
                continue
            if type(linear) is not nn.Linear:  # e.g. MultiheadAttention's out_proj, whose weight its parent reads
                report[name] = SparseLayerReport(density=1.0, chosen=False, reason=f"{type(linear).__name__} kept")
                continue
            weight = linear.weight.detach()
            density = float((weight != 0).sum()) / max(1, weight.numel())
            if density > max_density:
                report[name] = SparseLayerReport(density=density, chosen=False, reason="too dense")
                continue
            candidate = SparseLinear.from_dense(linear)
            entry = SparseLayerReport(density=density, chosen=False, reason="")
            was_training = linear.training
            linear.eval()
            candidate.eval()
            for batch in batch_sizes:
                x = torch.randn(batch, linear.in_features, dtype=weight.dtype, device=weight.device)
                dense_s, sparse_s = timer(linear, candidate, x)
                entry.dense_us[batch], entry.sparse_us[batch] = dense_s * 1e6, sparse_s * 1e6
            linear.train(was_training)
            slowest = min(entry.speedup.values())
            entry.chosen = slowest >= min_speedup
            entry.reason = (
                f"sparse faster at every batch size (min speedup {slowest:.2f}x)"
                if entry.chosen
                else f"sparse not {min_speedup:g}x faster at every batch size (min speedup {slowest:.2f}x)"
            )
            if entry.chosen:
                candidate.train(was_training)
                _replace(exported, name, candidate)
            report[name] = entry
    return exported, report


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2, GPT, ...): ``y = x @ W + b`` with ``W`` of shape ``(nx, nf)``, a Linear whose
    weight is stored transposed. Recognised by its name and fields, so transformers need not be installed."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)
            and isinstance(weight, Tensor) and tuple(weight.shape) == (module.nx, module.nf))


@torch.no_grad()
def conv1d_as_linear(conv1d: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` that computes what a Hugging Face ``Conv1D`` computes (its weight transposed)."""
    weight = conv1d.weight.detach()
    linear = nn.Linear(conv1d.nx, conv1d.nf, bias=conv1d.bias is not None, device=weight.device, dtype=weight.dtype)
    linear.weight.copy_(weight.t())
    if conv1d.bias is not None:
        linear.bias.copy_(conv1d.bias.detach())
    linear.train(conv1d.training)
    return linear


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def report_table(report: dict[str, SparseLayerReport]) -> list[dict[str, Any]]:
    """The report as flat rows (for printing or JSON): name, density, chosen, reason, and µs/speedup per batch size."""
    rows = []
    for name, entry in report.items():
        row: dict[str, Any] = {"layer": name, "density": round(entry.density, 6), "chosen": entry.chosen}
        for batch in entry.dense_us:
            row[f"dense_us@{batch}"] = round(entry.dense_us[batch], 1)
            row[f"sparse_us@{batch}"] = round(entry.sparse_us[batch], 1)
            row[f"speedup@{batch}"] = round(entry.speedup[batch], 3)
        row["reason"] = entry.reason
        rows.append(row)
    return rows
