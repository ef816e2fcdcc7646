"""Single-worker sweep trials trained in their own reused process (trial.py, launch.StepwiseRun):
the same metrics as under Ray Train's TorchTrainer, checkpoints registered and pruned, one
process for many trials, PBT clones that start from the donor's checkpoint, and a quiet sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raytrain_kit.config import build_experiment, with_overrides
from raytrain_kit.launch import checkpoint_dirs, fit
from raytrain_kit.loop import MEASURED
from raytrain_kit.sweep import run_sweep, trial_base
from raytrain_kit.trial import REGISTRY_FILE
from records import assert_picture

REPO = Path(__file__).resolve().parents[1]
# Dropout and a warmup-cosine schedule: the RNG streams and the schedule's position must match too.
TRIAL = {"data": {"source": "digits"}, "model": {"kind": "mlp", "hidden": [32], "dropout": 0.2},
         "optim": {"name": "adamw"}, "schedule": {"kind": "cosine", "warmup_steps": 5},
         "train": {"epochs": 3, "batch_size": 64, "seed": 5}, "preflight": {"enabled": False},
         "checkpoint": {"every_epochs": 1, "keep": 2}}


def _results(sweep_dir: Path) -> dict[str, list[dict]]:
    """Tune's results per trial (result.json), which carry the trial process's pid."""
    return {p.parent.name: [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
            for p in sweep_dir.glob("*/result.json")}


def test_in_process_trial_writes_the_metrics_a_torchtrainer_run_writes(ray_session, tmp_path):
    cfg = build_experiment({**TRIAL, "run": {"name": "same", "storage_path": str(tmp_path / "runs")},
                            "tune": {"space": {"optim.lr": {"grid": [0.004]}}, "num_samples": 1}})
    lines: list[str] = []
    summary = run_sweep(cfg, log=lines.append)
    (plan,) = [line for line in lines if line.startswith("sweep same: ")]
    assert "each in a reused process of its own" in plan
    sweep_dir = tmp_path / "runs" / "same"
    (trial_id,) = [p.name for p in (sweep_dir / "runs").iterdir()]
    in_process = sweep_dir / "runs" / trial_id
    # The same trial config under Ray Train's TorchTrainer, 1 worker.
    trainer_cfg = with_overrides(trial_base(cfg, str(sweep_dir)), {"optim.lr": 0.004, "run.name": "under_trainer"})
    fit(trainer_cfg)
    under_trainer = sweep_dir / "runs" / "under_trainer"
    measured = [c for c in MEASURED]
    a = pd.read_csv(in_process / "metrics.csv").drop(columns=measured, errors="ignore")
    b = pd.read_csv(under_trainer / "metrics.csv").drop(columns=measured, errors="ignore")
    assert list(a.columns) == list(b.columns) and {"train_loss", "val_loss", "val_accuracy", "lr", "step"} <= set(a.columns)
    assert a["epoch"].tolist() == [1, 2, 3]
    pd.testing.assert_frame_equal(a, b, check_exact=True)  # identical, not close
    steps_a, steps_b = pd.read_csv(in_process / "steps.csv"), pd.read_csv(under_trainer / "steps.csv")
    assert len(steps_a) == 3 * 23 and steps_a.equals(steps_b)  # 1,437 rows in batches of 64: 23 steps an epoch
    # The kit registered and pruned its own checkpoints as Ray Train does for its runs: the best 2
    # by val_accuracy and the latest, each with its score.
    registry = json.loads((in_process / REGISTRY_FILE).read_text())
    kept = sorted(checkpoint_dirs(str(under_trainer)))
    assert [int(n.rsplit("_", 1)[1]) for n in registry["checkpoints"]] == kept and 2 <= len(kept) <= 3
    assert registry["scores"] == {f"checkpoint_epoch_{e:04d}": a.loc[e - 1, "val_accuracy"] for e in kept}
    assert sorted(p.name for p in in_process.iterdir() if p.name.startswith("checkpoint_epoch")) == registry["checkpoints"]
    assert sorted(checkpoint_dirs(str(in_process))) == kept
    trial_summary = json.loads((in_process / "summary.json").read_text())
    trainer_summary = json.loads((under_trainer / "summary.json").read_text())
    assert trial_summary["status"] == "finished" and trial_summary["best_value"] == trainer_summary["best_value"]
    assert summary["best_value"] == trial_summary["best_value"]
    assert [h["val_loss"] for h in trial_summary["history"]] == [h["val_loss"] for h in trainer_summary["history"]]


def test_a_reused_trial_process_clones_a_donor_as_pbt_does(ray_session, tmp_path):
    """What PBT does with a reused trial process, step by step: a trial trains 2 epochs and Tune
    saves it; the process is reset to another trial's config and restored from that checkpoint
    (the exploit); it then trains on from the donor's weights with its own lr, in a new run whose
    history begins with the donor's epochs. The donor's run ends "stopped" at the reset."""
    from ray import tune

    from raytrain_kit.data import build_datasets
    from raytrain_kit.sweep import TrialTrainable

    cfg = build_experiment({**TRIAL, "train": {"epochs": 4, "batch_size": 64, "seed": 5},
                            "run": {"name": "clone", "storage_path": str(tmp_path / "runs")},
                            "tune": {"space": {"optim.lr": {"loguniform": [1e-4, 3e-2]}}, "scheduler": "pbt"}})
    sweep_dir = tmp_path / "runs" / "clone"
    trainable_class = tune.with_parameters(TrialTrainable, base=trial_base(cfg, str(sweep_dir)),
                                           data=[build_datasets(cfg)], parallel_folds=False)
    trial = trainable_class(config={"optim.lr": 0.01})
    donor_results = [trial.train() for _ in range(2)]
    saved = trial.save(str(tmp_path / "tune_checkpoint"))
    assert trial.reset({"optim.lr": 0.002})  # the next trial, in the same process
    trial.restore(saved)
    clone_results = [trial.train() for _ in range(2)]
    trial.stop()
    assert [r["epoch"] for r in donor_results + clone_results] == [1, 2, 3, 4] and clone_results[-1]["done"]
    runs = {p.name: json.loads((p / "summary.json").read_text()) for p in (sweep_dir / "runs").iterdir()}
    (donor_name,) = [n for n in runs if "_attempt" not in n]
    donor, clone = runs[donor_name], runs[f"{donor_name}_attempt1"]
    assert donor["status"] == "stopped" and [h["epoch"] for h in donor["history"]] == [1, 2]
    assert clone["status"] == "finished" and [h["epoch"] for h in clone["history"]] == [1, 2, 3, 4]
    assert clone["history"][:2] == donor["history"]  # the donor's epochs, restored from its checkpoint
    assert clone["config"]["optim"]["lr"] == 0.002
    # The clone's schedule kept its position (step 46 of 92) and follows its own base lr from there.
    from raytrain_kit.optim import lr_at

    assert clone_results[0]["step"] == 3 * 23
    assert clone_results[0]["lr"] == pytest.approx(lr_at(46, base_lr=0.002, cfg=cfg.schedule, total_steps=92), rel=1e-9)


@pytest.mark.parametrize("workers", [1, 2], ids=["in_process", "torchtrainer"])
def test_a_trial_continued_from_its_final_checkpoint_reports_that_epoch_and_trains_nothing(ray_session, tmp_path, workers):
    """A killed driver's trial process trains on to its last epoch and prunes the checkpoint Tune
    saw, so `tune --resume` continued the trial from its final checkpoint: it trained nothing and
    reported no val_accuracy, and Tune failed the whole resumed sweep (seen in CI)."""
    from ray import tune

    from raytrain_kit.data import build_datasets
    from raytrain_kit.sweep import TrialTrainable

    cfg = build_experiment({**TRIAL, "train": {"epochs": 2, "batch_size": 64, "seed": 5},
                            "run": {"name": "ended", "storage_path": str(tmp_path / "runs")},
                            "tune": {"space": {"optim.lr": {"grid": [0.004]}}}})
    sweep_dir = tmp_path / "runs" / "ended"
    trainable_class = tune.with_parameters(TrialTrainable, base=trial_base(cfg, str(sweep_dir)),
                                           data=[build_datasets(cfg)], parallel_folds=False)
    trial = trainable_class(config={"optim.lr": 0.004})
    finished = [trial.train() for _ in range(2)]
    saved = trial.save(str(tmp_path / "tune_checkpoint"))  # points at checkpoint_epoch_0002, the last
    assert finished[-1]["done"]
    assert trial.reset({"optim.lr": 0.004, "scaling.num_workers": workers})
    trial.restore(saved)
    started = time.monotonic()
    result = trial.train()
    trial.stop()
    assert result["done"] and result["epoch"] == 2 and result["training_iteration"] == 3
    assert result["val_accuracy"] == finished[-1]["val_accuracy"] and result["val_loss"] == finished[-1]["val_loss"]
    assert [p.name for p in (sweep_dir / "runs").iterdir()] == [trial.trial_id]  # no new attempt run
    assert time.monotonic() - started < 5  # no Ray Train run was started for it


def test_quiet_sweep_prints_only_the_result(tmp_path):
    """`tune -q` through the CLI in a fresh process: the result block alone, nothing from Ray."""
    config = tmp_path / "quiet.yaml"
    config.write_text(yaml.safe_dump({**TRIAL, "train": {"epochs": 2, "batch_size": 64},
                                      "run": {"storage_path": str(tmp_path / "runs")},
                                      "tune": {"space": {"optim.lr": {"grid": [0.002, 0.004, 0.008]}}, "num_samples": 1,
                                               "max_concurrent_trials": 1}}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "raytrain_kit", "tune", str(config), "-q"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, start_new_session=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0] == "top trials by val_accuracy (max):" and len(lines) == 1 + 1 + 3 + 2, lines
    assert lines[-2].startswith("sweep directory: ") and lines[-1].startswith("best config: ")
    # Three trials, one at a time, in one process.
    assert len({r["pid"] for rows in _results(tmp_path / "runs" / "quiet").values() for r in rows}) == 1
    # The report, drawn while the command's own Ray shut down: whole, and pictures that decode.
    report = (tmp_path / "runs" / "quiet" / "report.md").read_text()
    assert report.startswith("# Sweep quiet\n\n3 trials") and "(sweep.png)" in report and "(parallel.png)" in report
    for picture in ("sweep.png", "parallel.png"):
        assert_picture(tmp_path / "runs" / "quiet" / picture)


def test_ray_messages_to_the_driver_are_hidden_without_verbose(ray_session, capfd):
    """What the raylet publishes to drivers (its worker-pool warnings, a dead worker's notice) is
    printed by a Ray thread; the kit's driver shows it only with --verbose."""
    import ray

    @ray.remote(num_cpus=0)
    def publish() -> None:
        from ray._private.utils import publish_error_to_driver

        publish_error_to_driver("test", "WARNING: 99 PYTHON worker processes have been started (a test)",
                                ray._private.worker.global_worker.gcs_client)

    ray.get(publish.remote())
    time.sleep(2)  # the listener thread polls
    out, err = capfd.readouterr()
    assert "99 PYTHON worker processes" not in out + err


def test_startup_timeline_starts_when_python_started_not_the_shell(tmp_path):
    """A shell that works for 3 s and then execs Python keeps its process: the timeline must
    start at Python's start, not at the shell's."""
    script = tmp_path / "exec.sh"
    script.write_text(
        f"{sys.executable} -c 'import time\nt = time.time()\nwhile time.time() - t < 3: pass'\n"
        "date +%s.%N\n"
        f"exec {sys.executable} -c 'import time; from raytrain_kit.launch import _process_started; "
        "print(_process_started(), time.time())'\n")
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120)
    before_exec, (origin, now) = float(done.stdout.split()[0]), map(float, done.stdout.split()[1:3])
    assert before_exec - 0.2 <= origin <= now, (before_exec, origin, now)
    plain = subprocess.run([sys.executable, "-c", "import time; from raytrain_kit.launch import _process_started; "
                            "import psutil; print(_process_started() - psutil.Process().create_time())"],
                           capture_output=True, text=True, timeout=120)
    assert float(plain.stdout) == pytest.approx(0.0, abs=1e-6)  # not exec'd: the process's own creation
