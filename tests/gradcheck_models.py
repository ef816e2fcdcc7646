"""Models for the gradient-check tests: correct ones of every kind, and ones with injected
backward bugs written as custom autograd Functions (as a user's custom layer would be)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _LinearFn(torch.autograd.Function):
    """y = x W^T + b with a configurable bug in the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, bug):
        ctx.save_for_backward(x, weight)
        ctx.bug = bug
        return x @ weight.T + bias

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x, grad_w, grad_b = grad_out @ weight, grad_out.T @ x, grad_out.sum(0)
        if ctx.bug == "sign":
            grad_w = -grad_w
        elif ctx.bug == "zero_bias":
            grad_b = torch.zeros_like(grad_b)
        elif ctx.bug == "none_bias":
            grad_b = None
        return grad_x, grad_w, grad_b, None


class CustomLinear(nn.Linear):
    def __init__(self, *args, bug: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.bug = bug

    def forward(self, x):
        return _LinearFn.apply(x, self.weight, self.bias, self.bug)


def buggy_mlp(num_features=10, num_outputs=3, bug="sign", hidden=16) -> nn.Module:
    return nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh(), CustomLinear(hidden, hidden, bug=bug),
                         nn.Tanh(), nn.Linear(hidden, num_outputs))


class _MSEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, bug):
        ctx.save_for_backward(pred, target)
        ctx.bug = bug
        return ((pred - target) ** 2).mean()

    @staticmethod
    def backward(ctx, grad_out):
        pred, target = ctx.saved_tensors
        if ctx.bug == "no_factor_2":
            grad = (pred - target) / pred.numel()
        elif ctx.bug == "ignores_reduction":
            grad = 2 * (pred - target)
        else:
            grad = 2 * (pred - target) / pred.numel()
        return grad_out * grad, None, None


def mse_without_factor_2(outputs, targets):
    return _MSEFn.apply(outputs.squeeze(-1), targets.to(outputs.dtype), "no_factor_2")


def mse_ignoring_reduction(outputs, targets):
    return _MSEFn.apply(outputs.squeeze(-1), targets.to(outputs.dtype), "ignores_reduction")


def cross_entropy(outputs, targets):
    return F.cross_entropy(outputs, targets)


# ---- correct models -------------------------------------------------------------------------

class TinyTransformer(nn.Module):
    def __init__(self, num_features=8, seq_len=6, d_model=16, num_outputs=3, num_layers=2):
        super().__init__()
        self.seq_len, self.chunk = seq_len, num_features
        self.embed = nn.Linear(num_features, d_model)
        self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, nhead=2, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_outputs)

    def forward(self, x):
        h = self.encoder(self.embed(x) + self.pos)
        return self.head(h.mean(dim=1))


class RNNHead(nn.Module):
    def __init__(self, cell: type[nn.RNNBase], features=8, hidden=12, outputs=3):
        super().__init__()
        self.rnn = cell(features, hidden, batch_first=True, num_layers=2)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def correct_models():
    """name -> (model factory, input shape per sample, number of classes)."""
    return {
        "mlp_relu": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64),
                                           nn.ReLU(), nn.Linear(64, 10)), (64,), 10),
        "cnn_maxpool": (lambda: nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                              nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                              nn.Flatten(), nn.Linear(64, 10)), (1, 8, 8), 10),
        "gru": (lambda: RNNHead(nn.GRU), (6, 8), 3),
        "lstm": (lambda: RNNHead(nn.LSTM), (6, 8), 3),
        "dropout": (lambda: nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 5)), (20,), 5),
        "batchnorm": (lambda: nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)),
                      (20,), 4),
        "transformer": (lambda: TinyTransformer(), (6, 8), 3),
    }


def buggy_custom_model(spec, bug: str = "sign") -> nn.Module:
    """A `model.target` for the kit: the buggy MLP sized for the experiment's data."""
    return nn.Sequential(nn.Flatten(), buggy_mlp(spec.num_features, spec.num_outputs, bug=bug))


class Unstable(nn.Module):
    """Train-mode output drifts with every call (a stateful layer): not reproducible by seeding."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        drift = torch.tensor([1e-3 * self.calls, 0.0, 0.0], dtype=x.dtype)  # CE ignores a common shift
        return self.linear(x) + (drift if self.training else 0.0)


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        return self.used(x)
