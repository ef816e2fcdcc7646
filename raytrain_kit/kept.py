"""Which checkpoints a run keeps, and reading one: the kept set (registered with Ray Train, or
by an in-process trial's registry), the one `export`, `load_model` and `predict` use, its JSON
records and its model. Light on purpose (no Ray Train, no training loop): `predict`'s actors
load a model through it, and each import here is paid again in every actor's process.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from typing import Optional

import pyarrow.fs as pafs

from raytrain_kit import checkpoint as ckpt
from raytrain_kit.errors import ConfigError, RunError, short_message
from raytrain_kit.storage import filesystem, path_exists, read_run_file

SUMMARY_FILE = "summary.json"
REGISTRY_FILE = "checkpoints.json"  # an in-process run's registry of its kept checkpoints (trial.py)
# Ray Train's record of the checkpoints it registered (ray.train.v2._internal.constants'
# CHECKPOINT_MANAGER_SNAPSHOT_FILENAME, named here rather than imported: importing it imports
# Ray Train, about 0.6 s per process; tests/test_faults.py checks that the two agree).
TRAIN_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def registered_checkpoints(directory: str) -> Optional[list[str]]:
    """Names of the checkpoints an in-process run registered, oldest first; None if it has none."""
    if not path_exists(f"{directory}/{REGISTRY_FILE}"):
        return None
    return json.loads(read_run_file(directory, REGISTRY_FILE))["checkpoints"]


def _checkpoint_names_on_disk(directory: str) -> list[str]:
    fs, path = filesystem(directory)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return [i.base_name for i in fs.get_file_info(pafs.FileSelector(path))
            if i.type == pafs.FileType.Directory and i.base_name.startswith(ckpt.CHECKPOINT_PREFIX)]


def _registered_checkpoint_names(directory: str) -> set[str]:
    """Checkpoints Ray Train registered (its snapshot file), or an in-process run did (its
    registry, see trial.py); none before either was written: a checkpoint uploaded by a worker
    that died before Ray Train registered the run's first one is no checkpoint."""
    fs, path = filesystem(directory)
    snapshot = f"{path}/{TRAIN_SNAPSHOT_FILE}"
    if fs.get_file_info(snapshot).type != pafs.FileType.File:
        return set(registered_checkpoints(directory) or [])
    with fs.open_input_stream(snapshot) as f:
        raw = json.loads(f.read().decode())
    return {r["checkpoint_dir_name"] for r in raw.get("checkpoint_results", [])}


def checkpoint_dirs(directory: str) -> dict[int, str]:
    """Epoch -> path of every checkpoint the run keeps: registered with Ray Train, or by an in-process run."""
    names = _checkpoint_names_on_disk(directory)
    registered = _registered_checkpoint_names(directory)
    return {int(n.rsplit("_", 1)[1]): f"{directory}/{n}" for n in names if n in registered}


def checkpoint_record(checkpoint: Optional[str], name: str) -> Optional[object]:
    """A JSON record kept in a checkpoint (data.json, confusion.json), or None."""
    if not checkpoint or not path_exists(f"{checkpoint}/{name}"):
        return None
    return json.loads(read_run_file(checkpoint, name))


def chosen_checkpoint(directory: str, *, epoch: Optional[int] = None) -> str:
    """The checkpoint `export`, `load_model` and `predict` use: the summary's (the best saved
    epoch's), else the latest, or `epoch`'s. Raises ConfigError when there is none."""
    directory = directory.rstrip("/")
    kept = checkpoint_dirs(directory)
    if not kept:
        raise ConfigError(f"{directory}: no checkpoint there; give a run directory as `train` printed it")
    if epoch is not None:
        if epoch not in kept:
            raise ConfigError(f"--epoch: no checkpoint of epoch {epoch} in {directory}; kept: "
                              f"{', '.join(str(e) for e in sorted(kept))}")
        return kept[epoch]
    if path_exists(f"{directory}/{SUMMARY_FILE}"):
        return json.loads(read_run_file(directory, SUMMARY_FILE)).get("checkpoint") or kept[max(kept)]
    return kept[max(kept)]


def read_model_state(checkpoint: str) -> dict:
    """A checkpoint's model as a plain `state_dict` on the CPU, sharded ones reassembled in this
    process (fetched first from a URI). Raises RunError when it cannot be read."""
    local, fetched = checkpoint, None
    if "://" in checkpoint:  # torch reads local files: fetch the checkpoint first
        fs, path = filesystem(checkpoint)
        fetched = local = tempfile.mkdtemp(prefix="raytrain-kit-export-")
        pafs.copy_files(path, local, source_filesystem=fs)
    try:
        return ckpt.export_model_state(local)
    except Exception as e:
        raise RunError(f"{checkpoint}: cannot read the model ({type(e).__name__}: {short_message(e)})") from None
    finally:
        if fetched:
            shutil.rmtree(fetched, ignore_errors=True)
