"""Sweeps: bad sweep configs fail before any trial, folds, resource plans, and real Ray Tune sweeps
(ASHA frees every CPU, best.yaml trains to the best trial's metric, CV reports per-fold metrics)."""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from raytrain_kit.cli import main
from raytrain_kit.config import build_experiment, load_experiment
from raytrain_kit.data import assign_folds, build_datasets, build_folds, row_keys
from raytrain_kit.errors import ConfigError
from raytrain_kit.launch import fit
from raytrain_kit.optim import build_optimizer, build_scheduler
from raytrain_kit.sweep import aggregate_folds, gate_epochs, plan_resources, run_sweep
from raytrain_kit.loop import apply_hyperparameters
from records import assert_picture

REPO = Path(__file__).resolve().parents[1]
SPACE = {"optim.lr": {"loguniform": [1.0e-3, 3.0e-2]}}
SMALL = {"data": {"source": "digits"}, "model": {"kind": "mlp", "hidden": [32]}, "train": {"epochs": 3, "batch_size": 64},
         "preflight": {"enabled": False}, "checkpoint": {"every_epochs": 1, "keep": 2}}


# ---------------------------------------------------------------------------------------------
# Bad sweep configs: exit 2, one line, before any trial (no Ray, no sweep directory)


@pytest.mark.parametrize("tune, expected", [
    ({"space": {"optim.lrr": {"loguniform": [1e-4, 1e-1]}}}, "tune.space.optim.lrr: unknown key; did you mean 'optim.lr'?"),
    ({"space": {"init.scheme": {"choice": []}}}, "tune.space.init.scheme: choice: the list is empty"),
    ({"space": {"optim.lr": {"loguniform": [0.1, 0.001]}}}, "tune.space.optim.lr: loguniform: lower 0.1 must be below upper 0.001"),
    ({"space": {"model.dropout": {"uniform": [0.5, 0.2]}}}, "tune.space.model.dropout: uniform: lower 0.5 must be below upper 0.2"),
    ({"space": SPACE, "metric": "val_f1"}, "tune.metric: Input should be 'val_loss', 'val_accuracy', 'train_loss' or 'train_accuracy'"),
    ({"space": SPACE, "metric": "val_accuracy"}, "tune.metric: val_accuracy is not reported for data.task: regression"),
    ({"space": {"init.scheme": {"choice": ["he", "orthogonal"]}}}, "tune.space.init.scheme: choice value 'he' makes an invalid experiment"),
    ({"space": {"data.val_fraction": {"uniform": [0.1, 0.3]}}}, "tune.space.data.val_fraction: data.* cannot be searched"),
    ({"space": {"optim.lr": {"lognormal": [1, 2]}}}, "tune.space.optim.lr.lognormal: unknown key"),
    ({"space": {}}, "tune.space: empty"),
    ({"space": SPACE, "search": "grid"}, "tune.space.optim.lr: search grid enumerates values"),
    ({"space": SPACE, "scheduler": "pbt", "cv_folds": 3}, "tune.cv_folds: not supported with scheduler pbt"),
    ({"space": {"train.batch_size": {"uniform": [16, 64]}}},
     "tune.space.train.batch_size: is an integer key; uniform samples fractions (every trial would fail at set-up); "
     "use randint: [lower, upper), choice: [...] or grid: [...]"),
    ({"space": {"model.hidden_size": {"loguniform": [16, 256]}}}, "tune.space.model.hidden_size: is an integer key; loguniform"),
])
def test_bad_sweep_config_exits_2_before_any_trial(tmp_path, capsys, tune, expected):
    regression = "regression" in expected
    data = {"source": "synthetic", "num_classes": 0, "task": "regression"} if regression else {"source": "digits"}
    config = tmp_path / "bad_sweep.yaml"
    config.write_text(yaml.safe_dump({"data": data, "run": {"storage_path": str(tmp_path / "runs")}, "tune": tune}))
    assert main(["tune", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "runs").exists()


def test_tune_without_tune_section_names_the_remedy(tmp_path, capsys):
    config = tmp_path / "plain.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    assert main(["tune", str(config)]) == 2
    assert "no tune section; add tune.space" in capsys.readouterr().err


def test_shipped_sweeps_validate():
    for name, keys in (("sweep_digits", {"optim.lr", "init.scheme", "regularization.l2"}),
                       ("sweep_digits_cv", {"regularization.l1", "regularization.l2", "model.dropout"})):
        cfg = load_experiment(REPO / "jobs" / f"{name}.yaml")
        assert set(cfg.tune.space) == keys
    assert load_experiment(REPO / "jobs/sweep_digits.yaml").tune.num_samples >= 16
    assert load_experiment(REPO / "jobs/sweep_digits_cv.yaml").tune.cv_folds == 3


# ---------------------------------------------------------------------------------------------
# Pure parts: fold assignment, fold aggregation, resource plans, PBT's hyperparameter hand-over


def test_tune_skips_its_callback_census_only_while_the_sweep_runs():
    """Ray Tune's usage telemetry imports Ray's MLflow, W&B, Comet and Aim integrations (and
    mlflow) to count a sweep's callbacks by class: the sweep skips that census, at the very
    reference `tune.run` calls, and only while its Tuner runs."""
    from ray.air._internal import usage
    from ray.tune import tune as tune_module

    from raytrain_kit.sweep import _callback_census_skipped

    census = usage.tag_callbacks
    assert tune_module.air_usage is usage  # what Tune.fit calls goes through this module
    with _callback_census_skipped():
        assert usage.tag_callbacks is not census
        assert tune_module.air_usage.tag_callbacks(["any callback"]) is False
    assert usage.tag_callbacks is census


def test_assign_folds_is_stratified_and_balanced():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 1001)
    keys = rng.integers(0, 2**63, 1001, dtype=np.uint64)
    folds = assign_folds(keys, labels, num_folds=3)
    for c in range(4):
        counts = np.bincount(folds[labels == c], minlength=3)
        assert counts.max() - counts.min() <= 1, counts
    sizes = np.bincount(folds, minlength=3)
    assert sizes.sum() == 1001 and sizes.max() - sizes.min() <= 2
    regression = assign_folds(keys, None, num_folds=4)
    assert sorted(np.bincount(regression)) == [250, 250, 250, 251]


