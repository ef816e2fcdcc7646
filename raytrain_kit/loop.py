"""The per-worker training loop as named steps, pure of Ray, shared by both drivers.

`worker.py` drives it inside Ray Train's workers (`TorchTrainer`: ddp, fsdp or hsdp on any
number of workers); `trial.py` drives it in a sweep trial's own process (one worker, reused
from trial to trial). Both call the same steps in the same order:

1. `build_train_state`: seeded model, parallel wrapping, optimizer and schedule;
2. `restore`: a checkpoint directory, this run's own or another run's (a clone);
3. `InMemoryData` / `StreamedData`: this worker's batches for each epoch;
4. `run_epochs`: a generator that trains one epoch (`train_one_epoch`), validates on
   evaluation epochs (`validate`) and yields an `EpochReport`; the driver reports it, writes the
   checkpoint it asks for (`write_checkpoint`) and, in a sweep, waits at a gate before asking for
   the next epoch. Rollback after a non-finite step happens inside.

The arithmetic of an epoch is in `steps.py`. Exercised by `raytrain-kit train jobs/digits.yaml`
and `raytrain-kit tune jobs/sweep_digits.yaml`.
"""

from __future__ import annotations

import copy
import functools
import gc
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from raytrain_kit import checkpoint as ckpt
from raytrain_kit import parallel
from raytrain_kit.config import Experiment
from raytrain_kit.data import DataSpec, spec_to_dict
from raytrain_kit.materialize import build_worker_model
from raytrain_kit.optim import (build_optimizer, build_scheduler, current_lr, load_scheduler_state,
                                scheduler_state)
from raytrain_kit.recompute import apply_activation_checkpointing
from raytrain_kit.steps import Batch, EpochResult, SyncTimer, evaluate, epoch_generator, global_step_losses, \
    in_memory_batches, train_epoch
from raytrain_kit.tracking import HISTOGRAMS, histogram_epoch, layer_histograms

# Report keys that only rank 0 adds to a report, for the run's records; never part of the history.
STARTUP = "startup"  # its first report: wall-clock times of its start-up stages (the summary's `startup`)
STEP_LOSSES = "step_losses"  # the mean loss of each optimizer step of the epoch, over every worker's rows
# [worker group's start time, report's number in it (0, 1, ...)]: the driver takes them in this order.
REPORT_SEQ = "report_seq"
# Metrics measured in time or memory, which two runs of the same config and seed never share.
MEASURED = ("samples_per_s", "epoch_s", "data_s", "compute_s", "sync_s", "val_s", "wall_time", "state_mb",
            "peak_rss_mb", "model_peak_rss_mb", "gpu_peak_mb")


# ---------------------------------------------------------------------------------------------
# State


@dataclass
class TrainState:
    """Everything one worker's run holds between epochs."""

    cfg: Experiment
    spec: DataSpec
    rank: int
    world_size: int
    device: torch.device
    model: nn.Module  # the plain model: checkpoints, penalties, evaluation
    module: nn.Module  # what training calls: DDP around the model, the sharded model, or the model
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batches_per_epoch: int
    sync_timer: Optional[SyncTimer]
    precision: Callable[[], Any]  # an autocast context, or nothing
    scaler: Any  # fp16's gradient scaler, or None
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    history: list = field(default_factory=list)  # every completed epoch's metrics
    step_rows: list = field(default_factory=list)  # [epoch, step, train_loss] of every step this run took
    first_epoch: int = 1  # the first epoch this run trained: later than 1 for a clone of another run's checkpoint
    num_nonfinite: int = 0
    # this process's peak resident memory once its model was built (sharded) and its optimizer
    # made, before any step: what `scaling.meta_init` lowers
    model_peak_rss: int = 0
    val_confusion: Optional[list] = None  # the last validation's confusion counts (classification)
    # Where the run is, for a failure record: the epoch and step being taken, the last epoch reported.
    position: dict = field(default_factory=lambda: {"epoch": None, "step": None, "reported": None})

    @property
    def sharded(self) -> bool:
        return parallel.is_sharded(self.cfg)

    @property
    def classification(self) -> bool:
        return self.spec.task == "classification"


