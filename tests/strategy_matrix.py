"""Every optimizer the config offers x every strategy x fp32/bf16, a few steps each, on one tiny
model: the worker side of `tests/test_strategy_matrix.py` (Ray workers import it from here).

Each combination builds the kit's real train state (`loop.build_train_state`: model, sharding,
optimizer, schedule, scaler) and trains one epoch with `loop.train_one_epoch` on this worker's
block of rows, laid out so that every strategy sees the same global batches as one process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from raytrain_kit.config import build_experiment
from raytrain_kit.data import DataSpec

OPTIMIZERS = ("sgd", "adagrad", "rmsprop", "adam", "adamw")
STRATEGIES = ("ddp", "fsdp", "hsdp")
PRECISIONS = ("fp32", "bf16")
NUM_FEATURES, NUM_CLASSES, NUM_ROWS, GLOBAL_BATCH, NUM_VAL_ROWS = 6, 3, 32, 8, 8  # 4 steps an epoch
SPEC = DataSpec(num_features=NUM_FEATURES, num_classes=NUM_CLASSES, input_shape=(NUM_FEATURES,),
                num_train_rows=NUM_ROWS, num_val_rows=NUM_VAL_ROWS)


def rows() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((NUM_ROWS + NUM_VAL_ROWS, NUM_FEATURES)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64)
    return x, y


def block_of(rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s rows, in order: at its batch i, rows [i*G + r*b, i*G + (r+1)*b) of the
    global order, so that the world's batch i is one process's batch i."""
    b = GLOBAL_BATCH // world_size
    return [i * GLOBAL_BATCH + rank * b + j for i in range(NUM_ROWS // GLOBAL_BATCH) for j in range(b)]


def config(optimizer: str, strategy: str, precision: str, *, num_workers: int):
    return build_experiment({
        "data": {"source": "synthetic", "shuffle": False},
        "model": {"kind": "mlp", "hidden": [16, 16]}, "init": {"scheme": "xavier_uniform"},
        "optim": {"name": optimizer, "lr": 0.01 if optimizer == "rmsprop" else 0.05,
                  **({"momentum": 0.9} if optimizer in ("sgd", "rmsprop") else {})},
        "schedule": {"kind": "exponential", "decay_steps": 2, "decay_rate": 0.7, "warmup_steps": 1},
        "regularization": {"l1": 1e-4, "l2": 1e-3, "weight_decay": 1e-2, "grad_clip_norm": 1.0},
        "train": {"epochs": 1, "batch_size": GLOBAL_BATCH // num_workers, "precision": precision},
        "scaling": {"num_workers": num_workers, "strategy": strategy,
                    **({"shard_group_size": 2} if strategy == "hsdp" else {})},
        "preflight": {"enabled": False}, "tracking": {"tensorboard": False}})


def step_losses(optimizer: str, strategy: str, precision: str, *, rank: int, world_size: int) -> list[float]:
    """One epoch's global step losses (4 steps) and the validation loss, on this rank's rows."""
    from raytrain_kit.loop import InMemoryData, build_train_state, train_one_epoch, validate

    cfg = config(optimizer, strategy, precision, num_workers=world_size)
    state = build_train_state(cfg, SPEC, rank=rank, world_size=world_size, device=torch.device("cpu"))
    x, y = rows()
    mine = block_of(rank, world_size)
    val = list(range(NUM_ROWS + rank * NUM_VAL_ROWS // world_size, NUM_ROWS + (rank + 1) * NUM_VAL_ROWS // world_size))
    data = InMemoryData.from_arrays(state, {"x": x[mine], "y": y[mine]}, {"x": x[val], "y": y[val]})
    _, _, losses = train_one_epoch(state, data)
    return losses + [validate(state, data)["val_loss"]]


def nonfinite_seen_by_every_rank(strategy: str, *, rank: int, world_size: int) -> list[bool]:
    """The unclipped finiteness check on sharded gradients (`parallel.all_tensors_finite`), as
    this rank answers it: [after one backward, after the last rank put a NaN into its own shard]."""
    import torch.nn.functional as F

    from raytrain_kit.loop import build_train_state
    from raytrain_kit.parallel import all_tensors_finite, local_tensor

    cfg = config("adamw", strategy, "fp32", num_workers=world_size)
    state = build_train_state(cfg, SPEC, rank=rank, world_size=world_size, device=torch.device("cpu"))
    x, y = rows()
    mine = block_of(rank, world_size)[:GLOBAL_BATCH // world_size]
    F.cross_entropy(state.module(torch.from_numpy(x[mine])), torch.from_numpy(y[mine])).backward()
    grads = [p.grad for p in state.model.parameters() if p.grad is not None]
    before = all_tensors_finite(grads)
    if rank == world_size - 1:  # the first layer's weight: 16 rows, a few in every rank's shard
        local_tensor(grads[0]).view(-1)[0] = float("nan")
    return [before, all_tensors_finite(grads)]


def matrix_per_worker(loop_config: dict) -> None:
    """Every combination in turn; rank 0 writes {name: losses or the error} to loop_config["out"]."""
    import ray.train
    import torch.distributed as dist

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    results = {}
    for optimizer in OPTIMIZERS:
        for strategy in STRATEGIES:
            for precision in PRECISIONS:
                name = f"{optimizer}/{strategy}/{precision}"
                try:
                    results[name] = step_losses(optimizer, strategy, precision, rank=rank, world_size=world_size)
                except Exception as error:  # noqa: BLE001 - every failing combination is reported
                    results[name] = f"{type(error).__name__}: {str(error)[:300]}"
                dist.barrier()
    for strategy in STRATEGIES[1:]:  # sharded: each rank checks its own shards
        try:
            results[f"nonfinite/{strategy}"] = nonfinite_seen_by_every_rank(strategy, rank=rank, world_size=world_size)
        except Exception as error:  # noqa: BLE001
            results[f"nonfinite/{strategy}"] = f"{type(error).__name__}: {str(error)[:300]}"
        dist.barrier()
    if rank == 0:
        Path(loop_config["out"]).write_text(json.dumps(results))