def test_aggregate_folds_mean_std_and_per_fold():
    folds = [{"epoch": 2, "val_accuracy": a, "val_loss": 1 - a, "lr": 0.1, "checkpoint": "/x"} for a in (0.8, 0.9, 1.0)]
    out = aggregate_folds(folds)
    assert out["epoch"] == 2 and out["lr"] == pytest.approx(0.1)
    assert out["val_accuracy"] == pytest.approx(0.9) and out["val_accuracy_std"] == pytest.approx(0.1)
    assert [out[f"fold{i}_val_accuracy"] for i in range(3)] == [0.8, 0.9, 1.0]
    assert "checkpoint" not in out
    assert aggregate_folds(folds[:1]) == {"epoch": 2, "val_accuracy": 0.8, "val_loss": pytest.approx(0.2), "lr": 0.1}


def _plan(total_cpus, *, cv=None, workers=1, cpus=1.0, max_concurrent=None, can_grow=False, strategy="ddp", in_memory=True):
    cfg = build_experiment({**SMALL, "data": {"source": "digits", "in_memory": in_memory},
                            "scaling": {"num_workers": workers, "cpus_per_worker": cpus, "strategy": strategy},
                            "tune": {"space": SPACE, "cv_folds": cv, "max_concurrent_trials": max_concurrent}})
    return plan_resources(cfg, {"CPU": total_cpus}, can_grow=can_grow)


