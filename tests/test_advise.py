"""`advise`: the learning-rate range test's pick and its run on the kit's own train state, the
signal-propagation diagnostic of initialization schemes (He et al. 2015's 30-layer ReLU case),
the memory plan; pure torch, except the last test, the command on the main job on Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from raytrain_kit.advise import (diagnose_inits, judge_propagation, propagation_stats, range_test_lrs, smooth_losses,
                                 suggest_lr)
from raytrain_kit.config import build_experiment, with_overrides
from raytrain_kit.data import DataSpec
from raytrain_kit.data.sources import digits_arrays
from raytrain_kit.models import build_model


def _digits_job(**overrides):
    """jobs/digits.yaml with `overrides` (dotted keys)."""
    from pathlib import Path

    from raytrain_kit.config import load_experiment

    job = Path(__file__).resolve().parents[1] / "jobs" / "digits.yaml"
    return load_experiment(job, [f"{key}={value}" for key, value in overrides.items()])


def _digits_state(cfg, *, num_train_rows: int = 1437):
    """The kit's train state for `cfg` on one worker, and the digits as the job reads them
    (pixels / 16, not standardized), split 1437 / 360 by a seeded permutation."""
    from raytrain_kit.loop import InMemoryData, build_train_state

    x, y = digits_arrays()
    order = np.random.default_rng(0).permutation(len(y))
    x, y = (x[order] / 16.0).astype(np.float32), y[order].astype(np.int64)
    spec = DataSpec(num_features=64, num_classes=10, input_shape=(1, 8, 8), num_train_rows=num_train_rows,
                    num_val_rows=len(y) - num_train_rows)
    state = build_train_state(cfg, spec, rank=0, world_size=1, device=torch.device("cpu"))
    train, val = {"x": x[:num_train_rows], "y": y[:num_train_rows]}, {"x": x[num_train_rows:], "y": y[num_train_rows:]}
    return state, InMemoryData.from_arrays(state, train, val)


def test_the_range_test_on_the_kits_train_state_picks_a_rate_and_restores_everything():
    """The digits CNN on one worker at the job's global batch (64): the range test takes the
    run's own training steps, stops within 10 steps of the divergence, and leaves the weights,
    the optimizer (its moments, its rates, its schedule's base) and the RNG as they were."""
    from raytrain_kit.advise import smoothing_for
    from raytrain_kit.range_test import range_test

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        state, data = _digits_state(_digits_job(**{"scaling.num_workers": 1, "train.batch_size": 64}))
        before = ({k: v.clone() for k, v in state.model.state_dict().items()}, state.optimizer.state_dict(),
                  torch.get_rng_state())
        lrs = range_test_lrs(1e-6, 10.0, 200)
        losses = range_test(state, data, lrs)
    finally:
        torch.set_num_threads(threads)
    assert 0 < len(losses) < 200 and np.isfinite(losses[0]) and losses[0] > 2.0  # ~ln 10 at initialization
    suggestion = suggest_lr(lrs[:len(losses)], losses, beta=smoothing_for(200))
    assert len(losses) - 10 <= suggestion.stop < len(losses)  # stopped within a check of the divergence
    assert 1e-3 <= suggestion.lr <= 6e-3, suggestion.lr  # AdamW on this CNN: the job's own 3e-3 is in range
    assert min(losses[:suggestion.stop]) < 0.5 * losses[0]  # it learned on the way
    weights, optimizer, rng = before
    assert all(torch.equal(weights[k], v) for k, v in state.model.state_dict().items())
    assert state.optimizer.state_dict() == optimizer and not state.optimizer.state  # no moments left behind
    assert [g["lr"] for g in state.optimizer.param_groups] == [g["lr"] for g in optimizer["param_groups"]]
    assert torch.equal(torch.get_rng_state(), rng)


def _best_val_accuracy_of_the_kits_loop(cfg) -> float:
    """`cfg` trained by the kit's own loop (one worker, in this process): the best val_accuracy."""
    from raytrain_kit.loop import run_epochs

    state, data = _digits_state(cfg)
    return max(report.metrics.get("val_accuracy", 0.0) for report in run_epochs(state, data))


def _range_test_curve(num_steps: int, *, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """A loss that falls fastest at lr 1e-3 (in log lr), flattens, then diverges past lr 0.1."""
    lrs = range_test_lrs(1e-6, 1.0, num_steps)
    falling = 1.3 - np.tanh(2 * (np.log10(lrs) + 3))
    diverging = np.where(lrs > 0.1, 40 * (np.log10(lrs) + 1), 0.0)
    return lrs, falling + diverging + noise * np.random.default_rng(0).standard_normal(num_steps)


def test_range_test_rates_grow_geometrically_and_bad_ranges_are_refused():
    lrs = range_test_lrs(1e-5, 1e-1, 5)
    np.testing.assert_allclose(lrs, [1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    with pytest.raises(ValueError, match="0 < min_lr < max_lr"):
        range_test_lrs(1e-1, 1e-5, 10)


@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_the_pick_is_the_steepest_descent_before_the_divergence(noise):
    lrs, losses = _range_test_curve(300, noise=noise)
    suggestion = suggest_lr(lrs, losses)
    assert suggestion.lr == pytest.approx(1e-3, rel=0.1)  # the causal average alone would pick ~4e-3
    # It stops once the causal average passes 4x its minimum: past lr 0.1, where the loss turns.
    assert 0.1 < lrs[suggestion.stop] < 0.5 and len(suggestion.smoothed) == suggestion.stop
    # The divergence is not in what it picked from: the smoothed loss there stays below the start.
    assert suggestion.smoothed.max() <= suggestion.smoothed[0] + 0.5


def test_smoothing_is_bias_corrected_and_a_non_finite_loss_stops_the_test():
    assert smooth_losses([2.0, 2.0, 2.0]).tolist() == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0
    lrs, losses = _range_test_curve(300, noise=0.0)
    losses[200] = np.nan
    assert suggest_lr(lrs, losses).stop == 200
    losses[5] = np.inf
    with pytest.raises(ValueError, match="diverged after 5 of 300 steps .* start the range test at a lower"):
        suggest_lr(lrs, losses)


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as the kit trains them: pixels / 16, standardized per feature (a constant one
    keeps scale 1)."""
    x, y = digits_arrays()
    x = x / 16.0
    std = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))


def _deep_relu_mlp(scheme: str) -> nn.Module:
    cfg = build_experiment({"data": {"source": "digits"}, "model": {"kind": "mlp", "hidden": [64] * 30, "activation": "relu"},
                            "init": {"scheme": scheme, "std": 0.02}})
    return build_model(cfg, DataSpec(num_features=64, num_classes=10, input_shape=(64,), num_train_rows=1437,
                                     num_val_rows=360))


def _best_val_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int) -> tuple[float, float]:
    """SGD with momentum, as He et al. trained: (best validation accuracy, last training loss)."""
    order = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    (train_x, val_x), (train_y, val_y) = x.split([1437, 360]), y.split([1437, 360])
    best, loss = 0.0, torch.tensor(float("nan"))
    for _ in range(epochs):
        for rows in torch.randperm(len(train_x), generator=order).split(32):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(train_x[rows]), train_y[rows])
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            best = max(best, (model(val_x).argmax(dim=1) == val_y).float().mean().item())
    return best, loss.item()


def test_a_30_layer_relu_mlp_vanishes_under_xavier_and_small_normal_and_kaiming_is_recommended():
    """He et al. 2015 (section 2.2, Fig. 3): a ReLU halves the variance a layer passes on, which
    Xavier's 1/fan scale does not make up for: over 30 layers the gradient reaching the first
    layer is about 2^-15 of the last's, and the network does not learn. Kaiming's 2/fan does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is fastest, and the same on any machine
    try:
        _check_the_30_layer_case()
    finally:
        torch.set_num_threads(threads)


def _check_the_30_layer_case() -> None:
    torch.manual_seed(0)
    x, y = _digits()
    schemes = ["xavier_normal", "normal", "kaiming_normal", "kaiming_uniform"]
    diagnoses, recommended = diagnose_inits(_deep_relu_mlp, schemes, x[:256], y[:256], nn.functional.cross_entropy)
    verdicts = {d.scheme: d.verdict for d in diagnoses}
    assert verdicts == {"xavier_normal": "vanishing", "normal": "vanishing", "kaiming_normal": "healthy",
                        "kaiming_uniform": "healthy"}, {d.scheme: d.gradient_ratio for d in diagnoses}
    assert recommended.startswith("kaiming")
    xavier = next(d for d in diagnoses if d.scheme == "xavier_normal")
    assert len(xavier.stats) == 31 and xavier.gradient_ratio < 1e-3  # 30 hidden layers and the head
    # Forward too: Xavier's responses shrink layer by layer, Kaiming's keep their scale.
    kaiming = next(d for d in diagnoses if d.scheme == "kaiming_normal")
    assert xavier.stats[-2].activation_std < 1e-3 * xavier.stats[0].activation_std
    assert 0.1 < kaiming.stats[-2].activation_std / kaiming.stats[0].activation_std < 10

    # And the flagged scheme stalls where the recommended one learns.
    stalled, stalled_loss = _best_val_accuracy(_deep_relu_mlp("xavier_normal"), x, y, epochs=6)
    learned, _ = _best_val_accuracy(_deep_relu_mlp(recommended), x, y, epochs=6)
    assert stalled <= 0.15 and stalled_loss == pytest.approx(np.log(10), abs=0.05)  # chance, 10 classes
    assert learned >= 0.3


def test_a_shallow_network_is_healthy_under_any_scaled_scheme():
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    torch.manual_seed(0)
    stats = propagation_stats(model, torch.randn(64, 8), torch.randint(0, 3, (64,)), nn.functional.cross_entropy)
    assert [s.name for s in stats] == ["0", "2"] and all(s.gradient_rms > 0 for s in stats)
    assert judge_propagation(stats) == "healthy"


@pytest.mark.parametrize("optim", [{"name": "adamw"}, {"name": "adam"}, {"name": "sgd", "momentum": 0.9}, {"name": "sgd"},
                                   {"name": "adagrad"}, {"name": "rmsprop"}, {"name": "rmsprop", "momentum": 0.5}])
def test_the_planned_state_is_what_a_worker_holds_after_a_step(optim):
    """The plan against the kit's own measure (`parallel.state_bytes`, which the runs report as
    state_mb) on the built model and optimizer after one real step, byte for byte."""
    from raytrain_kit.advise import plan_state_bytes
    from raytrain_kit.optim import build_optimizer
    from raytrain_kit.parallel import state_bytes

    cfg = build_experiment({"data": {"source": "digits"}, "model": {"kind": "cnn"}, "optim": optim})
    model = build_model(cfg, DataSpec(num_features=64, num_classes=10, input_shape=(1, 8, 8), num_train_rows=1437,
                                      num_val_rows=360))
    optimizer = build_optimizer(model, cfg)
    x, y = _digits()
    nn.functional.cross_entropy(model(x[:32].view(-1, 1, 8, 8)), y[:32]).backward()
    optimizer.step()
    assert plan_state_bytes(model, cfg) == state_bytes(model, optimizer) > 0


def test_activation_bytes_are_what_autograd_keeps_counted_by_hand_and_scale_with_the_batch():
    from raytrain_kit.advise import plan_activation_bytes, saved_activation_bytes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    # Per row: the input (64 floats), the ReLU's output (128, which the second layer shares), the
    # log-softmax (10) and the int64 target; once: the loss's total weight (one float). Weights
    # are the state, not activations.
    per_row, fixed = 4 * (64 + 128 + 10) + 8, 4
    assert saved_activation_bytes(model, x[:32], y[:32], nn.functional.cross_entropy) == 32 * per_row + fixed
    assert plan_activation_bytes(model, x, y, nn.functional.cross_entropy, micro_batch=1000) == 1000 * per_row + fixed
    # A CNN: the plan from 16 and 32 rows is what 96 rows measure.
    cnn = build_model(build_experiment({"data": {"source": "digits"}, "model": {"kind": "cnn"}}),
                      DataSpec(num_features=64, num_classes=10, input_shape=(1, 8, 8), num_train_rows=1437, num_val_rows=360))
    images, labels = _digits()
    images = images.view(-1, 1, 8, 8)
    planned = plan_activation_bytes(cnn, images[:32], labels[:32], nn.functional.cross_entropy, micro_batch=96)
    assert planned == saved_activation_bytes(cnn, images[:96], labels[:96], nn.functional.cross_entropy) > 96 * 64 * 4


def test_the_strategy_plan_recommends_the_cheapest_that_fits_and_the_batch_that_would():
    from raytrain_kit.advise import plan_strategies

    gib = 2**30
    state = {"ddp": 12 * gib, "hsdp": 6 * gib, "fsdp": 3 * gib}  # 4 workers, hsdp in groups of 2
    working = {"hsdp": gib // 2, "fsdp": gib // 2}
    activations = {strategy: (2**20, 0) for strategy in state}
    plans, recommended = plan_strategies(state, working, activations=activations, micro_batch=1024,
                                         available_bytes=16 * gib)
    by_name = {p.strategy: p for p in plans}
    assert recommended == "hsdp"  # ddp needs 13 GiB, over 80% of 16
    assert by_name["ddp"].total_bytes == 13 * gib and not by_name["ddp"].fits
    assert by_name["hsdp"].total_bytes == 6 * gib + gib // 2 + gib and by_name["hsdp"].fits
    # ddp would fit with a micro-batch of (12.8 - 12) GiB / 1 MiB = 819 rows.
    assert by_name["ddp"].max_micro_batch == int((0.8 * 16 * gib - 12 * gib) // 2**20) == 819
    _, none = plan_strategies(state, working, activations=activations, micro_batch=1024, available_bytes=2 * gib)
    assert none is None
    # A model built whole on every worker before it is sharded (scaling.meta_init: false, or a
    # custom model that cannot be built on the meta device) needs all of it at the start: 14 GiB
    # does not fit 80% of 16 whatever the micro-batch, so fsdp is recommended instead.
    build = {"ddp": 3 * gib, "hsdp": 14 * gib, "fsdp": 3 * gib // 4}
    plans, recommended = plan_strategies(state, working, activations=activations, micro_batch=1024,
                                         available_bytes=16 * gib, build_bytes=build)
    by_name = {p.strategy: p for p in plans}
    assert recommended == "fsdp" and by_name["hsdp"].build_bytes == 14 * gib
    assert not by_name["hsdp"].fits and by_name["hsdp"].max_micro_batch == 0


def test_the_build_peak_is_the_whole_model_or_a_shard_and_one_module():
    from raytrain_kit.advisor import build_bytes

    spec = DataSpec(num_features=64, num_classes=12, input_shape=(64,), num_train_rows=100, num_val_rows=10)
    cfg = build_experiment({"model": {"kind": "mlp", "hidden": [256, 128]},
                            "scaling": {"num_workers": 4, "strategy": "fsdp"}})
    model = build_model(cfg, spec)
    whole = (64 * 256 + 256 + 256 * 128 + 128 + 128 * 12 + 12) * 4  # every dim 0 divides by 4: even shards
    largest = (256 * 128 + 128) * 4
    assert build_bytes(model, cfg, spec, "ddp", num_shards=1) == whole
    # built on the meta device: the worker's quarter, plus one module's full tensors and its chunk of them
    assert build_bytes(model, cfg, spec, "fsdp", num_shards=4) == whole // 4 + largest + largest // 4
    # built whole, then sharded: the model, and the quarter fully_shard copies out of a module
    # before its full tensors go
    whole_first = with_overrides(cfg, {"scaling.meta_init": False})
    assert build_bytes(model, whole_first, spec, "fsdp", num_shards=4) == whole + largest // 4


def test_advice_png_draws_the_range_test_and_the_propagation(tmp_path):
    from PIL import Image

    from raytrain_kit.advise import draw_advice

    lrs, losses = _range_test_curve(300, noise=0.1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    torch.manual_seed(0)
    diagnoses, _ = diagnose_inits(lambda scheme: model, ["default"], torch.randn(32, 8), torch.randint(0, 3, (32,)),
                                  nn.functional.cross_entropy)
    path = draw_advice(str(tmp_path), lrs=lrs, losses=losses, suggestion=suggest_lr(lrs, losses), diagnoses=diagnoses)
    image = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    assert path == str(tmp_path / "advice.png") and image.shape[1] > 2 * image.shape[0] > 400  # two panels side by side
    assert image.std() > 20  # decodes, and is not blank


def test_advise_on_the_main_job_prints_its_verdicts_and_writes_a_patch_train_accepts(ray_session, tmp_path, capsys):
    """Issue 21's must-show on jobs/digits.yaml: the range test on its 2 DDP workers and on 1
    worker at the same global batch pick rates within 2x of each other; the pick trains the job
    (the kit's own loop at that global batch) to >= 0.97; --set takes advice.yaml unchanged."""
    from pathlib import Path

    import yaml
    from PIL import Image

    from raytrain_kit.advisor import SCHEMES
    from raytrain_kit.cli import main

    job = Path(__file__).resolve().parents[1] / "jobs" / "digits.yaml"
    out, out_1 = tmp_path / "advice", tmp_path / "advice_1"
    assert main(["advise", str(job), "--set", f"run.storage_path={tmp_path / 'runs'}", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    patch = yaml.safe_load((out / "advice.yaml").read_text())
    assert set(patch) == {"optim.lr", "init.scheme", "scaling.strategy"} and patch["init.scheme"] in SCHEMES
    assert patch["scaling.strategy"] == "ddp"  # the digits CNN fits any worker whole: the least communication
    sets = f"--set optim.lr={patch['optim.lr']} --set init.scheme={patch['init.scheme']} --set scaling.strategy=ddp"
    assert f"wrote {out}/advice.yaml: {sets}" in printed
    assert "on 2 worker(s), global batch 64" in printed and f"recommended: {patch['optim.lr']:g}" in printed
    assert all(scheme in printed for scheme in SCHEMES) and "recommended: ddp" in printed
    assert np.asarray(Image.open(out / "advice.png").convert("L"), dtype=np.float64).std() > 20
    assert sorted(p.name for p in out.iterdir()) == ["advice.png", "advice.yaml"]  # Ray Train's records removed
    cfg = _digits_job(**patch)  # --set takes it unchanged
    assert (cfg.optim.lr, cfg.init.scheme, cfg.scaling.strategy) == (patch["optim.lr"], patch["init.scheme"], "ddp")
    assert not (tmp_path / "runs").exists()  # no run was started

    assert main(["advise", str(job), "--only", "lr", "--set", "scaling.num_workers=1", "--set", "train.batch_size=64",
                 "--out", str(out_1)]) == 0
    assert "on 1 worker(s), global batch 64" in capsys.readouterr().out
    lr_1 = yaml.safe_load((out_1 / "advice.yaml").read_text())["optim.lr"]
    assert 0.5 <= lr_1 / patch["optim.lr"] <= 2.0, (lr_1, patch["optim.lr"])  # the loss all-reduced: DDP-correct

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        accuracy = _best_val_accuracy_of_the_kits_loop(_digits_job(**patch, **{"scaling.num_workers": 1,
                                                                               "train.batch_size": 64}))
    finally:
        torch.set_num_threads(threads)
    assert accuracy >= 0.97, accuracy

    assert main(["advise", str(job), "--set", "model.kind=transformer"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model.kind:"), err
    assert main(["advise", str(job), "--lr-range", "1", "0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --lr-range/--lr-steps: a range test needs 0 < MIN < MAX and 2 or more steps "
                   "(got --lr-range 1 0.1 --lr-steps 200)"]
    assert main(["advise", str(job), "--only", "bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --only: invalid choice: 'bogus'"), err


def test_the_cli_defaults_of_the_range_test_are_the_advisors():
    from raytrain_kit.advisor import LR_RANGE, LR_STEPS
    from raytrain_kit.cli import build_parser

    args = build_parser().parse_args(["advise", "jobs/digits.yaml"])
    assert (tuple(args.lr_range), args.lr_steps) == (LR_RANGE, LR_STEPS)


def test_the_memory_plan_is_the_profilers_peak_of_a_step_with_accumulated_gradients():
    """One worker, 2 micro-batches a step: autograd computes each weight's gradient of the second
    micro-batch as a new tensor before adding it into the kept one, the plan's working bytes (the
    largest weight's gradient). Measured: PyTorch's profiler, every CPU allocation and free from
    before the model is built to the end of the second step, summed; its peak in that step."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from raytrain_kit.advise import profiled_peak_bytes
    from raytrain_kit.advisor import _memory_part
    from raytrain_kit.loop import build_train_state
    from raytrain_kit.steps import build_loss_fn, train_epoch

    cfg = build_experiment({"data": {"source": "synthetic", "num_features": 128}, "model": {"kind": "mlp", "hidden": [512] * 3},
                            "optim": {"name": "adamw"}, "train": {"batch_size": 64, "grad_accum_steps": 2},
                            "scaling": {"num_workers": 1}})
    spec = DataSpec(num_features=128, num_classes=10, input_shape=(128,), num_train_rows=1024, num_val_rows=64)
    x, y = torch.rand(128, 128, generator=torch.Generator().manual_seed(0)), torch.arange(128) % 10
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        state = build_train_state(cfg, spec, rank=0, world_size=1, device=torch.device("cpu"))
        for step in range(2):
            with record_function(f"step{step}"):
                train_epoch(state.module, [(x[:64], y[:64]), (x[64:], y[64:])], cfg=cfg, optimizer=state.optimizer,
                            scheduler=state.scheduler, penalty_model=state.model)
    peak = profiled_peak_bytes(prof, "step1")
    plan = next(p for p in _memory_part(cfg, spec, x[:64], y[:64], build_loss_fn(classification=True), 1 << 40)["plans"]
                if p["strategy"] == "ddp")
    assert plan["working_bytes"] == 512 * 512 * 4  # the largest weight's gradient
    assert plan["state_bytes"] < peak and abs(plan["total_bytes"] / peak - 1) < 0.1, (plan, peak)
