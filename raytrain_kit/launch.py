"""Launch one training run: build the `TorchTrainer`, fit, write `summary.json`.

Owns the run directory (`run.storage_path/run.name`, local or a URI), the resume-or-refuse
decision, the progress stream from Ray Train's controller to the driver, and the summary
that `report` and sweeps read. Every run is `open_run` (checks, data, preflight, records),
training, then `close_run` (checkpoints reconciled, summary): `fit` trains through Ray Train;
`StepwiseRun` trains a sweep's single-worker trial in the calling process, an epoch per call
(trial.py). `sweep` uses both. Exercised by `raytrain-kit train jobs/digits.yaml` and `tune`.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import pyarrow.fs as pafs
import ray
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

from raytrain_kit import IMPORTED_AT
from raytrain_kit import checkpoint as ckpt
from raytrain_kit import cluster
from raytrain_kit.cluster import connect, started_embedded_ray
from raytrain_kit.config import Experiment, to_yaml
from raytrain_kit.data import DataSpec, build_datasets, describe_data, spec_to_dict, split_for_workers
from raytrain_kit.errors import ConfigError, KitError, RunError, short_message, traceback_text
from raytrain_kit.materialize import build_on_meta
from raytrain_kit.models import build_model
from raytrain_kit.parallel import check_blocks, is_sharded
from raytrain_kit.preflight import run_preflight
from raytrain_kit.storage import check_run_name, filesystem, path_exists, read_run_file, run_dir, storage_root, \
    write_run_file  # noqa: F401 (re-exported)
from raytrain_kit.tracking import RunRecorder, check_tracking
from raytrain_kit.loop import REPORT_SEQ, STARTUP, STEP_LOSSES
from raytrain_kit.kept import (SUMMARY_FILE, _checkpoint_names_on_disk, _registered_checkpoint_names,  # noqa: F401
                               checkpoint_dirs, checkpoint_record, chosen_checkpoint, read_model_state)
from raytrain_kit.trial import train_in_process
from raytrain_kit.worker import train_loop_per_worker, write_failure

if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer

CONFIG_FILE = "config.yaml"


# ---------------------------------------------------------------------------------------------
# Ray and storage


def read_history(checkpoint_uri: str) -> list[dict]:
    import json

    fs, path = filesystem(checkpoint_uri)
    with fs.open_input_stream(f"{path}/{ckpt.HISTORY_FILE}") as f:
        return json.loads(f.read().decode())


def read_steps(checkpoint_uri: str) -> Optional[dict]:
    """A checkpoint's steps: {"first_epoch": n, "steps": [[epoch, step, train_loss], ...]}; None
    if it predates them."""
    import json

    fs, path = filesystem(checkpoint_uri)
    if fs.get_file_info(f"{path}/{ckpt.STEPS_FILE}").type != pafs.FileType.File:
        return None
    with fs.open_input_stream(f"{path}/{ckpt.STEPS_FILE}") as f:
        return json.loads(f.read().decode())


def reconcile_records(directory: str, recorder: RunRecorder, *, log: Callable[[str], None]) -> list[dict]:
    """The one reconciliation step, at a resumed run's start and at every run's end: checkpoints
    that were never registered are removed, and the run's records are made to agree with the
    latest registered checkpoint (`RunRecorder.reconcile`). Returns that checkpoint's history
    (every epoch up to it, across resumes; empty without one)."""
    remove_orphan_checkpoints(directory)
    kept = checkpoint_dirs(directory)
    if not kept:
        return []
    latest = kept[max(kept)]
    history = read_history(latest)
    try:
        recorder.reconcile(history, read_steps(latest))
    except Exception as e:  # a record that cannot be written must not end the run
        log(f"warning: run records: {type(e).__name__}: {short_message(e)}")
    return history


# ---------------------------------------------------------------------------------------------
# Progress: Ray Train calls this on its controller; the driver prints from the queue.


def _forward_reports(queue):
    """Ray Train's callback that forwards each report to `queue` (the driver prints from it).
    Ray Train's trainer modules are imported here, by the runs that use them, not by every
    process that imports the kit: a sweep's single-worker trials never do (0.5 s of each trial
    process's CPU on 2 cores)."""
    from ray.train.v2.api.callback import UserCallback

    class _ForwardReports(UserCallback):
        def __init__(self):
            self.sent_controller = False

        def after_report(self, run_context, metrics, checkpoint):
            # Sent without waiting for the queue: this runs inside the controller's loop, and a
            # worker's next report waits for that loop (a blocking put stalled training ~0.3 s a
            # run). One caller's calls arrive in order; `fit` waits for the last before it returns.
            if not self.sent_controller:
                # This runs on the controller: its handle lets the driver end the run gracefully.
                # Pickled here, so that the queue's process holds bytes: unpickling a handle
                # imports its class's module, and Ray Train's import (1.3-1.5 s of CPU here) ran
                # in that process beside the first epochs, slowing them by a quarter.
                handle = ray.cloudpickle.dumps(ray.get_runtime_context().current_actor)
                queue.actor.put_nowait.remote({"controller": handle})
                self.sent_controller = True
            queue.actor.put_nowait.remote(dict(metrics[0], checkpoint=checkpoint.path if checkpoint else None))

    return _ForwardReports()


