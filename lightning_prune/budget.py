"""The budget's arithmetic: how many weights are kept, how far the network is from the target, and the budget step.

The budget term is a trimmed L1 norm ``λ·Σ'|θ|/s`` (the kept count relaxed to the magnitudes, leaving out the
largest weights, which the network keeps anyway), applied as its proximal step once each optimizer step's gradients
are final, ``|θ| ← max(|θ| − λ·s, 0)`` (:func:`budget_step`): decoupled from the optimizer's learning rate, so that
a given λ moves the weights at the margin by the same amount under SGD, Adam or any learning rate. Under an optimizer
that scales each weight's step (Adam's ``1/√v``), the step is taken in that metric (:func:`optimizer_metric`): each
weight shrinks in proportion to the step the optimizer gives it, so the budget competes with the task's gradient as
an L1 term in the loss would, and the weights the loss needs least go first. λ itself is set by
:class:`~lightning_prune.budget_controller.BudgetController` from :func:`margin_gap`.
"""

from __future__ import annotations

import math
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lightning_prune.fused_kernels import run_fused_into, use_fused
from lightning_prune.magnitude_mask import gate
from lightning_prune.reparametrize import MaskedParameter

BudgetMode = Literal["global", "layer"]

#: Weights sampled per step to estimate the score at the budget's margin (every tensor gets at least
#: :data:`MIN_SAMPLES_PER_TENSOR`, or all of its weights).
MARGIN_SAMPLES = 1 << 14
MIN_SAMPLES_PER_TENSOR = 256
#: Optimizer-state entries holding a running mean of each weight's squared gradient: Adam, AdamW, NAdam, RAdam
#: (``exp_avg_sq``), RMSprop (``square_avg``), Adagrad (``sum``).
SECOND_MOMENT_KEYS = ("exp_avg_sq", "square_avg", "sum")
#: Weights whose score is within this factor of the threshold set the metric's reference (:func:`optimizer_metric`).
MARGIN_BAND = 1.5
#: Lowest threshold a tensor near its floor computes with, as a share of ``c`` (:func:`floor_threshold`).
FLOOR_THRESHOLD_MIN = 0.5
#: Smallest metric reference; a weight's step in the metric is at most 10⁶ times the step at the reference.
REFERENCE_FLOOR = 1e-30


def check_sparsity(sparsity: float) -> None:
    if isinstance(sparsity, bool) or not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise ValueError(
            f"sparsity is the share of weights removed and must be in [0, 1), got {sparsity!r}. "
            "For example sparsity=0.9 keeps 10% of the weights."
        )


def budget_count(total: int, sparsity: float) -> int:
    """Weights kept at ``sparsity``: ``(1 − sparsity)·total`` rounded half to even, computed exactly from the
    sparsity's decimal value (``0.9`` is 0.9, not the binary float 0.90000000000000002).

    Example:
        >>> budget_count(15, 0.9), budget_count(35, 0.9), budget_count(851008, 0.9)
        (2, 4, 85101)
    """
    check_sparsity(sparsity)
    kept = (Decimal(1) - Decimal(repr(float(sparsity)))) * total
    return int(kept.to_integral_value(rounding=ROUND_HALF_EVEN))


def rounded_budget(total: int, sparsity: float, round_to: int = 1) -> int:
    """The budget in units of ``round_to`` channels: :func:`budget_count` rounded to the nearest multiple (half to
    even), at least one unit.

    Example:
        >>> rounded_budget(384, 0.63), rounded_budget(384, 0.63, round_to=8), rounded_budget(384, 0.63, round_to=16)
        (142, 144, 144)
    """
    kept = budget_count(total, sparsity)
    if round_to <= 1:
        return kept
    return min(total, round_to * max(1, round(kept / round_to)))


