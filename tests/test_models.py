"""Models from the registry: output shapes per kind, the custom import path, and its errors."""

from __future__ import annotations

import pytest
import torch

from raytrain_kit.config import build_experiment
from raytrain_kit.data import DataSpec
from raytrain_kit.errors import ConfigError
from raytrain_kit.models import build_model

DIGITS = DataSpec(num_features=64, num_classes=10, input_shape=(1, 8, 8), num_train_rows=10, num_val_rows=2)
SEQ = DataSpec(num_features=12, num_classes=0, input_shape=(4, 3), num_train_rows=10, num_val_rows=2)


@pytest.mark.parametrize("model,spec,shape", [
    ({"kind": "mlp", "hidden": [16, 8], "dropout": 0.1}, DIGITS, (5, 10)),
    ({"kind": "cnn", "channels": [4, 8, 8, 8]}, DIGITS, (5, 10)),  # more blocks than halvings
    ({"kind": "rnn", "cell": "gru"}, DIGITS, (5, 10)),
    ({"kind": "rnn", "cell": "lstm", "bidirectional": True, "num_layers": 2, "dropout": 0.1}, SEQ, (5, 1)),
    ({"kind": "custom", "target": "test_models_lib:build_failing_mlp", "kwargs": {"hidden": 7}}, DIGITS, (5, 10)),
])
def test_output_shapes(model, spec, shape):
    cfg = build_experiment({"model": model, "data": {"input_shape": list(spec.input_shape)}})
    net = build_model(cfg, spec)
    out = net(torch.randn(5, *spec.input_shape))
    assert out.shape == shape
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_same_seed_same_weights_and_rng_untouched():
    cfg = build_experiment({"model": {"kind": "cnn"}, "init": {"scheme": "xavier_uniform"}})
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = build_model(cfg, DIGITS), build_model(cfg, DIGITS)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    other = build_model(cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 1})}), DIGITS)
    assert not torch.equal(next(iter(other.parameters())), next(iter(a.parameters())))


def test_rnn_reads_image_rows():
    cfg = build_experiment({"model": {"kind": "rnn", "cell": "gru", "hidden_size": 5}})
    net = build_model(cfg, DIGITS)
    assert net.rnn.input_size == 8  # one step per row of 8 pixels


@pytest.mark.parametrize("target,message", [
    ("no_such_module_xyz:build", "model.target: cannot import 'no_such_module_xyz:build'"),
    ("test_models_lib:missing", "model.target: cannot import 'test_models_lib:missing'"),
    ("test_models_lib:not_a_module", "returned str, not a torch.nn.Module"),
])
def test_custom_target_errors(target, message):
    cfg = build_experiment({"model": {"kind": "custom", "target": target}})
    with pytest.raises(ConfigError, match=message):
        build_model(cfg, DIGITS)
