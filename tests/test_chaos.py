"""Chaos: a 6-epoch, 2-worker run SIGKILLed on a seeded schedule of 10 kills, each of a Train
worker or of the driver's whole process group, at random moments: right after a report, while a
checkpoint is on disk but not (yet) registered, or anywhere. After each, what a user would do:
nothing for a worker (Ray Train restarts the group from the latest checkpoint), `--resume` for
the driver. The records never hold an epoch twice; after each resume's reconciliation (and at
the end, TensorBoard included) they hold each checkpointed epoch exactly once, with no
checkpoint on disk that Ray did not register; the finished run's metrics are the uninterrupted
run's."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from chaos import Driver, first_line, latest_epoch, on_disk, registered, reported_epochs, state_stamps, \
    terminated_trials, wait_for
from records import tensorboard_points

from raytrain_kit.config import build_experiment
from raytrain_kit.launch import fit

pytestmark = pytest.mark.chaos  # 8-9 minutes on 2 cores: `python -m pytest -m chaos tests`

REPO = Path(__file__).resolve().parents[1]
SEED, EPOCHS = 20261201, 6
COMPARED = ("epoch", "step", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy")

# Epochs of about half a second on 2 cores (as test_faults' SLOW), checkpointed each.
CONFIG = {"data": {"source": "synthetic", "num_rows": 12_000, "num_features": 32, "num_classes": 4},
          "model": {"kind": "mlp", "hidden": [256, 256]}, "optim": {"name": "adam", "lr": 0.001},
          "schedule": {"kind": "cosine", "warmup_steps": 20},
          "train": {"epochs": EPOCHS, "batch_size": 32}, "scaling": {"num_workers": 2, "max_failures": -1},
          "checkpoint": {"every_epochs": 1, "keep": 2}, "preflight": {"enabled": False}}


@dataclass(frozen=True)
class Kill:
    target: str  # "worker" or "driver"
    moment: str  # "after_report", "in_checkpoint" or "anywhere"
    delay_s: float  # after the moment
    worker: int  # which of the two workers


def build_schedule(seed: int) -> list[Kill]:
    """A seeded order of 10 kills: 7 of a worker, 3 of the driver; 2 right after a report, 2 in a
    checkpoint write, 6 anywhere in the 2 s after the workers came up (a restart's restore, the
    data, the first steps). Only the first two kinds let the run gain an epoch before the kill
    (a checkpoint written since the last one), so the 6-epoch run is still going at the last kill."""
    rng = random.Random(seed)
    targets = ["worker"] * 7 + ["driver"] * 3
    moments = ["after_report"] * 2 + ["in_checkpoint"] * 2 + ["anywhere"] * 6
    rng.shuffle(targets)
    rng.shuffle(moments)
    delays = {"after_report": lambda: rng.uniform(0, 0.05), "in_checkpoint": lambda: 0.0,
              "anywhere": lambda: rng.uniform(0, 2.0)}
    return [Kill(t, m, delays[m](), rng.randrange(2)) for t, m in zip(targets, moments)]


def _await_moment(kill: Kill, driver: Driver, run_dir: Path) -> bool:
    """Wait for the kill's moment in the current driver's run; False if the run ended first."""
    if kill.moment == "after_report":
        reported = reported_epochs(run_dir)
        found = wait_for(lambda: reported_epochs(run_dir) > reported, driver)
    elif kill.moment == "in_checkpoint":  # being written (or removed after pruning), not registered
        found = wait_for(lambda: bool(on_disk(run_dir) - registered(run_dir)), driver, timeout_s=180)
    else:
        found = wait_for(lambda: len(driver.train_workers()) == 2, driver, poll_s=0.05)
    time.sleep(kill.delay_s)
    return found and driver.alive()


def _kill_worker(kill: Kill, driver: Driver) -> bool:
    """SIGKILL one Train worker (waiting for the group if it is restarting); False if the run ended."""
    if not wait_for(lambda: len(driver.train_workers()) == 2, driver, poll_s=0.02):
        return False
    workers = sorted(driver.train_workers())
    os.kill(workers[kill.worker % len(workers)], signal.SIGKILL)
    return True


def _mlflow_steps(mlruns: Path) -> tuple[int, list[int]]:
    """(number of MLflow runs, val_loss steps of the run in logged order)."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # as the kit does for a file: URI
    client = MlflowClient(f"file:{mlruns}")
    experiment = client.get_experiment_by_name("chaos")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    if not runs:
        return 0, []
    return len(runs), [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_loss")]


def _column(path: Path, name: str) -> list:
    """A column of metrics.csv or steps.csv; empty before the run's first report wrote the file."""
    return pd.read_csv(path)[name].tolist() if path.exists() else []


def _assert_never_twice(run_dir: Path, mlruns: Path) -> None:
    """At any moment: no epoch or step in the records twice, and none before its predecessors."""
    metrics = _column(run_dir / "metrics.csv", "epoch")
    assert metrics == list(range(1, len(metrics) + 1)), metrics
    steps = _column(run_dir / "steps.csv", "step")
    assert steps == list(range(1, len(steps) + 1)), steps
    points = tensorboard_points(run_dir / "tensorboard")
    for tag in ("val_loss", "train_loss_step"):
        assert len(points.get(tag, [])) == len(set(points.get(tag, []))), (tag, points.get(tag))
    num_runs, logged = _mlflow_steps(mlruns)
    assert num_runs <= 1 and len(logged) == len(set(logged)), logged


def _assert_exactly_once(run_dir: Path, mlruns: Path, *, steps_per_epoch: int, finished: bool) -> int:
    """After a reconciliation: no checkpoint on disk that Ray did not register, and every epoch
    up to the latest registered checkpoint once in metrics.csv, steps.csv and MLflow, and in
    TensorBoard once the run has `finished` (tensorboardX writes from a queue in a thread of its
    own: until the writer closes, the points just given to it may not be in the file yet; a
    kill loses them and the next reconciliation writes them). Returns that epoch."""
    names = registered(run_dir)
    assert on_disk(run_dir) == names, (on_disk(run_dir), names)
    last = latest_epoch(names)
    epochs = list(range(1, last + 1))
    assert _column(run_dir / "metrics.csv", "epoch") == epochs
    assert _column(run_dir / "steps.csv", "step") == list(range(1, last * steps_per_epoch + 1))
    if finished:
        points = tensorboard_points(run_dir / "tensorboard")
        assert sorted(points.get("val_loss", [])) == epochs
        assert sorted(points.get("train_loss_step", [])) == list(range(1, last * steps_per_epoch + 1))
    num_runs, logged = _mlflow_steps(mlruns)
    assert num_runs == 1 and sorted(logged) == epochs, (num_runs, logged)
    return last


def test_a_run_killed_ten_times_keeps_each_epoch_once_and_ends_as_the_uninterrupted_run(ray_session, tmp_path):
    schedule = build_schedule(SEED)
    assert {k.target for k in schedule} == {"worker", "driver"}
    assert {k.moment for k in schedule} == {"after_report", "in_checkpoint", "anywhere"}
    mlruns = tmp_path / "mlruns"
    tracking = {"mlflow_uri": f"file:{mlruns}", "mlflow_experiment": "chaos"}
    reference = fit(build_experiment({**CONFIG, "run": {"name": "calm", "storage_path": str(tmp_path / "calm")}}))
    steps_per_epoch = reference["history"][0]["step"]

    config = tmp_path / "chaos.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "tracking": tracking, "run": {"storage_path": str(tmp_path / "runs")}}))
    run_dir = tmp_path / "runs" / "chaos"
    command = [sys.executable, "-m", "raytrain_kit", "train", str(config)]
    driver = Driver(command, REPO)
    drivers = [driver]
    done: list[Kill] = []
    resumed: list[tuple[Driver, int]] = []  # each --resume, and the epoch its reconciliation found
    try:
        for kill in schedule:
            if not _await_moment(kill, driver, run_dir):
                break
            if kill.target == "worker":
                if not _kill_worker(kill, driver):
                    break
            else:
                driver.kill_group()
                _assert_never_twice(run_dir, mlruns)
                driver = Driver([*command, "--resume"], REPO)
                drivers.append(driver)
                # the line after the reconciliation (a run with a fitted preprocessing says
                # "resume: the data is transformed ..." before it)
                line = first_line(driver, ("resume: from epoch", "resume: no registered checkpoint"))
                last = _assert_exactly_once(run_dir, mlruns, steps_per_epoch=steps_per_epoch, finished=False)
                assert line == (f"resume: from epoch {last}'s checkpoint" if last else
                                f"resume: no registered checkpoint in {run_dir}; training from epoch 1"), line
                resumed.append((driver, last))
            done.append(kill)
            print(f"chaos: {time.strftime('%X')} kill {len(done)}: {kill}; checkpointed {latest_epoch(registered(run_dir))}",
                  flush=True)
            _assert_never_twice(run_dir, mlruns)
        assert driver.finish() == 0, "\n".join(driver.output[-30:])
    finally:
        if driver.alive():
            driver.kill_group()

    print(f"chaos: {len(done)} kills: {sum(k.target == 'worker' for k in done)} of a worker, "
          f"{sum(k.target == 'driver' for k in done)} of the driver; moments {[k.moment for k in done]}")
    assert len(done) == len(schedule) == 10, f"the run finished after {len(done)} kills"
    assert not [line for d in drivers for line in d.output if "Traceback" in line or "ERROR" in line]
    assert _assert_exactly_once(run_dir, mlruns, steps_per_epoch=steps_per_epoch, finished=True) == EPOCHS
    for resumed_driver, last in resumed:  # each trained on right after its checkpoint
        epochs = [int(line.split()[1].split("/")[0]) for line in resumed_driver.output if line.startswith("epoch ")]
        assert epochs[:1] in ([], [last + 1]), (last, epochs)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and [h["epoch"] for h in summary["history"]] == list(range(1, EPOCHS + 1))
    # Every restart restored model, optimizer, schedule and shuffling: the uninterrupted run's numbers.
    for mine, theirs in zip(summary["history"], reference["history"]):
        assert {k: mine[k] for k in COMPARED} == pytest.approx({k: theirs[k] for k in COMPARED}, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# A sweep: its driver SIGKILLed at random moments, then `tune --resume`


GRID = [0.001, 0.002, 0.004, 0.008]
SWEEP = {"data": {"source": "digits"}, "model": {"kind": "mlp", "hidden": [32]}, "train": {"epochs": 4, "batch_size": 64},
         "preflight": {"enabled": False}, "checkpoint": {"every_epochs": 1, "keep": 2},
         "tune": {"space": {"optim.lr": {"grid": GRID}}, "num_samples": 1}}


def build_sweep_schedule(seed: int) -> list[tuple[str, float]]:
    """(moment, delay after it), in a seeded order: twice right after Tune saved its state, once
    right after a trial finished, twice anywhere after the trials' runs began."""
    rng = random.Random(seed)
    moments = ["state_saved"] * 2 + ["trial_finished"] + ["anywhere"] * 2
    rng.shuffle(moments)
    return [(m, rng.uniform(0, 3.0) if m == "anywhere" else rng.uniform(0, 0.02)) for m in moments]


def _await_sweep_moment(moment: str, delay_s: float, driver: Driver, sweep_dir: Path) -> bool:
    if moment == "state_saved":
        before = state_stamps(sweep_dir)
        found = wait_for(lambda: state_stamps(sweep_dir) != before, driver, poll_s=0.002)
    elif moment == "trial_finished":
        finished = terminated_trials(sweep_dir)
        found = wait_for(lambda: terminated_trials(sweep_dir) > finished, driver, poll_s=0.01)
    else:
        found = wait_for(lambda: (sweep_dir / "runs").exists(), driver, poll_s=0.05)
    time.sleep(delay_s)
    return found and driver.alive()


def _trial_runs(sweep_dir: Path) -> dict[str, int]:
    """{trial run directory: its summary's mtime in ns (0 without one)}."""
    runs = sweep_dir / "runs"
    if not runs.exists():
        return {}
    return {p.name: (p / "summary.json").stat().st_mtime_ns if (p / "summary.json").exists() else 0 for p in runs.iterdir()}


def test_a_sweep_killed_at_random_moments_resumes_each_time_and_runs_each_trial_once(tmp_path):
    schedule = build_sweep_schedule(SEED)
    assert {m for m, _ in schedule} == {"state_saved", "trial_finished", "anywhere"}
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({**SWEEP, "run": {"storage_path": str(tmp_path / "runs")}}))
    sweep_dir = tmp_path / "runs" / "sweep"
    command = [sys.executable, "-m", "raytrain_kit", "tune", str(config)]
    driver = Driver(command, REPO)
    drivers = [driver]
    finished: dict[str, set[str]] = {}  # trial -> its run directories when Tune recorded it finished
    stamps: dict[str, int] = {}
    done = 0
    try:
        for moment, delay_s in schedule:
            if not _await_sweep_moment(moment, delay_s, driver, sweep_dir):
                break
            driver.kill_group()
            done += 1
            print(f"sweep chaos: {time.strftime('%X')} kill {done} {moment}; finished {sorted(terminated_trials(sweep_dir))}",
                  flush=True)
            runs = _trial_runs(sweep_dir)
            for trial in terminated_trials(sweep_dir) - finished.keys():
                finished[trial] = {name for name in runs if name.startswith(trial)}
                stamps.update({name: runs[name] for name in finished[trial]})
            driver = Driver([*command, "--resume"], REPO)
            drivers.append(driver)
        assert driver.finish() == 0, "\n".join(driver.output[-30:])
    finally:
        if driver.alive():
            driver.kill_group()

    assert not [line for d in drivers for line in d.output if "Traceback" in line or "ERROR" in line]
    resumed = [line for line in drivers[-1].output if line.startswith("resume: ")]
    assert [line for line in resumed if "trial(s) finished, kept as they are" in line
            or "was stopped before Tune saved its state" in line], resumed
    print(f"sweep chaos: {done} kills of the driver; {len(finished)} trials finished before a kill")
    assert done == len(schedule), f"the sweep finished after {done} kills"
    table = pd.read_csv(sweep_dir / "trials.csv")
    assert len(table) == len(GRID) and table["trial_id"].is_unique  # every trial once
    assert sorted(table["optim.lr"]) == GRID
    assert (table["status"] == "finished").all() and (table["epochs_run"] == 4).all()
    # A trial Tune had recorded as finished was never trained again: no new run, its summary untouched.
    runs = _trial_runs(sweep_dir)
    for trial, names in finished.items():
        assert {name for name in runs if name.startswith(trial)} == names, trial
    assert {name: runs[name] for name in stamps} == stamps
