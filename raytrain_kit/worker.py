"""The training loop: pure train/eval steps, and `train_loop_per_worker`, which wires them to Ray.

The maths (`train_epoch`, `evaluate`, `loss_for`) take plain batches and run without Ray, so
tests can compare a DDP run with a single process step by step. `train_loop_per_worker` is the
only user of Ray Train's worker APIs: it reads its dataset shard, wraps the model
(`parallel.wrap_model`: DDP, FSDP or hybrid sharding), restores the latest checkpoint, reports
metrics (and each step's loss) every epoch and a checkpoint every `checkpoint.every_epochs`.
Exercised by `raytrain-kit train jobs/digits.yaml` and `jobs/fsdp_mlp.yaml`.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from raytrain_kit import checkpoint as ckpt
from raytrain_kit import parallel
from raytrain_kit.config import Experiment, build_experiment
from raytrain_kit.data import DataSpec, read_block_ranges
from raytrain_kit.errors import traceback_text
from raytrain_kit.models import build_model
from raytrain_kit.optim import (add_penalty_gradients, apply_decoupled_weight_decay, build_optimizer,
                                build_scheduler, current_lr, load_scheduler_state, scheduler_state)
from raytrain_kit.storage import write_run_file
from raytrain_kit.tracking import HISTOGRAMS, histogram_epoch, layer_histograms

Batch = tuple[torch.Tensor, torch.Tensor]
# Report key of rank 0's first report in a worker process: wall-clock times of its start-up
# stages (`launch.fit` puts them in the summary's `startup`); never part of the history.
STARTUP = "startup"
# Report key of rank 0's reports: the mean loss of each optimizer step of the epoch, over every
# worker's rows (`launch.fit` writes them to steps.csv); never part of the history.
STEP_LOSSES = "step_losses"


# ---------------------------------------------------------------------------------------------
# Pure maths


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
    """Sums that all-reduce across workers: loss * samples, correct predictions, samples."""

    loss: float = 0.0
    correct: float = 0.0
    samples: float = 0.0

    def add(self, loss: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor, classification: bool):
        n = targets.shape[0]
        self.loss += float(loss.detach()) * n
        if classification:
            self.correct += float((outputs.detach().argmax(dim=1) == targets).sum())
        self.samples += n

    def all_reduce(self) -> "EpochSums":
        if not (dist.is_available() and dist.is_initialized()):
            return self
        t = torch.tensor([self.loss, self.correct, self.samples], dtype=torch.float64)
        dist.all_reduce(t)
        return EpochSums(*t.tolist())


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
        optimizer.zero_grad(set_to_none=True)
        micro: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
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
        if sync_timer is not None:
            result.sync_s += sync_timer.exposed_since(time.perf_counter())
        if scaler is not None:
            scaler.unscale_(optimizer)
        add_penalty_gradients(penalized, l1=reg.l1, l2=reg.l2)
        grad_norm = gradient_norm(model, clip=reg.grad_clip_norm)
        if not torch.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None and all(bool(torch.isfinite(loss)) for loss, _, _ in micro):
                scaler.update()  # fp16 overflow: the scaler lowers its scale and the step is dropped
                continue
            result.num_nonfinite += 1
            if cfg.train.on_nonfinite != "skip" or result.num_nonfinite > nonfinite_budget:
                result.stopped = True
                break
            continue
        apply_decoupled_weight_decay(optimizer, weight_decay=reg.weight_decay, name=cfg.optim.name)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if result.first_step_at is None:
            result.first_step_at = time.time()
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            scheduler.step()
        step_loss = 0.0
        for loss, outputs, y in micro:
            result.sums.add(loss, outputs, y, classification)
            step_loss += float(loss) * y.shape[0]
        result.step_losses.append((step_loss, rows))
        result.num_steps += 1
        if on_batch is not None:
            on_batch(num_batches, int(result.sums.samples), result.sums.loss / max(result.sums.samples, 1))
    result.compute_s = max(0.0, time.perf_counter() - started - result.data_s - result.sync_s)
    return result


def gradient_norm(model: nn.Module, *, clip: Optional[float]) -> torch.Tensor:
    """The gradients' global norm (NaN/inf when any is not finite), clipped to `clip` if set.
    Sharded gradients give their norm over every shard. Without clipping only the norm is
    computed: clip_grad_norm_ with an infinite bound would still rescale every gradient by 1.0."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = parallel.full_value(nn.utils.get_total_norm(grads))
    if clip:
        nn.utils.clip_grads_with_norm_([p for p in model.parameters() if p.grad is not None], clip, norm)
    return norm


