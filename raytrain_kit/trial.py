"""A single-worker run trained in the calling process: how a sweep trial trains without a Ray
Train run of its own.

Each `TorchTrainer.fit()` starts a controller and a worker actor, and each imports torch and sets
up a process group: 10-20 s per run on 2 cores, which a sweep of small trials paid per trial. A
trial of one worker needs none of it: `train_in_process` drives `loop.py`'s steps (the same ones
`worker.py` drives inside Ray Train) in the trial's own process, which Tune reuses from trial to
trial with torch, the model code and the data already loaded.

Ray Train's local mode persists nothing (Ray 2.60), so this module writes, registers and prunes
its checkpoints itself, in the same layout under the run's storage as Ray Train's: each epoch's
`checkpoint_epoch_NNNN/` is written beside its final name and renamed into place (uploaded, at a
URI), then listed in the run's `checkpoints.json` (the registry `launch.checkpoint_dirs` reads
where Ray Train's snapshot is absent); only then are the ones `checkpoint.keep` does not keep
removed (the best by the run's metric and the latest are kept, as Ray Train chooses). A crash between the steps leaves at most an unregistered directory, which the run's end
removes. Exercised by `raytrain-kit tune jobs/sweep_digits.yaml`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Optional

import torch

from raytrain_kit import checkpoint as ckpt
from raytrain_kit.config import Experiment
from raytrain_kit.data import DataSpec, read_block_ranges, split_for_workers
from raytrain_kit.loop import InMemoryData, StreamedData, TrainState, build_train_state, restore, run_epochs, \
    write_checkpoint
from raytrain_kit.kept import REGISTRY_FILE, registered_checkpoints  # noqa: F401 (the registry's reader lives there)
from raytrain_kit.storage import filesystem, path_exists, read_run_file, write_run_file

# REGISTRY_FILE holds {"checkpoints": [names, oldest first], "scores": {name: the run's metric}}:
# what an in-process run registered.
_PIECES_KEPT = 8  # datasets whose tensors a trial process keeps (a sweep's folds), most recent first
_pieces: "OrderedDict[int, tuple[dict, tuple]]" = OrderedDict()


def train_in_process(cfg: Experiment, spec: DataSpec, datasets: dict, *, directory: str,
                     init_checkpoint: Optional[str], position: dict, startup: dict) -> Iterator[dict]:
    """Train the run in this process, yielding each epoch's report as Ray Train's workers send it
    (`loop.EpochReport.payload` of rank 0) with the path of the epoch's checkpoint, if any, under
    "checkpoint". Continues from the run's own latest registered checkpoint, else from
    `init_checkpoint` (another run's), else from scratch. `position` is kept at the epoch and step
    being taken (for a failure record); `startup` gets the model's and data's ready times."""
    device = torch.device("cuda", 0) if cfg.scaling.use_gpu else torch.device("cpu")
    state = build_train_state(cfg, spec, rank=0, world_size=1, device=device, position=position)
    own = registered_checkpoints(directory)
    source = f"{directory}/{own[-1]}" if own else init_checkpoint
    if source is not None:
        with _local_directory(source) as local:
            restore(state, local, cloned=not own, origin=source)
    startup["model_ready"] = time.time()
    if cfg.data.in_memory:
        data = InMemoryData.from_arrays(state, *_piece_arrays(datasets))
    else:  # one worker streams the whole datasets
        data = StreamedData(datasets["train"], datasets["val"], state)
    startup["data_ready"] = time.time()
    first: Optional[dict] = startup
    for report in run_epochs(state, data):
        payload = report.payload(rank=0, startup=first)
        first = None
        payload["checkpoint"] = save_checkpoint(state, directory) if report.save else None
        yield payload


def _piece_arrays(datasets: dict) -> tuple[Optional[dict], Optional[dict]]:
    """The training and validation rows as numpy columns, fetched from Ray's object store once per
    process and datasets: a reused trial process trains every later trial from memory."""
    key = id(datasets["train"])
    if key not in _pieces:
        ranges = split_for_workers(datasets, num_workers=1)
        # The datasets are kept with their arrays, so their id cannot be reused while cached.
        _pieces[key] = ({"train": datasets["train"]}, (read_block_ranges(ranges["train"][0]),
                                                      read_block_ranges(ranges["val"][0])))
        while len(_pieces) > _PIECES_KEPT:
            _pieces.popitem(last=False)
    _pieces.move_to_end(key)
    return _pieces[key][1]


@contextlib.contextmanager
def _local_directory(uri: str) -> Iterator[Path]:
    """A checkpoint as a local directory: itself, or a temporary copy of one at a URI."""
    if "://" not in uri:
        yield Path(uri)
        return
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    local = tempfile.mkdtemp(prefix="raytrain-kit-restore-")
    try:
        pafs.copy_files(path, local, source_filesystem=fs)
        yield Path(local)
    finally:
        shutil.rmtree(local, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Checkpoints: write, register, prune


def _registered_scores(directory: str) -> dict[str, float]:
    if not path_exists(f"{directory}/{REGISTRY_FILE}"):
        return {}
    return json.loads(read_run_file(directory, REGISTRY_FILE)).get("scores", {})


def save_checkpoint(state: TrainState, directory: str) -> str:
    """Write the checkpoint of the epoch just completed into the run's storage, register it with
    its score (the run's metric), then remove the registered ones `checkpoint.keep` does not keep
    (`checkpoint.checkpoints_to_keep`: the best by score and the latest, as Ray Train does).
    Returns its path."""
    name = f"{ckpt.CHECKPOINT_PREFIX}{state.epoch:04d}"
    target = f"{directory}/{name}"
    fs, path = filesystem(target)
    fs.delete_dir_contents(path, missing_dir_ok=True)  # an unregistered one of an earlier attempt
    if "://" in target:
        import pyarrow.fs as pafs

        local = Path(tempfile.mkdtemp(prefix="raytrain-kit-ckpt-"))
        try:
            write_checkpoint(state, local, durable=False)  # copied to the store, then deleted
            pafs.copy_files(str(local), path, destination_filesystem=fs)
        finally:
            shutil.rmtree(local, ignore_errors=True)
    else:
        os.makedirs(directory, exist_ok=True)
        # Not mkdtemp: its 0700 would outlive the rename; makedirs gives the umask's mode, as
        # every other directory of the run has.
        staging = Path(directory) / f".{name}.{uuid.uuid4().hex}"
        os.makedirs(staging)
        write_checkpoint(state, staging)
        if os.path.isdir(target):
            os.rmdir(target)  # emptied above
        os.rename(staging, target)  # atomic: the directory appears whole or not at all
    names = [n for n in registered_checkpoints(directory) or [] if n != name] + [name]
    scores = {**_registered_scores(directory), name: state.history[-1].get(state.cfg.metric, float("nan"))}
    kept = ckpt.checkpoints_to_keep(names, scores, keep=state.cfg.checkpoint.keep, mode=state.cfg.mode)
    write_run_file(directory, REGISTRY_FILE, json.dumps({"checkpoints": kept, "scores": {n: scores[n] for n in kept}}))
    for old in (n for n in names if n not in kept):
        fs.delete_dir(f"{filesystem(directory)[1]}/{old}")
    return target
