"""The pure gradient checker: catches injected backward bugs and names the layer, no false
alarms on correct models of every kind, leaves the caller's model and RNG untouched, and stays
within its cost budget (counted in float64 model passes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradcheck_models import (CustomLinear, Unstable, WithUnused, buggy_mlp, correct_models, cross_entropy,
                              mse_ignoring_reduction, mse_without_factor_2)
from raytrain_kit.gradcheck import check_gradients


def _classification_batch(shape=(10,), num_classes=3, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, num_classes, (n,), generator=g)


@pytest.mark.parametrize("bug,name,hint", [
    ("sign", "2.weight", "sign error"),
    ("zero_bias", "2.bias", "gradient dropped"),
    ("none_bias", "2.bias", "gradient dropped (backward returned None)"),
])
def test_detects_layer_bugs_and_names_the_layer(bug, name, hint):
    torch.manual_seed(0)
    report = check_gradients(buggy_mlp(bug=bug), _classification_batch(), cross_entropy)
    assert report.status == "fail", report.format_table()
    assert [f.name for f in report.findings] == [name]
    finding = report.findings[0]
    assert finding.module_type == "CustomLinear" and finding.module == "2"
    assert finding.hint.startswith(hint), finding.hint
    assert report.num_passes <= 200


@pytest.mark.parametrize("loss_fn,hint", [
    (mse_without_factor_2, "missing factor 2 "),
    (mse_ignoring_reduction, "missing factor 1/8: the backward ignores the mean over the batch of 8"),
])
def test_detects_loss_bugs_and_blames_the_loss(loss_fn, hint):
    torch.manual_seed(0)
    x, _ = _classification_batch()
    report = check_gradients(buggy_mlp(bug="", num_outputs=1), (x, torch.randn(8)), loss_fn)
    assert report.status == "fail"
    assert [f.name for f in report.findings] == ["loss"]
    assert report.findings[0].hint.startswith(hint), report.findings[0].hint


@pytest.mark.parametrize("name", list(correct_models()))
def test_no_false_alarms_and_model_untouched(name):
    make, shape, num_classes = correct_models()[name]
    for seed in range(20):
        torch.manual_seed(seed)
        model = make().train()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        batch = _classification_batch(shape, num_classes, seed=seed)
        rng = torch.get_rng_state()
        report = check_gradients(model, batch, cross_entropy, seed=seed)
        assert report.status == "pass", (name, seed, report.format_table())
        assert sum(p.status == "pass" for p in report.probes) == 4  # conclusive, not just "no failure"
        assert torch.equal(torch.get_rng_state(), rng)
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), (name, seed)  # params and buffers
        assert all(p.grad is None for p in model.parameters()) and model.training
        assert next(model.parameters()).dtype == torch.float32


def test_structural_problems():
    x, y = _classification_batch((6,))
    nan_model = nn.Sequential(nn.Linear(6, 3))
    with torch.no_grad():
        nan_model[0].weight[0, 0] = float("nan")
    report = check_gradients(nan_model, (x, y), cross_entropy)
    assert report.status == "fail" and report.errors == ["loss: not finite (nan)"]

    report = check_gradients(nn.Linear(6, 3), (x, y), lambda out, t: out.sum(dim=1))
    assert report.status == "fail" and report.errors == ["loss: expected a scalar, got shape [8]"]

    report = check_gradients(WithUnused(), (x, y), cross_entropy)
    assert report.status == "warning"
    assert [w.split(" ")[0] for w in report.warnings] == ["unused.weight", "unused.bias"]
    assert "unused parameter" in report.warnings[0]
    assert report.failed("warning") and not report.failed("error")

    report = check_gradients(Unstable(), (x, y), cross_entropy)
    assert report.mode == "eval" and report.status == "warning"
    assert "not reproducible" in report.warnings[0]


def test_many_tensors_are_bisected():
    torch.manual_seed(0)
    layers = []
    for i in range(15):
        layers += [CustomLinear(8, 8, bug="sign") if i == 11 else nn.Linear(8, 8), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(8, 3))
    report = check_gradients(model, _classification_batch((8,)), cross_entropy)
    assert report.num_tensors == 32
    assert [f.name for f in report.findings] == ["22.weight"]
    assert report.findings[0].hint.startswith("sign error")
    # Bisection probes far fewer groups than one probe per tensor would.
    assert sum("(" in p.target for p in report.probes) >= 2 and report.num_passes <= 200


def _wide_mlp(bug=None):
    torch.manual_seed(0)
    hidden = nn.Linear(2048, 2048) if bug is None else CustomLinear(2048, 2048, bug=bug)
    return nn.Sequential(nn.Linear(64, 2048), nn.ReLU(), hidden, nn.ReLU(), nn.Linear(2048, 512), nn.ReLU(),
                         nn.Linear(512, 10))


def test_cost_on_a_5m_parameter_model():
    batch = _classification_batch((64,), 10)
    passing = check_gradients(_wide_mlp(), batch, cross_entropy)
    assert passing.num_parameters > 5_000_000
    assert passing.status == "pass" and passing.num_passes <= 40
    failing = check_gradients(_wide_mlp(bug="zero_bias"), batch, cross_entropy)
    assert failing.status == "fail" and [f.name for f in failing.findings] == ["2.bias"]
    assert failing.num_passes <= 200
