"""CPU inference latency of networks whose channels were removed (``structure="channels"``) against the dense one.

For each model and channel sparsity, the BatchNorm layers whose channels can go, alone or joined by residual
additions (:func:`lightning_prune.channel_groups.channel_groups`), get channel masks, cut at that sparsity by
``finalize`` from random scales γ (latency depends only on the layer shapes, not on what was learnt; accuracy is
measured by ``accuracy_at_budget.py --methods channels``), and :func:`lightning_prune.remove_channels` builds the
smaller network, whose outputs are checked equal to the masked one's. Two variants run, alternating round by round
(``inference_speed.latencies``): ``dense`` and ``structured`` (the smaller network). A network pruned with masks only
(Lightning's ``ModelPruning(pruning_fn="ln_structured")``, or the channel masks before removal) runs the dense
kernels: its latency is the dense one's.

Each row has the MACs and parameters of the variant (Torch-Pruning's counter, one sample), the share of the dense
MACs removed, and the peak memory of one inference at that batch (:func:`peak_memory_bytes`). Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/channel_inference_speed.py --threads 2 \
        --json benchmarks/results/inference_structured.json
    # the same cut in units of 16 channels (the widths the kernels compute in)
    OMP_WAIT_POLICY=PASSIVE python benchmarks/channel_inference_speed.py --threads 2 --round-to 16
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from inference_speed import latencies
from result_files import write_json
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from lightning_prune import finalize, remove_channels
from lightning_prune.backbones import VGG19, Conv4, ResNet18
from lightning_prune.channel_groups import channel_groups, reparametrize_channels
from lightning_prune.channel_removal import macs_and_parameters

KINDS = ("dense", "structured")
#: name -> (builder, input shape without the batch dimension)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "vgg19": (lambda: VGG19(num_classes=10), (3, 32, 32)),
    "resnet18": (lambda: ResNet18(num_classes=10), (3, 32, 32)),
    "conv4_bn": (lambda: Conv4(num_classes=10, in_channels=3, input_size=32, batch_norm=True), (3, 32, 32)),
}


def smaller(
    dense: nn.Module, shape: tuple[int, ...], sparsity: float, seed: int = 0, residual_streams: bool = False,
    round_to: int = 1,
) -> nn.Module:
    """The dense network with ``sparsity`` of its removable channels taken out, chosen from random scales (each
    layer's count a multiple of ``round_to``, as ``BudgetCallback(round_to=...)`` cuts)."""
    model = copy.deepcopy(dense)
    x = torch.randn(2, *shape)
    groups = channel_groups(model, x, residual_streams=residual_streams)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in groups.removable:
            bn = model.get_submodule(name)
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=generator) + 0.1)
    reparametrize_channels(model, list(groups.removable), joined=groups.joined)
    finalize(model, sparsity=sparsity, round_to=round_to)
    return remove_channels(model, x).eval()


def peak_memory_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes in use at the peak of ``model(x)`` without autograd: the parameters and buffers, plus the largest total
    of the tensors alive at once during the call (allocations and frees in order, from torch's profiler)."""
    state = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x)
    changes = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                     for e in prof.events())
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return state + peak


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7],
                        help="shares of the removable channels taken out")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=9, help="rounds of alternated timing per configuration")
    parser.add_argument("--block", type=float, default=0.05, help="seconds of calls per timed block")
    parser.add_argument("--max-seconds", type=float, default=12.0, help="time cap per (model, sparsity, batch)")
    parser.add_argument("--residual-streams", action="store_true",
                        help="also remove channels of residual streams (BudgetCallback's residual_streams)")
    parser.add_argument("--round-to", type=int, default=1,
                        help="each layer keeps a multiple of this many channels (BudgetCallback's round_to)")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for name in args.models:
        build, shape = MODELS[name]
        torch.manual_seed(0)
        dense = build().eval()
        one = torch.randn(1, *shape)
        dense_macs, dense_params = macs_and_parameters(dense, one)
        for sparsity in args.sparsities:
            models = {"dense": dense, "structured": smaller(dense, shape, sparsity, residual_streams=args.residual_streams,
                                                            round_to=args.round_to)}
            sizes = {kind: macs_and_parameters(model, one) for kind, model in models.items()}
            for batch in args.batches:
                torch.manual_seed(1)
                x = torch.randn(batch, *shape)
                memory = {kind: peak_memory_bytes(model, x) for kind, model in models.items()}
                seconds = latencies(models, x, args.repeats, args.block, args.max_seconds)
                for kind in KINDS:
                    macs, params = sizes[kind]
                    rows.append({
                        "model": name, "kind": kind, "channel_sparsity": sparsity, "batch": batch,
                        "residual_streams": args.residual_streams, "round_to": args.round_to,
                        "latency_ms": round(seconds[kind] * 1e3, 4),
                        "speedup": round(seconds["dense"] / seconds[kind], 3),
                        "macs": macs, "params": params,
                        "macs_removed": round(1 - macs / dense_macs, 4),
                        "params_removed": round(1 - params / dense_params, 4),
                        "peak_memory_mb": round(memory[kind] / 2**20, 2),
                        "memory_ratio": round(memory[kind] / memory["dense"], 3),
                    })
            print(f"[{time.perf_counter() - started:6.0f} s] {name} at {sparsity:.0%} of the channels: "
                  f"{1 - sizes['structured'][0] / dense_macs:.1%} of the MACs removed", file=sys.stderr, flush=True)
    config = {"torch": torch.__version__, "threads": args.threads, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
              "repeats": args.repeats, "block_s": args.block, "seconds": round(time.perf_counter() - started, 1)}
    print(table(rows, config))
    result = {"config": config, "rows": rows}
    if args.json:
        write_json(args.json, result)
    return result


def table(rows: list[dict[str, Any]], config: dict[str, Any]) -> str:
    """Markdown: one line per (model, channel sparsity, batch)."""
    lines = [
        f"torch {config['torch']}, {config['threads']} threads, median of up to {config['repeats']} alternated rounds",
        "",
        "| model | channels removed | MACs removed | params removed | batch | dense ms | smaller ms | speedup "
        "| peak memory, smaller / dense |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    dense = {(r["model"], r["channel_sparsity"], r["batch"]): r for r in rows if r["kind"] == "dense"}
    for r in rows:
        if r["kind"] == "structured":
            d = dense[(r["model"], r["channel_sparsity"], r["batch"])]
            lines.append(
                f"| {r['model']} | {r['channel_sparsity']:.0%} | {r['macs_removed']:.1%} | {r['params_removed']:.1%} "
                f"| {r['batch']} | {d['latency_ms']:.3f} | {r['latency_ms']:.3f} | {r['speedup']:.2f}× "
                f"| {r['memory_ratio']:.2f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
