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


# ---- bugs injected into any parameter of any module ------------------------------------------

class _ScaledGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by `factor` (0: dropped)."""

    @staticmethod
    def forward(ctx, t, factor):
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


BUG_FACTORS = {"sign": -1.0, "dropped": 0.0, "factor_2": 2.0}
BUG_HINTS = {"sign": "sign error", "dropped": "gradient dropped", "factor_2": "missing factor 1/2"}


class _BuggyParameter:
    """A forward pre-hook (with its post-hook) on the whole model that makes parameter `name` of
    submodule `path` a view whose backward is wrong, for the length of one forward: a bug in the
    backward of one parameter tensor, as a custom layer would have. On the root, because some
    layers read their children's parameters without calling them (MultiheadAttention's
    out_proj). An object, not a closure, so that the checker's deep copy carries it."""

    def __init__(self, path: str, name: str, factor: float):
        self.path, self.name, self.factor = path, name, factor

    def before(self, model, args):
        owner = model.get_submodule(self.path)
        owner._unbugged = owner._parameters[self.name]
        owner._parameters[self.name] = _ScaledGrad.apply(owner._unbugged, self.factor)
        if isinstance(owner, nn.RNNBase):  # RNNs read a cached list of their weights
            owner._init_flat_weights()

    def after(self, model, args, output):
        owner = model.get_submodule(self.path)
        owner._parameters[self.name] = owner._unbugged
        del owner._unbugged
        if isinstance(owner, nn.RNNBase):
            owner._init_flat_weights()


def inject_bug(model: nn.Module, parameter: str, bug) -> nn.Module:
    """Make the gradient of `model`'s parameter `parameter` (a dotted name) wrong in the way `bug`
    names (a key of BUG_FACTORS), or multiply it by `bug` if it is a number; returns the model."""
    path, _, name = parameter.rpartition(".")
    hook = _BuggyParameter(path, name, BUG_FACTORS[bug] if isinstance(bug, str) else float(bug))
    model.register_forward_pre_hook(hook.before)
    model.register_forward_hook(hook.after)
    return model


# ---- every parameterised layer type torch ships, each in a small classifier -------------------

class _Classifier(nn.Module):
    """`body` then a linear head to 3 classes; `read` turns the body's output into [batch, width]."""

    def __init__(self, body: nn.Module, width: int, read=lambda out: out.flatten(1)):
        super().__init__()
        self.body, self.head, self.read = body, nn.Linear(width, 3), read

    def forward(self, x):
        return self.head(self.read(self.body(x)))


class _Pair(nn.Module):
    """Feeds a layer that takes two inputs (Bilinear, attention, decoder) from one batch."""

    def __init__(self, layer: nn.Module, call):
        super().__init__()
        self.layer, self.call = layer, call

    def forward(self, x):
        return self.call(self.layer, x)


def _recurrent(cell: type[nn.RNNBase]) -> nn.Module:
    # The last layer's final hidden state: h_n for RNN/GRU, (h_n, c_n) for LSTM.
    return _Classifier(cell(4, 6, num_layers=2, batch_first=True), 6,
                       read=lambda out: (out[1][0] if isinstance(out[1], tuple) else out[1])[-1])


def _packed_batch(n: int, generator: torch.Generator):
    lengths = torch.randint(1, 8, (n,), generator=generator).sort(descending=True).values
    padded = torch.randn(n, 7, 4, generator=generator)
    return nn.utils.rnn.pack_padded_sequence(padded, lengths, batch_first=True)


def layer_zoo():
    """name -> (model factory, batch input factory(n, generator)); every model has 3 classes."""
    randn = lambda *shape: lambda n, g: torch.randn(n, *shape, generator=g)  # noqa: E731
    attend = lambda layer, x: layer(x, x, x, need_weights=False)[0]  # noqa: E731
    return {
        "Linear": (lambda: _Classifier(nn.Linear(6, 5), 5), randn(6)),
        "Bilinear": (lambda: _Classifier(_Pair(nn.Bilinear(3, 4, 5), lambda l, x: l(x[:, :3], x[:, 3:])), 5), randn(7)),
        "Conv1d": (lambda: _Classifier(nn.Conv1d(2, 3, 3), 3 * 6), randn(2, 8)),
        "Conv2d": (lambda: _Classifier(nn.Conv2d(2, 3, 3), 3 * 4 * 4), randn(2, 6, 6)),
        "Conv3d": (lambda: _Classifier(nn.Conv3d(2, 2, 2), 2 * 3 * 3 * 3), randn(2, 4, 4, 4)),
        "ConvTranspose2d": (lambda: _Classifier(nn.ConvTranspose2d(2, 3, 2, stride=2), 3 * 6 * 6), randn(2, 3, 3)),
        "Embedding": (lambda: _Classifier(nn.Embedding(10, 4), 5 * 4), lambda n, g: torch.randint(0, 10, (n, 5), generator=g)),
        "LayerNorm": (lambda: _Classifier(nn.LayerNorm(6), 6), randn(6)),
        "GroupNorm": (lambda: _Classifier(nn.GroupNorm(2, 4), 4 * 5), randn(4, 5)),
        "BatchNorm1d": (lambda: _Classifier(nn.BatchNorm1d(6), 6), randn(6)),
        "BatchNorm2d": (lambda: _Classifier(nn.BatchNorm2d(3), 3 * 4 * 4), randn(3, 4, 4)),
        "PReLU": (lambda: _Classifier(nn.PReLU(6), 6), randn(6)),
        "RNN-padded": (lambda: _recurrent(nn.RNN), randn(5, 4)),
        "LSTM-padded": (lambda: _recurrent(nn.LSTM), randn(5, 4)),
        "GRU-padded": (lambda: _recurrent(nn.GRU), randn(5, 4)),
        "RNN-packed": (lambda: _recurrent(nn.RNN), _packed_batch),
        "LSTM-packed": (lambda: _recurrent(nn.LSTM), _packed_batch),
        "GRU-packed": (lambda: _recurrent(nn.GRU), _packed_batch),
        "MultiheadAttention": (lambda: _Classifier(_Pair(nn.MultiheadAttention(8, 2, batch_first=True), attend),
                                                   5 * 8), randn(5, 8)),
        "TransformerEncoderLayer": (lambda: _Classifier(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 5 * 8),
                                    randn(5, 8)),
        "TransformerDecoderLayer": (lambda: _Classifier(_Pair(nn.TransformerDecoderLayer(8, 2, 16, batch_first=True),
                                                              lambda l, x: l(x[:, :3], x[:, 3:])), 3 * 8),
                                    randn(5, 8)),
    }
