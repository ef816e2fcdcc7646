"""Ray Train's side of a run: `train_loop_per_worker` drives `loop.py`'s steps inside every
`TorchTrainer` worker, and is the only user of Ray Train's worker APIs.

It reads this worker's piece of the data (or its streaming shard), restores the latest reported
checkpoint (or a sweep clone's), and for each epoch `loop.run_epochs` yields it reports the
metrics: an epoch with a checkpoint (and the first) through `ray.train.report` (a barrier: every
rank reports), writing the checkpoint into a temp directory that Ray Train uploads to the run's
storage; any other epoch straight from rank 0 to the driver's report queue. In a sweep under
ASHA it then waits at the rung for the scheduler's decision. A failing worker writes its own
account into the run directory. Exercised by `raytrain-kit train jobs/digits.yaml` and `jobs/fsdp_mlp.yaml`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from raytrain_kit import checkpoint as ckpt
from raytrain_kit.config import build_experiment
from raytrain_kit.data import read_block_ranges, spec_from_dict
from raytrain_kit.errors import traceback_text
from raytrain_kit.loop import REPORT_SEQ, InMemoryData, StreamedData, build_train_state, restore, run_epochs, \
    write_checkpoint
from raytrain_kit.storage import write_run_file


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs in every Train worker. `loop_config` holds the experiment and the data spec as dicts,
    and the run directory where a failing worker leaves its error (see `write_failure`)."""
    import ray.train

    # Ray Train logs every report at INFO on each worker, under a logger named after its file
    # path; the driver prints one line per epoch instead.
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    rank = ray.train.get_context().get_world_rank()
    where = {"epoch": None, "step": None, "reported": None, "num_reports": 0}  # kept current by the loop
    try:
        _train_loop(loop_config, where)
    except Exception as e:
        if loop_config.get("run_dir"):
            write_failure(loop_config["run_dir"], e, rank=rank, epoch=where["epoch"], step=where["step"])
        raise
    if rank == 0 and loop_config.get("queue") is not None:
        # Reports reach the driver without anyone waiting on them; this tells it how many there
        # were, so it returns with every one (see launch._await_last_report).
        ray.get(loop_config["queue"].actor.put.remote({"end": [where["generation"], where["num_reports"]]}))


def failure_log_name(rank: int) -> str:
    return f"logs/rank{rank}.log"


def write_failure(run_dir: str, error: BaseException, *, rank: int, epoch: Optional[int], step: Optional[int]) -> None:
    """The worker's own account of its failure, in the run directory (shared storage, so the
    driver reads it whichever node the worker ran on): `logs/rankN.log` with the full traceback,
    and `logs/rankN_error.json` with what the CLI prints first. Ray's exception chain, which
    wraps and reprints this, is shown only with --verbose."""
    import json

    import ray

    record = {"type": type(error).__name__, "message": str(error).strip().splitlines()[0] if str(error).strip() else "",
              "rank": rank, "node": ray.util.get_node_ip_address(), "epoch": epoch, "step": step,
              "time": time.time(), "log": f"{run_dir}/{failure_log_name(rank)}"}
    text = traceback_text(error)
    try:
        write_run_file(run_dir, failure_log_name(rank),
                       f"worker rank {rank} on node {record['node']}, epoch {epoch}, step {step}\n\n{text}\n")
        write_run_file(run_dir, f"logs/rank{rank}_error.json", json.dumps(record))
    except Exception:  # never hide the worker's own error behind one about its log
        pass


