"""`raytrain-kit advise`: measurements that answer, before a run, which learning rate and which
initialization suit the experiment's model and data.

This module holds the maths, as pure functions on tensors and arrays (the command, which runs
them as Ray work on the experiment's own workers and data, builds on them):

- `range_test_lrs` and `suggest_lr`: the learning-rate range test (L. N. Smith, "Cyclical
  Learning Rates for Training Neural Networks", WACV 2017, section 3.3): train for a few hundred
  steps while the learning rate grows exponentially, smooth the loss, and pick the rate where
  the smoothed loss falls fastest before it diverges (the pick of fastai's `lr_find`).
- `propagation_stats`, `judge_propagation` and `diagnose_inits`: the signal-propagation
  diagnostic (X. Glorot and Y. Bengio, AISTATS 2010; K. He et al., "Delving Deep into
  Rectifiers", ICCV 2015, section 2.2): on one real batch at initialization, the standard
  deviation of every weight layer's response and the size of the loss gradient with respect to
  it (`LayerStats`). Under a scheme that does not preserve the variance the gradient shrinks (or
  grows) by a constant factor per layer on its way back, so the first layer's gradient over the
  last layer's leaves [0.1, 10] in a deep network: the scheme is flagged vanishing (or exploding).

Exercised by `tests/test_advise.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

HEALTHY_GRADIENT_RATIO = (0.1, 10.0)  # the first layer's gradient over the last layer's
SMOOTHING = 0.98  # the default exponential moving average of the loss (fastai's lr_find)
# The range test's smoothing window, as a fraction of its steps (`smoothing_for`): fastai's fixed
# 0.98 (a 50-step window) spans half of a 100-step test and drags the divergence's spikes back
# over the descent; on jobs/digits.yaml (200 steps, seeds 0-2) windows of 4-8% all picked the
# same rates (1.6-2.0e-3), 2% jumped between 2e-3 and 0.1.
SMOOTHING_WINDOW = 0.05
DIVERGENCE_FACTOR = 4.0  # the range test stops where the smoothed loss passes 4x its minimum so far
MIN_POINTS = 8  # a range test needs this many steps before it diverges to pick from


# ---------------------------------------------------------------------------------------------
# The learning-rate range test


def range_test_lrs(min_lr: float, max_lr: float, num_steps: int) -> np.ndarray:
    """The range test's learning rate at each step: `num_steps` rates growing geometrically from
    `min_lr` to `max_lr` (both included). Raises ValueError for an empty or reversed range."""
    if not 0 < min_lr < max_lr or num_steps < 2:
        raise ValueError(f"a range test needs 0 < min_lr < max_lr and 2 or more steps "
                         f"(got {min_lr}, {max_lr}, {num_steps})")
    return np.geomspace(min_lr, max_lr, num_steps)


@dataclass(frozen=True)
class LrSuggestion:
    """The range test's verdict: `lr`, picked at step `index`; `smoothed` is the bias-corrected
    moving average of the loss up to `stop` (the first diverged step, or the end)."""

    lr: float
    index: int
    stop: int
    smoothed: np.ndarray


def smoothing_for(num_steps: int, *, window: float = SMOOTHING_WINDOW) -> float:
    """The moving average's beta for a range test of `num_steps` steps: a window of `window`
    of them (1 / (1 - beta) steps), at least 2."""
    return 1.0 - 1.0 / max(window * num_steps, 2.0)


def smooth_losses(losses: Sequence[float], *, beta: float = SMOOTHING) -> np.ndarray:
    """The exponential moving average of `losses`, bias-corrected as Adam's moments are (so the
    first values are not pulled towards 0). Causal: it lags the losses by about beta/(1-beta)
    steps, which is right for spotting the divergence as it happens."""
    average, out = 0.0, np.empty(len(losses))
    for i, loss in enumerate(losses):
        average = beta * average + (1 - beta) * float(loss)
        out[i] = average / (1 - beta ** (i + 1))
    return out


def smooth_losses_zero_lag(losses: Sequence[float], *, beta: float = SMOOTHING) -> np.ndarray:
    """`smooth_losses` forwards, then backwards over the result (as scipy's filtfilt does with a
    filter): as smooth, without the lag, which would put the steepest descent about 50 steps
    (at beta 0.98) later, at a learning rate several times too high."""
    return smooth_losses(smooth_losses(losses, beta=beta)[::-1], beta=beta)[::-1]


def divergence_index(losses: Sequence[float], *, beta: float = SMOOTHING,
                     divergence_factor: float = DIVERGENCE_FACTOR) -> Optional[int]:
    """The first step at which the range test has diverged: its loss is not finite, or the
    causally smoothed loss is above `divergence_factor` times its minimum so far. None while it
    has not. Causal, so a run can stop there: later losses never change the answer."""
    losses = np.asarray(losses, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(losses))
    stop = int(bad[0]) if bad.size else len(losses)
    causal = smooth_losses(losses[:stop], beta=beta)
    above = np.flatnonzero(causal > divergence_factor * np.minimum.accumulate(causal))
    stop = int(above[0]) if above.size else stop
    return stop if stop < len(losses) else None


def suggest_lr(lrs: Sequence[float], losses: Sequence[float], *, beta: float = SMOOTHING,
               divergence_factor: float = DIVERGENCE_FACTOR) -> LrSuggestion:
    """The learning rate at the steepest descent of the smoothed loss against log(lr), before the
    loss diverges: a non-finite loss, or the (causally) smoothed loss above `divergence_factor`
    times its minimum so far. The descent is read off the zero-lag smoothing of the losses
    before the divergence. `lrs` and `losses`: one per step, lrs increasing. Raises ValueError
    when fewer than MIN_POINTS steps come before the divergence (start the range lower)."""
    lrs, losses = np.asarray(lrs, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if lrs.shape != losses.shape or lrs.ndim != 1:
        raise ValueError(f"one loss per learning rate (got {lrs.shape} and {losses.shape})")
    stop = divergence_index(losses, beta=beta, divergence_factor=divergence_factor)
    stop = len(losses) if stop is None else stop
    if stop < MIN_POINTS:
        raise ValueError(f"the loss diverged after {stop} of {len(losses)} steps (at lr {lrs[min(stop, len(lrs) - 1)]:.3g}): "
                         "start the range test at a lower learning rate")
    smoothed = smooth_losses_zero_lag(losses[:stop], beta=beta)
    index = int(np.argmin(np.gradient(smoothed, np.log(lrs[:stop]))))
    return LrSuggestion(lr=float(lrs[index]), index=index, stop=stop, smoothed=smoothed)


# ---------------------------------------------------------------------------------------------
# Signal propagation at initialization


@dataclass(frozen=True)
class LayerStats:
    """One weight layer on one batch: the std of its response (its output, before the
    nonlinearity that follows), and the size of the loss gradient with respect to that response:
    the root mean square over the batch's rows of each row's gradient norm. A norm per row, not
    the std per element: layers of different sizes compare (a 10-way head after 64-wide layers,
    a max-pool that routes each gradient to one of four positions, which divides the std per
    element by 2 and leaves the norm as it is); for layers of equal width the two ratios agree,
    as in He et al.'s analysis."""

    name: str
    activation_std: float
    gradient_rms: float


