"""Sharded from birth: each worker's model, and under fsdp/hsdp a model no worker holds whole.

With `scaling.meta_init` (the default) an fsdp/hsdp worker builds the model on PyTorch's meta
device (shapes and dtypes, no memory), shards it (`parallel.shard_model`), and only then creates
its own shards, one module at a time, with the values one process builds from `train.seed`
(`models.build_model`), bit for bit. Its peak is its shards plus one module's full tensors
(and its chunk of them on the way in), instead of the whole model plus its shards.

PyTorch's recipe (FSDP2's `fully_shard` docs; torchtitan) initializes the sharded DTensors in
place, with DTensor's own random streams: valid weights, but not the ones one process draws, so a
run's start would depend on its worker count. The kit replays the seeded CPU generator in the
order one process draws from it instead: every module's constructor (`reset_parameters`, as
torch's layers define it) in registration order, then `initializers.apply_init` module by module.
Pass 1 runs the constructors' draws on full-size temporaries and notes the generator's state
before each module; pass 2 re-creates each module from its noted state, initializes it from where
the constructors ended, and every rank keeps its chunk (`distribute_tensor(...,
src_data_rank=None)`: computed locally, no communication).

A model qualifies (`meta_init_blocker`) when it builds on the meta device, every module that
holds parameters or buffers re-creates them in its own `reset_parameters()`, and no parameter is
shared between modules. Its values then equal one process's when its constructors draw in the
order its modules are registered, as every built-in model and `nn.Sequential` do. Exercised by
`tests/test_materialize.py` and `raytrain-kit train jobs/fsdp_mlp.yaml`.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from raytrain_kit import parallel
from raytrain_kit.config import Experiment
from raytrain_kit.data import DataSpec
from raytrain_kit.errors import KitError, short_message
from raytrain_kit.initializers import apply_init
from raytrain_kit.models import MODELS, build_model


def build_worker_model(cfg: Experiment, spec: DataSpec, *, world_size: int,
                       device: torch.device) -> tuple[nn.Module, nn.Module]:
    """`(model, module)` for one worker: the network with the seeded initial values of
    `models.build_model`, and what the training loop calls (the model itself, DDP around it, or
    the model sharded in place). Under fsdp/hsdp a collective: every rank calls it."""
    if parallel.is_sharded(cfg) and cfg.scaling.meta_init:
        model, blocker = build_on_meta(cfg, spec)
        if blocker is None:
            model = build_sharded(model, cfg, world_size=world_size, device=device)
            return model, model
    model = parallel.convert_sync_batchnorm(build_model(cfg, spec), cfg, world_size=world_size)
    return model, parallel.wrap_model(model, cfg, world_size=world_size, device=device)


def build_on_meta(cfg: Experiment, spec: DataSpec) -> tuple[Optional[nn.Module], Optional[str]]:
    """The experiment's network on the meta device (no memory: a model of any size) and None, or
    None and why it cannot be created shard by shard (`meta_init_blocker`). Raises the builder's
    ConfigError (a custom target that does not import)."""
    try:
        with torch.device("meta"):
            model = MODELS[cfg.model.kind](cfg.model, spec)
    except KitError:
        raise
    except Exception as e:
        return None, f"the model cannot be built on the meta device ({type(e).__name__}: {short_message(e, last_line=True)})"
    blocker = meta_init_blocker(model)
    return (None, blocker) if blocker else (model, None)


def meta_init_blocker(model: nn.Module) -> Optional[str]:
    """Why `model`, built on the meta device, cannot be materialized shard by shard with one
    process's values; None when it can (see the module's docstring)."""
    owner_of: dict[int, str] = {}
    for name, module in model.named_modules():
        where = name or "the model's root"
        tensors = [(n, t) for n, t in (*module._parameters.items(), *module._buffers.items()) if t is not None]
        for tensor_name, tensor in tensors:
            if not tensor.is_meta:
                return f"{where}.{tensor_name} is created on {tensor.device}, not on the device being built on"
            if tensor_name in module._parameters and owner_of.setdefault(id(tensor), where) != where:
                return f"{where}.{tensor_name} is shared with {owner_of[id(tensor)]}"
        if tensors and not callable(getattr(module, "reset_parameters", None)):
            return f"{where} ({type(module).__name__}) has no reset_parameters() to re-create its tensors"
    return None


def build_sharded(meta_model: nn.Module, cfg: Experiment, *, world_size: int, device: torch.device) -> nn.Module:
    """`meta_model` (from `build_on_meta`) sharded for the run and materialized on `device`, this
    rank's chunks only, with `build_model`'s values (bit for bit)."""
    model = parallel.convert_sync_batchnorm(meta_model, cfg, world_size=world_size)
    template = copy.deepcopy(model)  # full-size meta tensors, free: each module's temporaries come from it
    parallel.shard_model(model, cfg, world_size=world_size, device_type=device.type)
    model.to_empty(device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        constructed_from = _replay_constructors(template)
        targets = dict(model.named_modules())
        for name, module in template.named_modules():
            if name in constructed_from:  # one module's full tensors alive at a time: no name holds them
                _keep_local_chunks(_initialized_copy(module, cfg, constructed_from=constructed_from[name]), targets[name])
    return model


def _owns_tensors(module: nn.Module) -> bool:
    return any(t is not None for t in (*module._parameters.values(), *module._buffers.values()))


def _full_copy(module: nn.Module) -> nn.Module:
    """`module` alone (no children), its own tensors full-size on the CPU, uninitialized."""
    alone = copy.copy(module)
    alone._parameters, alone._buffers, alone._modules = dict(module._parameters), dict(module._buffers), {}
    return alone.to_empty(device="cpu", recurse=False)


def _replay_constructors(template: nn.Module) -> dict[str, torch.Tensor]:
    """Pass 1: every module's constructor draws, in registration order, on throwaway full-size
    copies; returns the CPU generator's state before each module's draws, by module name."""
    states = {}
    for name, module in template.named_modules():
        if _owns_tensors(module):
            states[name] = torch.get_rng_state()
            _full_copy(module).reset_parameters()
    return states


def _initialized_copy(module: nn.Module, cfg: Experiment, *, constructed_from: torch.Tensor) -> nn.Module:
    """Pass 2, one module: its constructor's values (drawn again from `constructed_from`), then
    `apply_init`'s draws from where the generator stands (after every earlier module's)."""
    full = _full_copy(module)
    init_from = torch.get_rng_state()
    torch.set_rng_state(constructed_from)
    full.reset_parameters()
    torch.set_rng_state(init_from)
    return apply_init(full, cfg.init, activation=cfg.model.activation)


def _keep_local_chunks(full: nn.Module, target: nn.Module) -> None:
    """Copy this rank's chunk of each of `full`'s parameters into `target`'s (sharded) ones, and
    its buffers whole (FSDP2 does not shard buffers)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for name, value in full._parameters.items():
            if value is None:
                continue
            kept = target._parameters[name]
            if isinstance(kept, DTensor):
                chunk = distribute_tensor(value.detach().to(kept.device), kept.device_mesh, kept.placements,
                                          src_data_rank=None)
                kept.to_local().copy_(chunk.to_local())
            else:
                kept.copy_(value)
        for name, value in full._buffers.items():
            if value is not None:
                target._buffers[name].copy_(value)
