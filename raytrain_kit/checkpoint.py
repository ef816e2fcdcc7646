"""Checkpoint contents: what a run needs to continue exactly where it stopped.

A checkpoint directory holds `model.pt` (the plain, unwrapped `state_dict`: loadable by
`torch.load(..., weights_only=True)` into the model `build_model` returns), `train_state.pt`
(optimizer, scheduler, epoch, step), `history.json` (every epoch's metrics so far) and one
`rng_rank{r}.pt` per worker, so a resumed run draws the same dropout masks as an uninterrupted
one. Rank 0 writes the run-level files; every rank writes its own RNG file; each write is
atomic (temp file + rename). Exercised by `tests/test_train.py::test_resume_*`.
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


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def atomic_write_bytes(path: Path, write) -> None:
    """Call `write(file)` on a temp file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_torch(obj: Any, path: Path) -> None:
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def save_json(obj: Any, path: Path) -> None:
    atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=1, default=float).encode()))


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
                     history: list | None) -> None:
    """Write this rank's part of a checkpoint; rank 0 passes the run-level parts."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if model_state is not None:
        save_torch(model_state, directory / MODEL_FILE)
    if train_state is not None:
        save_torch(train_state, directory / STATE_FILE)
    if history is not None:
        save_json(history, directory / HISTORY_FILE)
    save_torch(rng_state(), directory / _rng_file(rank))


def read_checkpoint(directory: Path, *, rank: int) -> dict:
    """Everything a worker restores: model, train state, history and (if saved) its own RNG."""
    directory = Path(directory)
    rng_path = directory / _rng_file(rank)
    return {
        "model": load_torch(directory / MODEL_FILE),
        "train_state": load_torch(directory / STATE_FILE),
        "history": json.loads((directory / HISTORY_FILE).read_text()),
        "rng": load_torch(rng_path) if rng_path.exists() else None,
    }
