"""The reference every kit figure is compared with: a plain PyTorch training loop, no Ray.

It imports only torch and numpy (and scikit-learn for the digits), builds the same networks as
the kit's `model.kind: cnn` / `mlp` with the same initialization (the runner checks that the
weights are identical), trains them with AdamW on tensors already in memory, and prints one JSON
line per event to stdout. Run alone it is one process; under `torchrun` it is DDP over gloo.

    python benchmarks/plain.py digits --epochs 15 --target 0.95
    python benchmarks/plain.py mlp --rows 200000 --epochs 3
    torchrun --nproc-per-node 2 benchmarks/plain.py digits --epochs 1 --stop-after-first-step
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# The compute-bound workload: an MLP of about 2M parameters on 256 synthetic features.
MLP_FEATURES, MLP_HIDDEN, MLP_CLASSES = 256, (1536, 1024), 10


def init_like_kit(model: nn.Module, seed: int) -> nn.Module:
    """The kit's `init.scheme: kaiming_normal` with zero biases, in module order (initializers.py)."""
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if name.startswith("bias"):
                    nn.init.constant_(param, 0.0)
                elif param.dim() >= 2:
                    nn.init.kaiming_normal_(param, nonlinearity="relu")
    return model


def build_model(kind: str, *, seed: int, dropout: float = 0.1) -> nn.Module:
    """`digits`: jobs/digits.yaml's CNN (channels 32, 64; hidden 128); `mlp`: the wide MLP."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if kind == "digits":
            model = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Dropout(dropout), nn.Linear(64 * 2 * 2, 128), nn.ReLU(), nn.Dropout(dropout),
                nn.Linear(128, 10))
        else:
            layers, width = [nn.Flatten()], MLP_FEATURES
            for hidden in MLP_HIDDEN:
                layers += [nn.Linear(width, hidden), nn.ReLU()]
                width = hidden
            model = nn.Sequential(*layers, nn.Linear(width, MLP_CLASSES))
        return init_like_kit(model, seed)


def digits_data(seed: int, val_fraction: float = 0.2):
    """The digits from the file scikit-learn ships, read as the kit reads it (data.digits_arrays),
    so that neither side pays for importing scikit-learn."""
    import importlib.util
    from pathlib import Path

    table = np.loadtxt(Path(importlib.util.find_spec("sklearn").origin).parent / "datasets" / "data" / "digits.csv.gz",
                       delimiter=",")
    x = torch.tensor(table[:, :-1] / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(table[:, -1], dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    num_val = int(round(len(y) * val_fraction))
    return x[order[num_val:]], y[order[num_val:]], x[order[:num_val]], y[order[:num_val]]


def mlp_data(num_rows: int, seed: int):
    """Rows from a fixed random linear teacher, as the kit's `data.source: synthetic`."""
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((MLP_FEATURES, MLP_CLASSES)) / np.sqrt(MLP_FEATURES)
    x = rng.standard_normal((num_rows, MLP_FEATURES)).astype(np.float32)
    y = (x @ teacher + 0.1 * rng.standard_normal((num_rows, MLP_CLASSES))).argmax(axis=1)
    num_val = num_rows // 10
    x, y = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    return x[num_val:], y[num_val:], x[:num_val], y[:num_val]


def warmup_cosine(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """The kit's `schedule.kind: cosine` (optim.py): linear warmup, then cosine to min_lr."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, "time": time.time(), **fields}), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workload", choices=["digits", "mlp"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None, help="per process (digits 32, mlp 256)")
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--rows", type=int, default=200_000, help="mlp: synthetic rows")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the kit gives a worker one per CPU)")
    p.add_argument("--target", type=float, default=None, help="stop at this validation accuracy")
    p.add_argument("--stop-after-first-step", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    own_group = world_size > 1 and not dist.is_initialized()  # under Ray Train (bare_ddp.py) it exists
    if own_group:
        dist.init_process_group("gloo")
    x_train, y_train, x_val, y_val = digits_data(args.seed) if args.workload == "digits" else mlp_data(args.rows, args.seed)
    # An equal shard per rank, as Ray Train's split gives each worker.
    per_rank = len(y_train) // world_size
    x_train, y_train = x_train[rank * per_rank:(rank + 1) * per_rank], y_train[rank * per_rank:(rank + 1) * per_rank]
    batch_size = args.batch_size or (32 if args.workload == "digits" else 256)
    model = build_model(args.workload, seed=args.seed)
    trained = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    decay = [q for q in model.parameters() if q.dim() >= 2]
    rest = [q for q in model.parameters() if q.dim() < 2]
    # The fused kernel, as the kit uses: the ratio measures the kit's overhead, not a faster optimizer.
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4}, {"params": rest, "weight_decay": 0.0}],
                                  lr=args.lr, fused=True)
    steps_per_epoch = math.ceil(per_rank / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(
        s, total=args.epochs * steps_per_epoch, warmup=20, min_ratio=1e-4 / args.lr))
    if rank == 0:  # ranks share torchrun's stdout: one writer keeps the lines whole
        emit("ready")

    step = 0
    for epoch in range(args.epochs):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(per_rank, generator=torch.Generator().manual_seed(args.seed * 1_000_003 + epoch))
        loss_sum = correct_sum = 0.0  # what any real loop tracks (and the kit reports)
        for start in range(0, per_rank, batch_size):
            idx = order[start:start + batch_size]
            outputs = trained(x_train[idx])
            loss = F.cross_entropy(outputs, y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct_sum += float((outputs.detach().argmax(1) == y_train[idx]).sum())
            step += 1
            if step == 1 and rank == 0:
                emit("first_step")
                if args.stop_after_first_step:
                    break
        if args.stop_after_first_step:
            break
        seconds = time.perf_counter() - started
        model.eval()
        with torch.no_grad():
            correct = torch.tensor([(model(x_val).argmax(1) == y_val).sum().item(), len(y_val)], dtype=torch.float64)
        if rank == 0:
            emit("epoch", epoch=epoch + 1, rows=per_rank * world_size, samples_per_s=per_rank * world_size / seconds,
                 epoch_s=seconds, train_loss=loss_sum / per_rank, train_accuracy=correct_sum / per_rank,
                 val_accuracy=float(correct[0] / correct[1]))
        if args.target is not None and correct[0] / correct[1] >= args.target:
            break
    if own_group:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