def layer_floor(numel: int, min_layer_keep: float, round_to: int = 1) -> int:
    """Weights a tensor keeps at least: ``ceil(min_layer_keep·numel)``, and at least one when the floor is > 0; with
    ``round_to`` > 1, that rounded up to whole units, at least one unit (at most the tensor)."""
    floor = 0 if min_layer_keep <= 0 else min(numel, max(1, math.ceil(min_layer_keep * numel)))
    if round_to > 1:
        floor = min(numel, round_to * max(1, math.ceil(floor / round_to)))
    return floor


@torch.no_grad()
def hard_kept_counts(params: list[MaskedParameter]) -> dict[str, tuple[int, int]]:
    """``{name: (kept, numel)}`` of the binary masks in use (``1{|θ|/s > c}`` until hardened)."""
    return {p.name: (int(p.mask.hard_gate(p.latent).sum()), p.numel) for p in params}


@torch.no_grad()
def soft_kept_counts(params: list[MaskedParameter]) -> dict[str, tuple[float, int]]:
    """``{name: (Σ h_T(θ), numel)}``: what the soft gates keep at the current temperature."""
    return {p.name: (float(gate(p.latent, p.mask.scale, p.mask.threshold, p.mask.temperature).sum()), p.numel)
            for p in params}


class MarginSample(NamedTuple):
    """What :func:`margin_gap` reads off its sample of the weights (one value per budget: 1 in global mode, one per
    tensor in layer mode, except ``shares``, one per tensor)."""

    gap: Tensor  #: score at the target's quantile minus the threshold ``c``
    shares: Tensor  #: each tensor's share of weights in use
    exempt_above: Tensor  #: the score above which weights are exempt from the budget step (``inf``: none)


@torch.no_grad()
def floor_threshold(param: MaskedParameter, floor: int, threshold: float) -> Tensor:
    """The threshold that keeps a tensor's ``floor`` largest scores in use: ``the (floor+1)-th largest score`` between
    ``FLOOR_THRESHOLD_MIN·c`` and ``c`` (a 0-dim tensor on θ's device), so that training uses the weights the cut's
    floor will keep. The lower bound keeps a collapsed tensor, whose weights all sit near 0 and move with the
    optimizer's noise, from putting every one of them in use at once (a threshold at the noise, or at 0 on ties)."""
    scores = param.mask.score(param.latent).reshape(-1)
    if floor >= scores.numel():
        return torch.zeros((), device=scores.device, dtype=scores.dtype)
    return torch.kthvalue(scores, scores.numel() - floor).values.clamp(FLOOR_THRESHOLD_MIN * threshold, threshold)


@torch.no_grad()
def update_floor_thresholds(
    params: list[MaskedParameter], shares: Tensor, floors: list[int], min_layer_keep: float, threshold: float
) -> None:
    """A tensor whose share in use is under twice its floor computes with its floor's largest weights in use (its
    threshold lowered under ``c`` by :func:`floor_threshold`), the weights the cut's floor will keep; the others use
    ``c``. One host read of ``shares`` per call."""
    for p, near, floor in zip(params, (shares < 2 * min_layer_keep).tolist(), floors):
        if near and floor:
            p.mask.threshold.copy_(floor_threshold(p, floor, threshold))
        else:
            p.mask.threshold.fill_(threshold)


def common_unit(params: list[MaskedParameter]) -> Tensor:
    """``s̄/s_i`` per tensor, ``s̄`` the size-weighted mean scale: in global mode every weight loses the same magnitude
    ``λ·s̄`` (the proximal step of ``λ·Σ|θ|/s̄``), which is ``λ·s̄/s_i`` in units of tensor ``i``'s own scale."""
    scales = torch.stack([p.mask.scale.float() for p in params])
    sizes = torch.tensor([float(p.numel) for p in params], device=scales.device)
    return (scales * sizes).sum() / sizes.sum() / scales