def build_train_state(cfg: Experiment, spec: DataSpec, *, rank: int, world_size: int, device: torch.device,
                      position: Optional[dict] = None) -> TrainState:
    """The model (identical on every rank: seeded by train.seed alone), wrapped for the strategy,
    and its optimizer and schedule. Each rank gets its own dropout stream (a restored checkpoint
    replaces it). Under fsdp/hsdp every rank must call this: sharding is collective."""
    torch.manual_seed(cfg.train.seed * 7919 + rank)
    # DDP around it, or sharded in place (under fsdp/hsdp built on the meta device first); the
    # optimizer comes after, since sharding replaces the parameters with DTensors.
    model, module = build_worker_model(cfg, spec, world_size=world_size, device=device)
    apply_activation_checkpointing(model, cfg)
    rows_per_worker = spec.num_train_rows // world_size  # equal shards
    batches_per_epoch = max(1, math.ceil(rows_per_worker / cfg.train.batch_size))
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.train.grad_accum_steps)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=cfg.train.epochs * steps_per_epoch)
    from torch.nn.parallel import DistributedDataParallel

    state = TrainState(cfg=cfg, spec=spec, rank=rank, world_size=world_size, device=device, model=model,
                       module=module, optimizer=optimizer, scheduler=scheduler, batches_per_epoch=batches_per_epoch,
                       sync_timer=SyncTimer().register(module) if isinstance(module, DistributedDataParallel) else None,
                       precision=functools.partial(parallel.autocast, cfg, device),
                       scaler=parallel.build_grad_scaler(cfg, device), model_peak_rss=parallel.peak_rss_bytes())
    if position is not None:
        state.position = position
    return state


def restore(state: TrainState, directory: Path, *, cloned: bool, origin: str) -> None:
    """Continue from a checkpoint directory (`origin` names it in errors): this run's latest, or
    another run's when `cloned` (a sweep trial's clone or resume), whose own hyperparameters
    then give way to this run's config. Every rank calls it: a sharded checkpoint is read
    collectively, each rank reading the pieces of its own shards, whatever the number of workers
    that wrote it. Raises ValueError for a whole-tensor checkpoint under a sharded strategy."""
    saved = ckpt.read_checkpoint(Path(directory), rank=state.rank)
    if saved["sharded"]:
        ckpt.load_sharded(Path(directory), model=state.model, optimizer=state.optimizer)
    elif state.sharded:
        raise ValueError(f"checkpoint {origin} was written by strategy ddp and holds whole tensors; "
                         "resume it with scaling.strategy: ddp, or start a new run from its exported weights")
    train_state = saved["train_state"]
    if not saved["sharded"]:
        state.model.load_state_dict(saved["model"])
        state.optimizer.load_state_dict(train_state["optimizer"])
    load_scheduler_state(state.scheduler, train_state["scheduler"])
    if saved["rng"] is not None:
        ckpt.set_rng_state(saved["rng"])
    if cloned:
        # The checkpoint carries its own run's hyperparameters; this run's config may differ
        # (population based training perturbs lr and regularization): the config wins.
        apply_hyperparameters(state.optimizer, state.scheduler, state.cfg)
    state.epoch, state.step, state.history = train_state["epoch"] + 1, train_state["step"], saved["history"]
    if cloned:  # the clone's records start where it does; the history keeps the source's epochs
        state.first_epoch, state.step_rows = state.epoch + 1, []
    elif saved["steps"] is not None:
        state.first_epoch, state.step_rows = saved["steps"]["first_epoch"], saved["steps"]["steps"]


