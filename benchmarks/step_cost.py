"""Step cost of the reparametrization: training step time and peak memory against the dense backbone.

Variants, built from one initialisation of each backbone and timed round-robin in one process (so machine noise hits
all of them alike):

* ``dense``: the plain backbone;
* ``reparam``: lightning_prune during training (soft masks), plus the budget term exactly as ``BudgetCallback``
  adds it without gradient accumulation: ``add_budget_gradient(layers, keep, "global", 1.0, weight=lam,
  in_backward=True)`` before ``backward()`` (the backward pass adds it) and ``flush_budget_gradient(layers)`` after;
  ``--budget-pass separate`` adds it after ``backward()`` in a pass of its own instead, as the callback does with
  gradient accumulation or 16-bit mixed precision;
* ``reparam_separate`` (with ``--budget-pass both``): ``reparam`` with the separate budget pass, in the same rounds
  as ``reparam`` (an A/B of the two paths);
* ``reparam_compiled`` (with ``--compile-gate``): ``reparam`` with ``reparametrize(model, compile_gate=True)``, the
  gate's forward and backward as fused kernels compiled by torch.compile (compiled during the warm-up rounds);
* ``finalized``: after finalisation (hard masks, ``θ ⊙ M``; the callback adds no budget term any more);
* ``modelpruning``: what Lightning's ``ModelPruning`` runs between its pruning events, i.e.
  ``torch.nn.utils.prune`` (forward pre-hook ``weight = weight_orig * weight_mask``) after
  ``prune.global_unstructured(..., pruning_method=prune.L1Unstructured, amount=0.5)``.

A step is forward, cross-entropy, backward, (budget term), ``optimizer.step()`` (SGD, momentum 0.9), timed with
``time.perf_counter`` (after ``torch.cuda.synchronize`` on a GPU). The variants take turns: each round runs one step
of every variant. Reported: the median step time over ``--steps`` rounds after ``--warmup`` rounds, and the time
ratio to ``dense`` as the median over rounds of (variant's step / dense's step in the same round), so that a slow
stretch of the machine cancels out of the ratio instead of landing on whichever variant it hit.

Memory. On CUDA: ``torch.cuda.max_memory_allocated`` over one step, from a reset after the model, its gradients and
the optimizer state exist. On CPU there is no allocator peak counter for torch tensors (tracemalloc does not see
them), so the script *estimates* the peak as parameter + buffer + gradient + optimizer-state bytes plus the bytes of
the tensors autograd saves for the backward during one forward (``torch.autograd.graph.saved_tensors_hooks``, each
storage counted once, parameters and buffers not counted twice). The budget term of ``reparam`` builds no autograd
graph. The estimate leaves out temporaries that live inside a single operation, so it is a lower bound that is the
same kind of number for every variant.

Usage::

    python benchmarks/step_cost.py --threads 2 --steps 20 --warmup 3 --csv step_cost.csv

    # what benchmarks/results/step_cost_cpu.* come from (about 3.5 minutes on an idle 2-core CPU):
    python benchmarks/step_cost.py --threads 2 --batch-size 64 --steps 30 --warmup 3 \\
        --model-steps vgg19=20:2 resnet18=12:2 \\
        --csv benchmarks/results/step_cost_cpu.csv --json benchmarks/results/step_cost_cpu.json

CPU timings are only as steady as the machine is idle: with other processes on the cores, torch's two threads wait on
each other and the medians (and their ratios) scatter by tens of percent.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from result_files import write_csv, write_json
from torch import nn
from torch.nn.utils import prune

import lightning_prune
from lightning_prune import add_budget_gradient, finalize, flush_budget_gradient, pruned_layers, reparametrize
from lightning_prune.backbones import VGG19, Conv4, ResNet18

VARIANTS = ("dense", "reparam", "finalized", "modelpruning")
MODELS = ("conv4", "vgg19", "resnet18")
#: BudgetCallback defaults: the budget term's weight and surrogate temperature, and a target keep share mid-schedule.
LAMBDA, BUDGET_GRAD_TEMPERATURE, KEEP = 5.0, 1.0, 0.5
BUDGET_PASSES = ("backward", "separate")


@dataclass
class Row:
    model: str
    device: str
    precision: str
    variant: str
    batch_size: int
    threads: int
    steps: int
    median_ms: float
    iqr_ms: float
    time_ratio: float
    peak_mb: float
    memory_ratio: float
    memory_kind: str
    params: int


def build_backbone(name: str, width_scale: float = 1.0, num_classes: int = 10) -> nn.Module:
    """The backbone at CIFAR10 size (3x32x32 inputs), channels scaled by ``width_scale``."""
    if name == "conv4":
        return Conv4(num_classes, 3, 32, width=max(1, round(64 * width_scale)), hidden=max(1, round(256 * width_scale)))
    if name == "vgg19":
        return VGG19(num_classes, 3, width_multiplier=width_scale)
    if name == "resnet18":
        return ResNet18(num_classes, 3, width=max(1, round(64 * width_scale)))
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def _prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


class Variant:
    """One model + optimizer + the extra work its training step does."""

    def __init__(self, name: str, dense: nn.Module, device: torch.device, budget_pass: str = "backward") -> None:
        self.name = name
        self.budget_pass = "separate" if name == "reparam_separate" else budget_pass
        self.soft = name.startswith("reparam")  # trains with soft masks and the budget term
        model = copy.deepcopy(dense)
        self.layers = []
        if self.soft or name == "finalized":
            reparametrize(model, compile_gate=name == "reparam_compiled")
            self.layers = pruned_layers(model)
            if name == "finalized":
                finalize(self.layers, sparsity=0.9)
        elif name == "modelpruning":
            prune.global_unstructured(_prunable(model), pruning_method=prune.L1Unstructured, amount=0.5)
        self.model = model.to(device).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

    def step(self, x: torch.Tensor, y: torch.Tensor, autocast: Callable) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(self.model(x), y)
        if self.soft and self.budget_pass == "backward":  # BudgetCallback.on_before_backward
            add_budget_gradient(self.layers, KEEP, "global", BUDGET_GRAD_TEMPERATURE, weight=LAMBDA, in_backward=True)
        loss.backward()
        if self.soft:  # BudgetCallback.on_before_optimizer_step
            if self.budget_pass == "backward":
                flush_budget_gradient(self.layers)
            else:
                add_budget_gradient(self.layers, KEEP, "global", BUDGET_GRAD_TEMPERATURE, weight=LAMBDA)
        self.optimizer.step()

    # ------------------------------------------------------------- memory
    def state_bytes(self) -> int:
        """Parameters, buffers, gradients and optimizer state (after at least one step)."""
        total = sum(_nbytes(t) for t in self.model.parameters()) + sum(_nbytes(b) for b in self.model.buffers())
        total += sum(_nbytes(p.grad) for p in self.model.parameters() if p.grad is not None)
        for state in self.optimizer.state.values():
            total += sum(_nbytes(v) for v in state.values() if isinstance(v, torch.Tensor))
        return total

    def saved_bytes(self, x: torch.Tensor, y: torch.Tensor, autocast: Callable) -> int:
        """Bytes autograd keeps for the backward of one forward (parameters and buffers not counted)."""
        own = {t.untyped_storage().data_ptr() for t in list(self.model.parameters()) + list(self.model.buffers())}
        seen: set[int] = set()
        counter = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in own and ptr not in seen:
                seen.add(ptr)
                counter[0] += storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
            out = F.cross_entropy(self.model(x), y)
        del out
        self.optimizer.zero_grad(set_to_none=True)
        return counter[0]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure(
    model_name: str,
    device: torch.device,
    precision: str,
    batch_size: int,
    steps: int,
    warmup: int,
    width_scale: float,
    threads: int,
    seed: int = 0,
    budget_pass: str = "backward",
    compile_gate: bool = False,
) -> list[Row]:
    torch.manual_seed(seed)
    dense = build_backbone(model_name, width_scale)
    names = VARIANTS + (("reparam_separate",) if budget_pass == "both" else ()) + (
        ("reparam_compiled",) if compile_gate else ()
    )
    variants = [Variant(name, dense, device, "backward" if budget_pass == "both" else budget_pass) for name in names]
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    if precision == "bf16":

        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = nullcontext
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for i in range(warmup + steps):
        # rotate the order each round so no variant always runs right after the same one
        order = variants[i % len(variants) :] + variants[: i % len(variants)]
        for v in order:
            sync()
            start = time.perf_counter()
            v.step(x, y, autocast)
            sync()
            if i >= warmup:
                times[v.name].append(time.perf_counter() - start)
    peaks: dict[str, float] = {}
    for v in variants:
        if cuda:
            v.optimizer.zero_grad(set_to_none=False)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            v.step(x, y, autocast)
            torch.cuda.synchronize()
            peaks[v.name] = torch.cuda.max_memory_allocated(device)
        else:
            state = v.state_bytes()
            peaks[v.name] = state + v.saved_bytes(x, y, autocast)
    rows = []
    for v in variants:
        ts = sorted(t * 1e3 for t in times[v.name])
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        med = statistics.median(ts)
        rows.append(
            Row(
                model=model_name,
                device=device.type,
                precision=precision,
                variant=v.name,
                batch_size=batch_size,
                threads=threads,
                steps=steps,
                median_ms=round(med, 3),
                iqr_ms=round(q[2] - q[0], 3),
                time_ratio=round(statistics.median(t / d for t, d in zip(times[v.name], times["dense"])), 4),
                peak_mb=round(peaks[v.name] / 2**20, 2),
                memory_ratio=round(peaks[v.name] / peaks["dense"], 4),
                memory_kind="cuda.max_memory_allocated" if cuda else "estimate (state + saved tensors)",
                params=sum(p.numel() for p in v.model.parameters()),
            )
        )
    return rows


def profile_step(model_name: str, device: torch.device, batch_size: int, width_scale: float, steps: int = 3,
                 top: int = 15) -> dict[str, str]:
    """torch.profiler tables (self CPU time) of ``steps`` steps of ``dense`` and ``reparam``, to see where time goes."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    dense = build_backbone(model_name, width_scale)
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tables = {}
    for name in ("dense", "reparam"):
        v = Variant(name, dense, device)
        v.step(x, y, nullcontext)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                v.step(x, y, nullcontext)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        tables[name] = prof.key_averages().table(sort_by=key, row_limit=top)
    return tables


