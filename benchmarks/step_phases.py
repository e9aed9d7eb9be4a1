"""Where the callback's extra time per training step goes, phase by phase, on one network's covered weights.

Outside ``Trainer.fit``: each phase of one step is timed alone on VGG19's (or another backbone's) reparametrized
tensors, alternating rounds, with the fused kernels (``lightning_prune.fused_kernels``) and with the eager
operations. Phases: the masked weights' forward and backward passes (``gate``, at a temperature in each of the
schedule's two regimes), the gate's forward pass alone (``recompute``: what ``recompute_masked_weights=True`` adds
to a step), the budget loop's sample, margin and metric (``loop``, ``BudgetLoop.step`` less the proximal
step), the proximal step under Adam's metric (``budget_step``), and the non-finite check. ``fit_step_cost.py``
measures the whole step through ``Trainer.fit``.

    python benchmarks/step_phases.py --model vgg19 --threads 2 --json benchmarks/results/step_phases_vgg19.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from result_files import write_json

import lightning_prune.fused_kernels as fused_kernels
from lightning_prune import LoopSettings, masked_parameters, reparametrize
from lightning_prune.backbones import VGG19, Conv4, ResNet18
from lightning_prune.budget import budget_step, margin_gap, optimizer_metric, sample_indices
from lightning_prune.budget_loop import BudgetLoop

MODELS = {"vgg19": VGG19, "resnet18": ResNet18, "conv4": Conv4}


def phases(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loop: BudgetLoop) -> dict:
    params = masked_parameters(model)
    grads = [torch.randn_like(p.latent) for p in params]

    def gate(temperature: float):
        def run():
            for p in params:
                p.mask.set_temperature(temperature)
            weights = [getattr(p.module, p.param_name) for p in params]
            torch.autograd.backward(weights, grads)
        return run

    def recompute():  # what recompute_masked_weights adds: the forward pass's gate again, in the backward pass
        for p in params:
            p.mask.set_temperature(0.05)
        with torch.no_grad():
            for p in params:
                getattr(p.module, p.param_name)

    def sample():
        indices = sample_indices(params, 3)
        margin_gap(params, 0.5, "global", 3, 1.0, loop.floors, exempt=0.05, indices=indices)
        optimizer_metric(params, optimizer, 3, indices)

    def step():
        metric = optimizer_metric(params, optimizer, 3)
        budget_step(params, torch.full((len(params),), 1e-3), torch.tensor([3.0]), metric)

    def finite():
        bool(torch.isfinite(torch.stack([p.latent.sum(dtype=torch.float32) for p in params])).all())

    # the gate in the schedule's two regimes: T > 0 (a sigmoid in the forward pass), and T = 0 after the target reaches
    # the budget (the step in the forward pass); the backward pass is the same in both
    return {"gate, T > 0": gate(0.05), "gate, T = 0": gate(0.0), "recompute": recompute, "loop": sample,
            "budget_step": step, "finite_check": finite}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(MODELS), default="vgg19")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MODELS[args.model](num_classes=10)
    reparametrize(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    loop = BudgetLoop(LoopSettings(), "global", 0.01, 0.1)
    loop.attach(masked_parameters(model))
    work = phases(model, optimizer, loop)
    times = {(kind, name): [] for kind in ("fused", "eager") for name in work}
    limit = fused_kernels.FUSED_MIN_NUMEL
    for r in range(args.rounds + 1):
        for kind in ("fused", "eager") if r % 2 else ("eager", "fused"):
            fused_kernels.FUSED_MIN_NUMEL = limit if kind == "fused" else 1 << 62
            for name, fn in work.items():
                start = time.perf_counter()
                fn()
                if r:  # round 0 compiles and warms up
                    times[(kind, name)].append(time.perf_counter() - start)
    fused_kernels.FUSED_MIN_NUMEL = limit
    rows = [{"model": args.model, "phase": name, "kind": kind, "ms": round(1e3 * statistics.median(t), 2)}
            for (kind, name), t in times.items()]
    covered = sum(q.numel for q in masked_parameters(model))
    print(f"{args.model}: {covered:,} covered weights, {args.threads} threads, median of {args.rounds} rounds")
    print("| phase | eager ms | fused ms |\n|---|---:|---:|")
    for name in work:
        eager, fused = (next(r["ms"] for r in rows if r["phase"] == name and r["kind"] == k) for k in ("eager", "fused"))
        print(f"| {name} | {eager:.1f} | {fused:.1f} |")
    result = {"args": vars(args), "covered": covered, "rows": rows}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
