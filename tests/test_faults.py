"""Surviving failures: a worker SIGKILLed mid-epoch, and the driver SIGKILLed after a checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml
from chaos import registered
from ray_heads import kill_driver_when

from raytrain_kit.config import build_experiment
from raytrain_kit.launch import fit

REPO = Path(__file__).resolve().parents[1]

# Epochs of about half a second on 2 cores: long enough to be hit in the middle.
SLOW = {"data": {"source": "synthetic", "num_rows": 24_000, "num_features": 32, "num_classes": 4},
        "model": {"kind": "mlp", "hidden": [256, 256]}, "optim": {"name": "adam", "lr": 0.001},
        "train": {"epochs": 3, "batch_size": 32}, "scaling": {"num_workers": 2, "max_failures": 2},
        "checkpoint": {"every_epochs": 1, "keep": 10}, "preflight": {"enabled": False}}


def _alive_worker_pids() -> list[int]:
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]


def test_worker_killed_mid_epoch_run_finishes_from_checkpoint(ray_session, storage):
    cfg = build_experiment({**SLOW, "run": {"name": "worker-kill", "storage_path": storage}})
    run_dir = Path(storage) / "worker-kill"
    killed: list[int] = []

    def kill_one_worker_in_epoch_2():
        deadline = time.time() + 240
        while time.time() < deadline and "checkpoint_epoch_0001" not in registered(run_dir):
            time.sleep(0.1)
        time.sleep(0.3)  # into the second epoch
        pids = _alive_worker_pids()
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    killer = threading.Thread(target=kill_one_worker_in_epoch_2, daemon=True)
    killer.start()
    seen: list[dict] = []
    summary = fit(cfg, on_epoch=seen.append)
    killer.join(timeout=10)

    assert killed, "no worker was killed"
    assert summary["status"] == "finished" and summary["epochs_completed"] == 3
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]  # each epoch once
    reported = [m["epoch"] for m in seen]
    assert sorted(set(reported)) == [1, 2, 3] and len(reported) - len(set(reported)) <= 1  # at most one redone
    assert killed[0] not in _alive_worker_pids()  # a new worker group did the rest
    on_disk = {p.name for p in run_dir.glob("checkpoint_epoch_*")}
    assert on_disk == registered(run_dir) == {f"checkpoint_epoch_{e:04d}" for e in (1, 2, 3)}
    assert summary["final_metrics"]["val_accuracy"] > 0.5
    _assert_records_hold_each_epoch_once(run_dir, summary)


def test_driver_killed_after_second_checkpoint_resumes(tmp_path):
    config = tmp_path / "driver.yaml"
    # Ray's worker processes outlive a SIGKILLed driver by a second or more, and go on training:
    # epochs three times as long as SLOW's, and 8 of them, leave epochs to resume whatever the
    # machine's speed (with 5 short ones a fast hour finished them all before the workers died).
    config.write_text(yaml.safe_dump({**SLOW, "data": {**SLOW["data"], "num_rows": 72_000},
                                      "train": {**SLOW["train"], "epochs": 8},
                                      "run": {"storage_path": str(tmp_path / "runs")}}))
    run_dir = tmp_path / "runs" / "driver"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "raytrain_kit", "train", str(config)]
    kill_driver_when(command, done=lambda: "checkpoint_epoch_0002" in registered(run_dir), cwd=REPO)
    # Ray's actor processes outlive their dead raylet by a moment and may still register the
    # checkpoint in flight: read the run's state once it has stopped changing.
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    stamp = None
    while stamp != snapshot.stat().st_mtime_ns:
        stamp = snapshot.stat().st_mtime_ns
        time.sleep(3)
    checkpointed = max(int(n.rsplit("_", 1)[1]) for n in registered(run_dir))
    assert 2 <= checkpointed < 8, "the driver died too late to test a resume"

    resumed = subprocess.run([*command, "--resume"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=400, start_new_session=True)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    epochs = [int(line.split()[1].split("/")[0]) for line in resumed.stdout.splitlines() if line.startswith("epoch ")]
    assert epochs == list(range(checkpointed + 1, 9))  # starts right after the checkpoint
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert summary["status"] == "finished"
    assert "resume: from epoch " + str(checkpointed) + "'s checkpoint" in resumed.stdout
    _assert_records_hold_each_epoch_once(run_dir, summary)


def _assert_records_hold_each_epoch_once(run_dir: Path, summary: dict) -> None:
    """metrics.csv, steps.csv and TensorBoard hold every epoch (and step) once, as the final
    checkpoint's history and steps have them, whatever was killed when."""
    import pandas as pd
    from records import tensorboard_points

    epochs = [h["epoch"] for h in summary["history"]]
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics["epoch"].tolist() == epochs
    assert metrics["val_loss"].tolist() == [h["val_loss"] for h in summary["history"]]
    final = run_dir / f"checkpoint_epoch_{epochs[-1]:04d}" / "steps.json"
    steps = pd.read_csv(run_dir / "steps.csv")
    assert steps["step"].tolist() == list(range(1, summary["history"][-1]["step"] + 1))
    assert steps["step"].tolist() == [s for _, s, _ in json.loads(final.read_text())["steps"]]
    points = tensorboard_points(run_dir / "tensorboard")
    assert sorted(points["val_loss"]) == epochs and sorted(points["train_loss_step"]) == steps["step"].tolist()


def test_the_kits_name_for_ray_trains_checkpoint_record_is_ray_trains():
    """kept.py names Ray Train's snapshot file rather than importing Ray Train for it."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    from raytrain_kit.kept import TRAIN_SNAPSHOT_FILE

    assert TRAIN_SNAPSHOT_FILE == CHECKPOINT_MANAGER_SNAPSHOT_FILENAME == "checkpoint_manager_snapshot.json"