def global_step_losses(step_losses: list[tuple[float, int]]) -> list[float]:
    """Each optimizer step's mean loss over the rows of every worker (rank order is irrelevant)."""
    if not step_losses:
        return []
    t = torch.tensor(step_losses, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return (t[:, 0] / t[:, 1]).tolist()


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, Optional[torch.Tensor]]], *,
             classification: bool, precision: Callable[[], Any] = contextlib.nullcontext) -> EpochSums:
    """Loss and accuracy sums; a batch without targets (`parallel.lockstep`'s filler) only runs forward."""
    sums = EpochSums()
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


# ---------------------------------------------------------------------------------------------
# Ray wiring


def _load_piece(ranges: list, *, dtypes: dict, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fetch this worker's piece once (`data.split_for_workers`); it is then iterated from memory,
    which avoids Ray Data's per-epoch start-up cost (about 2 s an epoch on 2 cores)."""
    arrays = read_block_ranges(ranges)
    if arrays is None:  # a validation set of a handful of rows split across more workers
        return torch.empty((0, *shape), dtype=dtypes["x"]), torch.empty(0, dtype=dtypes["y"])
    return (torch.from_numpy(arrays["x"]).to(dtypes["x"]).view(-1, *shape),
            torch.from_numpy(arrays["y"]).to(dtypes["y"]))


def _streamed(shard, *, dtypes: dict, shape: tuple[int, ...], batch_size: int,
              shuffle_seed: Optional[int]) -> Iterator[Batch]:
    for batch in shard.iter_torch_batches(
            batch_size=batch_size, dtypes=dtypes, device="cpu",
            local_shuffle_buffer_size=None if shuffle_seed is None else 4 * batch_size,
            local_shuffle_seed=shuffle_seed):
        yield batch["x"].view(-1, *shape), batch["y"]


def _restore(model: nn.Module, optimizer, scheduler, *, rank: int, cfg, init_checkpoint: Optional[str]) -> tuple[int, int, list]:
    """Load the latest reported checkpoint of this run, else `init_checkpoint` (another run's: a
    sweep trial continuing from a clone), if any; returns (next epoch, global step, history).
    Every rank calls it: a sharded checkpoint is read collectively, each rank reading the pieces
    of its own shards, whatever the number of workers that wrote it."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    cloned = checkpoint is None and init_checkpoint is not None
    if cloned:
        checkpoint = ray.train.Checkpoint(init_checkpoint)
    if checkpoint is None:
        return 0, 0, []
    with checkpoint.as_directory() as directory:
        saved = ckpt.read_checkpoint(Path(directory), rank=rank)
        if saved["sharded"]:
            ckpt.load_sharded(Path(directory), model=model, optimizer=optimizer)
        elif parallel.is_sharded(cfg):
            raise ValueError(f"checkpoint {checkpoint.path} was written by strategy ddp and holds whole tensors; "
                             "resume it with scaling.strategy: ddp, or start a new run from its exported weights")
    state = saved["train_state"]
    if not saved["sharded"]:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(state["optimizer"])
    load_scheduler_state(scheduler, state["scheduler"])
    if saved["rng"] is not None:
        ckpt.set_rng_state(saved["rng"])
    if cloned:
        # The checkpoint carries its own run's hyperparameters; this run's config may differ
        # (population based training perturbs lr and regularization): the config wins.
        apply_hyperparameters(optimizer, scheduler, cfg)
    return state["epoch"] + 1, state["step"], saved["history"]


def apply_hyperparameters(optimizer, scheduler, cfg) -> None:
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


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs in every Train worker. `loop_config` holds the experiment and the data spec as dicts,
    and the run directory where a failing worker leaves its error (see `write_failure`)."""
    import ray.train

    # Ray Train logs every report at INFO on each worker, under a logger named after its file
    # path; the driver prints one line per epoch instead.
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    rank = ray.train.get_context().get_world_rank()
    where = {"epoch": None, "step": None, "reported": None}
    try:
        _train_loop(loop_config, where)
    except Exception as e:
        if loop_config.get("run_dir"):
            write_failure(loop_config["run_dir"], e, rank=rank, epoch=where["epoch"], step=where["step"])
        raise
    if rank == 0 and loop_config.get("queue") is not None:
        # Reports reach the driver without anyone waiting on them; this tells it which is the
        # last, so it returns with every one (see launch._await_last_report).
        ray.get(loop_config["queue"].actor.put.remote({"end": where["reported"]}))


def failure_log_name(rank: int) -> str:
    return f"logs/rank{rank}.log"


def write_failure(run_dir: str, error: BaseException, *, rank: int, epoch: Optional[int], step: Optional[int]) -> None:
    """The worker's own account of its failure, in the run directory (shared storage, so the
    driver reads it whichever node the worker ran on): `logs/rankN.log` with the full traceback,
    and `logs/rankN_error.json` with what the CLI prints first. Ray's exception chain, which
    wraps and reprints this, is shown only with --verbose."""
    import json

    import ray

    record = {"type": type(error).__name__, "message": str(error).strip().splitlines()[0] if str(error).strip() else "",
              "rank": rank, "node": ray.util.get_node_ip_address(), "epoch": epoch, "step": step,
              "time": time.time(), "log": f"{run_dir}/{failure_log_name(rank)}"}
    text = traceback_text(error)
    try:
        write_run_file(run_dir, failure_log_name(rank),
                       f"worker rank {rank} on node {record['node']}, epoch {epoch}, step {step}\n\n{text}\n")
        write_run_file(run_dir, f"logs/rank{rank}_error.json", json.dumps(record))
    except Exception:  # never hide the worker's own error behind one about its log
        pass


def _train_loop(loop_config: dict, where: dict) -> None:
    import ray.train
    import ray.train.torch

    startup = {"worker_started": time.time()}

    cfg = build_experiment(loop_config["experiment"])
    spec = spec_from_dict(loop_config["spec"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    classification = spec.task == "classification"
    dtypes = {"x": torch.float32, "y": torch.int64 if classification else torch.float32}

    # Each rank gets its own dropout stream; a restored checkpoint replaces it below.
    torch.manual_seed(cfg.train.seed * 7919 + rank)
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    sharded = parallel.is_sharded(cfg)
    model = build_model(cfg, spec)  # identical on every rank: seeded by train.seed alone
    # DDP around it, or sharded in place; the optimizer comes after, since sharding replaces the
    # parameters with DTensors.
    module = parallel.wrap_model(model, cfg, world_size=world_size, device=device)
    rows_per_worker = spec.num_train_rows // world_size  # Ray splits into equal shards
    batches_per_epoch = max(1, math.ceil(rows_per_worker / cfg.train.batch_size))
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.train.grad_accum_steps)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=cfg.train.epochs * steps_per_epoch)
    start_epoch, step, history = _restore(model, optimizer, scheduler, rank=rank, cfg=cfg,
                                         init_checkpoint=loop_config.get("init_checkpoint"))
    from torch.nn.parallel import DistributedDataParallel

    sync_timer = SyncTimer().register(module) if isinstance(module, DistributedDataParallel) else None
    precision = functools.partial(parallel.autocast, cfg, device)
    scaler = parallel.build_grad_scaler(cfg, device)
    progress = loop_config.get("queue") if rank == 0 and loop_config.get("progress") else None
    startup["model_ready"] = time.time()  # DDP's wrapping waits for every rank

    if cfg.data.in_memory:  # this worker's pieces, cut on the driver (data.split_for_workers)
        x_train, y_train = _load_piece(loop_config["shards"]["train"][rank], dtypes=dtypes, shape=spec.input_shape)
        x_val, y_val = _load_piece(loop_config["shards"]["val"][rank], dtypes=dtypes, shape=spec.input_shape)
    else:
        train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    startup["data_ready"] = time.time()

    # The state of the latest checkpoint, kept in memory (only) for train.on_nonfinite: rollback.
    rollback = cfg.train.on_nonfinite == "rollback"
    last_good = _snapshot(model, optimizer, scheduler, epoch=start_epoch - 1, step=step) if rollback else None
    num_nonfinite = 0
    # Everything built so far (torch, Ray, the model) lives to the end: keep it out of Python's
    # full garbage collections, each of which would otherwise scan it all again (about 0.1 s
    # with torch and Ray loaded) in the middle of some step.
    gc.collect()
    gc.freeze()
    epoch = start_epoch
    while epoch < cfg.train.epochs:
        where["epoch"], where["step"] = epoch + 1, step + 1  # the step being taken
        started = time.perf_counter()
        if cfg.data.in_memory:
            generator = epoch_generator(cfg.train.seed, epoch * world_size + rank) if cfg.data.shuffle else None
            train_batches = in_memory_batches(x_train, y_train, batch_size=cfg.train.batch_size, generator=generator)
        else:
            seed = cfg.train.seed * 1_000_003 + epoch * world_size + rank if cfg.data.shuffle else None
            train_batches = _streamed(train_shard, dtypes=dtypes, shape=spec.input_shape,
                                      batch_size=cfg.train.batch_size, shuffle_seed=seed)
        if device.type != "cpu":
            train_batches = _on_device(train_batches, device)
        lr = current_lr(optimizer)
        on_batch = _progress_sender(progress, epoch=epoch + 1, num_batches=batches_per_epoch, world_size=world_size,
                                    where=where, first_step=step)
        result = train_epoch(module, train_batches, cfg=cfg, optimizer=optimizer, scheduler=scheduler,
                             penalty_model=model, nonfinite_budget=cfg.train.max_skipped_steps - num_nonfinite,
                             sync_timer=sync_timer, on_batch=on_batch, precision=precision, scaler=scaler)
        num_nonfinite += result.num_nonfinite
        step_losses = global_step_losses(result.step_losses)
        step += result.num_steps
        sums = result.sums.all_reduce()
        seconds = time.perf_counter() - started
        metrics = {"epoch": epoch + 1, "step": step, "lr": lr,
                   "train_loss": sums.loss / sums.samples if sums.samples else float("nan"),
                   "samples_per_s": sums.samples / max(seconds, 1e-9), "epoch_s": seconds,
                   "data_s": result.data_s, "compute_s": result.compute_s, "nonfinite_steps": num_nonfinite}
        if not sharded:
            # Under fsdp/hsdp FSDP2 overlaps its gathers and reduce-scatters with compute, and the
            # time they are not hidden has no hook to be read from: it stays in compute_s.
            metrics["sync_s"] = result.sync_s
        if classification:
            metrics["train_accuracy"] = sums.correct / sums.samples if sums.samples else float("nan")
        metrics.update(_memory_metrics(model, optimizer, device))

        if result.stopped and rollback and num_nonfinite <= cfg.train.max_skipped_steps:
            # Back to the latest checkpoint's weights and optimizer, at a lower lr; redo this epoch.
            _restore_snapshot(last_good, model, optimizer, scheduler)
            _scale_lr(optimizer, scheduler, cfg.train.rollback_lr_factor)
            step = last_good["step"]
            epoch = last_good["epoch"] + 1
            del history[epoch:]  # epochs after that checkpoint are trained again
            continue
        finite = not result.stopped and parallel.all_finite(model, sharded=sharded)
        if not finite:
            # Never checkpoint non-finite weights: the latest good checkpoint stays the result.
            ray.train.report({**metrics, "nonfinite_stop": True})
            where["reported"] = epoch + 1
            return

        last = epoch + 1 == cfg.train.epochs
        save = last or (epoch + 1) % cfg.checkpoint.every_epochs == 0
        if save or (epoch + 1) % cfg.train.eval_every == 0:
            val_batches = (in_memory_batches(x_val, y_val, batch_size=cfg.train.batch_size * 4)
                           if cfg.data.in_memory else
                           _streamed(val_shard, dtypes=dtypes, shape=spec.input_shape,
                                     batch_size=cfg.train.batch_size * 4, shuffle_seed=None))
            if device.type != "cpu":
                val_batches = _on_device(val_batches, device)
            if sharded:  # every forward gathers weights: all ranks run as many, whatever their piece
                val_batches = parallel.lockstep(val_batches, dummy_x=torch.zeros((1, *spec.input_shape), device=device))
            # Under ddp the plain module: validation pieces may differ in length by a row, and DDP's
            # forward may hold collectives (buffer broadcasts) that every rank must join equally often.
            val = evaluate(model, val_batches, classification=classification, precision=precision).all_reduce()
            metrics["val_loss"] = val.loss / val.samples
            if classification:
                metrics["val_accuracy"] = val.correct / val.samples
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and cfg.metric in metrics:
            scheduler.step(metrics[cfg.metric])
        metrics["wall_time"] = time.time()  # the epoch's end, evaluation included: throughput over epochs
        history.append(metrics)
        epoch += 1

        reported = {**metrics, STEP_LOSSES: step_losses} if rank == 0 else metrics  # records, not the history
        if cfg.tracking.tensorboard and histogram_epoch(cfg, epoch):
            if rank == 0:
                reported = {**reported, HISTOGRAMS: layer_histograms(_named_parameter_values(model))}
            elif sharded:  # gathering shards is a collective: every rank takes part
                for _ in _named_parameter_values(model):
                    pass
        if rank == 0 and startup is not None:
            reported = {**reported, STARTUP: {**startup, "first_step": result.first_step_at}}
            startup = None
        where["reported"] = epoch
        if not save:
            ray.train.report(reported)
        else:
            if rollback:
                last_good = _snapshot(model, optimizer, scheduler, epoch=epoch - 1, step=step)
            directory = Path(tempfile.mkdtemp(prefix="raytrain-kit-ckpt-"))
            try:
                train_state = {"scheduler": scheduler_state(scheduler), "epoch": epoch - 1, "step": step}
                if sharded:  # every rank writes its own shards of the model and optimizer
                    ckpt.write_sharded(directory, model=model, optimizer=optimizer)
                else:
                    train_state["optimizer"] = optimizer.state_dict()
                ckpt.write_checkpoint(directory, rank=rank,
                                      model_state=model.state_dict() if rank == 0 and not sharded else None,
                                      train_state=train_state if rank == 0 else None,
                                      history=history if rank == 0 else None)
                ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                                 checkpoint_dir_name=f"{ckpt.CHECKPOINT_PREFIX}{epoch:04d}")
            finally:
                shutil.rmtree(directory, ignore_errors=True)
        if not last:
            wait_at_gate(loop_config.get("gate"), epoch)