def test_resource_plan_packs_trials_without_overcommitting():
    # Trials through Ray Train: several workers, or sharded (a single fsdp worker still needs a process group).
    assert _plan(2, workers=2).max_concurrent_trials == 1 and not _plan(2, workers=2).in_process
    assert _plan(16, workers=2, cpus=1.5).max_concurrent_trials == 5  # 5 x 3 = 15 <= 16
    parallel = _plan(2, cv=3, cpus=0.5, strategy="fsdp")
    assert parallel.parallel_folds and parallel.cpus_per_trial == 1.5 and parallel.max_concurrent_trials == 1
    assert parallel.trial_resources() == {"CPU": 0, "memory": 256 * 1024**2}  # the workers hold the CPUs
    sequential = _plan(2, cv=3, strategy="fsdp")
    assert not sequential.parallel_folds and sequential.max_concurrent_trials == 2
    with pytest.raises(ConfigError, match="a trial needs 4 CPUs"):
        _plan(2, workers=4)
    with pytest.raises(ConfigError, match="tune.max_concurrent_trials: 3 trials x 1 CPUs"):
        _plan(2, max_concurrent=3)
    assert _plan(2, max_concurrent=3, can_grow=True).max_concurrent_trials == 3  # an autoscaling cluster
    # Single-worker ddp trials train in their own process, which holds the worker's CPUs; its
    # folds take turns there, so more folds need no more CPUs.
    single = _plan(2)
    assert single.in_process and single.max_concurrent_trials == 2 and single.trial_resources() == {"CPU": 1.0}
    folds = _plan(2, cv=3, cpus=0.5)
    assert folds.in_process and folds.parallel_folds and folds.cpus_per_trial == 0.5 and folds.max_concurrent_trials == 4
    # Streamed data on an embedded Ray keeps a CPU for Ray Data's tasks, or the trials would starve them.
    assert _plan(2, in_memory=False).max_concurrent_trials == 1
    with pytest.raises(ConfigError, match="one kept free for streaming Ray Data"):
        _plan(1, in_memory=False)


def test_workers_wait_only_at_the_epochs_where_asha_decides():
    def gates(epochs, **tune):
        return gate_epochs(build_experiment({**SMALL, "train": {"epochs": epochs},
                                             "tune": {"space": SPACE, "scheduler": "asha", **tune}}))
    assert gates(9, grace_period=1, reduction_factor=3) == [1, 3]  # 9 is the last epoch: no decision after it
    assert gates(20, grace_period=2, reduction_factor=2, max_epochs=12) == [2, 4, 8, 12]  # ASHA ends trials at 12
    assert gates(9, grace_period=1, reduction_factor=3, scheduler="fifo") == []


def test_cloned_checkpoint_takes_the_new_lr_and_decay_at_the_same_schedule_position():
    base = {**SMALL, "optim": {"name": "adamw", "lr": 0.01}, "regularization": {"weight_decay": 0.1},
            "schedule": {"kind": "exponential", "decay_steps": 10, "decay_rate": 0.5}}
    old = build_experiment(base)
    new = build_experiment({**base, "optim": {"name": "adamw", "lr": 0.002}, "regularization": {"weight_decay": 0.3}})
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer, scheduler = build_optimizer(model, old), None
    scheduler = build_scheduler(optimizer, old, total_steps=100)
    for _ in range(20):
        optimizer.step(), scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** 2)
    fresh_optimizer = build_optimizer(model, new)
    fresh_scheduler = build_scheduler(fresh_optimizer, new, total_steps=100)
    fresh_optimizer.load_state_dict(optimizer.state_dict())
    fresh_scheduler.load_state_dict({**scheduler.state_dict(), "lr_lambdas": [None, None]})
    apply_hyperparameters(fresh_optimizer, fresh_scheduler, new)
    assert [g["lr"] for g in fresh_optimizer.param_groups] == [pytest.approx(0.002 * 0.25)] * 2
    assert fresh_optimizer.param_groups[0]["weight_decay"] == 0.3 and fresh_optimizer.param_groups[1]["weight_decay"] == 0.0
    fresh_optimizer.step(), fresh_scheduler.step()
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(0.002 * 0.5 ** 2.1)


# ---------------------------------------------------------------------------------------------
# Folds on real Ray Datasets


def _row_keys_of(ds) -> np.ndarray:
    batch = ds.take_batch(100_000, batch_format="numpy")
    return row_keys(batch["x"], batch["y"], seed=12345)