def apply_hyperparameters(optimizer, scheduler, cfg: Experiment) -> None:
    """Set the config's base lr and weight decay on restored optimizer and schedule state,
    keeping the schedule's position (the lr follows the new base from the current step)."""
    decay = cfg.regularization.weight_decay if cfg.optim.name == "adamw" else 0.0
    for i, group in enumerate(optimizer.param_groups):
        if i == 0 and any(p.dim() >= 2 for p in group["params"]):
            group["weight_decay"] = decay
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            group["initial_lr"] = cfg.optim.lr
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        scheduler.base_lrs = [cfg.optim.lr] * len(optimizer.param_groups)
        for group, fn in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["lr"] = cfg.optim.lr * fn(scheduler.last_epoch)
    else:  # plateau: its reductions so far are in the current lr; start again from the new base
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr


# ---------------------------------------------------------------------------------------------
# This worker's batches


def batch_dtypes(spec: DataSpec) -> dict[str, torch.dtype]:
    return {"x": torch.float32, "y": torch.int64 if spec.task == "classification" else torch.float32}


def _on_device(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    if device.type == "cpu":
        yield from batches
        return
    for x, y in batches:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@dataclass
class InMemoryData:
    """This worker's pieces as tensors (`data.split_for_workers`, fetched once), reshuffled in
    memory each epoch: no per-epoch start-up cost (Ray Data's is about 2 s an epoch on 2 cores)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    state: TrainState

    @classmethod
    def from_arrays(cls, state: TrainState, train: Optional[dict], val: Optional[dict]) -> "InMemoryData":
        """From `data.read_block_ranges`' numpy columns (None: an empty piece, as a validation set
        of a handful of rows split across more workers gives)."""
        dtypes, shape = batch_dtypes(state.spec), state.spec.input_shape

        def tensors(arrays: Optional[dict]) -> tuple[torch.Tensor, torch.Tensor]:
            if arrays is None:
                return torch.empty((0, *shape), dtype=dtypes["x"]), torch.empty(0, dtype=dtypes["y"])
            return (torch.from_numpy(np.asarray(arrays["x"])).to(dtypes["x"]).view(-1, *shape),
                    torch.from_numpy(np.asarray(arrays["y"])).to(dtypes["y"]))

        return cls(*tensors(train), *tensors(val), state=state)

    def train(self, epoch: int) -> Iterable[Batch]:
        cfg, s = self.state.cfg, self.state
        # Shuffling depends only on (seed, epoch, rank): a resumed run shuffles as an uninterrupted one.
        generator = epoch_generator(cfg.train.seed, epoch * s.world_size + s.rank) if cfg.data.shuffle else None
        batches = in_memory_batches(self.x_train, self.y_train, batch_size=cfg.train.batch_size, generator=generator)
        return _on_device(batches, s.device)

    def val(self) -> Iterable[Batch]:
        batches = in_memory_batches(self.x_val, self.y_val, batch_size=self.state.cfg.train.batch_size * 4)
        return _on_device(batches, self.state.device)


@dataclass
class StreamedData:
    """Shards that stream from Ray Data every epoch (`data.in_memory: false`): anything with
    `iter_torch_batches` (Ray Train's dataset shards, or a whole Dataset for a single worker)."""

    train_shard: Any
    val_shard: Any
    state: TrainState

    def _batches(self, shard, *, batch_size: int, shuffle_seed: Optional[int]) -> Iterator[Batch]:
        shape = self.state.spec.input_shape
        for batch in shard.iter_torch_batches(
                batch_size=batch_size, dtypes=batch_dtypes(self.state.spec), device="cpu",
                local_shuffle_buffer_size=None if shuffle_seed is None else 4 * batch_size,
                local_shuffle_seed=shuffle_seed):
            yield batch["x"].view(-1, *shape), batch["y"]

    def train(self, epoch: int) -> Iterable[Batch]:
        cfg, s = self.state.cfg, self.state
        seed = cfg.train.seed * 1_000_003 + epoch * s.world_size + s.rank if cfg.data.shuffle else None
        return _on_device(self._batches(self.train_shard, batch_size=cfg.train.batch_size, shuffle_seed=seed), s.device)

    def val(self) -> Iterable[Batch]:
        batches = self._batches(self.val_shard, batch_size=self.state.cfg.train.batch_size * 4, shuffle_seed=None)
        return _on_device(batches, self.state.device)


# ---------------------------------------------------------------------------------------------
# The steps of an epoch


def train_one_epoch(state: TrainState, data, *, on_batch: Optional[Callable[[int, int, float], None]] = None
                    ) -> tuple[EpochResult, dict, list[float]]:
    """Train epoch `state.epoch + 1`: the pass itself (`steps.train_epoch`), then its metrics,
    summed over every worker. Returns the pass's result, the metrics and each step's global loss."""
    cfg = state.cfg
    state.position.update(epoch=state.epoch + 1, step=state.step + 1)  # the step being taken
    first_step = state.step

    def note_batch(batches: int, samples: int, loss: float) -> None:
        state.position["step"] = first_step + batches + 1
        if on_batch is not None:
            on_batch(batches, samples, loss)

    started = time.perf_counter()
    lr = current_lr(state.optimizer)
    result = train_epoch(state.module, data.train(state.epoch), cfg=cfg, optimizer=state.optimizer,
                         scheduler=state.scheduler, penalty_model=state.model,
                         nonfinite_budget=cfg.train.max_skipped_steps - state.num_nonfinite,
                         sync_timer=state.sync_timer, on_batch=note_batch, precision=state.precision,
                         scaler=state.scaler)
    state.num_nonfinite += result.num_nonfinite
    step_losses = global_step_losses(result.step_losses)
    state.step += result.num_steps
    sums = result.sums.all_reduce()
    seconds = time.perf_counter() - started
    metrics = {"epoch": state.epoch + 1, "step": state.step, "lr": lr,
               "train_loss": sums.loss / sums.samples if sums.samples else float("nan"),
               "samples_per_s": sums.samples / max(seconds, 1e-9), "epoch_s": seconds,
               "data_s": result.data_s, "compute_s": result.compute_s, "nonfinite_steps": state.num_nonfinite}
    if not state.sharded:
        # Under fsdp/hsdp FSDP2 overlaps its gathers and reduce-scatters with compute, and the
        # time they are not hidden has no hook to be read from: it stays in compute_s.
        metrics["sync_s"] = result.sync_s
    if state.classification:
        metrics["train_accuracy"] = sums.correct / sums.samples if sums.samples else float("nan")
    metrics.update(memory_metrics(state))
    return result, metrics, step_losses


def validate(state: TrainState, data) -> dict[str, float]:
    """Validation loss (and accuracy) over every worker's piece, and the seconds it took."""
    started = time.perf_counter()
    parallel.broadcast_buffers(state.model)  # every rank evaluates the checkpoint's running statistics
    batches = data.val()
    if state.sharded:  # every forward gathers weights: all ranks run as many, whatever their piece
        batches = parallel.lockstep(batches, dummy_x=torch.zeros((1, *state.spec.input_shape), device=state.device))
    # Under ddp the plain model: validation pieces may differ in length by a row, and DDP's
    # forward may hold collectives (buffer broadcasts) that every rank must join equally often.
    val = evaluate(state.model, batches, classification=state.classification, precision=state.precision,
                   num_classes=state.spec.num_classes).all_reduce()
    state.val_confusion = val.confusion_matrix()  # kept with the epoch's checkpoint (confusion.json)
    metrics = {"val_loss": val.loss / val.samples}
    if state.classification:
        metrics["val_accuracy"] = val.correct / val.samples
    metrics["val_s"] = time.perf_counter() - started
    return metrics


def memory_metrics(state: TrainState) -> dict[str, float]:
    """The largest worker's parameter + gradient + optimizer bytes (its shards under fsdp), peak
    resident memory once its model was built and overall, in MB; and its peak GPU memory on
    GPUs. One small all-reduce."""
    figures = [parallel.state_bytes(state.model, state.optimizer), parallel.peak_rss_bytes(), state.model_peak_rss]
    if state.device.type == "cuda":
        figures.append(torch.cuda.max_memory_allocated(state.device))
    t = torch.tensor(figures, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        t = parallel.all_reduce_figures(t, op=dist.ReduceOp.MAX)
    names = ("state_mb", "peak_rss_mb", "model_peak_rss_mb", "gpu_peak_mb")
    return {name: round(v / 2**20, 4) for name, v in zip(names, t.tolist())}


def collect_histograms(state: TrainState) -> Optional[dict]:
    """On `tracking.histogram_every` epochs, rank 0's histograms of every layer (whole tensors:
    sharded ones are gathered, a collective every rank joins); else None."""
    cfg = state.cfg
    if not (cfg.tracking.tensorboard and histogram_epoch(cfg, state.epoch)):
        return None
    if state.rank == 0:
        return layer_histograms(_named_parameter_values(state.model))
    if state.sharded:
        for _ in _named_parameter_values(state.model):
            pass
    return None


def _named_parameter_values(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, Optional[torch.Tensor]]]:
    """(name, values, gradient) of each parameter, whole: sharded ones are gathered one at a time,
    so at most one full tensor exists at once; every rank must iterate it to the end."""
    for name, p in model.named_parameters():
        values = parallel.full_value(p.detach())
        grad = parallel.full_value(p.grad) if p.grad is not None else None
        yield name, values, grad


def write_checkpoint(state: TrainState, directory: Path, *, durable: bool = True) -> None:
    """Every rank calls it after the report that asked for one: this rank's part of the checkpoint
    of the epoch just completed (see checkpoint.py for the layout). `durable=False` for a temp
    directory that is uploaded, then deleted: no fsync per file."""
    train_state = {"scheduler": scheduler_state(state.scheduler), "epoch": state.epoch - 1, "step": state.step}
    if state.sharded:  # every rank writes its own shards of the model and optimizer
        ckpt.write_sharded(directory, model=state.model, optimizer=state.optimizer, durable=durable)
    else:
        train_state["optimizer"] = state.optimizer.state_dict()
    rank0 = state.rank == 0
    ckpt.write_checkpoint(directory, rank=state.rank,
                          model_state=state.model.state_dict() if rank0 and not state.sharded else None,
                          train_state=train_state if rank0 else None, history=state.history if rank0 else None,
                          steps={"first_epoch": state.first_epoch, "steps": state.step_rows} if rank0 else None,
                          records={ckpt.DATA_FILE: spec_to_dict(state.spec), ckpt.CONFUSION_FILE: state.val_confusion}
                          if rank0 else None, durable=durable)


# ---------------------------------------------------------------------------------------------
# Rollback after a non-finite step (train.on_nonfinite: rollback)


def snapshot(state: TrainState) -> dict:
    """The state of the latest checkpoint, kept in memory only."""
    return {"model": copy.deepcopy(state.model.state_dict()), "optimizer": copy.deepcopy(state.optimizer.state_dict()),
            "scheduler": copy.deepcopy(scheduler_state(state.scheduler)), "epoch": state.epoch, "step": state.step}


def roll_back(state: TrainState, saved: dict) -> None:
    """Back to the snapshot's weights and optimizer, for good at a lower lr: the current one and
    the base the schedule multiplies. The epochs after it are trained again."""
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    load_scheduler_state(state.scheduler, saved["scheduler"])
    factor = state.cfg.train.rollback_lr_factor
    for group in state.optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    if isinstance(state.scheduler, torch.optim.lr_scheduler.LambdaLR):
        state.scheduler.base_lrs = [b * factor for b in state.scheduler.base_lrs]
    state.epoch, state.step = saved["epoch"], saved["step"]
    del state.history[state.epoch:]


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class EpochReport:
    """What `run_epochs` hands its driver after each epoch."""

    metrics: dict  # the epoch's metrics, as the history keeps them
    step_losses: list[float]  # each optimizer step's mean loss over every worker's rows
    histograms: Optional[dict]  # rank 0, on histogram epochs
    first_step_at: Optional[float]  # wall-clock time of the epoch's first optimizer step
    save: bool  # the driver writes a checkpoint with this report (`write_checkpoint`)
    last: bool  # no epoch follows: training is done, or a non-finite step ended it

    def payload(self, *, rank: int, startup: Optional[dict] = None) -> dict:
        """The report as a driver sends it on: the metrics, and on rank 0 what the run's records
        take besides (the steps' losses, histograms, and with its first report the start-up times)."""
        if rank != 0:
            return dict(self.metrics)
        out = {**self.metrics, STEP_LOSSES: self.step_losses}
        if self.histograms is not None:
            out[HISTOGRAMS] = self.histograms
        if startup is not None:
            out[STARTUP] = {**startup, "first_step": self.first_step_at}
        return out


def run_epochs(state: TrainState, data, *, on_batch_for: Optional[Callable[[int, int], Callable]] = None
               ) -> Iterator[EpochReport]:
    """Train from `state.epoch` to `train.epochs`, yielding each epoch's report. The driver reports
    it and, when `report.save`, calls `write_checkpoint` before asking for the next epoch (every
    rank in lockstep). `on_batch_for(epoch, first_step)` gives the epoch's progress callback.
    A non-finite step (`train.on_nonfinite`) either rolls back to the latest checkpoint's state
    or ends the run with a report whose metrics say `nonfinite_stop`: non-finite weights are never
    checkpointed, so the latest good checkpoint stays the result."""
    cfg = state.cfg
    rollback = cfg.train.on_nonfinite == "rollback"
    last_good = snapshot(state) if rollback else None
    # Everything built so far (torch, Ray, the model) lives to the end of the run: keep it out of
    # Python's full garbage collections, each of which would otherwise scan it all again (about
    # 0.1 s with torch and Ray loaded) in the middle of some step. Unfrozen at the end. A process
    # that trains run after run (a sweep's trial process) froze what it keeps once, itself: a
    # collection here would scan it all again at every run's start (0.2 s a run).
    freeze_here = gc.get_freeze_count() == 0
    if freeze_here:
        gc.collect()
        gc.freeze()
    try:
        while state.epoch < cfg.train.epochs:
            on_batch = on_batch_for(state.epoch + 1, state.step) if on_batch_for else None
            result, metrics, step_losses = train_one_epoch(state, data, on_batch=on_batch)
            if result.stopped and rollback and state.num_nonfinite <= cfg.train.max_skipped_steps:
                roll_back(state, last_good)  # and redo the epochs after its checkpoint
                continue
            if result.stopped or not parallel.all_finite(state.model, sharded=state.sharded):
                state.position["reported"] = metrics["epoch"]
                yield EpochReport({**metrics, "nonfinite_stop": True}, step_losses, None, result.first_step_at,
                                  save=False, last=True)
                return
            epoch, first = state.epoch + 1, state.step - len(step_losses) + 1
            # An epoch trained again (after a rollback) replaces its earlier steps.
            state.step_rows = [r for r in state.step_rows if r[0] < epoch] + [
                [epoch, first + i, loss] for i, loss in enumerate(step_losses)]
            last = state.epoch + 1 == cfg.train.epochs
            save = last or (state.epoch + 1) % cfg.checkpoint.every_epochs == 0
            if save or (state.epoch + 1) % cfg.train.eval_every == 0:
                metrics.update(validate(state, data))
            if isinstance(state.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and cfg.metric in metrics:
                state.scheduler.step(metrics[cfg.metric])
            metrics["wall_time"] = time.time()  # the epoch's end, evaluation included: throughput over epochs
            state.history.append(metrics)
            state.epoch += 1
            state.position["reported"] = state.epoch
            yield EpochReport(metrics, step_losses, collect_histograms(state), result.first_step_at, save=save, last=last)
            if save and rollback:
                last_good = snapshot(state)
    finally:
        if freeze_here:
            gc.unfreeze()
