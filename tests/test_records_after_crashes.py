"""Nothing lost, nothing twice: after a worker dies right after a checkpointed report, the run's
records (metrics.csv, steps.csv, TensorBoard, MLflow) agree with its latest registered checkpoint,
a checkpoint Ray never registered is removed and never named, and a resume continues the same
MLflow run. Both outcomes of the issue's case are forced deterministically: the state a lost
report leaves (the records without the checkpointed epoch) and a checkpoint that was written but
never registered."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from chaos import registered
from records import tensorboard_points

from raytrain_kit.config import build_experiment, with_overrides
from raytrain_kit.errors import RunError
from raytrain_kit.launch import fit

STEPS_PER_EPOCH = 8  # 256 training rows over 2 workers x 16


def _config(tmp_path: Path, name: str, *, fail_at_step) -> object:
    return build_experiment({
        "data": {"source": "synthetic", "num_rows": 320, "num_features": 8, "num_classes": 3, "val_fraction": 0.2},
        "model": {"kind": "custom", "target": "test_models_lib:build_failing_mlp",
                  "kwargs": {"hidden": 16, "fail_at_step": fail_at_step}},
        "optim": {"name": "adamw", "lr": 0.01}, "schedule": {"kind": "cosine", "warmup_steps": 3},
        "train": {"epochs": 3, "batch_size": 16}, "scaling": {"num_workers": 2, "max_failures": 0},
        "checkpoint": {"every_epochs": 1, "keep": 5}, "preflight": {"enabled": False},
        "tracking": {"mlflow_uri": f"file:{tmp_path / 'mlruns'}", "mlflow_experiment": "crashes"},
        "run": {"name": name, "storage_path": str(tmp_path / "runs")}})


def _mlflow_runs(tmp_path: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file:{tmp_path / 'mlruns'}")
    return client.search_runs([client.get_experiment_by_name("crashes").experiment_id])


def _assert_each_epoch_once(tmp_path: Path, run_dir: Path, summary: dict) -> None:
    """metrics.csv, steps.csv, TensorBoard and MLflow hold epochs 1-3 (and steps 1-24) once each,
    with the values of the checkpoint's history; one MLflow run."""
    from mlflow.tracking import MlflowClient

    history = summary["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2, 3]
    assert metrics["train_loss"].tolist() == pytest.approx([h["train_loss"] for h in history], rel=1e-12)
    steps = pd.read_csv(run_dir / "steps.csv")
    assert steps["step"].tolist() == list(range(1, 3 * STEPS_PER_EPOCH + 1))
    assert steps["epoch"].tolist() == [e for e in (1, 2, 3) for _ in range(STEPS_PER_EPOCH)]
    saved = json.loads((run_dir / "checkpoint_epoch_0003" / "steps.json").read_text())["steps"]
    assert [[int(e), int(s)] for e, s, _ in saved] == steps[["epoch", "step"]].to_numpy().tolist()
    assert steps["train_loss"].tolist() == pytest.approx([v for _, _, v in saved], rel=1e-12)

    points = tensorboard_points(run_dir / "tensorboard")
    assert points["val_loss"] == [1, 2, 3] and points["train_loss"] == [1, 2, 3]
    assert sorted(points["train_loss_step"]) == list(range(1, 3 * STEPS_PER_EPOCH + 1))  # each step once

    (run,) = _mlflow_runs(tmp_path)
    assert run.info.status == "FINISHED"
    client = MlflowClient(f"file:{tmp_path / 'mlruns'}")
    logged = client.get_metric_history(run.info.run_id, "val_loss")
    assert sorted(m.step for m in logged) == [1, 2, 3]
    assert [m.value for m in sorted(logged, key=lambda m: m.step)] == pytest.approx([h["val_loss"] for h in history])


def test_records_lost_after_a_checkpointed_report_are_rebuilt_from_the_checkpoint(ray_session, tmp_path):
    """Outcome A: epoch 1's checkpoint registered, its report lost on the way to the driver (the
    worker died ~10 ms after it); the resumed run's records held epochs 2-3 and 16 of 24 steps."""
    cfg = _config(tmp_path, "lost-report", fail_at_step=STEPS_PER_EPOCH + 3)  # epoch 2, batch 3
    run_dir = tmp_path / "runs" / "lost-report"
    with pytest.raises(RunError, match="injected failure at training step 11"):
        fit(cfg)
    assert registered(run_dir) == {"checkpoint_epoch_0001"}
    # The state a lost report leaves: epoch 1's rows never written, its TensorBoard points with them.
    pd.read_csv(run_dir / "metrics.csv").query("epoch > 1").to_csv(run_dir / "metrics.csv", index=False)
    pd.read_csv(run_dir / "steps.csv").query("epoch > 1").to_csv(run_dir / "steps.csv", index=False)
    shutil.rmtree(run_dir / "tensorboard")
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == _mlflow_runs(tmp_path)[0].info.run_id

    summary = fit(with_overrides(cfg, {"model.kwargs.fail_at_step": None}), resume=True)
    assert summary["status"] == "finished"
    _assert_each_epoch_once(tmp_path, run_dir, summary)


def test_a_checkpoint_never_registered_is_removed_and_never_named(ray_session, tmp_path):
    """Outcome B: checkpoint_epoch_0001/ uploaded but never registered (no Ray snapshot): it was
    left on disk, named as the failed run's result, and `--resume` silently began again."""
    cfg = _config(tmp_path, "unregistered", fail_at_step=3)  # dies in epoch 1: nothing registered
    run_dir = tmp_path / "runs" / "unregistered"
    with pytest.raises(RunError):
        fit(cfg)
    assert registered(run_dir) == set()
    # What a worker killed in the middle of its upload leaves: part of a checkpoint, never registered.
    orphan = run_dir / "checkpoint_epoch_0001"
    orphan.mkdir()
    (orphan / "history.json").write_text(json.dumps([{"epoch": 1, "val_loss": 0.5}]))
    (orphan / "train_state.pt").write_bytes(b"PK\x03\x04 cut short")

    lines: list[str] = []
    with pytest.raises(RunError, match="injected failure at training step 3"):
        fit(cfg, resume=True, log=lines.append)  # still failing: the resumed run fails again
    assert not (run_dir / "checkpoint_epoch_0001").exists()  # removed, not restored from
    assert "resume: no registered checkpoint in " + str(run_dir) + "; training from epoch 1" in lines
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["checkpoint"] is None and summary["history"] == []

    summary = fit(with_overrides(cfg, {"model.kwargs.fail_at_step": None}), resume=True)
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3] and summary["status"] == "finished"
    on_disk = {p.name for p in run_dir.glob("checkpoint_epoch_*")}
    assert registered(run_dir) == on_disk == {f"checkpoint_epoch_{e:04d}" for e in (1, 2, 3)}
    assert Path(summary["checkpoint"]).name in on_disk  # the best epoch's, registered
    assert pd.read_csv(run_dir / "metrics.csv")["epoch"].tolist() == [1, 2, 3]
    assert len(_mlflow_runs(tmp_path)) == 1  # one kit run, across its two resumes


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs: a disk that fills up during a run (needs the right to mount, as root has)."""
    import subprocess

    mount = tmp_path / "small_disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_ends_the_run_in_one_line_and_keeps_the_latest_checkpoint(ray_session, small_disk, capsys):
    """Checkpoints of ~0.65 MB on a 2 MB disk: the third or fourth upload finds it full."""
    import torch

    from raytrain_kit.cli import main

    code = main(["train", "jobs/tabular_mlp.yaml", "--set", "data.source=synthetic", "--set", "data.label=label",
                 "--set", "data.num_rows=1000", "--set", "model.hidden=[256,256]", "--set", "train.epochs=6",
                 "--set", "checkpoint.keep=6",
                 "--set", "preflight.enabled=false", "--set", f"run.storage_path={small_disk}", "--set", "run.name=full"])
    err = capsys.readouterr().err
    run_dir = small_disk / "full"
    assert code == 1
    assert err.splitlines()[0] == (
        f"error: run.storage_path: no space left on the disk of {run_dir}; the latest registered checkpoint is intact "
        "(the one being written is removed): free space or set run.storage_path to a larger disk (moving the run "
        "there), then run the same command with --resume"), err
    assert "Traceback" not in err
    on_disk = {p.name for p in run_dir.glob("checkpoint_epoch_*")}
    assert on_disk == registered(run_dir) and 1 <= len(on_disk) < 6
    latest = run_dir / max(on_disk)
    assert torch.load(latest / "model.pt", weights_only=True)  # whole, loadable
    assert json.loads((latest / "history.json").read_text())[-1]["epoch"] == int(max(on_disk).rsplit("_", 1)[1])