@torch.no_grad()
def margin_gap(
    params: list[MaskedParameter],
    keep: float,
    mode: BudgetMode = "global",
    seed: int = 0,
    threshold: float | None = None,
    floors: list[int] | None = None,
    exempt: float = 0.0,
    indices: list[Tensor | None] | None = None,
) -> MarginSample:
    """How far the weights are from the target, in score units: ``q − c``, with ``q`` the score ``|θ|/s`` above which
    a share ``keep`` of the weights lie (one value in global mode, one per tensor in layer mode), estimated from a
    random sample of the weights; and each tensor's sampled share in use, ``share(|θ|/s > c_i)`` with ``c_i`` its
    mask's threshold.

    ``q − c > 0``: more weights than the target sit above the threshold. In global mode ``c`` is ``threshold`` (by
    default the first mask's), and the weights that per-tensor ``floors`` keep under ``c`` are taken out of the target
    first, as the cut does. ``exempt`` (a share of the weights) also gives the score above which the largest
    ``exempt`` share lie: :func:`budget_step` leaves those weights alone. The sample is drawn from ``seed`` (the same
    on every rank), so every rank computes the same values, unless ``indices`` (:func:`sample_indices`) gives it.
    """
    total = sum(p.numel for p in params)
    indices = sample_indices(params, seed) if indices is None else indices
    scores, weights, shares = [], [], []
    for p, index in zip(params, indices):
        flat = p.latent.detach().reshape(-1)
        n = p.numel if index is None else index.numel()
        score = p.mask.score(flat if index is None else flat.index_select(0, index))  # a gather: faster than [ ]
        scores.append(score)
        weights.append(torch.full((n,), p.numel / n, device=score.device, dtype=score.dtype))
        shares.append((score > p.mask.threshold).float().mean())
    if mode == "layer":
        quantiles = [_top_quantiles(s, torch.ones_like(s), keep * s.numel(), exempt * s.numel()) for s in scores]
        margins = torch.stack([margin for margin, _ in quantiles])
        thresholds = torch.stack([p.mask.threshold for p in params])
        exempt_above = torch.stack([above for _, above in quantiles])
        return MarginSample(margins - thresholds, torch.stack(shares), exempt_above)
    # torch.full, not torch.tensor: a fill on the device, where a copy from the host would wait for it
    c = params[0].mask.threshold if threshold is None else torch.full((), threshold, device=scores[0].device)
    mass = torch.full((), keep * total, dtype=torch.float64, device=scores[0].device)
    for p, score, floor in zip(params, scores, floors or [0] * len(params)):
        if floor:  # floor weights under c are kept by the cut whatever the target: they use part of it
            above = (score > c).double().mean() * p.numel
            mass = mass - (floor - above).clamp_min(0)
    scores, weights = torch.cat(scores), torch.cat(weights)
    margin, exempt_above = _top_quantiles(scores, weights, mass, exempt * total)
    exempt_above = exempt_above.reshape(1)
    return MarginSample((margin - c).reshape(1), torch.stack(shares), exempt_above)


def sample_indices(params: list[MaskedParameter], seed: int) -> list[Tensor | None]:
    """The weights of each tensor in the step's sample, drawn from ``seed`` (the same on every rank); ``None``: all."""
    total = sum(p.numel for p in params)
    generator = torch.Generator(device=params[0].latent.device).manual_seed(seed)
    return [_sample_index(p.numel, total, generator) for p in params]


def _sample_index(numel: int, total: int, generator: torch.Generator) -> Tensor | None:
    """Indices of a tensor's weights in the margin sample (its share of :data:`MARGIN_SAMPLES`, at least
    :data:`MIN_SAMPLES_PER_TENSOR`); ``None``: all of them."""
    n = min(numel, max(MIN_SAMPLES_PER_TENSOR, math.ceil(MARGIN_SAMPLES * numel / total)))
    return None if n == numel else torch.randint(numel, (n,), device=generator.device, generator=generator)


class StepMetric(NamedTuple):
    """The optimizer's per-weight step sizes, for :func:`budget_step`: weight ``j`` shrinks by
    ``λ·s·reference/√v_j``."""

    second_moments: list[Tensor | None]  #: ``v`` of each tensor (the optimizer's state, read only); None: uniform
    reference: Tensor  #: the median ``√v`` of the weights near the threshold, where the loop acts