def test_folds_are_disjoint_cover_the_training_split_and_repeat_with_the_seed(ray_session):
    cfg = build_experiment({"data": {"source": "digits"}, "train": {"seed": 3}})
    datasets, spec = build_datasets(cfg)
    everything = _row_keys_of(datasets["train"])
    assert len(set(everything)) == len(everything) == spec.num_train_rows

    def fold_sets(c):
        return [frozenset(_row_keys_of(part["val"])) for part, _ in build_folds(c, datasets["train"], spec, num_folds=3)]

    folds = build_folds(cfg, datasets["train"], spec, num_folds=3)
    vals = []
    for part, fold_spec in folds:
        val, train = set(_row_keys_of(part["val"])), set(_row_keys_of(part["train"]))
        assert not val & train and val | train == set(everything)
        assert (fold_spec.num_val_rows, fold_spec.num_train_rows) == (len(val), len(train))
        labels = part["val"].take_batch(10_000, batch_format="numpy")["y"]
        assert np.bincount(labels, minlength=10).min() >= 40  # every class in every fold (stratified)
        vals.append(frozenset(val))
    assert sum(map(len, vals)) == len(everything) and frozenset().union(*vals) == set(everything)
    assert fold_sets(cfg) == vals  # same seed, same folds
    reseeded = build_experiment({"data": {"source": "digits"}, "train": {"seed": 4}})
    datasets, spec = build_datasets(reseeded)
    assert fold_sets(reseeded) != vals


# ---------------------------------------------------------------------------------------------
# Real sweeps on the session's Ray


def _full_cpus_return(ray, deadline_s=60) -> float:
    total = ray.cluster_resources()["CPU"]
    deadline = time.time() + deadline_s
    while time.time() < deadline and ray.available_resources().get("CPU", 0) < total:
        time.sleep(0.5)
    return ray.available_resources().get("CPU", 0) - total


def test_asha_sweep_frees_every_cpu_reports_and_best_yaml_trains_to_the_best_metric(ray_session, tmp_path):
    from mlflow.tracking import MlflowClient

    store = f"file:{tmp_path / 'mlruns'}"
    cfg = build_experiment({**SMALL, "run": {"name": "asha", "storage_path": str(tmp_path / "runs")},
                            "tracking": {"mlflow_uri": store},
                            "tune": {"space": {"optim.lr": {"loguniform": [1e-4, 3e-2]},
                                               "init.scheme": {"choice": ["kaiming_normal", "xavier_uniform"]}},
                                     "num_samples": 4, "scheduler": "asha", "grace_period": 1, "reduction_factor": 3}})
    lines: list[str] = []
    summary = run_sweep(cfg, log=lines.append)
    assert _full_cpus_return(ray_session) == 0, "a stopped trial kept its CPUs"
    sweep_dir = tmp_path / "runs" / "asha"
    table = pd.read_csv(sweep_dir / "trials.csv")
    assert len(table) == 4 and table["trial_id"].is_unique
    assert set(table.columns) >= {"optim.lr", "init.scheme", "best_value", "best_epoch", "final_value",
                                  "epochs_run", "status", "wall_s"}
    assert set(table["status"]) <= {"finished", "stopped"} and (table["status"] == "stopped").any()
    assert (table.loc[table["status"] == "stopped", "epochs_run"] < 3).all()
    assert (table.loc[table["status"] == "finished", "epochs_run"] == 3).all()
    # Workers wait at a rung for the decision, so a stopped trial trained no epoch past it.
    trained = {tid: json.loads((sweep_dir / "runs" / tid / "summary.json").read_text())["epochs_completed"]
               for tid in table["trial_id"]}
    assert trained == dict(zip(table["trial_id"], table["epochs_run"]))
    assert table["best_value"].is_monotonic_decreasing and summary["best_value"] == table["best_value"].iloc[0]
    assert pd.read_parquet(sweep_dir / "trials.parquet")["trial_id"].tolist() == table["trial_id"].tolist()
    assert sum(line.startswith("trial ") for line in lines) == 4
    # Each trial's line says which value is its best and which its last, as trials.csv does.
    for line in (line for line in lines if line.startswith("trial ")):
        m = re.match(r"trial (\S+) (finished|stopped) at epoch (\d+): val_accuracy "
                     r"(?:best ([\d.]+), last ([\d.]+)|([\d.]+) \(best\))", line)
        assert m, line
        row = table.set_index("trial_id").loc[m[1]]
        best_shown, last_shown = (float(m[4]), float(m[5])) if m[4] else (float(m[6]), float(m[6]))
        assert (best_shown, last_shown) == (round(row["best_value"], 4), round(row["final_value"], 4))
        assert (m[2], int(m[3])) == (row["status"], row["epochs_run"])
    # The trial's own checkpoints get the mode every other directory of the run gets.
    umask = os.umask(0)
    os.umask(umask)
    modes = {oct(p.stat().st_mode & 0o777) for p in (sweep_dir / "runs").glob("*/checkpoint_*")}
    assert modes == {oct(0o777 & ~umask)}
    best = table.iloc[0]
    # Every trial is an MLflow child of the sweep's run.
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("raytrain-kit").experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "asha"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(table["trial_id"])
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(summary["best_value"])

    assert not (sweep_dir / "sweep.png").exists()  # the CLI draws it (report), run_sweep only writes data
    assert main(["report", str(sweep_dir)]) == 0
    for picture in ("sweep.png", "parallel.png"):
        assert_picture(sweep_dir / picture)
    report = (sweep_dir / "report.md").read_text()
    assert "](sweep.png)" in report and "](parallel.png)" in report and best["trial_id"] in report

    best_cfg = load_experiment(sweep_dir / "best.yaml")
    assert best_cfg.tune is None and best_cfg.run.name == "asha-best"
    assert best_cfg.optim.lr == pytest.approx(best["optim.lr"]) and best_cfg.init.scheme == best["init.scheme"]
    retrained = fit(best_cfg)
    # Same config, seed and worker count as the trial: the same metric, up to float noise.
    assert retrained["best_value"] == pytest.approx(best["best_value"], abs=0.005)


