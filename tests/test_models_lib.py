"""Custom models for tests, imported by Ray workers through `model.target`."""

from __future__ import annotations

import builtins

import torch
from torch import nn


class FailingMLP(nn.Module):
    """An MLP with dropout that raises on its `fail_at_step`-th training forward (1-based):
    a worker dying mid-run, deterministically. `error`: the builtin exception class it raises,
    with `message` (default: the step it failed at)."""

    def __init__(self, spec, hidden: int = 32, dropout: float = 0.2, fail_at_step=None, error: str = "RuntimeError",
                 message=None):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(spec.num_features, hidden), nn.ReLU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, spec.num_outputs))
        self.fail_at_step = fail_at_step
        self.error, self.message = getattr(builtins, error), message
        self.num_train_forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.num_train_forwards += 1
            if self.fail_at_step is not None and self.num_train_forwards >= self.fail_at_step:
                raise self.error(self.message or f"injected failure at training step {self.num_train_forwards}")
        return self.net(x)


def build_failing_mlp(spec, **kwargs) -> nn.Module:
    return FailingMLP(spec, **kwargs)


def not_a_module(spec):
    return "not a module"


class BatchNormMLP(nn.Module):
    """Linear-BatchNorm1d-ReLU-Linear. With `record_dir`, every evaluation forward appends the
    running statistics this rank evaluates with to `record_dir/rank<r>.jsonl`."""

    def __init__(self, spec, hidden: int = 16, record_dir=None):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(spec.num_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Linear(hidden, spec.num_outputs))
        self.record_dir = record_dir

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.record_dir:
            import json
            import os

            import torch.distributed as dist

            norm = self.net[2]
            rank = dist.get_rank() if dist.is_initialized() else 0
            with open(os.path.join(self.record_dir, f"rank{rank}.jsonl"), "a") as f:
                f.write(json.dumps({"running_mean": norm.running_mean.tolist(), "running_var": norm.running_var.tolist(),
                                    "num_batches_tracked": int(norm.num_batches_tracked)}) + "\n")
        return self.net(x)


def build_batchnorm_mlp(spec, **kwargs) -> nn.Module:
    return BatchNormMLP(spec, **kwargs)


class Scale(nn.Module):
    """A learned per-feature scale drawn at construction (a 1-dim, non-bias parameter that the
    kit's init schemes leave as built), re-created by `reset_parameters` as torch's layers are."""

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.scale, 0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def build_scaled_mlp(spec, hidden: int = 24) -> nn.Module:
    """Builds on the meta device: every tensor-holding module has reset_parameters."""
    return nn.Sequential(nn.Flatten(), nn.Linear(spec.num_features, hidden), nn.BatchNorm1d(hidden), Scale(hidden),
                         nn.ReLU(), nn.Linear(hidden, spec.num_outputs))


class RawWeight(nn.Module):
    """Draws its weight in the constructor and has no reset_parameters: cannot be re-created."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def build_raw_weight_mlp(spec, hidden: int = 8) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(spec.num_features, hidden), RawWeight(hidden),
                         nn.Linear(hidden, spec.num_outputs))


def build_cpu_pinned_mlp(spec, hidden: int = 8) -> nn.Module:
    """Creates its first layer's weight explicitly on the CPU, whatever the default device."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(spec.num_features, hidden), nn.Linear(hidden, spec.num_outputs))
    model[1].weight = nn.Parameter(torch.zeros(hidden, spec.num_features, device="cpu"))
    return model


def build_tied_mlp(spec, hidden: int = 8) -> nn.Module:
    """Two layers sharing one weight."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(spec.num_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                          nn.ReLU(), nn.Linear(hidden, hidden), nn.Linear(hidden, spec.num_outputs))
    model[5].weight = model[3].weight
    return model


def build_data_dependent_mlp(spec, hidden: int = 8) -> nn.Module:
    """Reads a tensor's value while building (meta tensors have none)."""
    width = int(torch.tensor(float(hidden)).item())
    return nn.Sequential(nn.Flatten(), nn.Linear(spec.num_features, width), nn.Linear(width, spec.num_outputs))
