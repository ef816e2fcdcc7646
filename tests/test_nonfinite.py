"""Non-finite losses: stop, skip and rollback on a run whose lr jumps until the loss diverges.
The kept checkpoint always holds finite weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raytrain_kit.checkpoint import MODEL_FILE
from raytrain_kit.config import build_experiment
from raytrain_kit.errors import RunError
from raytrain_kit.launch import fit

STEPS_PER_EPOCH = 1600 // 32  # 2000 rows, 80% for training, one worker, batch 32


def _diverging(storage: str, name: str, **train) -> dict:
    """Plain SGD whose lr is multiplied by 1e5 after two epochs: the loss blows up in epoch 3."""
    return build_experiment({
        "data": {"source": "synthetic", "num_rows": 2000, "num_features": 8, "num_classes": 3},
        "model": {"kind": "mlp", "hidden": [32]}, "optim": {"name": "sgd", "lr": 0.05},
        "schedule": {"kind": "step", "step_size": 2 * STEPS_PER_EPOCH, "gamma": 1e5},
        "train": {"epochs": 4, "batch_size": 32, **train}, "scaling": {"num_workers": 1, "max_failures": 0},
        "checkpoint": {"every_epochs": 1, "keep": 5}, "preflight": {"enabled": False},
        "run": {"name": name, "storage_path": storage}})


def _finite_weights(checkpoint: str) -> bool:
    state = torch.load(Path(checkpoint) / MODEL_FILE, weights_only=True)
    return all(bool(torch.isfinite(t).all()) for t in state.values())


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_stop_and_skip_keep_the_last_good_checkpoint(ray_session, storage, policy):
    cfg = _diverging(storage, policy, on_nonfinite=policy, max_skipped_steps=3)
    # stop: the first non-finite step ends the run; skip: drops 3 steps, stops at the 4th.
    steps = {"stop": 1, "skip": 4}[policy]
    with pytest.raises(RunError, match=rf"became NaN/inf in epoch 3 \({steps} non-finite step\(s\), "
                                       rf"train.on_nonfinite: {policy}\)"):
        fit(cfg)
    run_dir = Path(storage) / policy
    assert sorted(p.name for p in run_dir.glob("checkpoint_epoch_*")) == ["checkpoint_epoch_0001",
                                                                        "checkpoint_epoch_0002"]
    import json

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["epochs_completed"] == 2
    assert summary["checkpoint"].endswith(("checkpoint_epoch_0001", "checkpoint_epoch_0002"))
    assert _finite_weights(summary["checkpoint"]) and _finite_weights(run_dir / "checkpoint_epoch_0002")


def test_rollback_restores_and_lowers_the_lr(ray_session, storage):
    cfg = _diverging(storage, "rollback", on_nonfinite="rollback", rollback_lr_factor=1e-5, max_skipped_steps=3)
    seen: list[dict] = []
    summary = fit(cfg, on_epoch=seen.append)
    assert summary["status"] == "finished"
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3, 4]
    stopped = [m for m in seen if m["nonfinite_steps"]]
    assert stopped and stopped[0]["epoch"] == 3
    # After the rollback the lr is the jumped schedule (0.05 * 1e5) times the factor 1e-5.
    final = summary["history"][-1]
    assert final["lr"] == pytest.approx(0.05 * 1e5 * 1e-5)
    assert final["train_loss"] < 2.0 and _finite_weights(summary["checkpoint"])