def _on_device(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    for x, y in batches:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _named_parameter_values(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, Optional[torch.Tensor]]]:
    """(name, values, gradient) of each parameter, whole: sharded ones are gathered one at a time,
    so at most one full tensor exists at once; every rank must iterate it to the end."""
    for name, p in model.named_parameters():
        values = parallel.full_value(p.detach())
        grad = parallel.full_value(p.grad) if p.grad is not None else None
        yield name, values, grad


def _memory_metrics(model: nn.Module, optimizer, device: torch.device) -> dict[str, float]:
    """The largest worker's parameter + gradient + optimizer bytes (its shards under fsdp) and
    peak resident memory, in MB; and its peak GPU memory on GPUs. One small all-reduce."""
    figures = [parallel.state_bytes(model, optimizer), parallel.peak_rss_bytes()]
    if device.type == "cuda":
        figures.append(torch.cuda.max_memory_allocated(device))
    t = torch.tensor(figures, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    names = ("state_mb", "peak_rss_mb", "gpu_peak_mb")
    return {name: round(v / 2**20, 4) for name, v in zip(names, t.tolist())}


def _progress_sender(progress: Optional[Any], *, epoch: int, num_batches: int, world_size: int, where: dict, first_step: int,
                     every_s: float = 0.5) -> Callable[[int, int, float], None]:
    """Keeps `where` (for a failure record) at the step being taken, and sends rank 0's in-epoch
    progress, at most every `every_s`, to the driver's progress bar (the run's report queue;
    sent without waiting, so training never blocks on the driver)."""
    started = time.perf_counter()
    last = [0.0]

    def on_batch(batches: int, samples: int, loss: float) -> None:
        where["step"] = first_step + batches + 1
        if progress is None:
            return
        now = time.perf_counter()
        if now - last[0] < every_s and batches < num_batches:
            return
        last[0] = now
        progress.actor.put_nowait.remote({"progress": {
            "epoch": epoch, "batch": batches, "num_batches": num_batches, "samples": samples * world_size,
            "loss": loss, "elapsed_s": now - started}})

    return on_batch


def wait_at_gate(gate: Optional[dict], epoch: int, *, poll_s: float = 0.05, patience_s: float = 600.0) -> None:
    """In a sweep under ASHA, wait after a rung epoch until the scheduler has decided: "go" on,
    or "stop" (the trial then aborts this run, so we wait to be ended). Without the wait, a trial
    trains one more epoch while its result travels to the scheduler, and a stopped trial throws
    it away. A board that is gone, or no decision within `patience_s`, lets training go on."""
    import ray
    from ray.exceptions import RayActorError

    if not gate or epoch not in gate["epochs"]:
        return
    try:
        board = ray.get_actor(gate["board"])
    except ValueError:
        return
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        try:
            if ray.get(board.decision.remote(gate["trial"], epoch)) == "go":
                return
        except RayActorError:
            return
        time.sleep(poll_s)


def _snapshot(model: nn.Module, optimizer, scheduler, *, epoch: int = -1, step: int = 0) -> dict:
    import copy

    return {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict()),
            "scheduler": copy.deepcopy(scheduler_state(scheduler)), "epoch": epoch, "step": step}


def _restore_snapshot(snapshot: dict, model: nn.Module, optimizer, scheduler) -> None:
    model.load_state_dict(snapshot["model"])
    optimizer.load_state_dict(snapshot["optimizer"])
    load_scheduler_state(scheduler, snapshot["scheduler"])


def _scale_lr(optimizer, scheduler, factor: float) -> None:
    """Lower the lr for good: the current one, and the base the schedule multiplies."""
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        scheduler.base_lrs = [b * factor for b in scheduler.base_lrs]


def spec_to_dict(spec: DataSpec) -> dict:
    return {**asdict(spec), "input_shape": list(spec.input_shape), "feature_names": list(spec.feature_names)}


def spec_from_dict(raw: dict) -> DataSpec:
    return DataSpec(**{**raw, "input_shape": tuple(raw["input_shape"]), "feature_names": tuple(raw["feature_names"])})