@torch.no_grad()
def optimizer_metric(
    params: list[MaskedParameter],
    optimizer: torch.optim.Optimizer,
    seed: int = 0,
    indices: list[Tensor | None] | None = None,
) -> StepMetric | None:
    """The metric of the optimizer's steps, read from its running means of squared gradients ``v``
    (:data:`SECOND_MOMENT_KEYS`), or ``None`` when it keeps none for these tensors (SGD, with or without momentum,
    steps every weight alike: the uniform budget step already is its metric; so is a step before the first, when the
    state is empty).

    Adam moves weight ``j`` by about ``lr·g_j/√v_j``; a budget step of ``λ·s/√v_j`` then balances the task's pull
    where the mean gradient is about λ, as an L1 term in the loss would under Adam, instead of where the gradient's
    signal-to-noise ratio is. The step is normalised by the median ``√v`` of the sampled weights whose score is within
    :data:`MARGIN_BAND` of their threshold (of all sampled weights when none is), leaving out the weights that never
    had a gradient (``v = 0``: in a 3x3 convolution over a 1x1 map, the eight outer taps), so the weights at the margin still
    move by about λ score units per unit of λ and the loop's gains hold. The sample is :func:`margin_gap`'s (``indices``, or drawn
    from ``seed``), so every rank computes the same reference.

    Example:
        >>> import torch
        >>> from lightning_prune import masked_parameters, reparametrize
        >>> model = torch.nn.Sequential(torch.nn.Linear(100, 100))
        >>> _ = reparametrize(model)
        >>> optimizer = torch.optim.Adam(model.parameters())
        >>> optimizer_metric(masked_parameters(model), optimizer) is None  # no step taken yet
        True
        >>> model(torch.randn(8, 100)).sum().backward()
        >>> optimizer.step()
        >>> metric = optimizer_metric(masked_parameters(model), optimizer)
        >>> metric.second_moments[0].shape, bool(metric.reference > 0)
        (torch.Size([100, 100]), True)
    """
    moments = [_second_moment(optimizer.state.get(p.latent, {}), p.latent) for p in params]
    if all(v is None for v in moments):
        return None
    indices = sample_indices(params, seed) if indices is None else indices  # margin_gap's sample
    roots, near = [], []
    for p, v, index in zip(params, moments, indices):
        if v is None:
            continue
        theta, v = p.latent.detach().reshape(-1), v.reshape(-1)
        if index is not None:
            theta, v = theta.index_select(0, index), v.index_select(0, index)
        score = p.mask.score(theta)
        roots.append(v.float().sqrt())
        near.append((score > p.mask.threshold / MARGIN_BAND) & (score < p.mask.threshold * MARGIN_BAND))
    roots, near = torch.cat(roots), torch.cat(near)
    moving = roots > 0  # weights that never had a gradient (v = 0) set no reference; the step takes them to 0
    reference = torch.where(near & moving, roots, torch.nan).nanmedian()  # NaN when none: no host read
    reference = torch.where(torch.isnan(reference), torch.where(moving, roots, torch.nan).nanmedian(), reference)
    return StepMetric(moments, reference.nan_to_num(REFERENCE_FLOOR).clamp_min(REFERENCE_FLOOR))


def _second_moment(state: dict, theta: Tensor) -> Tensor | None:
    for key in SECOND_MOMENT_KEYS:
        v = state.get(key)
        if isinstance(v, Tensor) and v.shape == theta.shape and v.device == theta.device:
            return v
    return None


def _top_quantiles(scores: Tensor, weights: Tensor, mass: float | Tensor, exempt: float) -> tuple[Tensor, Tensor]:
    """The score at which the weights of the scores above it add up to ``mass``, and the same for ``exempt`` (infinite
    when ``exempt`` is under one weight: nothing is exempt), from one sort."""
    ordered, order = torch.sort(scores, descending=True)
    cumulative = torch.cumsum(weights.index_select(0, order), 0)
    last = scores.numel() - 1

    def at(m: float | Tensor) -> Tensor:
        if isinstance(m, Tensor):
            m = m.to(cumulative.dtype).reshape(1)
        else:
            m = torch.full((1,), m, dtype=cumulative.dtype, device=cumulative.device)
        return ordered.index_select(0, torch.searchsorted(cumulative, m).clamp_max(last)).reshape(())

    return at(mass), at(exempt) if exempt >= 1 else torch.full((), math.inf, device=scores.device)