def _follow(queue, on_epoch: Callable[[dict], None], stop: threading.Event, abort: threading.Event,
            on_progress: Optional[Callable[[dict], None]], seen: dict) -> None:
    """Forward reports to `on_epoch` (and rank 0's in-epoch progress to `on_progress`) until
    `stop`; once `abort` is set, ask Ray Train's controller to abort the run (workers shut down
    cleanly, the placement group is freed). `seen` gets the controller's handle, the number of
    reports delivered and rank 0's end message, its number of reports (see `_await_last_report`)."""
    from ray.exceptions import RayActorError
    from ray.util.queue import Empty

    controller, aborted = None, False
    order = [float("-inf"), 0]  # the worker group's start time, the number of the next report to deliver
    pending: dict[int, dict] = {}  # reports that arrived before one made earlier
    while True:
        if abort.is_set() and controller is not None and not aborted:
            controller.abort.remote()
            aborted = True
        try:
            message = queue.get(timeout=0.3)
        except Empty:
            if stop.is_set():
                return
            continue
        except RayActorError:  # the queue went with its owner: a sweep trial being stopped
            return
        if "controller" in message:
            controller = seen["controller"] = ray.cloudpickle.loads(message["controller"])
        elif "progress" in message:
            if on_progress and not aborted:
                on_progress(message["progress"])
        elif "end" in message:  # rank 0 finished; its last reports may still be on their way
            seen["end"] = message["end"]
        else:
            # In the order rank 0 made them: the queue's actor may run two puts in either order,
            # and a record taken out of order would replace the epochs after it.
            generation, number = message.pop(REPORT_SEQ)
            if generation > order[0]:  # a restarted worker group numbers its reports anew
                order, pending = [generation, 0], {}
            elif generation < order[0]:  # from a group since replaced: its epochs are trained again
                continue
            pending[number] = message
            while order[1] in pending:
                ready = pending.pop(order[1])
                order[1] += 1
                seen["delivered"] = tuple(order)
                if not aborted:
                    on_epoch(ready)


def _await_last_report(seen: dict, *, timeout_s: float = 60.0) -> None:
    """After a run that ended normally: wait until every report rank 0 made (its "end" message
    counts them) has reached the follower (both travel without waiting)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if "end" in seen:
            generation, num_reports = seen["end"]
            delivered = seen.get("delivered", (generation, 0))
            if num_reports == 0 or (delivered[0] == generation and delivered[1] >= num_reports):
                return
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# The run


@ray.remote(num_cpus=0, max_retries=0)
def _sees_path_task(path: str) -> bool:
    return os.path.exists(path)


def check_shared_storage(cfg: Experiment) -> None:
    """On a cluster of several nodes a local `run.storage_path` must be one that every node sees
    (an NFS mount): workers on each node write checkpoints there, and a restarted worker on
    another node reads them. A marker file written here is looked for from every alive node."""
    import uuid

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    root = storage_root(cfg)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if "://" in root or len(nodes) < 2:
        return
    created = not os.path.exists(root)
    os.makedirs(root, exist_ok=True)
    marker = os.path.join(root, f".raytrain-kit-shared-{uuid.uuid4().hex}")
    with open(marker, "w") as f:
        f.write("written by raytrain-kit to check that every node sees this folder\n")
    try:
        seen = ray.get([_sees_path_task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node_id=n["NodeID"], soft=False)).remote(marker) for n in nodes], timeout=120)
    finally:
        os.unlink(marker)
        if created:
            os.rmdir(root)
    blind = [f"{n['NodeManagerAddress']} (node {n['NodeID'][:8]})" for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise ConfigError(f"run.storage_path: {root} is local to this machine, and {len(blind)} of {len(nodes)} nodes "
                          f"cannot see it: {', '.join(blind)}; every node writes checkpoints there, so use shared "
                          "storage: an s3:// or gs:// URI, or an NFS mount at the same path on every node")


def check_checkpoint_strategy(cfg: Experiment, directory: str) -> None:
    """A sharded run cannot start from whole-tensor (ddp) checkpoints: say so before launch. (The
    other way works: a ddp run reads a sharded checkpoint's whole tensors.)"""
    kept = checkpoint_dirs(directory)
    if kept and is_sharded(cfg) and not path_exists(f"{kept[max(kept)]}/{ckpt.SHARDED_DIR}"):
        raise ConfigError(f"scaling.strategy: run {cfg.run.name!r} was checkpointed by strategy ddp (whole tensors); "
                          f"resume it with --set scaling.strategy=ddp, or export its model and start a new run")


def check_streaming_resources(cfg: Experiment, datasets: dict) -> None:
    """Streamed data still to be read or prepared runs as Ray Data tasks of 1 CPU each, every
    epoch: on an embedded Ray whose CPUs the workers all reserve, they never start and training
    waits forever. Refuse that before launch (data already materialized streams without tasks)."""
    from ray.data.dataset import MaterializedDataset

    if cfg.data.in_memory or not started_embedded_ray():
        return
    if all(isinstance(ds, MaterializedDataset) for ds in datasets.values()):
        return
    s = cfg.scaling
    total, need_cpu = ray.cluster_resources().get("CPU", 0), s.num_workers * s.cpus_per_worker
    if total - need_cpu < 1 - 1e-9:
        raise ConfigError(f"data.in_memory: false streams every epoch through Ray Data tasks, which need a CPU the "
                          f"workers leave free, but {s.num_workers} workers x {s.cpus_per_worker} CPUs take {need_cpu:g} "
                          f"of the Ray cluster's {total:g}; lower scaling.cpus_per_worker (fractions work) or set "
                          "data.in_memory: true")


def check_resources(cfg: Experiment) -> None:
    """An embedded Ray cannot grow: asking for more than it has would wait forever."""
    if not started_embedded_ray():
        return
    s = cfg.scaling
    total = ray.cluster_resources()
    need_cpu = s.num_workers * s.cpus_per_worker
    if need_cpu > total.get("CPU", 0) + 1e-9:
        raise ConfigError(f"scaling: {s.num_workers} workers x {s.cpus_per_worker} CPUs = {need_cpu:g} CPUs, but the "
                          f"Ray cluster has {total.get('CPU', 0):g}; lower scaling.num_workers or scaling.cpus_per_worker")
    if s.use_gpu and s.num_workers > total.get("GPU", 0):
        raise ConfigError(f"scaling.use_gpu: {s.num_workers} workers need {s.num_workers} GPUs, but the Ray cluster has "
                          f"{total.get('GPU', 0):g}; set scaling.use_gpu: false or lower scaling.num_workers")


def scaling_config(cfg: Experiment) -> ScalingConfig:
    """The run's workers as Ray Train places them: `scaling.num_workers`, each with its CPUs (and a GPU)."""
    s = cfg.scaling
    return ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                         resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})})


