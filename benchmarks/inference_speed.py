"""CPU inference latency of a pruned network: dense, unstructured export (zeros, dense kernels), sparse Linear export.

For each model and sparsity, masks come from ``reparametrize`` + ``finalize(model, sparsity=s)`` on the random
initialisation (latency does not depend on what was learnt; accuracy is not measured here). Three variants run:

* ``dense``: the unpruned network;
* ``unstructured_dense_kernels``: ``make_permanent`` of the pruned one (zeros where pruned, the same dense kernels);
* ``unstructured_sparse``: ``sparse_linear_export`` of that, where each ``nn.Linear`` measured faster in CSR form at
  every batch size (timed at export, on this machine) is a ``SparseLinear``; convolutions stay dense.

The three variants of one (model, sparsity, batch) alternate round by round (the order rotating) and each latency is
the median over the rounds, so the speedups (dense time / variant time) come from one stretch of the same run.
``params`` counts the stored parameter values (a ``SparseLinear`` stores its non-zeros as ``values``, indices not
counted), ``nonzeros`` those that are not zero, ``state_bytes`` the size of the ``state_dict`` (indices included).

Models: Conv4 (32 px, 3 channels; its first Linear holds 89% of the weights but ~2% of the multiply-adds), a
GPT-2-style MLP stack (4 pre-norm residual blocks of Linear(768, 3072)-GELU-Linear(3072, 768); batch = tokens),
VGG19 and ResNet18 at 32 px (convolutional: the sparse export can only touch their last Linear).

Usage (``OMP_WAIT_POLICY=PASSIVE``: on a machine shared with other jobs, an OpenMP thread that spins waiting for a
partner whose core is taken costs a whole scheduler slice, ~8 ms, per parallel kernel; measured here, 2-thread sparse
products took 5-8 ms instead of 0.1-0.2 ms and every layer stayed dense)::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/inference_speed.py --threads 2 \
        --json benchmarks/results/inference_unstructured.json
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from result_files import write_json
from torch import Tensor, nn

from lightning_prune import finalize, make_permanent, reparametrize
from lightning_prune.backbones import VGG19, Conv4, ResNet18
from lightning_prune.sparse_export import SparseLinear, sparse_linear_export

KINDS = ("dense", "unstructured_dense_kernels", "unstructured_sparse")


class MLPBlock(nn.Module):
    """GPT-2's MLP with its pre-norm residual: ``x + fc2(gelu(fc1(ln(x))))``."""

    def __init__(self, width: int = 768, hidden: int = 3072) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(self.ln(x))))


def gpt2_mlp(blocks: int = 4, width: int = 768, hidden: int = 3072) -> nn.Module:
    return nn.Sequential(*(MLPBlock(width, hidden) for _ in range(blocks)))


#: name -> (builder, input shape without the batch dimension)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv4": (lambda: Conv4(num_classes=10, in_channels=3, input_size=32), (3, 32, 32)),
    "gpt2_mlp": (gpt2_mlp, (768,)),
    "vgg19": (lambda: VGG19(num_classes=10), (3, 32, 32)),
    "resnet18": (lambda: ResNet18(num_classes=10), (3, 32, 32)),
}


def counts(model: nn.Module) -> tuple[int, int, int]:
    """``(params, nonzeros, state_bytes)``: stored parameter values (CSR values included), those not zero, bytes."""
    tensors = list(model.parameters()) + [m.values for m in model.modules() if isinstance(m, SparseLinear)]
    params = sum(t.numel() for t in tensors)
    nonzeros = sum(int((t != 0).sum()) for t in tensors)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return params, nonzeros, state_bytes


