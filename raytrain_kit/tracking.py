"""Run records, written by the driver from each epoch's report: `metrics.csv`, TensorBoard event
files, and (when `tracking.mlflow_uri` is set) an MLflow run.

The driver writes them, not the workers: it already receives every epoch's metrics from Ray
Train, so a run leaves one consistent record wherever its workers ran, and a resumed run
continues the same files. Rank 0 adds the histograms (weights, gradient norms) to the reports
it makes on `tracking.histogram_every` epochs. Exercised by `raytrain-kit train jobs/digits.yaml`.
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import tempfile
import time
from typing import Any, Iterator, Optional, Sequence

from raytrain_kit.config import Experiment
from raytrain_kit.errors import ConfigError, short_message
from raytrain_kit.storage import filesystem, path_exists, read_run_file, write_run_file

METRICS_CSV = "metrics.csv"
STEPS_CSV = "steps.csv"  # epoch, step, train_loss of every optimizer step
TENSORBOARD_DIR = "tensorboard"
HISTOGRAMS = "histograms"  # the report key rank 0 fills on histogram epochs
NUM_BINS = 30


# ---------------------------------------------------------------------------------------------
# Pure parts: what the worker computes, and how a report becomes a row


def histogram_epoch(cfg: Experiment, epoch: int) -> bool:
    every = cfg.tracking.histogram_every
    return bool(every) and (epoch % every == 0 or epoch == cfg.train.epochs)


def layer_histograms(parameters) -> dict[str, dict]:
    """Per parameter tensor: a histogram of its values (TensorBoard's raw form) and the norm of
    its current gradient (the epoch's last step); small enough to travel in a report.
    `parameters`: a module, or (name, values, gradient) triples (the worker's whole tensors
    gathered from shards)."""
    import numpy as np
    import torch

    if hasattr(parameters, "named_parameters"):
        parameters = ((name, p.detach(), p.grad) for name, p in parameters.named_parameters())
    out: dict[str, dict] = {}
    for name, p, grad in parameters:
        # A copy, always: numpy's view of a live parameter would make its storage unresizable,
        # and FSDP2 frees an unsharded root's parameters by resizing their storage to 0 ("Trying
        # to resize storage that is not resizable" at the next checkpoint).
        values = p.detach().to("cpu", torch.float64, copy=True).numpy().ravel()
        counts, edges = np.histogram(values, bins=NUM_BINS)
        out[name] = {"min": float(values.min()), "max": float(values.max()), "num": int(values.size),
                     "sum": float(values.sum()), "sum_squares": float((values ** 2).sum()),
                     "bucket_limits": edges[1:].tolist(), "bucket_counts": counts.tolist(),
                     "grad_norm": float(grad.norm()) if grad is not None else None}
    return out


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The numbers of a report (no booleans, paths or histograms), in a stable order."""
    return {k: v if isinstance(v, int) else float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _read_table(directory: str, name: str) -> list[dict]:
    """Rows of a run's CSV written by `metrics_table` (none if it is not there)."""
    if not path_exists(f"{directory}/{name}"):
        return []
    return [{k: _number(v) for k, v in row.items() if v != ""}
            for row in csv.DictReader(io.StringIO(read_run_file(directory, name).decode()))]


def _number(text: str) -> int | float:
    return int(text) if text.lstrip("-").isdigit() else float(text)


def metrics_table(rows: list[dict]) -> str:
    """CSV text with one row per epoch; columns in first-seen order (later epochs may add
    validation columns), blanks where an epoch did not report a metric."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def flat_params(cfg: Experiment) -> dict[str, str]:
    """The config as dotted keys, for MLflow's params (strings of at most 500 characters)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = str(value)[:500]

    walk("", cfg.model_dump(mode="json", exclude={"tune"}))
    return out


def check_tracking(cfg: Experiment) -> None:
    """Refuse at launch, not at the first epoch, a tracking setting this installation cannot honour."""
    import importlib.util

    if cfg.tracking.mlflow_uri and importlib.util.find_spec("mlflow") is None:
        raise ConfigError("tracking.mlflow_uri: MLflow is not installed; pip install 'raytrain-kit[mlflow]' "
                          "or remove tracking.mlflow_uri")


# ---------------------------------------------------------------------------------------------
# The recorder


class RunRecorder:
    """Feeds one run's records. `on_epoch(metrics)` per report, `reconcile(history, steps)` with
    the latest registered checkpoint's contents (at a resume's start and at every end), and
    `close(summary)`. `parent_mlflow_run`: a sweep's MLflow run id, making this run its child.

    metrics.csv and steps.csv are rewritten whole, so they show every epoch as it is reported
    and are corrected from the checkpoint. TensorBoard's files and MLflow's history only grow, so
    an epoch goes to them once a registered checkpoint covers it (at once with
    `checkpoint.every_epochs: 1`): such an epoch is never trained again, so it is never written
    twice, and one lost on the way (a driver killed after the checkpoint registered) is written
    by the next `reconcile`, which asks them what they hold."""

    def __init__(self, cfg: Experiment, directory: str, *, resume: bool, parent_mlflow_run: Optional[str] = None):
        self.cfg, self.directory = cfg, directory
        self.rows = _read_table(directory, METRICS_CSV) if resume else []
        self.step_rows = _read_table(directory, STEPS_CSV) if resume else []
        self.pending: list[dict] = []  # reported epochs no registered checkpoint covers yet
        self.writer, self.tb_local, self.tb_upload = None, None, None
        self.in_tensorboard: dict[str, set[int]] = {}  # tag -> steps the event files hold
        if cfg.tracking.tensorboard:
            from tensorboardX import SummaryWriter

            target = f"{directory}/{TENSORBOARD_DIR}"
            self.in_tensorboard = tensorboard_steps(target) if resume else {}
            # TensorBoard appends to local files; a run stored at a URI writes here and uploads at close.
            self.tb_local = target if "://" not in target else tempfile.mkdtemp(prefix="raytrain-kit-tb-")
            self.tb_upload = None if "://" not in target else target
            self.writer = SummaryWriter(self.tb_local, flush_secs=10)
        self.mlflow_run = None
        # metric -> steps MLflow holds: none in a new run; asked of MLflow once in a resumed one.
        self.in_mlflow: Optional[dict[str, set[int]]] = None if resume else {}
        if cfg.tracking.mlflow_uri:
            self.mlflow_run = start_mlflow_run(cfg, directory=directory, resume=resume, parent=parent_mlflow_run)

    def on_epoch(self, metrics: dict, *, step_losses: Optional[Sequence[float]] = None) -> None:
        """One epoch's report; `step_losses`: the mean loss of each of its optimizer steps;
        `metrics["checkpoint"]`: its registered checkpoint, if it has one."""
        epoch = int(metrics["epoch"])
        row = scalar_metrics(metrics)
        # A run resumed from an earlier checkpoint trains some epochs again: the new rows replace them.
        self.rows = [r for r in self.rows if r.get("epoch", math.inf) < epoch] + [row]
        write_run_file(self.directory, METRICS_CSV, metrics_table(self.rows))
        steps = None
        if step_losses is not None:
            first = int(metrics["step"]) - len(step_losses) + 1
            steps = [{"epoch": epoch, "step": first + i, "train_loss": loss} for i, loss in enumerate(step_losses)]
            self.step_rows = [r for r in self.step_rows if r.get("epoch", math.inf) < epoch] + steps
            write_run_file(self.directory, STEPS_CSV, metrics_table(self.step_rows))
        self.pending = [p for p in self.pending if p["row"]["epoch"] < epoch] + [
            {"row": row, "steps": steps or [], "histograms": metrics.get(HISTOGRAMS) or {}}]
        if metrics.get("checkpoint"):
            self.publish(up_to=epoch)

    def publish(self, *, up_to: float = math.inf) -> None:
        """Write the pending epochs up to `up_to` to TensorBoard and MLflow."""
        ready = [p for p in self.pending if p["row"]["epoch"] <= up_to]
        self.pending = [p for p in self.pending if p["row"]["epoch"] > up_to]
        for p in ready:
            self._write_epoch(p["row"], p["steps"], p["histograms"])

    def reconcile(self, history: list[dict], steps: Optional[dict]) -> None:
        """Make the records agree with the latest registered checkpoint's `history` (its epochs'
        metrics) and `steps` ({"first_epoch", "steps": [epoch, step, loss] rows}; None in an
        older checkpoint): the epochs this run trained appear exactly once, as the checkpoint has
        them (a clone of another run's checkpoint records from its `first_epoch` on); later
        epochs stay as reported."""
        last = int(history[-1]["epoch"]) if history else 0
        first = steps["first_epoch"] if steps is not None else 1
        history = [h for h in history if int(h["epoch"]) >= first]
        rows = [scalar_metrics(h) for h in history] + [r for r in self.rows if r.get("epoch", 0) > last]
        if steps is None:  # a checkpoint from before steps were kept: keep what the file has
            kept = [r for r in self.step_rows if r.get("epoch", 0) <= last]
        else:
            kept = [{"epoch": int(e), "step": int(n), "train_loss": float(v)} for e, n, v in steps["steps"]]
        step_rows = kept + [r for r in self.step_rows if r.get("epoch", 0) > last]
        if rows != self.rows or not path_exists(f"{self.directory}/{METRICS_CSV}"):
            self.rows = rows
            write_run_file(self.directory, METRICS_CSV, metrics_table(rows))
        if step_rows != self.step_rows:
            self.step_rows = step_rows
            write_run_file(self.directory, STEPS_CSV, metrics_table(step_rows))
        self.pending = [p for p in self.pending if p["row"]["epoch"] > last]
        # TensorBoard and MLflow: the checkpoint's epochs they do not hold yet.
        by_epoch: dict[int, list[dict]] = {}
        for r in kept:
            by_epoch.setdefault(r["epoch"], []).append(r)
        for h in history:
            row = scalar_metrics(h)
            self._write_epoch(row, by_epoch.get(int(row["epoch"]), []), {})

    def _write_epoch(self, row: dict, steps: list[dict], histograms: dict) -> None:
        """One epoch into TensorBoard and MLflow, skipping any (tag, step) they already hold."""
        epoch = int(row["epoch"])
        # The worker's wall clock at the epoch's end dates the points; it is not a curve itself.
        wall_time = row.get("wall_time")
        plotted = {k: v for k, v in row.items() if k not in ("epoch", "wall_time") and math.isfinite(v)}
        if self.writer is not None:
            held = self.in_tensorboard
            for r in steps:
                if r["step"] not in held.setdefault("train_loss_step", set()):
                    self.writer.add_scalar("train_loss_step", r["train_loss"], r["step"], walltime=wall_time)
                    held["train_loss_step"].add(r["step"])
            for key, value in plotted.items():
                if epoch not in held.setdefault(key, set()):
                    self.writer.add_scalar(key, value, epoch, walltime=wall_time)
                    held[key].add(epoch)
            for name, h in histograms.items():
                self.writer.add_histogram_raw(f"weights/{name}", min=h["min"], max=h["max"], num=h["num"],
                                              sum=h["sum"], sum_squares=h["sum_squares"],
                                              bucket_limits=h["bucket_limits"], bucket_counts=h["bucket_counts"],
                                              global_step=epoch)
                if h.get("grad_norm") is not None:
                    self.writer.add_scalar(f"grad_norm/{name}", h["grad_norm"], epoch)
        if self.mlflow_run is not None:
            from mlflow.entities import Metric

            if self.in_mlflow is None:
                self.in_mlflow = self._mlflow_steps()
            timestamp = int(wall_time * 1000) if wall_time else int(time.time() * 1000)
            metrics = [Metric(k, v, timestamp, epoch) for k, v in plotted.items()
                       if epoch not in self.in_mlflow.get(k, ())]
            if metrics:
                _mlflow_client(self.cfg.tracking.mlflow_uri).log_batch(self.mlflow_run, metrics=metrics)
            for m in metrics:
                self.in_mlflow.setdefault(m.key, set()).add(epoch)

    def _mlflow_steps(self) -> dict[str, set[int]]:
        """The steps (epochs) MLflow holds for each of this run's metrics."""
        client = _mlflow_client(self.cfg.tracking.mlflow_uri)
        keys = client.get_run(self.mlflow_run).data.metrics
        return {k: {m.step for m in client.get_metric_history(self.mlflow_run, k)} for k in keys}

    def close(self, summary: Optional[dict]) -> None:
        """A run that ended cleanly (finished, or stopped by a sweep's scheduler) publishes what
        is pending; a failed one's unchecked epochs are trained again on resume."""
        if (summary or {}).get("status") in ("finished", "stopped"):
            self.publish()
        if self.writer is not None:
            self.writer.close()
            if self.tb_upload:
                _upload(self.tb_local, self.tb_upload)
                shutil.rmtree(self.tb_local, ignore_errors=True)
        if self.mlflow_run is not None:
            end_mlflow_run(self.cfg, self.mlflow_run, summary)


def tensorboard_events(folder: str) -> Iterator:
    """Every event of a TensorBoard folder's event files (local or a URI), file by file in name
    order, read with tensorboardX's own protobuf from TFRecord framing (length, crc, data, crc).
    A record cut short by a crash ends its file's reading."""
    import struct

    import pyarrow.fs as pafs
    from tensorboardX.proto.event_pb2 import Event

    fs, path = filesystem(folder)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return
    infos = sorted(fs.get_file_info(pafs.FileSelector(path)), key=lambda i: i.base_name)
    for info in infos:
        if not info.base_name.startswith("events.out.tfevents."):
            continue
        with fs.open_input_stream(info.path) as f:
            data = f.read()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            if offset + 12 + length + 4 > len(data):
                break
            yield Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4


def tensorboard_steps(folder: str) -> dict[str, set[int]]:
    """{tag: steps} of the scalars in a TensorBoard folder (`tensorboard_events`)."""
    steps: dict[str, set[int]] = {}
    for event in tensorboard_events(folder):
        for value in event.summary.value:
            if not value.HasField("histo"):
                steps.setdefault(value.tag, set()).add(event.step)
    return steps


MLFLOW_RUN_FILE = "mlflow_run.json"  # {"run_id": ...}: the MLflow run a resume goes on with


def start_mlflow_run(cfg: Experiment, *, directory: str, resume: bool, parent: Optional[str] = None) -> str:
    """A run (or a sweep) as an MLflow run with the config as params; a resumed one goes on with
    the MLflow run it had, whose id its `directory` keeps. Returns its id. Raises ConfigError
    naming the URI if MLflow refuses."""
    try:
        return _start_mlflow_run(cfg, directory=directory, resume=resume, parent=parent)
    except Exception as e:
        raise ConfigError(f"tracking.mlflow_uri: cannot start an MLflow run at {cfg.tracking.mlflow_uri!r} "
                          f"({type(e).__name__}: {short_message(e)}); check the URI or the server") from None


def _mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 refuses its file store unless asked; the config asking for a file: URI is that ask.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(uri)


def _start_mlflow_run(cfg: Experiment, *, directory: str, resume: bool, parent: Optional[str]) -> str:
    import json

    client = _mlflow_client(cfg.tracking.mlflow_uri)
    if resume and path_exists(f"{directory}/{MLFLOW_RUN_FILE}"):  # the same MLflow run goes on
        run_id = json.loads(read_run_file(directory, MLFLOW_RUN_FILE))["run_id"]
        client.update_run(run_id, status="RUNNING")
        return run_id
    experiment = client.get_experiment_by_name(cfg.tracking.mlflow_experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.tracking.mlflow_experiment)
    if resume:  # a run from before the id was kept: found by its name
        found = client.search_runs([experiment_id], filter_string=f"tags.`raytrain_kit.run_name` = '{cfg.run.name}'",
                                   max_results=1)
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            write_run_file(directory, MLFLOW_RUN_FILE, json.dumps({"run_id": found[0].info.run_id}))
            return found[0].info.run_id
    tags = {"raytrain_kit.run_name": cfg.run.name, "mlflow.runName": cfg.run.name}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(experiment_id, run_name=cfg.run.name, tags=tags)
    from mlflow.entities import Param

    params = flat_params(cfg)
    names = list(params)
    for i in range(0, len(names), 100):  # MLflow takes at most 100 params a batch
        client.log_batch(run.info.run_id, params=[Param(k, params[k]) for k in names[i:i + 100]])
    # Kept before any epoch is logged: a crash after this point resumes into this run, never a new one.
    write_run_file(directory, MLFLOW_RUN_FILE, json.dumps({"run_id": run.info.run_id}))
    return run.info.run_id


def end_mlflow_run(cfg: Experiment, run_id: str, summary: Optional[dict], *, artifacts: Sequence[str] = ()) -> None:
    """The best value, the best checkpoint (a local one) and any `artifacts` files; then the status."""
    client = _mlflow_client(cfg.tracking.mlflow_uri)
    for path in artifacts:
        if "://" not in path and os.path.isfile(path):
            client.log_artifact(run_id, path)
    status = (summary or {}).get("status", "failed")
    if summary and summary.get("best_value") is not None:
        client.log_metric(run_id, f"best_{summary['metric']}", float(summary["best_value"]))
    checkpoint = (summary or {}).get("checkpoint")
    if checkpoint and "://" not in checkpoint and os.path.isdir(checkpoint):
        client.log_artifacts(run_id, checkpoint, artifact_path="best_checkpoint")
    client.set_terminated(run_id, status={"finished": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED"))


def _upload(local: str, uri: str) -> None:
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    pafs.copy_files(local, path, destination_filesystem=fs)