@functools.lru_cache(maxsize=None)
def _trainer_class():
    """`TorchTrainer`, less what a run may not need.

    - The dataset manager, when a run passes it no datasets. Ray Train 2.60 starts that actor (a
      process importing Ray Data: 0.4-0.6 s of CPU measured here, at the end of a run's start,
      when both cores are busy) for every run, datasets or none; in-memory data reaches the
      workers in their loop config and never asks it for a shard. Without the actor a worker's
      train context has no shard provider, which only `get_dataset_shard` reads.
    - The placement-group cleaner, where `cluster.needs_placement_group_cleaner` says so.
    - The resource requests to Ray's autoscaling coordinator, for a run that passes no datasets
      on a Ray that cannot grow (`cluster.can_autoscale`). Ray Train's fixed scaling policy sends
      one as its controller starts, and waits for it: the coordinator is an actor of its own,
      started on demand (a process importing Ray Data), in the middle of a run's start. It tells
      an autoscaler what to add, and Ray Data's executions what Train holds; an embedded Ray has
      no autoscaler, and a run without datasets runs no Ray Data execution beside its workers.

    The hooks are Ray Train's private `_create_default_callbacks` and
    `_initialize_and_run_controller` (its `scaling_policy` argument): a Ray without them leaves
    the trainer as it is."""
    from ray.train.torch import TorchTrainer

    from raytrain_kit.cluster import can_autoscale, needs_placement_group_cleaner

    try:
        from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
    except ImportError:  # another Ray's layout: its own policy stays
        FixedScalingPolicy = None

    if FixedScalingPolicy is not None:
        class FixedScalingWithoutAutoscaler(FixedScalingPolicy):
            """Ray Train's fixed scaling policy, less its requests to the autoscaling coordinator."""

            def _send_resource_request(self):
                pass

            def _maybe_send_resource_request(self):
                pass

            def _cancel_resource_request(self):
                pass

    class KitTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            dropped = set() if self.datasets else {"DatasetsCallback"}
            if not needs_placement_group_cleaner():
                dropped.add("PlacementGroupCleanerCallback")
            return [cb for cb in super()._create_default_callbacks() if type(cb).__name__ not in dropped]

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            policy = controller_init_kwargs.get("scaling_policy")
            if FixedScalingPolicy is not None and type(policy) is FixedScalingPolicy and not self.datasets \
                    and not can_autoscale():
                controller_init_kwargs["scaling_policy"] = FixedScalingWithoutAutoscaler(policy.scaling_config)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    return KitTorchTrainer