def _budget_step_math(theta: Tensor, v: Tensor | None, rate: Tensor, scale: Tensor, reference: Tensor | None,
                      limit: Tensor | None) -> Tensor:
    """:func:`budget_step` on one tensor, written for one fused kernel: the new θ."""
    magnitude = theta.abs()
    if v is None:
        magnitude = magnitude - rate * scale
    else:
        floor = (reference.square() * 1e-12).clamp_min(torch.finfo(v.dtype).tiny)
        magnitude = magnitude - torch.rsqrt(v.clamp_min(floor)) * (rate.clamp_min(0) * scale * reference)
        magnitude = magnitude - rate.clamp_max(0) * scale
    stepped = magnitude.clamp_min(0).copysign(theta)
    return stepped if limit is None else torch.where(theta.abs() >= limit * scale, theta, stepped)


@torch.no_grad()
def budget_step(
    params: list[MaskedParameter], rates: Tensor, exempt_above: Tensor | None = None, metric: StepMetric | None = None
) -> None:
    """The proximal step of ``λ·Σ|θ|/s``: ``|θ| ← max(|θ| − λ_i·s_i, 0)`` for tensor ``i`` (``rates``: one λ per tensor,
    on θ's device). The sign of each weight is kept; a weight that reaches 0 stays there until its gradient moves it.
    Weights whose score is at least ``exempt_above`` (one value, or one per tensor) are left alone: the step of the
    trimmed norm, which does not count the largest weights. With a ``metric`` (:func:`optimizer_metric`) a shrinking
    step (λ > 0) is taken in the optimizer's metric, ``λ_i·s_i·reference/√v_j`` for weight ``j``; a growing one
    (λ < 0) stays uniform: it also lifts weights at 0, which gives a pruned weight a gradient again.

    Example:
        >>> import torch
        >>> from lightning_prune import masked_parameters, reparametrize
        >>> model = torch.nn.Sequential(torch.nn.Linear(100, 100))
        >>> _ = reparametrize(model)
        >>> theta = masked_parameters(model)[0].latent
        >>> before = theta.detach().abs().sum()
        >>> budget_step(masked_parameters(model), torch.tensor([0.1]))
        >>> bool(theta.abs().sum() < before)
        True
    """
    limits = exempt_above.expand(len(params)) if exempt_above is not None else [None] * len(params)
    moments = metric.second_moments if metric is not None else [None] * len(params)
    reference = metric.reference if metric is not None else None
    for p, rate, limit, v in zip(params, rates, limits, moments):
        theta = p.latent
        if use_fused(theta) and run_fused_into(_budget_step_math, theta, v, rate, p.mask.scale, reference, limit):
            continue  # one pass over θ (and v), written in place, instead of about nine
        magnitude = theta.abs()
        exempt = magnitude >= limit * p.mask.scale if limit is not None else None
        if v is None:
            magnitude.sub_(rate * p.mask.scale)
        else:  # no host read of λ's sign: the shrink in the metric plus the growth, one of them zero
            reference = metric.reference
            floor = (reference.square() * 1e-12).clamp_min(torch.finfo(v.dtype).tiny)  # √v ≥ 10⁻⁶·reference
            magnitude.addcmul_(v.clamp_min(floor).rsqrt_(), rate.clamp_min(0) * p.mask.scale * reference, value=-1)
            magnitude.sub_(rate.clamp_max(0) * p.mask.scale)
        stepped = magnitude.clamp_min_(0).copysign_(theta)
        if exempt is None:
            theta.copy_(stepped)
        else:
            torch.where(exempt, theta, stepped, out=theta)
