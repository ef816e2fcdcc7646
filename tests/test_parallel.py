"""ddp, fsdp and hsdp give the same training, step for step; gradient accumulation equals the
larger batch; sharded checkpoints resume on other worker counts and export to a plain state_dict."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from raytrain_kit.config import build_experiment, load_experiment, with_overrides
from raytrain_kit.data import DataSpec
from raytrain_kit.errors import ConfigError
from raytrain_kit.launch import fit
from raytrain_kit.models import build_model
from raytrain_kit.tracking import STEPS_CSV
from raytrain_kit.steps import evaluate, in_memory_batches

REPO = Path(__file__).resolve().parents[1]
NUM_FEATURES, NUM_CLASSES, NUM_ROWS, NUM_VAL_ROWS, GLOBAL_BATCH = 6, 3, 192, 42, 16


def _rows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((NUM_ROWS + NUM_VAL_ROWS, NUM_FEATURES)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64)
    return x, y


def laid_out_for(num_workers: int) -> list[int]:
    """Row order that gives `num_workers` workers (each taking one contiguous block of the data,
    reading it in order) the same global batches as one process reading rows 0, 1, 2, ...:
    block r holds, at its batch i, rows [i*G + r*b, i*G + (r+1)*b) of the global order."""
    b = GLOBAL_BATCH // num_workers
    return [i * GLOBAL_BATCH + r * b + j for r in range(num_workers)
            for i in range(NUM_ROWS // GLOBAL_BATCH) for j in range(b)]


def _datasets(num_workers: int):
    import ray

    x, y = _rows()
    order = laid_out_for(num_workers)
    train = [{"x": x[i], "y": int(y[i])} for i in order]
    val = [{"x": x[i], "y": int(y[i])} for i in range(NUM_ROWS, NUM_ROWS + NUM_VAL_ROWS)]
    spec = DataSpec(num_features=NUM_FEATURES, num_classes=NUM_CLASSES, input_shape=(NUM_FEATURES,),
                    num_train_rows=NUM_ROWS, num_val_rows=NUM_VAL_ROWS)
    # One block per worker: the equal split hands block k to worker k.
    return {"train": ray.data.from_items(train, override_num_blocks=num_workers),
            "val": ray.data.from_items(val, override_num_blocks=num_workers)}, spec


def _config(storage: str, name: str, *, num_workers: int, strategy: str = "ddp", epochs: int = 3,
            accum: int = 1, **scaling):
    return build_experiment({
        "data": {"source": "synthetic", "shuffle": False},
        "model": {"kind": "mlp", "hidden": [32, 32]}, "init": {"scheme": "xavier_uniform"},
        "optim": {"name": "adamw", "lr": 0.01},
        "schedule": {"kind": "exponential", "decay_steps": 10, "decay_rate": 0.7, "warmup_steps": 3},
        "regularization": {"l2": 1e-3, "weight_decay": 1e-2, "grad_clip_norm": 1.0},
        "train": {"epochs": epochs, "batch_size": GLOBAL_BATCH // num_workers // accum, "grad_accum_steps": accum},
        "scaling": {"num_workers": num_workers, "strategy": strategy, "cpus_per_worker": 2 / max(num_workers, 2),
                    "max_failures": 0, **scaling},
        "checkpoint": {"keep": 3}, "preflight": {"enabled": False}, "tracking": {"tensorboard": False},
        "run": {"name": name, "storage_path": storage}})


def step_losses(run_dir: str, *, first_step: int = 1) -> list[float]:
    """The run's steps.csv: the mean loss of every optimizer step, in order from `first_step`."""
    with open(Path(run_dir) / STEPS_CSV) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(first_step, first_step + len(rows)))
    return [float(r["train_loss"]) for r in rows]


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    """Every strategy on the same data, model, seed and global batch of 16 (3 epochs, 36 steps)."""
    storage = str(tmp_path_factory.mktemp("parallel") / "runs")
    plans = {
        "single": dict(num_workers=1, epochs=4),
        "ddp": dict(num_workers=2),
        "fsdp": dict(num_workers=2, strategy="fsdp"),
        "hsdp": dict(num_workers=4, strategy="hsdp", shard_group_size=2),
        "ddp_accum": dict(num_workers=2, accum=2),
        "fsdp_accum": dict(num_workers=2, strategy="fsdp", accum=2),
    }
    out = {"storage": storage}
    for name, plan in plans.items():
        cfg = _config(storage, name, **plan)
        out[name] = fit(cfg, datasets_and_spec=_datasets(plan["num_workers"]))
        out[name]["cfg"] = cfg
    return out