def build_trainer(cfg: Experiment, datasets: dict, spec: DataSpec, *, callbacks=(),
                  init_checkpoint: Optional[str] = None, gate: Optional[dict] = None,
                  queue=None, progress=None) -> TorchTrainer:
    """In-memory data is cut into per-worker pieces here (`data.split_for_workers`) and handed
    to the workers in their config; streamed data goes through Ray Train's own streaming split."""
    s = cfg.scaling
    in_memory = cfg.data.in_memory
    return _trainer_class()(
        train_loop_per_worker,
        train_loop_config={"experiment": cfg.model_dump(mode="json"), "spec": spec_to_dict(spec),
                           "init_checkpoint": init_checkpoint, "gate": gate, "run_dir": run_dir(cfg),
                           "queue": queue, "progress": progress is not None,
                           "shards": split_for_workers(datasets, num_workers=s.num_workers) if in_memory else None},
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=storage_root(cfg), callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),
            # The best `keep` by the run's metric, and always the latest (Ray Train keeps it).
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep, checkpoint_score_attribute=cfg.metric,
                                               checkpoint_score_order=cfg.mode)),
        datasets=None if in_memory else datasets,
        # Ordered execution makes the split of rows across workers the same on every run.
        dataset_config=DataConfig(execution_options=ray.data.ExecutionOptions(preserve_order=True)),
    )


def describe_scaling(cfg: Experiment) -> str:
    """`training: 2 workers, fsdp built on the meta device, bf16; global batch 128 = 32 x 2
    micro-batches x 2 workers` (and `activation checkpointing` after the precision when on)"""
    s, t = cfg.scaling, cfg.train
    how = s.strategy + (f" (shard groups of {s.shard_group_size})" if s.strategy == "hsdp" else "")
    # One ddp worker has nothing to share: "1 worker, ddp" only puzzled readers.
    if s.strategy != "ddp":
        how += " built on the meta device" if s.meta_init else " built whole, then sharded"
    parts = [f"{s.num_workers} worker{'s' if s.num_workers > 1 else ''}"] + ([] if s.single_process else [how]) + \
        [t.precision] + (["activation checkpointing"] if t.activation_checkpointing else [])
    global_batch = t.batch_size * t.grad_accum_steps * s.num_workers
    terms = [str(t.batch_size)] + ([f"{t.grad_accum_steps} micro-batches"] if t.grad_accum_steps > 1 else []) + \
        ([f"{s.num_workers} workers"] if s.num_workers > 1 else [])
    formula = f" = {' x '.join(terms)}" if len(terms) > 1 else ""
    return f"training:      {', '.join(parts)}; global batch {global_batch}{formula} per optimizer step"


def _process_started() -> float:
    """When this Python interpreter started: the origin of the start-up timeline.

    The process's creation time, unless the process ran something else first and then exec'd
    Python (the last command of `bash -c "pip install ... && raytrain-kit train ..."`, a
    container entrypoint's `exec`): creation then dates the shell, and the pip install would
    count as start-up. Python's own start is CPU-bound, so the interpreter started about its CPU
    seconds before the kit's first import; a creation time well before that (more than twice
    those seconds and one more) is a shell's."""
    imported_at, cpu_at_import = IMPORTED_AT
    python_started = imported_at - cpu_at_import
    try:
        import psutil  # Ray ships a copy and puts it on sys.path when imported

        created = psutil.Process().create_time()
    except Exception:
        return python_started
    return created if created >= imported_at - 2 * cpu_at_import - 1.0 else python_started


# Start-up stages in the order they happen; the workers' come from rank 0's first report.
STARTUP_STAGES = ("process_started", "ray_ready", "fit_called", "datasets_built", "preflight_done", "trainer_started",
                  "worker_started", "model_ready", "data_ready", "first_step")


def startup_seconds(times: dict) -> dict[str, float]:
    """Seconds from this process's start to each start-up stage that happened (a run restored
    from a checkpoint may take no step, a preflight may be off)."""
    origin = times["process_started"]
    return {stage: round(times[stage] - origin, 3) for stage in STARTUP_STAGES[1:] if times.get(stage)}


def best_of(history: list[dict], *, metric: str, mode: str) -> Optional[dict]:
    """The best epoch by `metric`, NaN never; of equal values the later, as the checkpoints kept
    choose (`checkpoint.checkpoints_to_keep`), so the best epoch's checkpoint is always kept."""
    scored = [h for h in history if metric in h and h[metric] == h[metric]]
    if not scored:
        return None
    sign = 1 if mode == "max" else -1
    return max(scored, key=lambda h: (sign * h[metric], h["epoch"]))


def summarize(cfg: Experiment, history: list[dict], *, status: str, error: Optional[str], wall_s: float) -> dict:
    best = best_of(history, metric=cfg.metric, mode=cfg.mode)
    kept = checkpoint_dirs(run_dir(cfg))
    # The best saved epoch's checkpoint (checkpoint.keep keeps the best, by the same rule), else
    # the latest (no metric yet).
    best_saved = best_of([h for h in history if h["epoch"] in kept], metric=cfg.metric, mode=cfg.mode)
    checkpoint = kept[best_saved["epoch"]] if best_saved else kept[max(kept)] if kept else None
    return {
        "status": status, "error": error, "metric": cfg.metric, "mode": cfg.mode,
        "best_value": best[cfg.metric] if best else None, "best_epoch": best["epoch"] if best else None,
        "final_metrics": history[-1] if history else None, "epochs_completed": len(history),
        "checkpoint": checkpoint, "run_dir": run_dir(cfg), "wall_s": round(wall_s, 2),
        "history": history, "config": cfg.model_dump(mode="json"),
    }


