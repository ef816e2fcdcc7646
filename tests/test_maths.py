"""Pure maths, no Ray: init statistics, schedules at their boundaries, penalty gradients,
optimizers, and the train step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from raytrain_kit.config import InitConfig, ScheduleConfig, build_experiment
from raytrain_kit.initializers import apply_init
from raytrain_kit.optim import (apply_decoupled_weight_decay, build_optimizer, build_scheduler,
                                load_scheduler_state, lr_at, penalty, scheduler_state,
                                add_penalty_gradients)


def _init(scheme: str, shape=(256, 512), **kw) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(shape[1], shape[0])
    return apply_init(layer, InitConfig(scheme=scheme, **kw))


# ---- initialization --------------------------------------------------------------------------

def test_init_xavier_uniform_bound():
    layer = _init("xavier_uniform", gain=1.5)
    bound = 1.5 * math.sqrt(6 / (512 + 256))
    w = layer.weight
    assert w.abs().max() <= bound + 1e-7
    assert w.abs().max() > 0.99 * bound  # fills the interval, not a narrower one
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.01 * bound
    assert torch.all(layer.bias == 0)


def test_init_xavier_normal_std():
    w = _init("xavier_normal").weight
    assert abs(w.std().item() - math.sqrt(2 / (512 + 256))) < 0.02 * math.sqrt(2 / (512 + 256))


def test_init_truncated_normal_inside_two_sigma():
    w = _init("truncated_normal", std=0.05).weight
    assert w.abs().max() <= 2 * 0.05 + 1e-7
    # A normal truncated at +-2 sigma has std 0.8796 sigma.
    assert abs(w.std().item() - 0.8796 * 0.05) < 0.002


def test_init_normal_std():
    w = _init("normal", std=0.02).weight
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 5e-4


def test_init_zeros_are_zero():
    layer = _init("zeros")
    assert torch.count_nonzero(layer.weight) == 0 and torch.count_nonzero(layer.bias) == 0


@pytest.mark.parametrize("scheme", ["kaiming_uniform", "kaiming_normal"])
def test_init_kaiming_std(scheme):
    w = _init(scheme).weight
    expected = math.sqrt(2 / 512)  # relu gain, fan_in
    assert abs(w.std().item() - expected) < 0.02 * expected


def test_init_orthogonal():
    w = _init("orthogonal", shape=(64, 128)).weight
    assert torch.allclose(w @ w.T, torch.eye(64), atol=1e-5)
    rnn = apply_init(nn.GRU(16, 16), InitConfig(scheme="orthogonal"))
    for gate in rnn.weight_hh_l0.chunk(3, dim=0):  # each gate block is orthogonal on its own
        assert torch.allclose(gate @ gate.T, torch.eye(16), atol=1e-5)


def test_init_bias_and_default():
    assert torch.all(_init("normal", bias=0.1).bias == 0.1)
    torch.manual_seed(0)
    reference = nn.Linear(512, 256)
    default = _init("default")
    assert torch.equal(default.weight, reference.weight) and torch.equal(default.bias, reference.bias)
    norm = apply_init(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), InitConfig(scheme="zeros"))
    assert torch.all(norm[1].weight == 1)  # normalization layers keep identity scale


# ---- schedules -------------------------------------------------------------------------------

def _lr(step, total=1000, **kw):
    return lr_at(step, base_lr=0.1, cfg=ScheduleConfig(**kw), total_steps=total)


def test_exponential_matches_keras():
    kw = dict(kind="exponential", decay_steps=100, decay_rate=0.9)
    assert _lr(0, **kw) == pytest.approx(0.1)
    assert _lr(50, **kw) == pytest.approx(0.1 * 0.9 ** 0.5)
    assert _lr(100, **kw) == pytest.approx(0.09)
    assert _lr(250, **kw) == pytest.approx(0.1 * 0.9 ** 2.5)


def test_exponential_staircase():
    kw = dict(kind="exponential", decay_steps=100, decay_rate=0.9, staircase=True)
    assert _lr(99, **kw) == pytest.approx(0.1)
    assert _lr(100, **kw) == pytest.approx(0.09)
    assert _lr(199, **kw) == pytest.approx(0.09)
    assert _lr(200, **kw) == pytest.approx(0.081)


def test_step_schedule_and_min_lr():
    kw = dict(kind="step", step_size=10, gamma=0.5, min_lr=0.02)
    assert [_lr(s, **kw) for s in (0, 9, 10, 20, 30)] == pytest.approx([0.1, 0.1, 0.05, 0.025, 0.02])


def test_warmup_then_schedule():
    kw = dict(kind="exponential", warmup_steps=10, decay_steps=100, decay_rate=0.9)
    assert _lr(0, **kw) == pytest.approx(0.01)
    assert _lr(4, **kw) == pytest.approx(0.05)
    assert _lr(9, **kw) == pytest.approx(0.1)
    assert _lr(10, **kw) == pytest.approx(0.1)  # decay starts after warmup
    assert _lr(110, **kw) == pytest.approx(0.09)


def test_cosine_end_value():
    kw = dict(kind="cosine", warmup_steps=10, min_lr=0.001)
    assert _lr(10, total=110, **kw) == pytest.approx(0.1)
    assert _lr(60, total=111, **kw) == pytest.approx(0.001 + 0.099 * 0.5)
    assert _lr(109, total=110, **kw) == pytest.approx(0.001)
    assert _lr(500, total=110, **kw) == pytest.approx(0.001)


def test_constant_with_warmup():
    kw = dict(kind="constant", warmup_steps=4)
    assert [_lr(s, **kw) for s in (0, 3, 4, 10_000)] == pytest.approx([0.025, 0.1, 0.1, 0.1])


def test_plateau_reduces_after_patience_in_the_metric_direction():
    cfg = build_experiment({"optim": {"lr": 0.1}, "schedule": {"kind": "plateau", "patience": 1, "factor": 0.5,
                                                                "min_lr": 0.02}})
    opt = build_optimizer(nn.Linear(2, 1), cfg)
    sched = build_scheduler(opt, cfg, total_steps=100)
    assert cfg.mode == "max"  # val_accuracy: higher is better
    lrs = []
    for accuracy in (0.5, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7):
        sched.step(accuracy)
        lrs.append(opt.param_groups[0]["lr"])
    # Reduced on the 2nd epoch without improvement; improvement resets the count; floor at min_lr.
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025, 0.02, 0.02])


def test_scheduler_drives_optimizer_and_round_trips():
    cfg = build_experiment({"optim": {"name": "sgd", "lr": 0.1},
                            "schedule": {"kind": "exponential", "decay_steps": 2, "decay_rate": 0.5}})
    model = nn.Linear(2, 1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=10)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert seen == pytest.approx([0.1, 0.1 * 0.5 ** 0.5, 0.05, 0.05 * 0.5 ** 0.5])
    state = scheduler_state(sched)
    fresh_opt = build_optimizer(model, cfg)
    fresh = build_scheduler(fresh_opt, cfg, total_steps=10)
    load_scheduler_state(fresh, state)
    fresh_opt.load_state_dict(opt.state_dict())
    assert fresh.last_epoch == 4 and fresh.get_last_lr() == pytest.approx(sched.get_last_lr())


# ---- regularization --------------------------------------------------------------------------

def test_penalty_gradients_touch_weights_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    penalty(model, l1=0.3, l2=0.0).backward()
    w = model[0].weight
    assert torch.allclose(w.grad, 0.3 * torch.sign(w))
    assert model[0].bias.grad is None  # not even in the penalty's graph
    assert model[1].weight.grad is None  # LayerNorm scale untouched
    model.zero_grad()
    penalty(model, l1=0.0, l2=0.25).backward()
    assert torch.allclose(model[2].weight.grad, 2 * 0.25 * model[2].weight)
    assert model[2].bias.grad is None
    expected = 0.25 * sum((m.weight ** 2).sum() for m in (model[0], model[2]))
    assert penalty(model, l1=0, l2=0.25).item() == pytest.approx(expected.item())


def test_penalty_gradients_added_after_backward_equal_the_penalty_s_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    x = torch.randn(7, 5)
    (model(x).square().mean() + penalty(model, l1=0.3, l2=0.25)).backward()
    through_autograd = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    add_penalty_gradients(model, l1=0.3, l2=0.25)
    for expected, p in zip(through_autograd, model.parameters()):
        assert torch.allclose(p.grad, expected, atol=1e-7)


def test_decoupled_weight_decay_spares_biases():
    cfg = build_experiment({"optim": {"name": "sgd", "lr": 0.5}, "regularization": {"weight_decay": 0.1}})
    model = nn.Linear(3, 2)
    before_w, before_b = model.weight.detach().clone(), model.bias.detach().clone()
    opt = build_optimizer(model, cfg)
    apply_decoupled_weight_decay(opt, weight_decay=0.1, name="sgd")
    assert torch.allclose(model.weight, before_w * (1 - 0.5 * 0.1))
    assert torch.equal(model.bias, before_b)
    adamw = build_optimizer(model, build_experiment({"optim": {"name": "adamw"}, "regularization": {"weight_decay": 0.1}}))
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.1, 0.0]


# ---- optimizers ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,extra", [("sgd", {"momentum": 0.9, "nesterov": True}), ("adagrad", {"lr": 0.3}),
                                        ("rmsprop", {}), ("adam", {}), ("adamw", {})])
def test_every_optimizer_lowers_the_loss(name, extra):
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1) + 0.01 * torch.randn(256, 1)
    model = nn.Linear(8, 1)
    opt = build_optimizer(model, build_experiment({"optim": {"name": name, "lr": 0.01, **extra}}))
    losses = []
    for _ in range(100):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert type(opt).__name__.lower() == name
    assert losses[-1] < 0.5 * losses[0], losses[::20]


# ---- gradient accumulation -------------------------------------------------------------------

def test_accumulating_k_micro_batches_of_b_equals_one_batch_of_k_b():
    """43 rows: batches of 15 (15, 15, 13) against 3 micro-batches of 5 (the last step's are
    5, 5, 3): the same steps, losses and weights, with clipping and penalties in the step."""
    from raytrain_kit.steps import in_memory_batches, train_epoch

    torch.manual_seed(0)
    x, y = torch.randn(43, 6), torch.randint(0, 3, (43,))
    results, states = [], []
    for batch_size, accum in ((15, 1), (5, 3)):
        cfg = build_experiment({"optim": {"name": "adam", "lr": 0.1}, "train": {"batch_size": batch_size, "grad_accum_steps": accum},
                                "regularization": {"l1": 1e-3, "l2": 1e-3, "grad_clip_norm": 0.5}})
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        optimizer = build_optimizer(model, cfg)
        epochs = [train_epoch(model, in_memory_batches(x, y, batch_size=batch_size), cfg=cfg, optimizer=optimizer)
                  for _ in range(5)]
        results.append([loss / rows for e in epochs for loss, rows in e.step_losses])
        states.append(model.state_dict())
        assert [e.num_steps for e in epochs] == [3] * 5
    assert results[0] == pytest.approx(results[1], rel=1e-5)
    assert results[0][-1] < 0.8 * results[0][0]
    for name, value in states[0].items():
        assert torch.allclose(value, states[1][name], atol=1e-5), name


@pytest.mark.parametrize("clip", [None, 0.5])
def test_a_step_with_one_non_finite_gradient_is_refused_and_a_finite_one_is_left_as_it_was(clip):
    """The finiteness check without clipping (a fused check, no norm) gives the norm's answer:
    any NaN or inf in any gradient, of any dtype, refuses the step; finite gradients keep their
    values unless clipped."""
    from raytrain_kit.steps import gradients_finite

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    model[2].to(torch.bfloat16)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in params]
    assert gradients_finite(params, clip=clip) is True
    scale = min(1.0, clip / float(torch.cat([g.float().flatten() for g in before]).norm())) if clip else 1.0
    for p, g in zip(params, before):
        if clip:  # the norm sums each dtype's part in that dtype: bf16's rounding enters the scale
            assert torch.allclose(p.grad.float(), g.float() * scale, rtol=1e-2)
        else:
            assert torch.equal(p.grad, g)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for p in (params[1], params[3]):  # a float32 bias, a bfloat16 bias
            for q in params:  # clipping by a NaN norm leaves every gradient NaN (the step is refused)
                q.grad = torch.randn_like(q)
            p.grad[-1] = bad
            assert gradients_finite(params, clip=clip) is False, (bad, p.dtype)
    for q in params[1:]:
        q.grad = torch.randn_like(q)
    params[0].grad = None  # a parameter without a gradient (frozen, or unused this step)
    assert gradients_finite(params, clip=clip) is True
