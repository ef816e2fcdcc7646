"""Preflight: the gradient check as a Ray task, run before any training worker starts.

`preflight_task` builds the experiment's model where Ray places it (so a custom model must
import there, as it must for training), checks its gradients on a small fixed batch of the
training data with `gradcheck.check_gradients`, and returns the report. `run_preflight` raises
`PreflightError` (exit code 3) when the report fails under `preflight.fail_on`.
Exercised by `raytrain-kit check jobs/digits.yaml` and `tests/test_preflight.py`.
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from raytrain_kit.config import Experiment, build_experiment
from raytrain_kit.data import DataSpec, spec_from_dict, spec_to_dict
from raytrain_kit.errors import PreflightError
from raytrain_kit.gradcheck import GradCheckReport, check_gradients
from raytrain_kit.models import build_model
from raytrain_kit.steps import build_loss_fn


@ray.remote(num_cpus=1, max_retries=0)
def preflight_task(experiment: dict, spec: dict, x: np.ndarray, y: np.ndarray) -> dict:
    cfg, spec = build_experiment(experiment), spec_from_dict(spec)
    model = build_model(cfg, spec).train()
    batch = (torch.tensor(x, dtype=torch.float32).view(-1, *spec.input_shape), torch.tensor(y))
    report = check_gradients(model, batch, build_loss_fn(classification=spec.task == "classification"),
                             num_directions=cfg.preflight.num_directions, rtol=cfg.preflight.rtol,
                             seed=cfg.train.seed)
    return report.to_dict()


def run_preflight(cfg: Experiment, train: ray.data.Dataset, spec: DataSpec) -> GradCheckReport:
    """Check on the first `preflight.batch_size` training rows; raise PreflightError on failure."""
    batch = train.take_batch(cfg.preflight.batch_size, batch_format="numpy")
    report = GradCheckReport.from_dict(ray.get(preflight_task.remote(
        cfg.model_dump(mode="json"), spec_to_dict(spec), batch["x"], batch["y"])))
    if report.failed(cfg.preflight.fail_on):
        problems = report.errors + (report.warnings if cfg.preflight.fail_on == "warning" else [])
        raise PreflightError(*[f"preflight: {p}" for p in problems], details=report.format_table(),
                             report=report.to_dict())
    return report