def test_cv_trial_reports_mean_std_and_every_fold(ray_session, tmp_path):
    """One Optuna-sampled trial of 3 folds side by side (half a CPU per worker)."""
    cfg = build_experiment({**SMALL, "train": {"epochs": 2, "batch_size": 64},
                            "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
                            "run": {"name": "cv", "storage_path": str(tmp_path / "runs")},
                            "tune": {"space": {"regularization.l2": {"loguniform": [1e-5, 1e-3]}}, "search": "optuna",
                                     "num_samples": 1, "cv_folds": 3}})
    lines: list[str] = []
    run_sweep(cfg, log=lines.append)
    (plan,) = [line for line in lines if line.startswith("sweep cv: ")]
    assert "3 folds per trial (side by side)" in plan
    sweep_dir = tmp_path / "runs" / "cv"
    table = pd.read_csv(sweep_dir / "trials.csv")
    assert len(table) == 1
    row = table.iloc[0]
    assert 1e-5 <= row["regularization.l2"] <= 1e-3  # sampled by Optuna's TPE
    folds = [row[f"fold{i}_val_accuracy"] for i in range(3)]
    assert row["best_value"] == pytest.approx(np.mean(folds)) and row["val_accuracy_std"] == pytest.approx(np.std(folds, ddof=1))
    assert len(set(folds)) == 3 and all(0.3 < f <= 1.0 for f in folds)  # three different models
    history = pd.read_parquet(sweep_dir / "history.parquet")
    assert history["epoch"].tolist() == [1, 2] and {"fold2_val_loss", "val_loss_std"} <= set(history.columns)
    # Each fold is its own Train run, trained on the other two thirds of the training split.
    runs = sorted(p.name for p in (sweep_dir / "runs").iterdir())
    assert [r.split("_", 2)[-1] for r in runs] == ["fold0", "fold1", "fold2"]
    summaries = [json.loads((sweep_dir / "runs" / r / "summary.json").read_text()) for r in runs]
    assert [s["final_metrics"]["val_accuracy"] for s in summaries] == pytest.approx(folds)
    assert not math.isnan(row["val_accuracy_std"])


# ---------------------------------------------------------------------------------------------
# A sweep driver killed after a trial finished: --resume finishes it without re-running that trial