def data_summary(spec: DataSpec, *, checkpoint: Optional[str]) -> dict:
    """What summary.json says about the data: the class names (in index order), what the
    preprocessing dropped or imputed, and the summary checkpoint's validation confusion counts."""
    prep = spec.preprocessing
    return {"classes": list(spec.classes),
            "data": {"rows_dropped": prep.get("rows_dropped", 0), "cells_imputed": prep.get("imputed", {}),
                     "features": list(spec.feature_names)},
            "confusion": checkpoint_record(checkpoint, ckpt.CONFUSION_FILE) if spec.classes else None}


@dataclass
class TrialLink:
    """The sweep-only side of a run: what ties it to the sweep trial that runs it."""

    # Set it to end the run early and cleanly (a scheduler stopping the trial); its summary then
    # says "stopped".
    abort: threading.Event = field(default_factory=threading.Event)
    # Epochs after which the workers wait for the scheduler's decision (`worker.wait_at_gate`).
    gate: Optional[dict] = None
    # Another run's checkpoint to start from (a trial resumed, or a PBT clone).
    init_checkpoint: Optional[str] = None
    # The sweep's MLflow run, which this run's becomes a child of.
    parent_mlflow_run: Optional[str] = None


@dataclass
class _OpenRun:
    """A run between `open_run` and `close_run`: its directory, data, records and reports so far."""

    cfg: Experiment
    directory: str
    datasets: dict
    spec: DataSpec
    startup: dict  # wall-clock times of the start-up stages
    recorder: RunRecorder
    on_epoch: Optional[Callable[[dict], None]]
    log: Callable[[str], None]
    started: float = field(default_factory=time.perf_counter)
    reports: list = field(default_factory=list)

    def forward(self, metrics: dict) -> None:
        """One epoch's report, as rank 0 sent it: into the run's records, then to `on_epoch`."""
        self.startup.update(metrics.pop(STARTUP, None) or {})
        step_losses = metrics.pop(STEP_LOSSES, None)
        self.reports.append(metrics)
        try:
            self.recorder.on_epoch(metrics, step_losses=step_losses)
        except Exception as e:  # a record that cannot be written must not end the training
            self.log(f"warning: run records: {type(e).__name__}: {short_message(e)}")
        if self.on_epoch:
            self.on_epoch(metrics)


def check_model_builds(cfg: Experiment, spec: DataSpec, *, log: Optional[Callable[[str], None]] = None) -> None:
    """Build the model once here: a bad custom target (or fsdp block names) fails as one
    ConfigError line, instead of inside the preflight task or every worker. Under fsdp/hsdp with
    `scaling.meta_init` it is built on the meta device (no memory: the driver need not hold a
    model bigger than a worker); a model that cannot be gets `log`'s one-line warning."""
    try:
        model = None
        if is_sharded(cfg) and cfg.scaling.meta_init:
            model, blocker = build_on_meta(cfg, spec)
            if blocker and log is not None:
                log(f"warning: scaling.meta_init: {blocker}; every worker builds the whole model, then shards it")
        check_blocks(model if model is not None else build_model(cfg, spec), cfg)
    except KitError:
        raise
    except Exception as e:
        raise ConfigError(f"model: cannot build {cfg.model.kind!r} for input shape {list(spec.input_shape)} "
                          f"({type(e).__name__}: {short_message(e, last_line=True)})") from None


