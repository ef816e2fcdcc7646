"""Each worker's piece of the prepared data as block ranges in Ray's object store, cut once on the
driver and read into memory by the worker (`data.in_memory` runs)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import ray

from raytrain_kit.data.split import preserved_order



BlockRange = tuple  # (ObjectRef of a Ray Data block, first row, end row)


def split_for_workers(datasets: dict[str, ray.data.Dataset], *, num_workers: int) -> dict[str, list[list[BlockRange]]]:
    """Each dataset cut once, on the driver, into one piece per worker: the row ranges of blocks
    in Ray's object store that the worker reads (`read_block_ranges`) and trains on from memory.

    For `data.in_memory` runs this replaces Ray Train's streaming split, whose coordinator actor
    and per-worker streaming executor cost several seconds per run before the first step on 2
    cores, against milliseconds for fetching the blocks. The pieces are the rows Ray Data's own
    `split(num_workers, equal=True)` (training) and `split_at_indices` at even fractions
    (validation) give, in the dataset's order: training pieces are equal (every worker takes the
    same number of steps, as DDP requires; up to num_workers - 1 rows are left out, as in Ray's
    equal split); validation keeps every row. They are cut from the blocks' row counts alone
    (`cut_ranges`), with no Ray task: Ray Data's split runs one per block cut (0.5 s on 2 cores
    for the digits table, before the run's workers start). The blocks stay wherever they are:
    nothing passes through the driver, and a worker on another node fetches its own.
    """
    pieces = {}
    for name, ds in datasets.items():
        ranges = _block_ranges(ds if source_bundles(ds) is not None else _materialized(ds))
        num_rows = sum(stop - start for _, start, stop in ranges)
        if name == "train":
            bounds = [num_rows // num_workers * i for i in range(num_workers + 1)]
        else:
            bounds = [num_rows * i // num_workers for i in range(num_workers + 1)]
        pieces[name] = cut_ranges(ranges, bounds)
    return pieces


def cut_ranges(ranges: list[BlockRange], bounds: list[int]) -> list[list[BlockRange]]:
    """The rows that `ranges` hold, in order, cut at the row positions `bounds` (ascending, the
    first 0-based position and the last the end of the last piece): piece i is rows
    `bounds[i]` to `bounds[i+1]`, as block ranges. A block that straddles a bound is shared by
    two pieces, each reading its own rows of it; nothing is copied."""
    pieces: list[list[BlockRange]] = [[] for _ in range(len(bounds) - 1)]
    offset = 0  # the position of this block range's first row among all of them
    for ref, start, stop in ranges:
        for i, (low, high) in enumerate(zip(bounds, bounds[1:])):
            first, last = max(low, offset), min(high, offset + stop - start)
            if first < last:
                pieces[i].append((ref, start + first - offset, start + last - offset))
        offset += stop - start
    return pieces


def _materialized(ds: ray.data.Dataset) -> ray.data.Dataset:
    """A lazy dataset (a read, a map) executed once into blocks, in its order on every run."""
    with preserved_order():  # the same rows reach the same worker every run
        return ds.materialize()


def _block_ranges(ds: ray.data.Dataset) -> list[BlockRange]:
    ranges = []
    for bundle in source_bundles(ds) or ds.iter_internal_ref_bundles():
        for entry, cut in zip(bundle.blocks, bundle.slices):
            start, stop = (0, entry.metadata.num_rows) if cut is None else (cut.start_offset, cut.end_offset)
            ranges.append((entry.ref, start, stop))
    return ranges


def source_bundles(ds: ray.data.Dataset) -> Optional[list]:
    """The block bundles of a dataset that is only its blocks (materialized, or made by a
    `ray.data.from_*` call), read off its plan's source operator. `iter_internal_ref_bundles`
    would run an execution to list them, and Ray Data's first execution in a session starts its
    stats and autoscaling actors: measured here, ~5 s of CPU on 2 cores for a run that needs
    neither. None when the plan holds more than its blocks (a read, a map) or Ray's plan classes
    differ from 2.60's (`output_data` on `InputData` and `AbstractFrom`): then list them by
    executing."""
    source = getattr(getattr(ds, "_logical_plan", None), "dag", None)
    output_data = getattr(source, "output_data", None)
    return output_data() if callable(output_data) else None


def read_block_ranges(ranges: list[BlockRange]) -> Optional[dict[str, np.ndarray]]:
    """The `x` and `y` columns of a worker's piece (see `split_for_workers`); None if it is empty."""
    from ray.data.block import BlockAccessor

    blocks = ray.get([ref for ref, _, _ in ranges])
    columns = []
    for block, (_, start, stop) in zip(blocks, ranges):
        accessor = BlockAccessor.for_block(block)
        cut = accessor.slice(start, accessor.num_rows() if stop is None else stop, copy=False)
        columns.append(BlockAccessor.for_block(cut).to_numpy(["x", "y"]))
    columns = [c for c in columns if len(c["y"])]
    if not columns:
        return None
    return {name: np.concatenate([c[name] for c in columns]) for name in ("x", "y")}


def head_rows(ds: ray.data.Dataset, num_rows: int) -> dict[str, np.ndarray]:
    """The `x` and `y` of the first `num_rows` rows (all of them when there are fewer), as
    `ds.take_batch(num_rows, batch_format="numpy")` gives them. A materialized dataset's first
    blocks are fetched as they are: a Ray Data pass for a handful of rows would start Ray Data's
    stats and autoscaling actors (seconds of CPU on 2 cores) in a run that needs neither. A lazy
    dataset (data.in_memory: false) is taken by Ray Data."""
    from ray.data.dataset import MaterializedDataset

    if not isinstance(ds, MaterializedDataset):
        batch = ds.take_batch(num_rows, batch_format="numpy")
        return {"x": batch["x"], "y": batch["y"]}
    ranges, have = [], 0
    for ref, start, stop in _block_ranges(ds):
        if have >= num_rows:
            break
        stop = min(stop, start + num_rows - have)
        ranges.append((ref, start, stop))
        have += stop - start
    rows = read_block_ranges(ranges)
    if rows is None:
        raise ValueError("head_rows: the dataset holds no rows")
    return rows