def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    import os
    import subprocess
    import sys

    from chaos import terminated_trials
    from ray_heads import kill_driver_when

    epochs = 16
    config = tmp_path / "resumable.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "train": {"epochs": epochs, "batch_size": 64},
                                      "run": {"storage_path": str(tmp_path / "runs")},
                                      "tune": {"space": {"optim.lr": {"grid": [0.002, 0.004, 0.008]}}, "num_samples": 1}}))
    sweep_dir = tmp_path / "runs" / "resumable"
    command = [sys.executable, "-m", "raytrain_kit", "tune", str(config)]
    # Tune writes its state at most every 10 s by default, and the three in-process trials all
    # finish inside 10 s: saved at every step, the first finished trial is on disk while the third
    # still trains (~0.15 s an epoch, so seconds, against the 0.2 s poll), and the kill lands between.
    kill_driver_when(command, done=lambda: bool(terminated_trials(sweep_dir)), cwd=REPO, poll_s=0.2,
                     extra_env={"TUNE_GLOBAL_CHECKPOINT_S": "0"})
    time.sleep(3)  # Ray's actor processes outlive their raylet by a moment
    finished_before = terminated_trials(sweep_dir)
    assert 1 <= len(finished_before) < 3, "the driver died too late to test a resume"
    runs_before = {p.name: (p / "summary.json").stat().st_mtime_ns
                   for p in (sweep_dir / "runs").iterdir() if p.name.split("_attempt")[0] in finished_before}

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    resumed = subprocess.run([*command, "--resume"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=400, start_new_session=True)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    table = pd.read_csv(sweep_dir / "trials.csv")
    assert len(table) == 3 and table["trial_id"].is_unique
    assert sorted(table["optim.lr"]) == [0.002, 0.004, 0.008]
    assert (table["status"] == "finished").all() and (table["epochs_run"] == epochs).all()
    # The finished trials were not trained again: no new run, their summaries untouched.
    for trial_id in finished_before:
        assert f"trial {trial_id} " not in resumed.stdout
        assert [p.name for p in (sweep_dir / "runs").iterdir() if p.name.startswith(trial_id)] == [trial_id]
    assert {name: (sweep_dir / "runs" / name / "summary.json").stat().st_mtime_ns for name in runs_before} == runs_before
    resumed_lines = [line for line in resumed.stdout.splitlines() if line.startswith("trial ")]
    assert len(resumed_lines) == 3 - len(finished_before)


def test_a_sweep_killed_before_tune_saved_its_state_has_none_to_restore(tmp_path):
    """`tune --resume` restores only with Tune's tuner and an experiment state file; without the
    latter Tune logs a traceback and starts afresh, so the kit starts afresh itself, quietly."""
    import pickle

    from raytrain_kit.sweep import has_tune_state

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "config.yaml").write_text("run: {name: sweep}\n")  # what the kit writes before Tune starts
    assert not has_tune_state(str(sweep))
    (sweep / "tuner.pkl").write_bytes(pickle.dumps({"param_space": {"lr": 0.1}}))
    assert not has_tune_state(str(sweep))
    (sweep / "experiment_state-2026-12-01_06-32-17.json").write_text(json.dumps({"trial_data": []}))
    assert has_tune_state(str(sweep))


def test_a_resumed_sweep_says_how_many_trials_it_keeps_and_continues(tmp_path):
    from raytrain_kit.sweep import describe_sweep_state

    def state(*statuses):  # Tune's layout: [trial JSON, runtime metadata] per trial
        return json.dumps({"trial_data": [[json.dumps({"trial_id": f"t{i}", "status": s}), "{}"]
                                          for i, s in enumerate(statuses)]})

    (tmp_path / "experiment_state-2026-12-01_06-32-17.json").write_text(state("TERMINATED"))
    (tmp_path / "experiment_state-2026-12-01_06-40-02.json").write_text(state("TERMINATED", "TERMINATED", "RUNNING", "PENDING"))
    assert describe_sweep_state(str(tmp_path)) == (
        "resume: 2 trial(s) finished, kept as they are; 2 continue from their latest checkpoints (in new runs, "
        "<trial>_attemptN); any not yet started follow")