_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def propagation_stats(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                      loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> list[LayerStats]:
    """Each linear and convolutional layer of `model`, in the order the forward pass runs them:
    `LayerStats` from one forward and backward pass of `loss_fn(model(inputs), targets)`. The
    model's parameters get gradients (zero them, or build a fresh model, before training it)."""
    responses: list[tuple[str, torch.Tensor]] = []

    def keep(name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.retain_grad()
                responses.append((name, output))
        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in model.named_modules() if isinstance(m, _WEIGHT_LAYERS)]
    try:
        loss_fn(model(inputs), targets).backward()
    finally:
        for handle in handles:
            handle.remove()
    return [LayerStats(name, float(out.detach().float().std()), _row_gradient_rms(out.grad)) for name, out in responses]


def _row_gradient_rms(grad: Optional[torch.Tensor]) -> float:
    if grad is None:
        return 0.0
    rows = grad.float().reshape(len(grad), -1)
    return float(rows.pow(2).sum(dim=1).mean().sqrt())


def gradient_ratio(stats: Sequence[LayerStats]) -> float:
    """The first layer's gradient (`LayerStats.gradient_rms`) over the last layer's (1 for a
    network of one layer)."""
    first, last = stats[0].gradient_rms, stats[-1].gradient_rms
    return first / last if last > 0 else (math.inf if first > 0 else 0.0)


def judge_propagation(stats: Sequence[LayerStats], *, healthy: tuple[float, float] = HEALTHY_GRADIENT_RATIO) -> str:
    """'vanishing', 'exploding' or 'healthy': where `gradient_ratio` falls against `healthy`."""
    ratio = gradient_ratio(stats)
    if not ratio >= healthy[0]:  # NaN counts as vanishing: no gradient reaches the first layer
        return "vanishing"
    return "exploding" if ratio > healthy[1] else "healthy"


@dataclass(frozen=True)
class InitDiagnosis:
    """One init scheme on the experiment's model and a real batch."""

    scheme: str
    stats: list[LayerStats]
    gradient_ratio: float
    verdict: str


def diagnose_inits(build: Callable[[str], nn.Module], schemes: Sequence[str], inputs: torch.Tensor,
                   targets: torch.Tensor, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                   ) -> tuple[list[InitDiagnosis], str]:
    """Each scheme's `propagation_stats` on the model `build(scheme)` returns (built afresh, with
    the same seed), its verdict, and the recommended scheme: of the healthy ones, the one whose
    gradient ratio is nearest 1 on a log scale (the first of equals, in `schemes`' order); with
    no healthy one, the nearest of all."""
    diagnoses = []
    for scheme in schemes:
        stats = propagation_stats(build(scheme), inputs, targets, loss_fn)
        diagnoses.append(InitDiagnosis(scheme, stats, gradient_ratio(stats), judge_propagation(stats)))
    healthy = [d for d in diagnoses if d.verdict == "healthy"] or diagnoses
    best = min(healthy, key=lambda d: abs(math.log(d.gradient_ratio)) if 0 < d.gradient_ratio < math.inf else math.inf)
    return diagnoses, best.scheme


# ---------------------------------------------------------------------------------------------
# Memory: what a worker holds


def optimizer_buffers(cfg) -> tuple[int, bool]:
    """(tensors of each parameter's size the optimizer keeps, whether it also keeps a scalar step
    tensor per parameter), as torch.optim's implementations do: Adam/AdamW exp_avg and
    exp_avg_sq; Adagrad its sum; RMSprop square_avg, plus a momentum buffer when momentum > 0;
    SGD a momentum buffer when momentum > 0, and no step."""
    o = cfg.optim
    if o.name in ("adam", "adamw"):
        return 2, True
    if o.name == "adagrad":
        return 1, True
    if o.name == "rmsprop":
        return 1 + (o.momentum > 0), True
    return int(o.momentum > 0), False


def shard_numel(shape: torch.Size, num_shards: int) -> int:
    """Elements of the largest shard of a tensor FSDP2 splits along dim 0 into `num_shards`
    (torch.chunk's split: the first shards take ceil(rows / num_shards) rows)."""
    if num_shards <= 1 or len(shape) == 0:
        return int(math.prod(shape))
    return math.ceil(shape[0] / num_shards) * int(math.prod(shape[1:]))


def plan_state_bytes(model: nn.Module, cfg, *, num_shards: int = 1) -> int:
    """Bytes of parameters, gradients and optimizer state the largest worker holds once the
    optimizer has stepped: every parameter whole (`num_shards` 1: ddp), or its dim-0 shard
    (fsdp: the worker count; hsdp: the shard group's size). Matches `parallel.state_bytes`
    after a step. Source: torch.optim's per-parameter state, FSDP2's dim-0 sharding."""
    buffers, step = optimizer_buffers(cfg)
    total = 0
    for p in model.parameters():
        if not p.requires_grad:
            total += shard_numel(p.shape, num_shards) * p.element_size()
            continue
        total += shard_numel(p.shape, num_shards) * p.element_size() * (2 + buffers)  # the weight, its gradient, the buffers
        total += 4 * step  # a float32 scalar step per parameter (fused and foreach kernels keep it as a tensor)
    return total


def saved_activation_bytes(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                           loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> int:
    """Bytes autograd keeps from one forward pass for its backward pass (the activations a worker
    holds at the peak of a step, beside its state): each saved tensor's own bytes, a tensor saved
    twice (a layer's output is the next layer's input) once, the parameters not at all; then runs
    the backward pass, which frees them. Under mixed precision, call it
    under the run's autocast: the saved tensors are then in its dtype. Source: PyTorch's
    `torch.autograd.graph.saved_tensors_hooks`."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[tuple, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in parameters:
            size = tensor.numel() * tensor.element_size()
            saved[(tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)] = size
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn(model(inputs), targets)
    loss.backward()
    return sum(saved.values())


def profiled_activation_bytes(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                              loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> int:
    """The peak of the tensor bytes one forward and backward pass hold beyond the parameters and
    their gradients, by PyTorch's profiler (`profiled_peak_bytes`): the gradients are allocated
    before the pass, and the one weight gradient autograd holds before adding it into its kept
    one (the plan's working bytes, or its state) is taken off, as the largest weight's. For a
    model under activation checkpointing (`recompute.py`), whose peak comes in the backward,
    while a region is recomputed beside the gradients flowing through it, rather than from what
    the forward saved: `saved_activation_bytes` cannot see it."""
    from torch.profiler import ProfilerActivity, profile, record_function

    trained = [p for p in model.parameters() if p.requires_grad]
    peaks = []
    for p in trained:
        p.grad = torch.zeros_like(p)
    try:
        # The least of 3 passes: a first pass's lazy allocations (autograd's, the profiler's)
        # would enter the fit 32 rows apart, and an error of x bytes there is x * rows / 32 in
        # the plan.
        for _ in range(3):
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                with record_function("forward and backward"):
                    loss_fn(model(inputs), targets).backward()
            peaks.append(profiled_peak_bytes(prof, "forward and backward"))
    finally:
        for p in trained:
            p.grad = None
    in_flight = max((p.numel() * p.element_size() for p in trained), default=0)
    return min(peaks) - in_flight


def fit_activation_bytes(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                         loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                         profiled: bool = False) -> tuple[float, int]:
    """(bytes per row, fixed bytes) of the activations, from two measured passes on the first
    half of `inputs` and on all of it: saved bytes are a per-row part and a fixed part (a loss's
    scalars). `profiled`: measured by `profiled_activation_bytes` (a model under activation
    checkpointing), on `inputs` and on them 4 times over, instead of `saved_activation_bytes`.
    `inputs`: at least 2 rows, with `targets` to match. Raises ValueError with fewer."""
    rows = len(inputs)
    if rows < 2:
        raise ValueError("measuring activations needs a batch of 2 rows or more")
    if profiled:
        # The profiler's peak varies by some KB between passes (intra-op threads' buffers): fitted
        # on `inputs` and on them repeated 4 times, that error is divided by 3 x rows, not rows / 2.
        tiled = (inputs.repeat(4, *[1] * (inputs.dim() - 1)), targets.repeat(4, *[1] * (targets.dim() - 1)))
        small, full = (profiled_activation_bytes(model, inputs, targets, loss_fn),
                       profiled_activation_bytes(model, *tiled, loss_fn))
        per_row = (full - small) / (3 * rows)
        return per_row, max(round(small - per_row * rows), 0)
    half = rows // 2
    small = saved_activation_bytes(model, inputs[:half], targets[:half], loss_fn)
    full = saved_activation_bytes(model, inputs, targets, loss_fn)
    per_row = (full - small) / (rows - half)
    return per_row, max(round(small - per_row * half), 0)


def plan_activation_bytes(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                          loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, micro_batch: int) -> int:
    """The activation bytes of a micro-batch of `micro_batch` rows (`fit_activation_bytes`, scaled)."""
    per_row, fixed = fit_activation_bytes(model, inputs, targets, loss_fn)
    return round(per_row * micro_batch + fixed)


def profiled_peak_bytes(prof, region: str) -> int:
    """The highest running sum of the CPU tensor bytes allocated (less those freed) since
    `prof` (a `torch.profiler.profile(profile_memory=True)`) started, within its
    `record_function(region)`: a step's peak tensor memory, measured independently of the plan.
    A free counts only when its block was allocated in this profile: PyTorch's CPU allocator
    reports the free of any block allocated while some profiler ran, so a tensor of an earlier
    profile that dies here (the garbage collector freeing an earlier pass's graph) would lower
    the sum by bytes it never added. Raises StopIteration when `region` was not recorded."""
    from torch._C._profiler import _EventType

    def walk(events):
        for event in events:
            yield event
            yield from walk(event.children)

    tree = list(walk(prof.profiler.kineto_results.experimental_event_tree()))
    inside = next(e for e in tree if e.name == region)
    allocations = sorted((e.start_time_ns, e.extra_fields.ptr, e.extra_fields.alloc_size) for e in tree
                         if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu")
    live_blocks, live, peak = {}, 0, 0
    for start_ns, ptr, nbytes in allocations:
        if nbytes > 0:
            live_blocks[ptr] = nbytes
        elif live_blocks.pop(ptr, None) is None:
            continue  # allocated before this profile: its bytes were never added
        live += nbytes
        if inside.start_time_ns <= start_ns <= inside.end_time_ns:
            peak = max(peak, live)
    return peak


MEMORY_MARGIN = 0.8  # a plan fits when it needs at most this share of a worker's memory


@dataclass(frozen=True)
class StrategyPlan:
    """One strategy's bytes per worker at the configured micro-batch, and whether they fit."""

    strategy: str
    state_bytes: int  # parameters, gradients, optimizer state (the worker's shards)
    # held beside the state while a step computes: sharded, the full weights (and gradients) of
    # the blocks being gathered; ddp, a fresh gradient on its way into the kept one
    working_bytes: int
    activation_bytes: int
    total_bytes: int
    fits: bool
    max_micro_batch: int  # the largest micro-batch that fits with the margin (0: none does)
    # the peak while the worker builds its model, before any step: the whole model when it is
    # built whole, or its shards and one module's full tensors when built on the meta device
    build_bytes: int = 0


def plan_strategies(state_bytes: dict[str, int], working_bytes: dict[str, int], *,
                    activations: dict[str, tuple[float, int]], micro_batch: int, available_bytes: int,
                    build_bytes: Optional[dict[str, int]] = None,
                    margin: float = MEMORY_MARGIN) -> tuple[list[StrategyPlan], Optional[str]]:
    """Each strategy's `StrategyPlan` (in `state_bytes`' order) and the recommended one: the first
    that fits, so order them cheapest in communication first (ddp, hsdp, fsdp); None when none
    does (then `max_micro_batch` says how far to shrink the batch). `activations`: each
    strategy's (bytes per row, fixed bytes) (`fit_activation_bytes`). `build_bytes`: each
    strategy's peak while building the model (`advisor.build_bytes`); a plan whose build does not
    fit does not fit at any micro-batch. `available_bytes`: the memory of one worker (its share
    of the node's, or its GPU's)."""
    budget = margin * available_bytes
    plans = []
    for strategy, state in state_bytes.items():
        working = working_bytes.get(strategy, 0)
        build = (build_bytes or {}).get(strategy, 0)
        per_row, fixed = activations[strategy]
        activation = round(per_row * micro_batch + fixed)
        total = state + working + activation
        room = budget - state - working - fixed if build <= budget else 0
        most = int(room // per_row) if room > 0 and per_row > 0 else 0
        plans.append(StrategyPlan(strategy, state, working, activation, total, max(total, build) <= budget,
                                  max(most, 0), build))
    recommended = next((p.strategy for p in plans if p.fits), None)
    return plans, recommended


ADVICE_PNG = "advice.png"


def draw_advice(directory: str, *, lrs: Optional[Sequence[float]] = None, losses: Optional[Sequence[float]] = None,
                suggestion: Optional[LrSuggestion] = None, diagnoses: Optional[Sequence[InitDiagnosis]] = None) -> str:
    """advice.png in `directory` (local or a URI): the range test's loss against the learning
    rate (log axis; the raw losses faint, the smoothed ones up to the divergence, the pick
    marked) and each init scheme's gradient std per layer (log axis; flagged schemes dashed),
    whichever of the two was measured. Returns the path written."""
    from raytrain_kit.report import _pyplot, _save

    panels = [p for p in ("lr", "init") if (p == "lr" and suggestion is not None) or (p == "init" and diagnoses)]
    fig, axes = _pyplot().subplots(1, max(len(panels), 1), figsize=(6.4 * max(len(panels), 1), 4.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "lr":
            _draw_range_test(ax, np.asarray(lrs), np.asarray(losses), suggestion)
        else:
            _draw_propagation(ax, diagnoses)
    fig.tight_layout()
    return _save(fig, directory, ADVICE_PNG)


def _draw_range_test(ax, lrs: np.ndarray, losses: np.ndarray, suggestion: LrSuggestion) -> None:
    ax.plot(lrs, losses, color="0.75", linewidth=0.8, label="loss per step")
    ax.plot(lrs[:suggestion.stop], suggestion.smoothed, color="C0", linewidth=2, label="smoothed")
    ax.axvline(suggestion.lr, color="C3", linestyle="--", label=f"pick: lr {suggestion.lr:.3g}")
    if suggestion.stop < len(lrs):  # where the (causal) moving average passed 4x its minimum
        ax.axvline(lrs[suggestion.stop], color="0.4", linestyle=":", label=f"diverged: lr {lrs[suggestion.stop]:.2g}")
    ax.set_xscale("log")
    shown = np.concatenate([losses[:suggestion.stop], suggestion.smoothed])
    ax.set_ylim(shown.min() * 0.9, max(suggestion.smoothed[0], shown.min()) * 1.6)  # the divergence's tail off the top
    ax.set(xlabel="learning rate", ylabel="training loss", title="learning-rate range test")
    ax.legend()


def _draw_propagation(ax, diagnoses: Sequence[InitDiagnosis]) -> None:
    for i, d in enumerate(diagnoses):
        stds = [max(s.gradient_rms, 1e-300) for s in d.stats]
        ax.plot(range(1, len(stds) + 1), stds, color=f"C{i}", linestyle="-" if d.verdict == "healthy" else "--",
                label=f"{d.scheme} ({d.verdict}, ratio {d.gradient_ratio:.2g})")
    from matplotlib.ticker import MaxNLocator

    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="layer", ylabel="loss gradient at the layer's output (rms row norm)", title="signal propagation at init")
    ax.legend(fontsize=8)
