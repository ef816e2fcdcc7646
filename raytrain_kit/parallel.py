"""How the model is spread over the workers, and the arithmetic of its steps: DDP, FSDP or hybrid
sharding, bf16/fp16 precision, gradient accumulation.

`ddp` keeps a whole copy of the model on every worker and all-reduces gradients. `fsdp` and `hsdp`
use PyTorch's FSDP2: `fully_shard` on each block, then on the root, turns parameters into
DTensors sharded along their first dimension over a `DeviceMesh` (1-D for fsdp; 2-D for hsdp,
sharded inside each group of `shard_group_size` workers and replicated across groups). A block's
full weights exist only while it runs; gradients are reduce-scattered and the optimizer steps
only the local shard. Ray's `prepare_model(parallel_strategy="fsdp")` refuses CPU, so the kit
wraps the model itself; the same code serves gloo on CPU and NCCL on GPU. The helpers here let
`worker.py` stay blind to the strategy. Exercised by `raytrain-kit train jobs/fsdp_mlp.yaml`.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from raytrain_kit.config import Experiment
from raytrain_kit.errors import ConfigError

# The modules sharded as one unit each, per model kind: the layers that hold the parameters. A
# custom model is sharded as a whole unless `scaling.fsdp_blocks` names its blocks.
BLOCK_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "mlp": (nn.Linear,), "cnn": (nn.Conv2d, nn.Linear), "rnn": (nn.RNNBase, nn.Linear), "custom": (),
}
LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def is_sharded(cfg: Experiment) -> bool:
    return cfg.scaling.strategy != "ddp"


def find_blocks(model: nn.Module, cfg: Experiment) -> list[nn.Module]:
    """The submodules `fully_shard` wraps before the root, innermost first (FSDP2 needs a nested
    block sharded before the block around it)."""
    names = cfg.scaling.fsdp_blocks
    if names is not None:
        chosen = [m for m in model.modules() if type(m).__name__ in names]
    else:
        chosen = [m for m in model.modules() if isinstance(m, BLOCK_TYPES[cfg.model.kind])]
    return [m for m in reversed(chosen) if m is not model]


def check_blocks(model: nn.Module, cfg: Experiment) -> None:
    """A name in `scaling.fsdp_blocks` that matches no module is a typo: say so before launch."""
    if cfg.scaling.fsdp_blocks is None or not (is_sharded(cfg) or cfg.train.activation_checkpointing):
        return
    present = sorted({type(m).__name__ for m in model.modules()})
    missing = [n for n in cfg.scaling.fsdp_blocks if n not in present]
    if missing:
        raise ConfigError(f"scaling.fsdp_blocks: no module of class {', '.join(missing)} in the model; "
                          f"its module classes are {', '.join(present)}")


def build_mesh(cfg: Experiment, *, world_size: int, device_type: str):
    from torch.distributed.device_mesh import init_device_mesh

    s = cfg.scaling
    if s.strategy == "hsdp":
        groups = world_size // s.shard_group_size
        return init_device_mesh(device_type, (groups, s.shard_group_size), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))


def wrap_model(model: nn.Module, cfg: Experiment, *, world_size: int, device: torch.device) -> nn.Module:
    """The module the training loop calls. ddp: the model itself on 1 worker, else DDP around it.
    fsdp/hsdp: the model, sharded in place (its parameters become DTensors, so build the
    optimizer after this). Under bf16/fp16 FSDP2 gathers parameters in that type and reduces
    gradients in fp32; ddp uses autocast instead (see `autocast`)."""
    model.to(device)
    if not is_sharded(cfg):
        if world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        # Gradients as views into DDP's all-reduce buckets: without it every worker holds the
        # gradients twice (the buckets are a copy), 33 MB more per worker on jobs/fsdp_mlp.yaml
        # than `advise.plan_state_bytes` (measured: benchmarks/advise_bench.py).
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       gradient_as_bucket_view=True)
    return shard_model(model, cfg, world_size=world_size, device_type=device.type)


def shard_model(model: nn.Module, cfg: Experiment, *, world_size: int, device_type: str) -> nn.Module:
    """FSDP2's `fully_shard` on each block (`find_blocks`), then on the root, in place: parameters
    become DTensors sharded along dim 0 over the run's mesh (on whatever device they are,
    the meta device included: see `materialize.py`). A collective: every rank calls it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = build_mesh(cfg, world_size=world_size, device_type=device_type)
    low = LOW_PRECISION.get(cfg.train.precision)
    # Outputs come back in fp32 so the loss is computed as in fp32 training.
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None,
                                  output_dtype=torch.float32 if low else None)
    for block in find_blocks(model, cfg):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def autocast(cfg: Experiment, device: torch.device):
    """bf16/fp16 autocast around forward for ddp; FSDP2's policy already casts (see `wrap_model`)."""
    low = LOW_PRECISION.get(cfg.train.precision)
    if low is None or is_sharded(cfg):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=low)


