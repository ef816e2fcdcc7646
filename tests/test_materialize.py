"""Sharded from birth: fsdp/hsdp workers built on the meta device hold, bit for bit, the initial
weights one process builds from the same seed, and never the whole model; models that cannot be
built so are named with the reason. Two and four real gloo processes (torch.multiprocessing, no
Ray: the training runs on Ray are tests/test_parallel.py's, whose fsdp and hsdp runs use this)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raytrain_kit.advisor import build_bytes
from raytrain_kit.config import build_experiment
from raytrain_kit.data import DataSpec
from raytrain_kit.errors import ConfigError
from raytrain_kit.materialize import build_on_meta, build_worker_model
from raytrain_kit.models import build_model

TABLE = DataSpec(num_features=12, num_classes=3, input_shape=(12,), num_train_rows=64, num_val_rows=8)
IMAGES = DataSpec(num_features=64, num_classes=10, input_shape=(1, 8, 8), num_train_rows=64, num_val_rows=8)

# (name, model section, init scheme, spec): every built-in kind, the scheme that leaves torch's
# constructors' values (default), and a custom model with a drawn 1-dim parameter and BatchNorm.
CASES = [
    ("mlp_xavier", {"kind": "mlp", "hidden": [40, 24], "dropout": 0.1}, "xavier_uniform", TABLE),
    ("mlp_default", {"kind": "mlp", "hidden": [40, 24]}, "default", TABLE),
    ("cnn_kaiming", {"kind": "cnn", "channels": [8, 16], "hidden": [32]}, "kaiming_normal", IMAGES),
    ("cnn_orthogonal", {"kind": "cnn", "channels": [8], "hidden": [16]}, "orthogonal", IMAGES),
    ("lstm_truncated", {"kind": "rnn", "cell": "lstm", "hidden_size": 10, "num_layers": 2}, "truncated_normal", IMAGES),
    ("custom_scaled", {"kind": "custom", "target": "test_models_lib:build_scaled_mlp"}, "kaiming_uniform", TABLE),
]


def _experiment(model: dict, scheme: str, *, strategy: str = "fsdp", num_workers: int = 2, seed: int = 11, **scaling):
    return build_experiment({"model": model, "init": {"scheme": scheme}, "train": {"seed": seed},
                             "scaling": {"num_workers": num_workers, "strategy": strategy, **scaling}})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world_size: int, *args) -> None:
    port = _free_port()
    mp.spawn(fn, args=(world_size, port, *args), nprocs=world_size, join=True)


def _join(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def _compare_with_one_process(rank: int, world_size: int, port: int, cases: list, scaling: dict, out: str) -> None:
    _join(rank, world_size, port)
    try:
        lines = []
        for name, model_section, scheme, spec in cases:
            cfg = _experiment(model_section, scheme, num_workers=world_size, **scaling)
            # A worker seeds its own dropout stream before building (loop.build_train_state): the
            # build must leave the generator where it was, as build_model does.
            torch.manual_seed(100 + rank)
            before = torch.get_rng_state()
            model, module = build_worker_model(cfg, spec, world_size=world_size, device=torch.device("cpu"))
            lines.append(f"{name} generator {'equal' if torch.equal(before, torch.get_rng_state()) else 'DIFFERENT'}")
            reference = build_model(cfg, spec).state_dict()
            for key, value in model.state_dict().items():
                full = value.full_tensor() if hasattr(value, "full_tensor") else value
                same = full.dtype == reference[key].dtype and torch.equal(full, reference[key])
                lines.append(f"{name} {key} {type(value).__name__} {'equal' if same else 'DIFFERENT'}")
            assert module is model
        if rank == 0:
            with open(out, "w") as f:
                f.write("\n".join(lines))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("scaling", [{"strategy": "fsdp", "num_workers": 2},
                                     {"strategy": "hsdp", "num_workers": 4, "shard_group_size": 2}],
                         ids=["fsdp_2", "hsdp_2x2"])
def test_sharded_workers_start_from_one_process_weights_bit_for_bit(tmp_path, scaling):
    out = str(tmp_path / "compare.txt")
    world_size = scaling.pop("num_workers")
    _spawn(_compare_with_one_process, world_size, CASES, scaling, out)
    lines = open(out).read().splitlines()
    # Every case's every tensor was compared, its parameters as sharded DTensors.
    for name, *_ in CASES:
        mine = [line for line in lines if line.startswith(name + " ")]
        assert mine and any(" DTensor " in line for line in mine), name
    assert any("custom_scaled net.2.running_var Tensor" in line or ".running_var Tensor" in line for line in lines)
    assert [line for line in lines if line.endswith("DIFFERENT")] == []


def _profile_build(rank: int, world_size: int, port: int, model_section: dict, meta_init: bool, out: str) -> None:
    from raytrain_kit.advise import profiled_peak_bytes
    from raytrain_kit.parallel import local_tensor

    _join(rank, world_size, port)
    try:
        cfg = _experiment(model_section, "xavier_uniform", num_workers=world_size, meta_init=meta_init)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            with torch.profiler.record_function("build"):
                model, _ = build_worker_model(cfg, TABLE, world_size=world_size, device=torch.device("cpu"))
        kept = sum(local_tensor(p).numel() * 4 for p in model.parameters())
        if rank == 0:
            with open(out, "w") as f:
                f.write(f"{profiled_peak_bytes(prof, 'build')} {kept}")
    finally:
        dist.destroy_process_group()


def test_a_meta_built_worker_never_holds_the_whole_model(tmp_path):
    """Eight 512x512 layers (8.4 MB of fp32 weights) on 2 workers: built on the meta device, a
    worker's tensor peak is its half plus one layer's full weights (1 MB) and its chunk of them;
    built whole, it is the whole model."""
    section = {"kind": "mlp", "hidden": [512] * 8}
    model_bytes = sum(p.numel() * 4 for p in build_model(_experiment(section, "xavier_uniform"), TABLE).parameters())
    layer_bytes = (512 * 512 + 512) * 4
    peaks = {}
    for meta_init in (True, False):
        out = str(tmp_path / f"{meta_init}.txt")
        _spawn(_profile_build, 2, section, meta_init, out)
        peaks[meta_init], kept = map(int, open(out).read().split())
        assert kept == pytest.approx(model_bytes / 2, rel=0.01)
    # measured 5.32 MB of 7.39: the half, one layer's full weights and the rank's chunk of them
    # (distribute_tensor's copy) before it lands in the shard
    assert peaks[True] <= model_bytes / 2 + 1.6 * layer_bytes
    assert peaks[False] >= model_bytes
    # advise's plan of the build (advisor.build_bytes) is what the profiler measures
    for meta_init, peak in peaks.items():
        cfg = _experiment(section, "xavier_uniform", meta_init=meta_init)
        planned = build_bytes(build_model(cfg, TABLE), cfg, TABLE, "fsdp", num_shards=2)
        assert peak == pytest.approx(planned, rel=0.05), meta_init


@pytest.mark.parametrize("target,reason", [
    ("test_models_lib:build_raw_weight_mlp", "2 (RawWeight) has no reset_parameters() to re-create its tensors"),
    ("test_models_lib:build_cpu_pinned_mlp", "1.weight is created on cpu, not on the device being built on"),
    ("test_models_lib:build_tied_mlp", "5.weight is shared with 3"),
    ("test_models_lib:build_data_dependent_mlp", "the model cannot be built on the meta device (RuntimeError: "),
])
def test_a_custom_model_that_cannot_be_built_on_meta_is_named_with_the_reason(target, reason):
    model, blocker = build_on_meta(_experiment({"kind": "custom", "target": target}, "default"), TABLE)
    assert model is None and blocker.startswith(reason)


def test_a_custom_model_that_can_is_built_on_meta_and_a_bad_target_is_still_a_config_error():
    model, blocker = build_on_meta(_experiment({"kind": "custom", "target": "test_models_lib:build_scaled_mlp"},
                                               "default"), TABLE)
    assert blocker is None and all(p.is_meta for p in model.parameters())
    with pytest.raises(ConfigError, match="model.target: cannot import 'no_such_module_xyz:build'"):
        build_on_meta(_experiment({"kind": "custom", "target": "no_such_module_xyz:build"}, "default"), TABLE)


def _fallback(rank: int, world_size: int, port: int, out: str) -> None:
    _join(rank, world_size, port)
    try:
        cfg = _experiment({"kind": "custom", "target": "test_models_lib:build_raw_weight_mlp"}, "default")
        model, _ = build_worker_model(cfg, TABLE, world_size=world_size, device=torch.device("cpu"))
        reference = build_model(cfg, TABLE).state_dict()
        same = all(torch.equal(v.full_tensor(), reference[k]) for k, v in model.state_dict().items())
        if rank == 0:
            with open(out, "w") as f:
                f.write(str(same))
    finally:
        dist.destroy_process_group()


def test_a_model_that_cannot_be_built_on_meta_is_built_whole_and_sharded_with_the_same_values(tmp_path):
    out = str(tmp_path / "fallback.txt")
    _spawn(_fallback, 2, out)
    assert open(out).read() == "True"
