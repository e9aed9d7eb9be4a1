"""Where the reparametrization's step time goes: each phase of a training step, reparam against dense.

The dense backbone and the reparametrized one take turns, one step each per round, as in ``step_cost.py``. Each step
is split into phases: ``zero_grad``, ``forward`` (with the loss), ``backward``, ``budget`` (reparam only: what
``BudgetCallback`` runs around the backward pass, ``add_budget_gradient(..., in_backward=True)`` before it and
``flush_budget_gradient`` after it; the gradient itself is then computed inside ``backward``; with ``--budget-pass
separate``, ``add_budget_gradient`` after the backward pass) and ``optimizer`` (SGD step). For each phase the script prints the
median wall time of both variants, their difference, and the median number of minor page faults
(``resource.getrusage``, Linux/macOS): fresh weight-sized buffers show up there.

``--kernel-probe`` also times the gate's elementwise work on the model's largest prunable weight with cold caches:
the forward (``θ ⊙ h`` and ``Σh``) and the backward of the eager kernels in ``lightning_prune.gate_kernels``,
against the same formulas compiled into one function each with ``torch.compile(dynamic=True)`` (needs a working
inductor backend: a C++ compiler on the CPU). The ratios are compiled / eager.

Usage::

    python benchmarks/step_phases.py --model vgg19 --threads 2 --rounds 10 --kernel-probe
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from result_files import write_json
from step_cost import BUDGET_PASSES, MODELS, Variant, build_backbone

from lightning_prune import add_budget_gradient, flush_budget_gradient
from lightning_prune.gate_kernels import masked_weight, masked_weight_grad

try:
    import resource
except ImportError:  # Windows: no page-fault counter
    resource = None

PHASES = ("zero_grad", "forward", "backward", "budget", "optimizer")
#: BudgetCallback's defaults and a target keep share mid-schedule, as in step_cost.py.
LAMBDA, BUDGET_GRAD_TEMPERATURE, KEEP = 5.0, 1.0, 0.5


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def timed_step(variant: Variant, x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple[float, int]]:
    """One training step of ``variant``: ``{phase: (seconds, minor page faults)}``."""
    out = {phase: (0.0, 0) for phase in PHASES}
    state: dict[str, torch.Tensor] = {}
    reparam, in_backward = variant.soft, variant.budget_pass == "backward"

    def forward() -> None:
        state["loss"] = F.cross_entropy(variant.model(x), y)

    def request() -> None:  # BudgetCallback.on_before_backward
        if reparam and in_backward:
            add_budget_gradient(variant.layers, KEEP, "global", BUDGET_GRAD_TEMPERATURE, LAMBDA, in_backward=True)

    def budget() -> None:  # BudgetCallback.on_before_optimizer_step
        if reparam and in_backward:
            flush_budget_gradient(variant.layers)
        elif reparam:
            add_budget_gradient(variant.layers, KEEP, "global", BUDGET_GRAD_TEMPERATURE, weight=LAMBDA)

    work: list[tuple[str, Callable[[], object]]] = [
        ("zero_grad", lambda: variant.optimizer.zero_grad(set_to_none=True)),
        ("forward", forward),
        ("budget", request),
        ("backward", lambda: state.pop("loss").backward()),
        ("budget", budget),
        ("optimizer", variant.optimizer.step),
    ]
    for phase, fn in work:
        faults, start = _faults(), time.perf_counter()
        fn()
        seconds, count = out[phase]
        out[phase] = (seconds + time.perf_counter() - start, count + _faults() - faults)
    return out


def measure_phases(
    model_name: str,
    rounds: int,
    warmup: int,
    batch_size: int,
    width_scale: float,
    budget_pass: str = "backward",
    compile_gate: bool = False,
) -> list[dict]:
    """Rows ``{phase, dense_ms, reparam_ms, extra_ms, dense_faults, reparam_faults}``, plus a ``total`` row."""
    torch.manual_seed(0)
    dense = build_backbone(model_name, width_scale)
    reparam = Variant("reparam_compiled" if compile_gate else "reparam", dense, torch.device("cpu"), budget_pass)
    reparam.name = "reparam"  # the rows' label
    variants = [Variant("dense", dense, torch.device("cpu")), reparam]
    x, y = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))
    samples: dict[str, dict[str, list[tuple[float, int]]]] = {v.name: {p: [] for p in PHASES} for v in variants}
    for i in range(warmup + rounds):
        for v in variants if i % 2 else variants[::-1]:
            step = timed_step(v, x, y)
            if i >= warmup:
                for phase, value in step.items():
                    samples[v.name][phase].append(value)
    rows = []
    for phase in (*PHASES, "total"):
        row: dict[str, float | str] = {"phase": phase}
        for name in ("dense", "reparam"):
            if phase == "total":
                per_round = [sum(samples[name][p][r][0] for p in PHASES) for r in range(rounds)]
                faults = [sum(samples[name][p][r][1] for p in PHASES) for r in range(rounds)]
            else:
                per_round = [t for t, _ in samples[name][phase]]
                faults = [f for _, f in samples[name][phase]]
            row[f"{name}_ms"] = round(statistics.median(per_round) * 1e3, 2)
            row[f"{name}_faults"] = statistics.median(faults)
        row["extra_ms"] = round(row["reparam_ms"] - row["dense_ms"], 2)
        rows.append(row)
    return rows


def _gate_forward(theta, scale, threshold, temperature):
    gate = torch.sigmoid(theta.abs() / (scale * temperature) - threshold / temperature)
    return theta * gate, gate.sum()


def _gate_backward(theta, grad_out, scale, threshold, temperature):
    scaled = theta.abs() / (scale * temperature)
    gate = torch.sigmoid(scaled - threshold / temperature)
    return grad_out * (gate + scaled * gate * (1 - gate))


def kernel_probe(model_name: str, width_scale: float, repeats: int = 30) -> dict[str, float]:
    """Median ms of the eager and the compiled gate kernels on the largest prunable weight, caches cold."""
    torch.manual_seed(0)
    weights = [m.weight for m in build_backbone(model_name, width_scale).modules() if hasattr(m, "weight")]
    theta = max((w.detach() for w in weights if w is not None and w.dim() > 1), key=torch.Tensor.numel).contiguous()
    scale, threshold = theta.abs().mean(), torch.tensor(1.0)
    temperature, floor = torch.tensor(0.5), torch.tensor(0.1)  # T ≥ floor: the backward has one gate, as compiled
    grad_out = torch.randn_like(theta)
    evict = torch.empty(16 * 2**20)  # 64 MB, written between calls so that θ is not in cache

    def median_ms(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(repeats):
            evict.fill_(1.0)
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    compiled_forward = torch.compile(_gate_forward, dynamic=True)
    compiled_backward = torch.compile(_gate_backward, dynamic=True)
    start = time.perf_counter()
    compiled_forward(theta, scale, threshold, temperature)
    compiled_backward(theta, grad_out, scale, threshold, temperature)
    result = {"weights": theta.numel(), "compile_s": round(time.perf_counter() - start, 1)}
    result["eager_forward_ms"] = median_ms(lambda: masked_weight(theta, scale, threshold, temperature))
    result["compiled_forward_ms"] = median_ms(lambda: compiled_forward(theta, scale, threshold, temperature))
    result["eager_backward_ms"] = median_ms(
        lambda: masked_weight_grad(theta, grad_out, scale, threshold, temperature, floor)
    )
    result["compiled_backward_ms"] = median_ms(
        lambda: compiled_backward(theta, grad_out, scale, threshold, temperature)
    )
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="conv4")
    parser.add_argument("--rounds", type=int, default=20, help="rounds measured (one step of each variant)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width-scale", type=float, default=1.0, help="channels x this (tests use small models)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--budget-pass", choices=BUDGET_PASSES, default="backward",
                        help="the budget gradient added by the backward pass (the callback's default) or after it")
    parser.add_argument("--compile-gate", action="store_true",
                        help="reparam with compile_gate=True (the gate as kernels compiled by torch.compile)")
    parser.add_argument("--kernel-probe", action="store_true", help="also time eager against compiled gate kernels")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        raise SystemExit(f"--rounds must be >= 1 and --warmup >= 0, got {args.rounds} and {args.warmup}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"{args.model}, CPU, batch {args.batch_size}, torch.get_num_threads() = {torch.get_num_threads()}, "
          f"{args.rounds} rounds, budget gradient {args.budget_pass}, compile_gate={args.compile_gate}; page faults from {'getrusage' if resource else 'nothing (not counted here)'}")
    rows = measure_phases(
        args.model, args.rounds, args.warmup, args.batch_size, args.width_scale, args.budget_pass, args.compile_gate
    )
    print("| phase | dense ms | reparam ms | reparam − dense ms | dense faults | reparam faults |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['phase']} | {r['dense_ms']:.1f} | {r['reparam_ms']:.1f} | {r['extra_ms']:+.1f} | "
              f"{r['dense_faults']:.0f} | {r['reparam_faults']:.0f} |")
    total = rows[-1]
    print(f"total reparam / dense (medians of the summed phases): {total['reparam_ms'] / total['dense_ms']:.3f}x")
    report = {"args": vars(args), "cpu_count": os.cpu_count(), "phases": rows}
    if args.kernel_probe:
        probe = kernel_probe(args.model, args.width_scale)
        print(f"gate kernels on the largest weight ({probe['weights']} weights, caches cold; compile "
              f"{probe['compile_s']} s): forward eager {probe['eager_forward_ms']:.2f} ms, compiled "
              f"{probe['compiled_forward_ms']:.2f} ms ({probe['compiled_forward_ms'] / probe['eager_forward_ms']:.2f}x); "
              f"backward eager {probe['eager_backward_ms']:.2f} ms, compiled {probe['compiled_backward_ms']:.2f} ms "
              f"({probe['compiled_backward_ms'] / probe['eager_backward_ms']:.2f}x)")
        report["kernel_probe"] = probe
    if args.json:
        write_json(args.json, report)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
