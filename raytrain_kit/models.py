"""Networks built from `(ModelConfig, DataSpec)`: a registry keyed by `model.kind`.

Every builder returns a plain `nn.Module` mapping a batch shaped `(N, *spec.input_shape)` to
`(N, spec.num_outputs)`; parallel wrapping happens later, in the worker. `custom` imports
`package.module:callable` and calls it with the data spec and `model.kwargs`.
Exercised by `tests/test_models.py` and every `jobs/` recipe.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn

from raytrain_kit.config import Experiment, ModelConfig
from raytrain_kit.data import DataSpec
from raytrain_kit.errors import ConfigError
from raytrain_kit.initializers import apply_init

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "leaky_relu": nn.LeakyReLU,
}


def _mlp_layers(in_features: int, hidden: list[int], out: int, m: ModelConfig) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), ACTIVATIONS[m.activation]()]
        if m.dropout:
            layers.append(nn.Dropout(m.dropout))
        in_features = width
    layers.append(nn.Linear(in_features, out))
    return layers


def build_mlp(m: ModelConfig, spec: DataSpec) -> nn.Module:
    return nn.Sequential(nn.Flatten(), *_mlp_layers(spec.num_features, m.hidden, spec.num_outputs, m))


def build_cnn(m: ModelConfig, spec: DataSpec) -> nn.Module:
    channels, height, width = spec.input_shape
    layers: list[nn.Module] = []
    for out_channels in m.channels:
        layers += [nn.Conv2d(channels, out_channels, m.kernel_size, padding=m.kernel_size // 2),
                   ACTIVATIONS[m.activation]()]
        # Pool while there is something left to pool: digits' 8x8 allows three halvings.
        if height >= 2 and width >= 2:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        channels = out_channels
    head = _mlp_layers(channels * height * width, m.hidden, spec.num_outputs, m)
    return nn.Sequential(*layers, nn.Flatten(), *([nn.Dropout(m.dropout)] if m.dropout else []), *head)


class RecurrentClassifier(nn.Module):
    """Reads a (T, F) sequence, or an image [C, H, W] row by row (T = H, F = C * W)."""

    def __init__(self, m: ModelConfig, spec: DataSpec):
        super().__init__()
        shape = spec.input_shape
        self.image = len(shape) == 3
        steps_features = shape[-1] * shape[0] if self.image else shape[-1]
        cell = nn.LSTM if m.cell == "lstm" else nn.GRU
        self.rnn = cell(steps_features, m.hidden_size, num_layers=m.num_layers, batch_first=True,
                        bidirectional=m.bidirectional, dropout=m.dropout if m.num_layers > 1 else 0.0)
        directions = 2 if m.bidirectional else 1
        self.dropout = nn.Dropout(m.dropout) if m.dropout else nn.Identity()
        self.head = nn.Linear(m.hidden_size * directions, spec.num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.image:  # (N, C, H, W) -> (N, H, C * W): one step per image row
            x = x.permute(0, 2, 1, 3).flatten(2)
        out, _ = self.rnn(x)
        directions = 2 if self.rnn.bidirectional else 1
        size = self.rnn.hidden_size
        # Last step of the forward direction, first step of the backward one.
        last = out[:, -1, :size] if directions == 1 else torch.cat([out[:, -1, :size], out[:, 0, size:]], dim=1)
        return self.head(self.dropout(last))


def build_rnn(m: ModelConfig, spec: DataSpec) -> nn.Module:
    return RecurrentClassifier(m, spec)


def build_custom(m: ModelConfig, spec: DataSpec) -> nn.Module:
    module_name, _, attr = (m.target or "").partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model.target: cannot import {m.target!r} ({type(e).__name__}: {e}); "
                          "is its package on PYTHONPATH or installed?") from None
    model = factory(spec, **m.kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.target: {m.target!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


MODELS: dict[str, Callable[[ModelConfig, DataSpec], nn.Module]] = {
    "mlp": build_mlp, "cnn": build_cnn, "rnn": build_rnn, "custom": build_custom,
}


def build_model(cfg: Experiment, spec: DataSpec) -> nn.Module:
    """The experiment's network, initialized by `init.scheme` under `train.seed`."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed)
        model = MODELS[cfg.model.kind](cfg.model, spec)
        apply_init(model, cfg.init, activation=cfg.model.activation)
    return model


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

