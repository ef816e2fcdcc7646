"""The learning-rate range test (L. N. Smith, WACV 2017; the maths in `advise.py`) as one worker
of the experiment runs it, on its own `TrainState` and its own batches. Pure of Ray: Ray Train's
workers (`advisor.range_test_per_worker`) and a test in one process call it alike.

Every step is one of the run's own training steps (`steps.train_epoch`: its precision,
micro-batches, penalties, clipping, and DDP's all-reduce or FSDP's reduce-scatter of the
gradients) at the rate `lrs[i]`; each step's loss is the mean over every worker's rows
(`steps.global_step_losses`), so every rank sees the same curve and stops at the same step.
Afterwards the model, the optimizer, fp16's gradient scaler and the RNG are as they were before.
Exercised by `raytrain-kit advise jobs/digits.yaml --only lr`.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Iterator, Sequence

import numpy as np
import torch

from raytrain_kit.advise import divergence_index, smoothing_for
from raytrain_kit.loop import TrainState
from raytrain_kit.steps import Batch, global_step_losses, train_epoch

CHECK_EVERY = 10  # steps between divergence checks: each check is one all-reduce of the steps' losses


def range_test(state: TrainState, data, lrs: Sequence[float], *, check_every: int = CHECK_EVERY) -> list[float]:
    """Train up to `len(lrs)` steps, step i at learning rate `lrs[i]`, from the state's current
    weights; stop early (within `check_every` steps) once the loss diverged
    (`advise.divergence_index`, smoothed as `advise.smoothing_for(len(lrs))`). `data`:
    `loop.InMemoryData` or `loop.StreamedData`, cycled over epochs. Returns each step's loss over every worker's rows (one per step taken, at
    most len(lrs)); a step whose gradients were not finite ends the list with inf. Every rank
    must call it (the losses are all-reduced). The state is restored before it returns."""
    saved = _save(state)
    try:
        return _train_at_rates(state, data, np.asarray(lrs, dtype=np.float64), check_every)
    finally:
        _restore(state, saved)


def _train_at_rates(state: TrainState, data, lrs: np.ndarray, check_every: int) -> list[float]:
    cfg, optimizer = state.cfg, state.optimizer
    # A schedule of its own: multipliers of a base of 1.0 are the rates themselves. (The run's
    # own schedule, untouched, comes back with the optimizer's state.)
    for group in optimizer.param_groups:
        group["initial_lr"] = 1.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: float(lrs[min(step, len(lrs) - 1)]))
    batches, losses = _cycled(data, first_epoch=state.epoch), []
    while len(losses) < len(lrs):
        chunk = list(itertools.islice(batches, min(check_every, len(lrs) - len(losses)) * cfg.train.grad_accum_steps))
        if not chunk:
            break  # no rows at all
        result = train_epoch(state.module, chunk, cfg=cfg, optimizer=optimizer, scheduler=scheduler,
                             penalty_model=state.model, nonfinite_budget=0, precision=state.precision,
                             scaler=state.scaler)
        losses += global_step_losses(result.step_losses)
        if result.stopped:  # gradients not finite: diverged (every rank decides alike on reduced gradients)
            losses.append(math.inf)
            break
        if divergence_index(losses, beta=smoothing_for(len(lrs))) is not None:
            break
    return losses[:len(lrs)]


def _cycled(data, *, first_epoch: int) -> Iterator[Batch]:
    """This worker's batches, epoch after epoch (each epoch shuffled as training would)."""
    for epoch in itertools.count(first_epoch):
        empty = True
        for batch in data.train(epoch):
            empty = False
            yield batch
        if empty:
            return


def _save(state: TrainState) -> dict:
    return {"model": copy.deepcopy(state.model.state_dict()), "optimizer": copy.deepcopy(state.optimizer.state_dict()),
            "scaler": state.scaler.state_dict() if state.scaler is not None else None,
            "rng": torch.get_rng_state()}


def _restore(state: TrainState, saved: dict) -> None:
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])  # its param groups' lr and initial_lr too
    if saved["scaler"] is not None:
        state.scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["rng"])
    # Zeroed, not freed: DDP's gradients stay views into its buckets (steps.train_epoch).
    state.optimizer.zero_grad(set_to_none=not getattr(state.module, "gradient_as_bucket_view", False))