def open_run(cfg: Experiment, *, resume: bool, datasets_and_spec: Optional[tuple[dict, DataSpec]], link: Optional[TrialLink],
             on_epoch: Optional[Callable[[dict], None]], log: Callable[[str], None]) -> _OpenRun:
    """Everything before training: the resume-or-refuse decision, the checks that need Ray (a
    sweep's trial skips those its sweep made), the data, the model built once (a bad custom
    target fails here, as a config error, instead of inside every worker), the preflight,
    `config.yaml` and the run's records."""
    startup = {"process_started": _process_started(), "ray_ready": cluster.ray_ready_at(), "fit_called": time.time()}
    if link is not None:  # a trial's process outlives many runs: its start-up counts from the run's
        startup.update(process_started=startup["fit_called"], ray_ready=None)
    directory = run_dir(cfg)
    check_run_name(cfg, resume=resume)
    if resume:
        check_checkpoint_strategy(cfg, directory)
    check_resources(cfg)
    if link is None:
        check_shared_storage(cfg)
        check_tracking(cfg)
    fitted = checkpoint_preprocessing(directory) if resume and not datasets_and_spec else None
    datasets, spec = datasets_and_spec or build_datasets(cfg, fitted=fitted)
    if datasets_and_spec is None:  # a sweep's driver said these once
        for line in describe_data(spec):
            log(line)
        if fitted:
            log("resume: the data is transformed as the run's checkpoint was (its fitted preprocessing)")
    check_streaming_resources(cfg, datasets)
    startup["datasets_built"] = time.time()
    check_model_builds(cfg, spec, log=log)
    if cfg.preflight.enabled:
        report = run_preflight(cfg, datasets["train"], spec)  # raises PreflightError: no worker starts
        log(f"preflight: gradient check {report.status} ({report.num_parameters:,} parameters, "
            f"{report.seconds:.2f} s)" + "".join(f"\n  warning: {w}" for w in report.warnings))
        startup["preflight_done"] = time.time()
    write_run_file(directory, CONFIG_FILE, to_yaml(cfg))
    log(describe_scaling(cfg))
    recorder = RunRecorder(cfg, directory, resume=resume, parent_mlflow_run=link.parent_mlflow_run if link else None)
    if resume:
        history = reconcile_records(directory, recorder, log=log)
        log(f"resume: from epoch {history[-1]['epoch']}'s checkpoint" if history else
            f"resume: no registered checkpoint in {directory}; training from epoch 1")
    return _OpenRun(cfg=cfg, directory=directory, datasets=datasets, spec=spec, startup=startup, recorder=recorder,
                    on_epoch=on_epoch, log=log)


def close_run(run: _OpenRun, *, error: Optional[list[str]], details: str = "", aborted: bool = False) -> dict:
    """Everything after training: the run's checkpoints made to agree with what was registered,
    its history read from the latest one (every epoch up to it, across resumes), `summary.json`,
    the records closed. Raises RunError (after writing the summary) if the run failed, a
    non-finite step included."""
    import json

    cfg, directory = run.cfg, run.directory
    if aborted:
        error = None  # the run ended because it was asked to
    if not error and run.reports and run.reports[-1].get("nonfinite_stop"):
        last = run.reports[-1]
        error = [f"the loss or its gradients became NaN/inf in epoch {last['epoch']} "
                 f"({last['nonfinite_steps']} non-finite step(s), train.on_nonfinite: {cfg.train.on_nonfinite}); "
                 "the latest good checkpoint is kept as the result; lower optim.lr, clip gradients "
                 "(regularization.grad_clip_norm) or set train.on_nonfinite: skip or rollback"]
    history = reconcile_records(directory, run.recorder, log=run.log)
    status = "failed" if error else "stopped" if aborted and len(history) < cfg.train.epochs else "finished"
    summary = summarize(cfg, history, status=status, error="; ".join(error) if error else None,
                        wall_s=time.perf_counter() - run.started)
    summary["startup"] = startup_seconds(run.startup)
    summary.update(data_summary(run.spec, checkpoint=summary["checkpoint"]))
    try:
        write_run_file(directory, SUMMARY_FILE, json.dumps(summary, indent=1, default=str))
    except OSError as e:
        raise RunError(disk_full_message(directory) if is_disk_full(str(e)) else
                       f"run.storage_path: cannot write {directory}/{SUMMARY_FILE} ({short_message(e)})") from None
    run.recorder.close(summary)
    if error:
        raise RunError(*error, f"run {cfg.run.name!r} failed; summary at {directory}/{SUMMARY_FILE}", traceback=details)
    return summary


def fit(cfg: Experiment, *, resume: bool = False, on_epoch: Optional[Callable[[dict], None]] = None,
        on_progress: Optional[Callable[[dict], None]] = None, datasets_and_spec: Optional[tuple[dict, DataSpec]] = None,
        trial: Optional[TrialLink] = None, log: Callable[[str], None] = lambda line: None) -> dict:
    """Train the experiment with Ray Train's `TorchTrainer`; returns (and writes) the run summary.
    Raises KitError subclasses. `on_epoch(metrics)` after each epoch; `on_progress`: rank 0's
    in-epoch progress (a progress bar). The run's records (metrics.csv, TensorBoard, MLflow) are
    written as the reports arrive. `datasets_and_spec`: data already built (a sweep's); `trial`:
    the sweep's side of a trial's run (abort, gate, clone, MLflow parent). Called with no Ray
    running (a script's or notebook's first fit), it starts the Ray `raytrain-kit train` would."""
    if not ray.is_initialized():
        check_run_name(cfg, resume=resume)  # refused before Ray's start, not after
        connect()
    run = open_run(cfg, resume=resume, datasets_and_spec=datasets_and_spec, link=trial, on_epoch=on_epoch, log=log)
    link = trial or TrialLink()
    error, details = _train_with_trainer(run, link, on_progress=on_progress)
    return close_run(run, error=error, details=details, aborted=link.abort.is_set())