def test_a_sweep_state_cut_short_by_a_crash_resumes_from_the_last_whole_one_or_says_what_to_do(tmp_path):
    """Tune writes its state files in place: a sweep killed mid-write left one empty or cut short,
    and `tune --resume` ended in an EOFError (upstream reports). Real files as Tune lays them out."""
    import pickle

    from raytrain_kit.sweep import check_sweep_state

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "tuner.pkl").write_bytes(pickle.dumps({"param_space": {"lr": 0.1}}))
    older, newer = "experiment_state-2026-12-01_06-32-17.json", "experiment_state-2026-12-01_06-32-44.json"
    (sweep / older).write_text(json.dumps({"trial_data": [1]}))
    (sweep / newer).write_text(json.dumps({"trial_data": [1, 2]})[:9])  # cut short
    # The basic-variant searcher's state is a pickle despite its name.
    (sweep / "basic-variant-state-2026-12-01_06-32-44.json").write_bytes(pickle.dumps({"iterators": []}))
    lines: list[str] = []
    check_sweep_state(str(sweep), log=lines.append)
    assert lines == [f"resume: {newer} was cut short by the crash; resuming from {older} "
                     "(trials finished since it was written are trained again)"]
    assert (sweep / f"{newer}.damaged").exists() and not (sweep / newer).exists() and (sweep / older).exists()

    (sweep / older).write_text("")  # the only one left, empty
    with pytest.raises(ConfigError) as raised:
        check_sweep_state(str(sweep), log=lines.append)
    assert str(raised.value) == (
        f"--resume: {sweep}/{older} is empty or cut short (the sweep was killed while Tune wrote it), so Tune "
        f"cannot resume the sweep; start it again with --set run.name=<new name> (each finished trial's run stays "
        f"under {sweep}/runs)")
    (sweep / older).write_text(json.dumps({"trial_data": [1]}))
    (sweep / "tuner.pkl").write_bytes(pickle.dumps({"param_space": {"lr": 0.1}})[:-3])
    with pytest.raises(ConfigError, match=r"tuner.pkl is empty or cut short"):
        check_sweep_state(str(sweep), log=lines.append)
    # Tune rewrites tuner.pkl in place at every start; the copy the kit keeps of it stands in.
    (sweep / "tuner.pkl.whole").write_bytes(pickle.dumps({"param_space": {"lr": 0.1}}))
    (sweep / "tuner.pkl").write_bytes(b"")
    check_sweep_state(str(sweep), log=lines.append)
    assert lines[-1] == "resume: tuner.pkl was cut short by the crash; restored from the copy the sweep kept (tuner.pkl.whole)"
    assert pickle.loads((sweep / "tuner.pkl").read_bytes()) == {"param_space": {"lr": 0.1}}


def test_a_trial_resumes_from_the_checkpoint_tune_saved_or_the_next_one_its_run_kept(tmp_path):
    """A trial's process outlives its killed driver by a second or two, training on and pruning
    the checkpoint Tune last saw (a newcomer's sweep then failed the trial: model.pt not found)."""
    from raytrain_kit.sweep import kept_checkpoint

    run = tmp_path / "runs" / "90de8_00002"
    for epoch in (8, 9):
        (run / f"checkpoint_epoch_{epoch:04d}").mkdir(parents=True)
        (run / f"checkpoint_epoch_{epoch:04d}" / "model.pt").write_bytes(b"weights")
    (run / "checkpoint_epoch_0010").mkdir()  # being written when the process died: never registered
    (run / "checkpoint_epoch_0010" / "model.pt").write_bytes(b"weights")
    (run / "checkpoints.json").write_text(json.dumps({"checkpoints": ["checkpoint_epoch_0008", "checkpoint_epoch_0009"]}))
    assert kept_checkpoint(f"{run}/checkpoint_epoch_0007") == f"{run}/checkpoint_epoch_0008"  # pruned: the next kept
    assert kept_checkpoint(f"{run}/checkpoint_epoch_0009") == f"{run}/checkpoint_epoch_0009"  # still there
    assert kept_checkpoint(None) is None
    assert kept_checkpoint(f"{tmp_path}/runs/other/checkpoint_epoch_0003") is None  # its run kept none