def format_table(rows: Sequence[Row]) -> str:
    header = "| model | device | precision | variant | batch | median ms | IQR ms | time / dense | peak MB | mem / dense |"
    lines = [header, "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.device} | {r.precision} | {r.variant} | {r.batch_size} | {r.median_ms:.1f} | "
            f"{r.iqr_ms:.1f} | {r.time_ratio:.3f}x | {r.peak_mb:.1f} | {r.memory_ratio:.3f}x |"
        )
    return "\n".join(lines)


def check_goals(rows: Sequence[Row]) -> list[str]:
    """Goals of the issue: reparametrized step time <= 1.10x dense on CPU (1.05x on a GPU), peak memory <= 1.25x."""
    misses = []
    for r in rows:
        if r.variant != "reparam":
            continue
        limit = 1.10 if r.device == "cpu" else 1.05
        if r.time_ratio > limit:
            misses.append(f"{r.model}/{r.device}/{r.precision}: step time {r.time_ratio:.3f}x > {limit:.2f}x")
        if r.memory_ratio > 1.25:
            misses.append(f"{r.model}/{r.device}/{r.precision}: peak memory {r.memory_ratio:.3f}x > 1.25x")
    return misses


def environment(threads: int) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning_prune": lightning_prune.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.platform(),
        "torch_threads": threads,
    }
    try:
        import lightning

        info["lightning"] = lightning.__version__
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--model-steps", nargs="+", default=[], metavar="MODEL=STEPS[:WARMUP]",
                        help="per-model override of --steps/--warmup, e.g. vgg19=8:2 resnet18=6:2 (big models are slow)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 on CPU, 128 on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: CPU always, and CUDA too when a GPU is present")
    parser.add_argument("--width-scale", type=float, default=1.0, help="scale the channels (smoke tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-pass", choices=(*BUDGET_PASSES, "both"), default="backward",
                        help="reparam's budget gradient: added by the backward pass (BudgetCallback's default) or in "
                             "a separate pass after it (the callback with gradient accumulation or 16-mixed); both: "
                             "reparam as by default, and a reparam_separate variant timed in the same rounds")
    parser.add_argument("--compile-gate", action="store_true",
                        help="also time reparam_compiled: reparam with compile_gate=True (fused kernels compiled by "
                             "torch.compile; needs a C++ compiler on the CPU, Triton on a GPU)")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's top operators of one dense and one reparam step per model")
    parser.add_argument("--csv", default=None)
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def step_plan(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """``{model: (timed steps, warm-up steps)}`` from ``--steps``/``--warmup`` and the ``--model-steps`` overrides."""
    plan = {name: (args.steps, args.warmup) for name in MODELS}
    for item in args.model_steps:
        name, sep, value = item.partition("=")
        steps, _, warmup = value.partition(":")
        if not sep or name not in MODELS or not steps.isdigit() or (warmup and not warmup.isdigit()):
            raise SystemExit(f"--model-steps takes MODEL=STEPS[:WARMUP] with MODEL in {MODELS}, got {item!r}")
        plan[name] = (int(steps), int(warmup) if warmup else args.warmup)
    for name, (steps, warmup) in plan.items():
        if steps < 1 or warmup < 0:
            raise SystemExit(f"{name}: steps must be >= 1 and warm-up >= 0, got {steps} and {warmup}")
    return plan


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    plan = step_plan(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    runs: list[tuple[torch.device, str, int]] = []
    if args.device in ("auto", "cpu"):
        runs.append((torch.device("cpu"), "fp32", args.batch_size or 64))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but no GPU is available")
        for precision in ("fp32", "bf16"):
            runs.append((torch.device("cuda"), precision, args.batch_size or 128))
    env = environment(threads)
    print(f"torch.get_num_threads() = {threads}")
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    rows: list[Row] = []
    for device, precision, batch in runs:
        for name in args.models:
            steps, warmup = plan[name]
            rows += measure(name, device, precision, batch, steps, warmup, args.width_scale, threads, args.seed,
                            args.budget_pass, args.compile_gate)
            print(format_table([r for r in rows if (r.model, r.device, r.precision) == (name, device.type,
                                                                                            precision)]), flush=True)
    if args.profile:
        for device, _, batch in runs:
            for name in args.models:
                for variant, table in profile_step(name, device, batch, args.width_scale).items():
                    print(f"\nprofile {name} {device.type} {variant}:\n{table}")
    print()
    print(format_table(rows))
    print()
    print("ratios to dense (time, memory):")
    for r in rows:
        if r.variant != "dense":
            print(f"  {r.model:8s} {r.device:4s} {r.precision:4s} {r.variant:12s} {r.time_ratio:.3f}x  {r.memory_ratio:.3f}x")
    misses = check_goals(rows)
    print("goals (reparam <= 1.10x dense on CPU, <= 1.05x on GPU; memory <= 1.25x): "
          + ("met" if not misses else "MISSED: " + "; ".join(misses)))
    if args.csv:
        write_csv(args.csv, rows)
    if args.json:
        write_json(args.json, {"environment": env, "args": vars(args), "rows": [asdict(r) for r in rows],
                               "goals_missed": misses})
    assert all(math.isfinite(r.time_ratio) and r.time_ratio > 0 for r in rows)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