def _train_with_trainer(run: _OpenRun, link: TrialLink, *, on_progress) -> tuple[Optional[list[str]], str]:
    """The `TorchTrainer` run itself, its reports forwarded to the records as they arrive; returns
    the worker's error lines (None if it succeeded) and Ray's traceback."""
    from ray.util.queue import Queue

    queue = Queue(actor_options={"num_cpus": 0})
    stop = threading.Event()
    seen: dict = {}
    follower = threading.Thread(target=_follow, args=(queue, run.forward, stop, link.abort, on_progress, seen), daemon=True)
    follower.start()
    trainer = build_trainer(run.cfg, run.datasets, run.spec, callbacks=[_forward_reports(queue)],
                            init_checkpoint=link.init_checkpoint, gate=link.gate, queue=queue, progress=on_progress)
    error, details = None, ""
    fit_started = run.startup["trainer_started"] = time.time()
    # Train installs a Ctrl-C handler that holds its controller, which then outlives the run
    # (an idle process, polling); the process's own handler comes back when the run ends.
    main_thread = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        trainer.fit()
        if not link.abort.is_set():
            _await_last_report(seen)
    except Exception as e:  # TrainingFailedError and friends: report the worker's own error
        error, details = _worker_error(e, run.directory, since=fit_started), traceback_text(e)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, sigint)
        stop.set()
        follower.join(timeout=10)
        ray.kill(queue.actor)
        if seen.get("controller") is not None:  # done: end it and the actors it owns now, not at GC
            try:
                ray.kill(seen["controller"])
            except Exception:
                pass
    return error, details


class StepwiseRun:
    """A single-worker ddp run trained in this process one epoch per `next_epoch()` call
    (`trial.train_in_process`): a sweep trial's run without a Ray Train run of its own. The same
    run directory, checkpoints, records and summary as `fit`'s; `close()` writes the summary.
    Several may advance in turns in one process (a trial's folds): each keeps its own RNG stream."""

    def __init__(self, cfg: Experiment, *, datasets_and_spec: Optional[tuple[dict, DataSpec]] = None,
                 trial: Optional[TrialLink] = None, on_epoch: Optional[Callable[[dict], None]] = None,
                 log: Callable[[str], None] = lambda line: None):
        assert runs_in_process(cfg), "a run of several workers or sharded needs Ray Train's workers"
        self.link = trial or TrialLink()
        self.run = open_run(cfg, resume=False, datasets_and_spec=datasets_and_spec, link=self.link,
                            on_epoch=on_epoch, log=log)
        self.run.startup["trainer_started"] = self.run.startup["worker_started"] = time.time()
        self.position: dict = {"epoch": None, "step": None, "reported": None}
        self.started = time.time()
        self.epochs = train_in_process(cfg, self.run.spec, self.run.datasets, directory=self.run.directory,
                                       init_checkpoint=self.link.init_checkpoint, position=self.position,
                                       startup=self.run.startup)
        self.rng: Optional[tuple] = None
        self.summary: Optional[dict] = None
        self.closed = False

    def next_epoch(self) -> Optional[dict]:
        """Train the next epoch and return its report (with its checkpoint's path, if one was
        written), or None when the run has no epoch left. Raises RunError (summary written) when
        training raises, with the error's first line, as a worker's would read."""
        gpu = self.run.cfg.scaling.use_gpu
        if self.rng is not None:
            torch.set_rng_state(self.rng[0])
            if gpu:
                torch.cuda.set_rng_state_all(self.rng[1])
        try:
            metrics = next(self.epochs)
        except StopIteration:
            return None
        except Exception as e:
            write_failure(self.run.directory, e, rank=0, epoch=self.position["epoch"], step=self.position["step"])
            self.close(error=_worker_error(e, self.run.directory, since=self.started), details=traceback_text(e))
        finally:  # dropout's streams: CPU, and each GPU's
            self.rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if gpu else None)
        self.run.forward(metrics)
        return metrics

    def close(self, *, error: Optional[list[str]] = None, details: str = "", stopped: bool = False) -> Optional[dict]:
        """End the run and write its summary (once): `stopped` ends it early and cleanly, as a
        scheduler stopping the trial does. Returns the summary; raises RunError for an error."""
        if self.closed:
            return self.summary
        self.closed = True
        self.epochs.close()
        self.summary = close_run(self.run, error=error, details=details, aborted=stopped or self.link.abort.is_set())
        return self.summary


def runs_in_process(cfg: Experiment) -> bool:
    """Whether a sweep trial's run trains in the trial's own process (one ddp worker), not through
    Ray Train. Sharded runs need a process group; several workers need Ray Train's."""
    return cfg.scaling.single_process


def checkpoint_preprocessing(directory: str) -> Optional[dict]:
    """The preprocessing the run's latest registered checkpoint was trained with (its data.json),
    or None (no checkpoint yet, or one from before it was kept)."""
    import json

    kept = checkpoint_dirs(directory)
    if not kept or not path_exists(f"{kept[max(kept)]}/{ckpt.DATA_FILE}"):
        return None
    return json.loads(read_run_file(kept[max(kept)], ckpt.DATA_FILE)).get("preprocessing") or None


