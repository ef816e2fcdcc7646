"""The arithmetic of one epoch, pure of Ray: the loss, one pass of optimizer steps (micro-batches,
penalties, clipping, decay, non-finite steps refused), evaluation, and the batches they read.

Tests call these without Ray and compare a DDP run with a single process step by step; `loop.py`
strings them into a run. Exercised by `raytrain-kit train jobs/digits.yaml`.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from raytrain_kit import parallel
from raytrain_kit.config import Experiment
from raytrain_kit.optim import add_penalty_gradients, apply_decoupled_weight_decay

Batch = tuple[torch.Tensor, torch.Tensor]


def loss_for(outputs: torch.Tensor, targets: torch.Tensor, *, classification: bool) -> torch.Tensor:
    """Mean cross-entropy over class logits, or mean squared error of a single output."""
    if classification:
        return F.cross_entropy(outputs, targets)
    return F.mse_loss(outputs.squeeze(-1), targets.to(outputs.dtype))


def build_loss_fn(*, classification: bool):
    """`loss_fn(outputs, targets)` for tools that take one (the preflight gradient check)."""

    def cross_entropy(outputs, targets):
        return loss_for(outputs, targets, classification=True)

    def mse_loss(outputs, targets):
        return loss_for(outputs, targets, classification=False)

    return cross_entropy if classification else mse_loss


@dataclass
class EpochSums:
    """Sums that all-reduce across workers: loss * samples, correct predictions, samples; in
    validation also the confusion counts (true class * num_classes + predicted class)."""

    loss: float = 0.0
    correct: float = 0.0
    samples: float = 0.0
    confusion: Optional[torch.Tensor] = None  # (num_classes ** 2,) float64 on the CPU, when counted

    def add(self, loss: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor, classification: bool):
        n = targets.shape[0]
        self.loss += float(loss.detach()) * n
        if classification:
            predicted = outputs.detach().argmax(dim=1)
            self.correct += float((predicted == targets).sum())
            if self.confusion is not None:
                k = outputs.shape[1]
                self.confusion += torch.bincount((targets * k + predicted).cpu(), minlength=k * k).double()
        self.samples += n

    def all_reduce(self) -> "EpochSums":
        if not (dist.is_available() and dist.is_initialized()):
            return self
        parts = [torch.tensor([self.loss, self.correct, self.samples], dtype=torch.float64)]
        parts += [self.confusion] if self.confusion is not None else []
        t = parallel.all_reduce_figures(torch.cat(parts))
        return EpochSums(*t[:3].tolist(), confusion=t[3:] if self.confusion is not None else None)

    def confusion_matrix(self) -> Optional[list[list[int]]]:
        """Rows: true class, columns: predicted class (counts); None when not counted."""
        if self.confusion is None:
            return None
        k = int(round(len(self.confusion) ** 0.5))
        return self.confusion.reshape(k, k).long().tolist()


@dataclass
class EpochResult:
    sums: EpochSums
    num_steps: int  # optimizer steps taken
    num_nonfinite: int = 0  # steps whose loss or gradients were NaN/inf (skipped, never applied)
    stopped: bool = False  # a non-finite step ended the epoch (on_nonfinite: stop or rollback)
    data_s: float = 0.0  # waiting for the next batch
    compute_s: float = 0.0  # forward, backward and the optimizer step
    sync_s: float = 0.0  # gradient all-reduce not hidden behind backward (see SyncTimer)
    first_step_at: Optional[float] = None  # wall-clock time of the epoch's first optimizer step
    step_losses: list = field(default_factory=list)  # (loss * rows, rows) of this worker, per step taken


class SyncTimer:
    """Measures the part of DDP's gradient all-reduce that backward does not hide.

    Registered as DDP's communication hook, it launches the same all-reduce as DDP's default and
    notes when the last bucket was launched: that is when this rank's backward compute ended.
    Whatever `backward()` takes after that is waiting for the other ranks and the network.
    """

    def __init__(self):
        self.last_launch: Optional[float] = None

    def register(self, ddp_model) -> "SyncTimer":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        def timed_allreduce(state, bucket):
            self.last_launch = time.perf_counter()
            return default_hooks.allreduce_hook(state, bucket)

        ddp_model.register_comm_hook(state=None, hook=timed_allreduce)
        return self

    def exposed_since(self, backward_end: float) -> float:
        launched, self.last_launch = self.last_launch, None
        return max(0.0, backward_end - launched) if launched is not None else 0.0


def train_epoch(model: nn.Module, batches: Iterable[Batch], *, cfg: Experiment,
                optimizer: torch.optim.Optimizer, scheduler=None, penalty_model: Optional[nn.Module] = None,
                nonfinite_budget: int = 0, sync_timer: Optional[SyncTimer] = None,
                on_batch: Optional[Callable[[int, int, float], None]] = None,
                precision: Callable[[], Any] = contextlib.nullcontext, scaler=None) -> EpochResult:
    """One pass. Each optimizer step takes `train.grad_accum_steps` micro-batches: forward (in
    `precision()`, an autocast or nothing) -> backward of each one's share of the step's mean
    loss, gradients synchronised across workers on the last only -> L1/L2 penalty gradients ->
    clip -> decoupled decay -> step.

    `penalty_model` is the unwrapped model whose weights are penalized (DDP's `.module`). A step
    whose gradients are not finite is never applied; under `train.on_nonfinite: skip` the epoch
    goes on while fewer than `nonfinite_budget` such steps were seen, otherwise it stops there.
    The gradients are already averaged (or, sharded, their norm is global), so every rank takes
    the same decision. An fp16 `scaler` skips overflowing steps itself and lowers its scale:
    those are not counted as non-finite. Times the epoch into data / compute / sync seconds;
    `on_batch(batches, samples, loss)` after every step feeds a progress bar.
    """
    classification = cfg.data.task == "classification"
    reg = cfg.regularization
    penalized = penalty_model if penalty_model is not None else model
    result = EpochResult(EpochSums(), 0)
    model.train()
    # DDP's gradients are views into its all-reduce buckets (parallel.wrap_model): zeroed in
    # place they stay views; set to None, the micro-batches before the last (no_sync) would
    # accumulate into fresh tensors, a second copy of every gradient beside the buckets.
    bucket_views = bool(getattr(model, "gradient_as_bucket_view", False))
    # Listed once: walking the module tree for them took as long as the finiteness check itself.
    parameters = list(model.parameters())
    started = time.perf_counter()
    num_batches = 0
    it = iter(batches)
    while True:
        waited = time.perf_counter()
        group = list(itertools.islice(it, cfg.train.grad_accum_steps))
        result.data_s += time.perf_counter() - waited
        if not group:
            break
        num_batches += len(group)
        rows = sum(y.shape[0] for _, y in group)
        optimizer.zero_grad(set_to_none=not bucket_views)
        micro = _backward_micro_batches(model, group, rows=rows, classification=classification, precision=precision,
                                        scaler=scaler)
        if sync_timer is not None:
            result.sync_s += sync_timer.exposed_since(time.perf_counter())
        if scaler is not None:
            scaler.unscale_(optimizer)
        add_penalty_gradients(penalized, l1=reg.l1, l2=reg.l2)
        if not gradients_finite(parameters, clip=reg.grad_clip_norm):
            optimizer.zero_grad(set_to_none=not bucket_views)
            if _refused_step_stops_epoch(result, micro, scaler=scaler, on_nonfinite=cfg.train.on_nonfinite,
                                         nonfinite_budget=nonfinite_budget):
                break
            continue
        _apply_update(optimizer, scheduler, scaler, cfg)
        if result.first_step_at is None:
            result.first_step_at = time.time()
        _record_step(result, micro, rows=rows, classification=classification)
        if on_batch is not None:
            on_batch(num_batches, int(result.sums.samples), result.sums.loss / max(result.sums.samples, 1))
    result.compute_s = max(0.0, time.perf_counter() - started - result.data_s - result.sync_s)
    return result


def _refused_step_stops_epoch(result: EpochResult, micro: list, *, scaler, on_nonfinite: str,
                              nonfinite_budget: int) -> bool:
    """Counts a step whose gradients were not finite (never applied); True when the epoch stops
    there. An fp16 overflow (every loss finite, a `scaler`) is not counted: the scaler lowers its
    scale and the step is dropped, as `GradScaler.step` would."""
    if scaler is not None and all(bool(torch.isfinite(loss)) for loss, _, _ in micro):
        scaler.update()
        return False
    result.num_nonfinite += 1
    if on_nonfinite != "skip" or result.num_nonfinite > nonfinite_budget:
        result.stopped = True
        return True
    return False


def _backward_micro_batches(model: nn.Module, group: list[Batch], *, rows: int, classification: bool,
                            precision: Callable[[], Any], scaler) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Forward and backward of each micro-batch of one optimizer step (`rows` rows in all),
    gradients synchronised across workers on the last only; each one's (loss, outputs, y), detached."""
    micro = []
    for j, (x, y) in enumerate(group):
        last = j == len(group) - 1
        # One micro-batch a step: synchronised as always, without asking the wrapper each time.
        with parallel.gradient_sync(model, enabled=last) if len(group) > 1 else contextlib.nullcontext():
            with precision():
                outputs = model(x)
            loss = loss_for(outputs.float(), y, classification=classification)
            # Each micro-batch's share of the mean over the step's rows: the gradient is the
            # one a single batch of all of them would give.
            share = loss * (y.shape[0] / rows) if len(group) > 1 else loss
            (scaler.scale(share) if scaler is not None else share).backward()
        micro.append((loss.detach(), outputs.detach(), y))
    return micro


def _apply_update(optimizer: torch.optim.Optimizer, scheduler, scaler, cfg: Experiment) -> None:
    """Decoupled weight decay, the optimizer's step (through fp16's scaler), the schedule's step."""
    apply_decoupled_weight_decay(optimizer, weight_decay=cfg.regularization.weight_decay, name=cfg.optim.name)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        scheduler.step()


def _record_step(result: EpochResult, micro: list, *, rows: int, classification: bool) -> None:
    """An applied step into the epoch's sums and its list of step losses."""
    step_loss = 0.0
    for loss, outputs, y in micro:
        result.sums.add(loss, outputs, y, classification)
        step_loss += float(loss) * y.shape[0]
    result.step_losses.append((step_loss, rows))
    result.num_steps += 1


def gradients_finite(parameters: list[nn.Parameter], *, clip: Optional[float]) -> bool:
    """Whether every gradient of `parameters` (a model's) is finite, after clipping them to the
    global norm `clip` if set (`nn.utils.get_total_norm`: sharded gradients give their norm over
    every shard; a non-finite gradient makes the norm NaN/inf). Without clipping no norm is
    needed, and a fused finiteness check costs a tenth of one (`parallel.all_tensors_finite`)."""
    with_grad = [p for p in parameters if p.grad is not None]
    if not clip:
        return parallel.all_tensors_finite([p.grad for p in with_grad])
    norm = parallel.full_value(nn.utils.get_total_norm([p.grad for p in with_grad]))
    nn.utils.clip_grads_with_norm_(with_grad, clip, norm)
    return bool(torch.isfinite(norm))


def global_step_losses(step_losses: list[tuple[float, int]]) -> list[float]:
    """Each optimizer step's mean loss over the rows of every worker (rank order is irrelevant)."""
    if not step_losses:
        return []
    t = torch.tensor(step_losses, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        t = parallel.all_reduce_figures(t)
    return (t[:, 0] / t[:, 1]).tolist()


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, Optional[torch.Tensor]]], *,
             classification: bool, precision: Callable[[], Any] = contextlib.nullcontext,
             num_classes: int = 0) -> EpochSums:
    """Loss and accuracy sums, and with `num_classes` the confusion counts; a batch without
    targets (`parallel.lockstep`'s filler) only runs forward."""
    sums = EpochSums(confusion=torch.zeros(num_classes ** 2, dtype=torch.float64) if num_classes else None)
    model.eval()
    for x, y in batches:
        with precision():
            outputs = model(x)
        if y is not None:
            sums.add(loss_for(outputs.float(), y, classification=classification), outputs.float(), y, classification)
    return sums


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Shuffling depends only on (seed, epoch): a resumed run shuffles as an uninterrupted one."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def in_memory_batches(x: torch.Tensor, y: torch.Tensor, *, batch_size: int,
                      generator: Optional[torch.Generator] = None) -> Iterator[Batch]:
    order = torch.randperm(len(y), generator=generator) if generator is not None else None
    for start in range(0, len(y), batch_size):
        idx = order[start:start + batch_size] if order is not None else slice(start, start + batch_size)
        yield x[idx], y[idx]
