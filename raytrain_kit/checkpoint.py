"""Checkpoint contents: what a run needs to continue exactly where it stopped.

A checkpoint directory holds `train_state.pt` (scheduler, epoch, step), `history.json` (every
epoch's metrics so far), `steps.json` (every optimizer step's loss so far, and the first epoch
this run trained itself: the run's records are rebuilt from these two after a crash),
`data.json` (the data spec with the preprocessing fitted on the training split, which a resumed
run and `export` reuse), `confusion.json` (classification: the epoch's validation confusion) and one `rng_rank{r}.pt` per worker, so a resumed run draws the same
dropout masks as an uninterrupted one. The model and optimizer are stored in one of two ways:

- strategy ddp: `model.pt`, the plain, unwrapped `state_dict` (loadable by
  `torch.load(..., weights_only=True)` into the model `build_model` returns), and the optimizer
  in `train_state.pt`; rank 0 writes them.
- fsdp/hsdp: `sharded/`, a `torch.distributed.checkpoint` in which every rank writes its own
  shards of both. It is read back by any number of workers (each reads the pieces its new shards
  need), and `export_model_state` turns it into a plain `state_dict` in one process.

Rank 0 writes the run-level files; every rank writes its own RNG file; each write is atomic
(temp file + rename), and a sharded checkpoint becomes one only when Ray Train registers it, after
every rank's files arrived. Exercised by `tests/test_train.py::test_resume_*` and
`tests/test_parallel.py`.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_PREFIX = "checkpoint_epoch_"  # + zero-padded epoch: sorts by name
MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
STEPS_FILE = "steps.json"  # {"first_epoch": n, "steps": [[epoch, step, train_loss], ...]}
DATA_FILE = "data.json"  # the run's DataSpec with its fitted preprocessing (data/encode.py)
CONFUSION_FILE = "confusion.json"  # classification: the epoch's validation confusion counts (rows: true class)
SHARDED_DIR = "sharded"  # torch.distributed.checkpoint of {"model": ..., "optimizer": ...}


def checkpoints_to_keep(names: list[str], scores: dict[str, float], *, keep: int, mode: str) -> list[str]:
    """Which of a run's checkpoints to keep, as Ray Train's checkpoint manager chooses under
    `CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute=..., checkpoint_score_order=mode)`:
    the `keep` best by score (a missing or NaN score is the worst; of equal scores the later is
    better) and always the latest, which `--resume` continues from. `names` are oldest first;
    returns the kept ones in the same order."""
    def rank(item: tuple[int, str]) -> tuple[bool, float, int]:
        index, name = item
        score = scores.get(name, float("nan"))
        finite = score == score  # NaN != NaN
        return (finite, (score if mode == "max" else -score) if finite else 0.0, index)

    best = sorted(enumerate(names), key=rank)[-keep:]
    kept = {name for _, name in best} | set(names[-1:])
    return [n for n in names if n in kept]


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def _umask() -> int:
    mask = os.umask(0o022)  # reading the mask means setting it: set it straight back
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, write) -> None:
    """Call `write(file)` on a temp file beside `path`, then rename: readers never see half a file.
    The file gets the mode a plain `open` would give it (mkstemp's is owner-only: an export or an
    in-process trial's checkpoint was unreadable to others on shared storage)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes(path: Path, write, *, durable: bool = True) -> None:
    """`atomic_write_bytes`, or when not `durable` a plain write: for a private temp directory
    that is copied elsewhere and deleted, where a rename and an fsync per file protect nothing
    (they took ~10 ms of a digits checkpoint's 15)."""
    if durable:
        atomic_write_bytes(path, write)
        return
    with open(path, "wb") as f:
        write(f)


def save_torch(obj: Any, path: Path, *, durable: bool = True) -> None:
    write_bytes(path, lambda f: torch.save(obj, f), durable=durable)


def save_json(obj: Any, path: Path, *, durable: bool = True) -> None:
    write_bytes(path, lambda f: f.write(json.dumps(obj, indent=1, default=float).encode()), durable=durable)


def load_torch(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    # numpy's state holds an ndarray, which weights_only loading refuses: store it as a tensor.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def write_checkpoint(directory: Path, *, rank: int, model_state: dict | None, train_state: dict | None,
                     history: list | None, steps: dict | None = None, records: dict | None = None,
                     durable: bool = True) -> None:
    """Write this rank's part of a checkpoint; rank 0 passes the run-level parts (`records`:
    more JSON files by name; a None value is not written). `durable=False` for a temp directory
    that is uploaded, then deleted (see `write_bytes`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if model_state is not None:
        save_torch(model_state, directory / MODEL_FILE, durable=durable)
    if train_state is not None:
        save_torch(train_state, directory / STATE_FILE, durable=durable)
    if history is not None:
        save_json(history, directory / HISTORY_FILE, durable=durable)
    if steps is not None:
        save_json(steps, directory / STEPS_FILE, durable=durable)
    for name, record in (records or {}).items():
        if record is not None:
            save_json(record, directory / name, durable=durable)
    save_torch(rng_state(), directory / _rng_file(rank), durable=durable)


def read_checkpoint(directory: Path, *, rank: int) -> dict:
    """What a worker restores from files: the whole model (ddp checkpoints; a sharded one is read
    by `load_sharded`), the train state, the history, the step losses (None in a checkpoint
    from before they were kept) and (if saved) its own RNG."""
    directory = Path(directory)
    rng_path = directory / _rng_file(rank)
    steps_path = directory / STEPS_FILE
    sharded = (directory / SHARDED_DIR).is_dir()
    return {
        "sharded": sharded,
        "model": None if sharded else load_torch(directory / MODEL_FILE),
        "train_state": load_torch(directory / STATE_FILE),
        "history": json.loads((directory / HISTORY_FILE).read_text()),
        "steps": json.loads(steps_path.read_text()) if steps_path.exists() else None,
        "rng": load_torch(rng_path) if rng_path.exists() else None,
    }


def write_sharded(directory: Path, *, model, optimizer, durable: bool = True) -> None:
    """Every rank calls this: each writes its shards of the model and optimizer state, rank 0 the
    metadata that maps them to whole tensors. Keys are the plain model's parameter names.
    `durable=False`: no fsync per file (see `write_bytes`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    path = str(Path(directory) / SHARDED_DIR)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path,
             storage_writer=dcp.FileSystemWriter(path, sync_files=durable))


def load_sharded(directory: Path, *, model, optimizer) -> None:
    """Every rank calls this: fill this run's model and optimizer (sharded or whole, any number of
    workers) from a sharded checkpoint, each rank reading only what its own tensors need."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(Path(directory) / SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def export_model_state(directory: Path) -> dict:
    """The plain `state_dict` of a checkpoint's model, in this process (no process group): as it
    is for ddp checkpoints, reassembled from every rank's shards for sharded ones."""
    directory = Path(directory)
    if not (directory / SHARDED_DIR).is_dir():
        return load_torch(directory / MODEL_FILE)
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    # What torch's own `format_utils.dcp_to_torch_save` does, restricted to the model: the
    # planner builds whole tensors from the metadata, so the optimizer state is never read.
    _load_state_dict(state, storage_reader=FileSystemReader(str(directory / SHARDED_DIR)),
                     planner=_EmptyStateDictLoadPlanner(keys={"model"}), no_dist=True)
    return {name: tensor.contiguous() for name, tensor in state["model"].items()}