def remove_orphan_checkpoints(directory: str) -> list[str]:
    """A checkpoint uploaded while a worker died is never registered (its epoch is trained again);
    its directory would pass for a real checkpoint to anyone browsing the run: remove it, and any
    in-process run's checkpoint that was still being written beside its final name (trial.py)."""
    if "://" not in directory:
        for staging in Path(directory).glob(f".{ckpt.CHECKPOINT_PREFIX}*"):
            shutil.rmtree(staging, ignore_errors=True)
    registered = _registered_checkpoint_names(directory)
    fs, path = filesystem(directory)
    orphans = [n for n in _checkpoint_names_on_disk(directory) if n not in registered]
    for name in orphans:
        fs.delete_dir(f"{path}/{name}")
    return orphans


def exported_data_path(out: str) -> str:
    """Where `export` writes the data spec and fitted preprocessing beside the model file `out`."""
    return os.path.splitext(out)[0] + ".data.json"


def export_run(directory: str, out: str, *, epoch: Optional[int] = None) -> tuple[str, int]:
    """Write the model of a run's checkpoint (`chosen_checkpoint`) to `out` as a plain `state_dict`
    (loadable with `torch.load(..., weights_only=True)` into the model `build_model` returns).
    Beside it, `<out without extension>.data.json`: the data spec with the preprocessing fitted
    on the training split (feature names, standardization, encoders, class names). Returns
    (checkpoint used, number of parameters)."""
    chosen = chosen_checkpoint(directory, epoch=epoch)
    state = read_model_state(chosen)
    out_path = os.path.abspath(out)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    ckpt.save_torch(state, out_path)
    data = checkpoint_record(chosen, ckpt.DATA_FILE)
    if data is not None:  # what a prediction must do to raw rows first, beside the weights
        ckpt.save_json(data, Path(exported_data_path(out_path)))
    return chosen, count_parameters(directory, state, data)


def count_parameters(directory: str, state: dict, data: Optional[dict]) -> int:
    """The run's model's parameters, from the model rebuilt on the meta device (no memory) out of
    the run's config.yaml and data spec: a state dict also holds buffers (BatchNorm's running
    statistics), which are not parameters. Without the spec, or when the model cannot be rebuilt
    (a custom target this process cannot import), the state dict's floating-point tensors."""
    import yaml

    from raytrain_kit.config import build_experiment
    from raytrain_kit.data import spec_from_dict
    from raytrain_kit.models import MODELS

    if data is not None:
        try:
            cfg = build_experiment(yaml.safe_load(read_run_file(directory, CONFIG_FILE)))
            with torch.device("meta"):
                model = MODELS[cfg.model.kind](cfg.model, spec_from_dict(data))
            return sum(p.numel() for p in model.parameters())
        except Exception:
            pass
    return sum(t.numel() for t in state.values() if t.is_floating_point())


def worker_failures(directory: str, *, since: float = 0.0) -> list[dict]:
    """The failure records workers wrote (`worker.write_failure`) since `since`, lowest rank first."""
    import json

    fs, path = filesystem(f"{directory}/logs")
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    records = [json.loads(read_run_file(f"{directory}/logs", i.base_name))
               for i in fs.get_file_info(pafs.FileSelector(path)) if i.base_name.endswith("_error.json")]
    return sorted((r for r in records if r.get("time", 0) >= since), key=lambda r: r["rank"])


def _worker_error(error: Exception, directory: str, *, since: float) -> list[str]:
    """What the user reads first: the worker's own exception, where it happened, and its log;
    Ray's wrapping (TrainingFailedError, the actor's traceback) only under --verbose."""
    records = worker_failures(directory, since=since)
    if records:
        r = records[0]
        where = f"rank {r['rank']} on node {r['node']}" + (f", epoch {r['epoch']}, step {r['step']}" if r["epoch"] else "")
        lines = [f"{r['type']}: {r['message'][:300]} ({where})", f"full log of worker rank {r['rank']}: {r['log']}"]
    else:
        failures = getattr(error, "worker_failures", None) or {}
        causes = [(rank, getattr(f, "cause", None) or f) for rank, f in sorted(failures.items())]
        lines = ([f"{type(cause).__name__}: {short_message(cause, last_line=True)} (rank {rank})" for rank, cause in causes[:1]]
                 or [f"{type(error).__name__}: {short_message(error, last_line=True)}"])
    return [disk_full_message(directory)] if is_disk_full(lines[0]) else lines


def is_disk_full(text: str) -> bool:
    return "No space left on device" in text or "[Errno 28]" in text or "[errno 28]" in text


def disk_full_message(directory: str) -> str:
    """The one line for a full disk under the run (a checkpoint's upload, a record): what is safe and what to do."""
    return (f"run.storage_path: no space left on the disk of {directory}; the latest registered checkpoint is "
            "intact (the one being written is removed): free space or set run.storage_path to a larger disk "
            "(moving the run there), then run the same command with --resume")