def _train_loop(loop_config: dict, where: dict) -> None:
    import ray.train
    import ray.train.torch

    startup = {"worker_started": time.time()}
    # This worker group's reports are numbered from 0; a restarted group (a later start) anew.
    where["generation"] = startup["worker_started"]
    cfg = build_experiment(loop_config["experiment"])
    spec = spec_from_dict(loop_config["spec"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    state = build_train_state(cfg, spec, rank=rank, world_size=world_size, device=device, position=where)
    checkpoint, init = ray.train.get_checkpoint(), loop_config.get("init_checkpoint")
    cloned = checkpoint is None and init is not None
    if cloned:
        checkpoint = ray.train.Checkpoint(init)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            restore(state, Path(directory), cloned=cloned, origin=checkpoint.path)
    startup["model_ready"] = time.time()  # DDP's wrapping waits for every rank

    if cfg.data.in_memory:  # this worker's pieces, cut on the driver (data.split_for_workers)
        shards = loop_config["shards"]
        data = InMemoryData.from_arrays(state, read_block_ranges(shards["train"][rank]), read_block_ranges(shards["val"][rank]))
    else:
        data = StreamedData(ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val"), state)
    startup["data_ready"] = time.time()

    queue = loop_config.get("queue")  # the run's report queue (a Queue's truth is its length)
    progress = queue if rank == 0 and loop_config.get("progress") else None  # when the driver draws a bar
    on_batch_for = (lambda epoch, first_step: _progress_sender(progress, epoch=epoch, num_batches=state.batches_per_epoch,
                                                              world_size=world_size)) if progress is not None else None
    for report in run_epochs(state, data, on_batch_for=on_batch_for):
        reported = report.payload(rank=rank, startup=startup)
        if rank == 0:  # their order: Ray's queue actor may run two puts in either order
            reported[REPORT_SEQ] = [where["generation"], where["num_reports"]]
        first = where["num_reports"] == 0
        where["num_reports"] += 1
        startup = None
        if report.save:
            _report_with_checkpoint(state, reported)
        elif queue is not None and not first:
            # Metrics alone go straight to the driver: through `ray.train.report` each waited on
            # a barrier across ranks and on the controller's poll (2.5 ms of a 120 ms digits
            # epoch). The first report does go through Ray Train: its controller callback sends
            # the driver the controller's handle (launch._forward_reports).
            if rank == 0:
                queue.actor.put_nowait.remote(dict(reported, checkpoint=None))
        else:
            ray.train.report(reported)
        if not report.last:
            wait_at_gate(loop_config.get("gate"), state.epoch)


def _report_with_checkpoint(state, reported: dict) -> None:
    """Every rank writes its part into a temp directory; Ray Train uploads it to the run's storage
    as `checkpoint_epoch_NNNN` and registers it once every rank's part arrived."""
    import ray.train

    directory = Path(tempfile.mkdtemp(prefix="raytrain-kit-ckpt-"))
    try:
        write_checkpoint(state, directory, durable=False)  # Ray Train copies it to storage
        ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                         checkpoint_dir_name=f"{ckpt.CHECKPOINT_PREFIX}{state.epoch:04d}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _progress_sender(progress: Any, *, epoch: int, num_batches: int, world_size: int,
                     every_s: float = 0.5) -> Callable[[int, int, float], None]:
    """Sends rank 0's in-epoch progress, at most every `every_s`, to the driver's progress bar (the
    run's report queue; sent without waiting, so training never blocks on the driver)."""
    started = time.perf_counter()
    last = [0.0]

    def on_batch(batches: int, samples: int, loss: float) -> None:
        now = time.perf_counter()
        if now - last[0] < every_s and batches < num_batches:
            return
        last[0] = now
        progress.actor.put_nowait.remote({"progress": {
            "epoch": epoch, "batch": batches, "num_batches": num_batches, "samples": samples * world_size,
            "loss": loss, "elapsed_s": now - started}})

    return on_batch


def wait_at_gate(gate: Optional[dict], epoch: int, *, poll_s: float = 0.05, patience_s: float = 600.0) -> None:
    """In a sweep under ASHA, wait after a rung epoch until the scheduler has decided: "go" on,
    or "stop" (the trial then aborts this run, so we wait to be ended). Without the wait, a trial
    trains one more epoch while its result travels to the scheduler, and a stopped trial throws
    it away. A board that is gone, or no decision within `patience_s`, lets training go on."""
    import ray
    from ray.exceptions import RayActorError

    if not gate or epoch not in gate["epochs"]:
        return
    try:
        board = ray.get_actor(gate["board"])
    except ValueError:
        return
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        try:
            if ray.get(board.decision.remote(gate["trial"], epoch)) == "go":
                return
        except RayActorError:
            return
        time.sleep(poll_s)
