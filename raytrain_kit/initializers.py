"""Weight initialization schemes, applied in place to every linear, conv and recurrent weight.

`init.scheme` picks one of torch.nn.init's schemes; biases start at `init.bias` (0 unless the
scheme is `default`, which leaves PyTorch's own initialization alone). Normalization layers
keep their identity initialization. Exercised by `tests/test_maths.py::test_init_*`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from raytrain_kit.config import InitConfig

# torch.nn.init.calculate_gain names; gelu and silu have no entry and are close to relu.
_GAIN_NAME = {"relu": "relu", "gelu": "relu", "silu": "relu", "tanh": "tanh", "leaky_relu": "leaky_relu"}


def _weight_init(cfg: InitConfig, activation: str) -> Callable[[torch.Tensor], None]:
    nonlinearity = _GAIN_NAME[activation]
    return {
        "zeros": nn.init.zeros_,
        "normal": lambda w: nn.init.normal_(w, 0.0, cfg.std),
        "truncated_normal": lambda w: nn.init.trunc_normal_(w, 0.0, cfg.std, -2 * cfg.std, 2 * cfg.std),
        "xavier_uniform": lambda w: nn.init.xavier_uniform_(w, gain=cfg.gain),
        "xavier_normal": lambda w: nn.init.xavier_normal_(w, gain=cfg.gain),
        "kaiming_uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity=nonlinearity),
        "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity=nonlinearity),
        "orthogonal": lambda w: nn.init.orthogonal_(w, gain=cfg.gain),
    }[cfg.scheme]


def _is_normalization(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm))


def apply_init(model: nn.Module, cfg: InitConfig, *, activation: str = "relu") -> nn.Module:
    """Initialize `model` in place; returns it for chaining."""
    if cfg.scheme == "default" and cfg.bias is None:
        return model
    init_weight = None if cfg.scheme == "default" else _weight_init(cfg, activation)
    bias = 0.0 if cfg.bias is None else cfg.bias
    with torch.no_grad():
        for module in model.modules():
            if _is_normalization(module):
                continue
            for name, param in module.named_parameters(recurse=False):
                if name.startswith("bias"):
                    nn.init.constant_(param, bias)
                elif init_weight is not None and param.dim() >= 2:
                    # RNNs stack their gate matrices; initializing each gate's block keeps
                    # fan-in/fan-out (and orthogonality) per gate, as Keras does.
                    if isinstance(module, nn.RNNBase):
                        gates = param.shape[0] // module.hidden_size
                        for block in param.chunk(gates, dim=0):
                            init_weight(block)
                    else:
                        init_weight(param)
    return model