def build_grad_scaler(cfg: Experiment, device: torch.device):
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none. Under
    fsdp the scaler agrees across ranks on whether any shard overflowed."""
    if cfg.train.precision != "fp16":
        return None
    if is_sharded(cfg):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device=device.type)
    return torch.amp.GradScaler(device.type)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, *, enabled: bool) -> Iterator[None]:
    """Backward inside this block synchronises gradients only if `enabled` (the last micro-batch
    of an accumulated step): DDP's `no_sync`, FSDP2's `set_requires_gradient_sync`."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(enabled)
        yield
    elif isinstance(module, DistributedDataParallel) and not enabled:
        with module.no_sync():
            yield
    else:
        yield


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every rank calls it); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly sharded) tensor this worker holds."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def all_reduce_figures(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a small CPU tensor of figures (sums, counts, flags) across the workers and
    return it on the CPU. NCCL reduces CUDA tensors only ("no backend for device type cpu"), so
    under it the figures make a round trip through this rank's GPU; gloo reduces them in place."""
    if dist.get_backend() == "nccl":
        on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=op)
        return on_gpu.cpu()
    dist.all_reduce(t, op=op)
    return t


def all_tensors_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of `tensors` is finite. Sharded tensors (DTensors) are checked shard
    by shard and every rank gets the same answer (a collective then: every rank calls it).

    One fused pass per device: the kernel `torch.amp.GradScaler` checks gradients with (scaling
    by 1.0, which changes no value). An optimizer step of a small model (the digits CNN, batch 32,
    2.4 ms on 1 CPU) spent 150-190 us on `nn.utils.get_total_norm` for the same answer, 6% of the
    run; this takes about 15 us."""
    from torch.distributed.tensor import DTensor

    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        by_device.setdefault(local.device, []).append(local)
    num_bad = 0.0
    for device, group in by_device.items():
        found = torch.zeros(1, device=device)  # the kernel sets it to 1.0 if any element is NaN or inf
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, torch.ones(1, device=device))
        num_bad += float(found)
    if dist.is_initialized() and any(isinstance(t, DTensor) for t in tensors):
        num_bad = all_reduce_figures(torch.tensor([num_bad])).item()
    return num_bad == 0


def all_finite(model: nn.Module, *, sharded: bool) -> bool:
    """Whether every weight is finite; with sharded weights every rank checks its shard and all agree."""
    ok = all(bool(torch.isfinite(local_tensor(p.detach())).all()) for p in model.parameters())
    if not sharded or not dist.is_initialized():
        return ok
    return not all_reduce_figures(torch.tensor([0.0 if ok else 1.0])).item()


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm's running statistics and step count, any
    custom module's state). Called before evaluation, and so before every checkpoint (a
    checkpointed epoch is always evaluated first): every rank evaluates the model the checkpoint
    holds. They drift apart in training because each rank updates them from its own batches: DDP
    broadcasts rank 0's at the start of each forward, after which every rank adds its own batch
    (running means 0.035 apart at an epoch's end); FSDP2 never broadcasts them, and its
    checkpoint keeps one rank's copy of a replicated tensor, not necessarily rank 0's.
    Parameters cannot drift: every rank applies the same all-reduced (or its own sharded) update."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for buffer in model.buffers():
            if not isinstance(buffer, DTensor):
                dist.broadcast(buffer, src=0)


def convert_sync_batchnorm(model: nn.Module, cfg: Experiment, *, world_size: int) -> nn.Module:
    """`model.sync_batchnorm`: BatchNorm layers become `torch.nn.SyncBatchNorm`, whose batch
    statistics in training are taken over the global batch (all workers) instead of each worker's
    own; the parameter and buffer names stay the same, so checkpoints are interchangeable. torch
    implements it for GPUs only (config validation refuses it on CPU)."""
    if not cfg.model.sync_batchnorm or world_size == 1:
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def lockstep(batches: Iterable, *, dummy_x: torch.Tensor) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Yield every batch, then `(dummy_x, None)` until every rank has run out: a sharded model's
    forward is a collective (it gathers weights), so all ranks must call it equally often even
    when their validation pieces differ in length."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        flag = all_reduce_figures(torch.tensor([0.0 if batch is None else 1.0]), op=dist.ReduceOp.MAX)
        if not flag.item():
            return
        yield batch if batch is not None else (dummy_x, None)


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters, gradients and optimizer state this worker holds (its shards only)."""
    def size(t: Optional[torch.Tensor]) -> int:
        if not isinstance(t, torch.Tensor):
            return 0
        local = local_tensor(t)
        return local.numel() * local.element_size()

    total = sum(size(p) + size(p.grad) for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(size(v) for v in state.values())
    return total


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports kilobytes, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
