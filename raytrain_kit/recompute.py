"""Activation checkpointing (`train.activation_checkpointing`): each block keeps only its input in
the forward pass and runs again in the backward to recreate what its backward needs, trading
about one more forward per step for activation memory.

torch.utils.checkpoint's non-reentrant form (the one torch recommends: it works under DDP, with
FSDP2's hooks, with autocast, and re-draws dropout's masks from the same RNG state, so the losses
are those without it). A block is what `parallel.find_blocks` returns, the unit FSDP shards. In
the built-in `nn.Sequential` models (mlp, cnn) a Linear or Conv2d layer alone keeps nothing worth
dropping (its input is kept either way), so each region there is the layer together with the
parameter-free layers after it (activation, dropout, pooling), whose outputs and masks are what
checkpointing saves. The model's modules and names stay as they are (checkpoints, exported
weights and `fsdp_blocks` are unchanged): only `forward` is replaced on the instance. A
recomputed BatchNorm would update its running statistics a second time: they are put back after
each recomputation.
Exercised by `tests/test_recompute.py`.
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from raytrain_kit import parallel
from raytrain_kit.config import Experiment


def apply_activation_checkpointing(model: nn.Module, cfg: Experiment) -> nn.Module:
    """Make `model` recompute its blocks' activations in the backward (in place; returns it).
    Call it on the plain model, before or after sharding; a no-op unless
    `train.activation_checkpointing`. The replaced `forward`s hold no references to layers
    (they find them on `self`), so a deep copy of the model recomputes its own."""
    if not cfg.train.activation_checkpointing:
        return model
    blocks = parallel.find_blocks(model, cfg)
    if _cut_in_sequence(model, blocks):
        model.checkpoint_regions = sequential_regions(model, blocks)
        model.forward = types.MethodType(_sequential_forward, model)
    else:
        for block in blocks:
            block.forward = types.MethodType(_checkpointed_forward, block)
    return model


def _cut_in_sequence(model: nn.Module, blocks: list[nn.Module]) -> bool:
    children = list(model.children())
    return isinstance(model, nn.Sequential) and all(any(b is c for c in children) for b in blocks)


def sequential_regions(model: nn.Sequential, blocks: list[nn.Module]) -> list[tuple[bool, int, int]]:
    """`model`'s layers cut before every block: `(checkpointed, start, end)` per region (layers
    `model[start:end]`), a block with the layers that follow it up to the next block checkpointed
    (in the built-in models: activation, dropout, pooling), the layers before the first block (a
    Flatten) not."""
    ids = {id(b) for b in blocks}
    regions: list[list] = []
    for i, layer in enumerate(model):
        if id(layer) in ids or not regions:
            regions.append([id(layer) in ids, i, i + 1])
        else:
            regions[-1][2] = i + 1
    return [tuple(r) for r in regions]


def _recompute_keeps_statistics(modules: Iterable[nn.Module]):
    """`context_fn` for `checkpoint`: nothing around the forward; around the recomputation, the
    normalization layers' running statistics (and step counts) put back as the forward left
    them: the recomputation runs them in training mode again, and would count every batch twice."""
    norms = [m for root in modules for m in root.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    return contextlib.nullcontext(), _statistics_restored(norms)


@contextlib.contextmanager
def _statistics_restored(norms: list[nn.Module]) -> Iterator[None]:
    kept = [(buffer, buffer.clone()) for norm in norms for buffer in norm.buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in kept:
                buffer.copy_(value)


def _run(model: nn.Sequential, start: int, end: int, x: torch.Tensor) -> torch.Tensor:
    for i in range(start, end):
        x = model[i](x)
    return x


def _sequential_forward(self: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    for checkpointed, start, end in self.checkpoint_regions:
        if checkpointed and torch.is_grad_enabled():
            context = functools.partial(_recompute_keeps_statistics, [self[i] for i in range(start, end)])
            x = checkpoint(_run, self, start, end, x, use_reentrant=False, context_fn=context)
        else:
            x = _run(self, start, end, x)
    return x


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    # type(self).forward: the class's own (FSDP2 subclasses the class without replacing it)
    if not torch.is_grad_enabled():
        return type(self).forward(self, *args, **kwargs)
    return checkpoint(type(self).forward, self, *args, use_reentrant=False,
                      context_fn=functools.partial(_recompute_keeps_statistics, [self]), **kwargs)
