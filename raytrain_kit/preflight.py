"""Preflight: the gradient check, run before any training worker starts.

`check_model` builds the experiment's model, checks its gradients on a small fixed batch of the
training data with `gradcheck.check_gradients`, and returns the report. `run_preflight` runs it
where the work would land anyway: in this process when Ray is this machine alone (a task would
run on this machine too, in a new process that imports torch again: about 2 s of a run's start
on 2 cores), else as `preflight_task` where Ray places it (so a custom model must import there,
as it must for training). It raises `PreflightError` (exit code 3) when the report fails under
`preflight.fail_on`. Exercised by `raytrain-kit check jobs/digits.yaml` and
`tests/test_preflight.py`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import ray
import torch

from raytrain_kit.config import Experiment, build_experiment
from raytrain_kit.data import DataSpec, spec_from_dict, spec_to_dict
from raytrain_kit.data.shards import head_rows
from raytrain_kit.errors import PreflightError
from raytrain_kit.gradcheck import GradCheckReport, check_gradients
from raytrain_kit.models import build_model
from raytrain_kit.steps import build_loss_fn


def check_model(cfg: Experiment, spec: DataSpec, x: np.ndarray, y: np.ndarray) -> GradCheckReport:
    """The gradient check of the experiment's model (built from `train.seed`, in train mode) on
    the rows `x` (shape [rows, features], float) and labels `y` (shape [rows])."""
    model = build_model(cfg, spec).train()
    batch = (torch.tensor(x, dtype=torch.float32).view(-1, *spec.input_shape), torch.tensor(y))
    return check_gradients(model, batch, build_loss_fn(classification=spec.task == "classification"),
                           num_directions=cfg.preflight.num_directions, rtol=cfg.preflight.rtol, seed=cfg.train.seed)


@ray.remote(num_cpus=1, max_retries=0)
def preflight_task(experiment: dict, spec: dict, x: np.ndarray, y: np.ndarray) -> dict:
    return check_model(build_experiment(experiment), spec_from_dict(spec), x, y).to_dict()


def ray_is_this_machine() -> bool:
    """Whether Ray's only node is this process's and has CPUs: a task would run on this
    machine anyway. A cluster of more nodes, or a head without CPUs (waiting for workers), gets a
    task placed by Ray."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return (len(nodes) == 1 and nodes[0]["NodeID"] == ray.get_runtime_context().get_node_id()
            and nodes[0].get("Resources", {}).get("CPU", 0) > 0)


def run_preflight(cfg: Experiment, train: ray.data.Dataset, spec: DataSpec, *,
                  in_process: Optional[bool] = None) -> GradCheckReport:
    """Check on the first `preflight.batch_size` training rows; raise PreflightError on failure.
    `in_process`: None decides by `ray_is_this_machine`; False always uses the task."""
    batch = head_rows(train, cfg.preflight.batch_size)
    here = ray_is_this_machine() if in_process is None else in_process
    if here:
        report = check_model(cfg, spec, batch["x"], batch["y"])
    else:
        report = GradCheckReport.from_dict(ray.get(preflight_task.remote(
            cfg.model_dump(mode="json"), spec_to_dict(spec), batch["x"], batch["y"])))
    if report.failed(cfg.preflight.fail_on):
        problems = report.errors + (report.warnings if cfg.preflight.fail_on == "warning" else [])
        raise PreflightError(*[f"preflight: {p}" for p in problems], details=report.format_table(),
                             report=report.to_dict())
    return report