@torch.no_grad()
def latencies(models: dict[str, nn.Module], x: Tensor, repeats: int, block_s: float, max_s: float) -> dict[str, float]:
    """Median seconds per forward pass of each model on ``x``, the models alternating round by round.

    A round times a block of about ``block_s`` of calls of each model, in an order that rotates every round. Rounds
    stop after ``repeats`` (or, past 3 rounds, when ``max_s`` seconds are spent).
    """
    names = list(models)
    calls = {}
    for name in names:
        models[name](x)  # warm-up
        start = time.perf_counter()
        models[name](x)
        calls[name] = max(1, int(block_s / max(time.perf_counter() - start, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in names}
    began = time.perf_counter()
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(calls[name]):
                models[name](x)
            times[name].append((time.perf_counter() - start) / calls[name])
        if r >= 2 and time.perf_counter() - began > max_s:
            break
    return {name: statistics.median(values) for name, values in times.items()}


def variants(name: str, sparsity: float, batches: Sequence[int], threads: int) -> tuple[dict[str, nn.Module], dict]:
    """The three variants of one model at one sparsity (same seed, so the same dense weights at every sparsity)."""
    build, _ = MODELS[name]
    torch.manual_seed(0)
    dense = build().eval()
    pruned = copy.deepcopy(dense)
    reparametrize(pruned)
    finalize(pruned, sparsity=sparsity)
    unstructured = make_permanent(pruned).eval()
    sparse, report = sparse_linear_export(unstructured, batch_sizes=batches, threads=threads)
    return {"dense": dense, "unstructured_dense_kernels": unstructured, "unstructured_sparse": sparse.eval()}, report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=9, help="rounds of alternated timing per configuration")
    parser.add_argument("--block", type=float, default=0.03, help="seconds of calls per timed block")
    parser.add_argument("--max-seconds", type=float, default=12.0, help="time cap per (model, sparsity, batch)")
    parser.add_argument("--json", metavar="PATH", help="write the rows and the per-layer export decisions as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.threads > 1 and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        print("warning: OMP_WAIT_POLICY is not PASSIVE: on a shared machine multi-thread timings may stall",
              file=sys.stderr)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
    rows: list[dict[str, Any]] = []
    layers: list[dict[str, Any]] = []
    started = time.perf_counter()
    for name in args.models:
        shape = MODELS[name][1]
        for sparsity in args.sparsities:
            models, report = variants(name, sparsity, args.batches, args.threads)
            chosen = sum(r.chosen for r in report.values())
            for layer, entry in report.items():
                layers.append({
                    "model": name, "sparsity": sparsity, "layer": layer, "density": round(entry.density, 5),
                    "chosen": entry.chosen, "reason": entry.reason,
                    "dense_us": {str(b): round(t, 1) for b, t in entry.dense_us.items()},
                    "sparse_us": {str(b): round(t, 1) for b, t in entry.sparse_us.items()},
                })
            sizes = {kind: counts(model) for kind, model in models.items()}
            for batch in args.batches:
                torch.manual_seed(1)
                x = torch.randn(batch, *shape)
                seconds = latencies(models, x, args.repeats, args.block, args.max_seconds)
                for kind in KINDS:
                    params, nonzeros, state_bytes = sizes[kind]
                    rows.append({
                        "model": name, "sparsity": sparsity, "batch": batch, "kind": kind,
                        "latency_ms": round(seconds[kind] * 1e3, 4),
                        "speedup": round(seconds["dense"] / seconds[kind], 3),
                        "params": params, "nonzeros": nonzeros, "state_bytes": state_bytes,
                        "sparse_linear_layers": f"{chosen}/{len(report)}" if kind == "unstructured_sparse" else "",
                    })
            print(f"[{time.perf_counter() - started:6.0f} s] {name} at {sparsity:.0%}: {chosen}/{len(report)} "
                  "Linear layers exported sparse", file=sys.stderr, flush=True)
    config = {
        "torch": torch.__version__, "threads": args.threads, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "repeats": args.repeats, "block_s": args.block,
        "max_seconds": args.max_seconds, "seconds": round(time.perf_counter() - started, 1),
    }
    print(table(rows, config))
    result = {"config": config, "rows": rows, "export_layers": layers}
    if args.json:
        write_json(args.json, result)
    return result


def table(rows: list[dict[str, Any]], config: dict[str, Any]) -> str:
    """Markdown: one line per (model, sparsity, batch), latency and speedup of each variant, non-zeros."""
    lines = [
        f"torch {config['torch']}, {config['threads']} threads, median of up to {config['repeats']} alternated rounds",
        "",
        "| model | sparsity | batch | dense ms | zeros, dense kernels ms (×) | sparse export ms (×) | sparse Linear "
        "layers | nonzeros / params |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["sparsity"], row["batch"]), {})[row["kind"]] = row
    for (model, sparsity, batch), kinds in groups.items():
        dense, zeros, sparse = (kinds[k] for k in KINDS)
        lines.append(
            f"| {model} | {sparsity:.0%} | {batch} | {dense['latency_ms']:.3f} | {zeros['latency_ms']:.3f} "
            f"({zeros['speedup']:.2f}×) | {sparse['latency_ms']:.3f} ({sparse['speedup']:.2f}×) | "
            f"{sparse['sparse_linear_layers']} | {zeros['nonzeros']:,} / {dense['params']:,} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