def test_every_strategy_takes_the_same_steps(runs):
    """fsdp and hsdp workers build the model on the meta device (scaling.meta_init, the default)
    and create only their shards; with one process's initial weights they take its steps."""
    from raytrain_kit.materialize import build_on_meta

    for name in ("fsdp", "hsdp", "fsdp_accum"):
        cfg = runs[name]["cfg"]
        assert cfg.scaling.meta_init and build_on_meta(cfg, _datasets(1)[1])[1] is None, name
    reference = step_losses(runs["single"]["run_dir"])
    assert len(reference) == 4 * NUM_ROWS // GLOBAL_BATCH
    assert reference[35] < 0.8 * reference[0]  # it learns: the comparison is not of constants
    for name in ("ddp", "fsdp", "hsdp", "ddp_accum", "fsdp_accum"):
        losses = step_losses(runs[name]["run_dir"])
        assert len(losses) == 36, name
        np.testing.assert_allclose(losses, reference[:36], rtol=1e-5, err_msg=name)
        # Epoch figures agree as well: validation runs on differently split pieces (42 rows).
        for mine, theirs in zip(runs[name]["history"], runs["single"]["history"]):
            assert mine["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-4), name
            assert mine["step"] == theirs["step"], name


def test_fsdp_shards_what_each_worker_holds(runs):
    ddp, fsdp, hsdp = (runs[n]["history"][-1] for n in ("ddp", "fsdp", "hsdp"))
    # Parameters, gradients and AdamW's two moments: fsdp holds about half of ddp's per worker;
    # hsdp shards within groups of 2, so it holds as much as fsdp on 2 workers.
    assert fsdp["state_mb"] <= 0.55 * ddp["state_mb"]
    assert hsdp["state_mb"] == pytest.approx(fsdp["state_mb"], rel=0.05)
    # `advise`'s memory plan of the same: every tensor whole, or its dim-0 shard, to the byte
    # (state_mb is rounded to 1e-4 MB).
    from raytrain_kit.advise import plan_state_bytes

    model = build_model(runs["fsdp"]["cfg"], _datasets(1)[1])
    for shards, measured in ((1, ddp), (2, fsdp), (2, hsdp)):
        assert measured["state_mb"] == pytest.approx(plan_state_bytes(model, runs["fsdp"]["cfg"], num_shards=shards) / 2**20,
                                                     abs=1e-4), shards


def test_export_gives_a_plain_state_dict_with_the_same_validation_loss(runs, tmp_path):
    from raytrain_kit.launch import export_run

    fsdp = runs["fsdp"]
    out = tmp_path / "exported" / "model.pt"
    used, num_parameters = export_run(fsdp["run_dir"], str(out))
    assert used == fsdp["checkpoint"]
    state = torch.load(out, weights_only=True)
    _, spec = _datasets(1)
    model = build_model(fsdp["cfg"], spec)
    assert num_parameters == sum(p.numel() for p in model.parameters())
    model.load_state_dict(state)  # strict: the same names and shapes as build_model's
    x, y = _rows()
    val = evaluate(model, in_memory_batches(torch.from_numpy(x[NUM_ROWS:]), torch.from_numpy(y[NUM_ROWS:]), batch_size=64),
                   classification=True)
    epoch = int(Path(used).name.rsplit("_", 1)[1])
    assert val.loss / val.samples == pytest.approx(fsdp["history"][epoch - 1]["val_loss"], rel=1e-5)


def test_sharded_checkpoint_resumes_on_one_and_on_four_workers(runs):
    """The fsdp run's epoch-3 checkpoint, written by 2 workers, goes on for a 4th epoch on 1
    worker and on 4 (and under ddp): each continues exactly as the single process's
    uninterrupted 4th epoch."""
    from raytrain_kit.launch import TrialLink, checkpoint_dirs

    fsdp = runs["fsdp"]
    checkpoint = checkpoint_dirs(fsdp["run_dir"])[3]
    assert sorted(p.name for p in Path(checkpoint, "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    reference = step_losses(runs["single"]["run_dir"])[36:]
    one = fit(_config(runs["storage"], "fsdp_on_1", num_workers=1, strategy="fsdp", epochs=4),
              datasets_and_spec=_datasets(1), trial=TrialLink(init_checkpoint=checkpoint))
    four = fit(with_overrides(fsdp["cfg"], {"scaling.num_workers": 4, "train.batch_size": 4, "train.epochs": 4,
                                            "scaling.cpus_per_worker": 0.5}),
               datasets_and_spec=_datasets(4), resume=True)
    # A ddp run reads the whole tensors out of the same shards.
    ddp = fit(_config(runs["storage"], "ddp_from_fsdp", num_workers=2, epochs=4), datasets_and_spec=_datasets(2),
              trial=TrialLink(init_checkpoint=checkpoint))
    # The clone records only the steps it took; the resumed run keeps its first three epochs'.
    for summary, first_step in ((one, 37), (four, 1), (ddp, 37)):
        assert [h["epoch"] for h in summary["history"]] == [1, 2, 3, 4]
        assert summary["history"][-1]["step"] == 48
        np.testing.assert_allclose(step_losses(summary["run_dir"], first_step=first_step)[-12:], reference, rtol=1e-4)
        assert summary["history"][-1]["val_loss"] == pytest.approx(runs["single"]["history"][-1]["val_loss"], rel=1e-4)
    # The other way is refused before launch: ddp's whole-tensor checkpoints cannot feed shards.
    with pytest.raises(ConfigError, match="scaling.strategy: run 'ddp' was checkpointed by strategy ddp"):
        fit(with_overrides(runs["ddp"]["cfg"], {"scaling.strategy": "fsdp"}), datasets_and_spec=_datasets(2), resume=True)


def test_bf16_on_cpu_trains_the_main_job_past_its_bar(ray_session, tmp_path):
    """jobs/digits.yaml (2 ddp workers) with bf16 autocast reaches the spine's bar of 0.95."""
    cfg = load_experiment(REPO / "jobs/digits.yaml", ["train.precision=bf16", f"run.storage_path={tmp_path}",
                                                      "tracking.tensorboard=false"])
    summary = fit(cfg)
    assert summary["status"] == "finished" and summary["epochs_completed"] == 15
    assert summary["final_metrics"]["val_accuracy"] >= 0.95


def test_precision_casts_where_each_strategy_expects():
    from raytrain_kit.parallel import autocast

    x, layer, cpu = torch.randn(4, 3), torch.nn.Linear(3, 2), torch.device("cpu")
    with autocast(build_experiment({"train": {"precision": "bf16"}}), cpu):
        assert layer(x).dtype == torch.bfloat16  # ddp: autocast around forward
    with autocast(build_experiment({"train": {"precision": "bf16"}, "scaling": {"strategy": "fsdp"}}), cpu):
        assert layer(x).dtype == torch.float32  # fsdp: FSDP2's policy casts the gathered weights instead
    with autocast(build_experiment({}), cpu):
        assert layer(x).dtype == torch.float32


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_every_rank_evaluates_the_checkpointed_batchnorm_statistics(ray_session, tmp_path, strategy):
    """Issue case: with 2 DDP workers rank 1 evaluated its own BatchNorm running mean (up to 0.035
    from rank 0's, the checkpoint's), so val metrics averaged two models while one was saved."""
    import json

    from raytrain_kit.launch import export_run

    records = tmp_path / "records"
    records.mkdir()
    cfg = with_overrides(_config(str(tmp_path / "runs"), f"bn_{strategy}", num_workers=2, strategy=strategy, epochs=2),
                         {"model.kind": "custom", "model.target": "test_models_lib:build_batchnorm_mlp",
                          "model.kwargs": {"record_dir": str(records)},
                          # Histograms gather a root-sharded model's weights before the checkpoint.
                          "tracking.tensorboard": True})
    datasets, spec = _datasets(2)
    result = fit(cfg, datasets_and_spec=(datasets, spec))
    exported = tmp_path / "model.pt"
    used, num_parameters = export_run(result["run_dir"], str(exported))
    assert used.endswith("checkpoint_epoch_0002")
    state = torch.load(exported, weights_only=True)
    # Parameters, not the running statistics the state dict holds beside them.
    from test_models_lib import build_batchnorm_mlp

    assert num_parameters == sum(p.numel() for p in build_batchnorm_mlp(spec, record_dir=str(records)).parameters())
    assert num_parameters < sum(t.numel() for t in state.values() if t.is_floating_point())

    def last_evaluation(rank: int) -> dict:
        return json.loads((records / f"rank{rank}.jsonl").read_text().splitlines()[-1])

    for rank in (0, 1):
        seen = last_evaluation(rank)
        assert torch.equal(torch.tensor(seen["running_mean"]), state["net.2.running_mean"]), rank
        assert torch.equal(torch.tensor(seen["running_var"]), state["net.2.running_var"]), rank
        assert seen["num_batches_tracked"] == int(state["net.2.num_batches_tracked"]) == 2 * NUM_ROWS // GLOBAL_BATCH

    _, spec = _datasets(1)
    model = build_model(with_overrides(cfg, {"model.kwargs": {}}), spec)
    model.load_state_dict(state)
    x, y = _rows()
    val = evaluate(model, in_memory_batches(torch.from_numpy(x[NUM_ROWS:]), torch.from_numpy(y[NUM_ROWS:]), batch_size=64),
                   classification=True)
    assert result["history"][-1]["val_loss"] == pytest.approx(val.loss / val.samples, rel=1e-6)
    assert result["history"][-1]["val_accuracy"] == val.correct / val.samples


def test_sync_batchnorm_converts_on_gpus_and_is_refused_on_cpu():
    from raytrain_kit.parallel import convert_sync_batchnorm

    with pytest.raises(ConfigError, match=r"model.sync_batchnorm: torch's SyncBatchNorm runs on GPUs only"):
        build_experiment({"model": {"sync_batchnorm": True}})
    cfg = build_experiment({"model": {"sync_batchnorm": True}, "scaling": {"use_gpu": True, "num_workers": 2}})
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    names = [n for n, _ in model.state_dict().items()]
    converted = convert_sync_batchnorm(model, cfg, world_size=2)
    assert isinstance(converted[1], nn.SyncBatchNorm) and list(converted.state_dict()) == names
    assert isinstance(convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(8)), cfg, world_size=1)[0], nn.BatchNorm1d)
