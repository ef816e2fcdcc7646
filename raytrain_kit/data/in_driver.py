"""Small tables prepared in the driver: the same batch functions on the same blocks as the Ray
Data path, without a Ray Data execution.

Why: Ray Data's first execution in a session starts its `_StatsActor`, its autoscaling
coordinator actor and a task worker, each importing `ray.data` (measured here: ~7.8 s of CPU,
3.9 s of wall time to build the digits table on 2 cores) before a few thousand rows are packed,
split and encoded in milliseconds. Ray 2.60 has no switch for either actor. A table the driver
already holds (the digits set) is built here instead, one block through every step of
`data/build.py` (`_pack`, `_block_stats`, the keyed sort, `_block_counts`, `encode_batch`), and
the prepared splits are put into Ray's object store as datasets of their blocks
(`ray.data.from_blocks`): workers read them exactly as they read a Ray Data build's blocks.

The Ray Data path holds such a table in one block too (`from_pandas` makes one; each map keeps a
block whole, below Ray Data's target block size; the keyed sort gathers one), so both paths give
the same rows in the same order and the same statistics, bit for bit
(`tests/test_data.py::test_the_driver_build_gives_the_rows_and_statistics_of_ray_data`).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import pandas as pd
import ray


class DriverTable:
    """A table's blocks (pandas DataFrames or Arrow tables, as Ray Data holds them), and the few
    `ray.data.Dataset` operations the build applies to them, run in this process. Each map sees
    what Ray Data's `map_batches` would give it (`BlockAccessor.to_batch_format`), whole block by
    whole block, and its output becomes a block as Ray Data makes one (`batch_to_block`): the
    build's batch functions are row-wise or per block, so the result does not depend on batch
    size."""

    def __init__(self, blocks: list):
        self.blocks = blocks

    @classmethod
    def from_pandas(cls, frame: pd.DataFrame) -> "DriverTable":
        return cls([frame])  # `ray.data.from_pandas` keeps a DataFrame as its block

    def _accessors(self):
        from ray.data.block import BlockAccessor

        return [BlockAccessor.for_block(block) for block in self.blocks]

    def map_batches(self, fn: Callable, *, batch_format: str = "default", fn_kwargs: Optional[dict] = None,
                    batch_size=None) -> "DriverTable":
        from ray.data.block import BlockAccessor

        outputs = [fn(accessor.to_batch_format(batch_format), **(fn_kwargs or {})) for accessor in self._accessors()]
        return DriverTable([BlockAccessor.batch_to_block(out) for out in outputs])

    def materialize(self) -> "DriverTable":
        return self

    def repartition(self, num_blocks: int) -> "DriverTable":
        # A driver table is one block from its source on (`read_in_driver`), and every step keeps it.
        assert num_blocks == 1 and len(self.blocks) == 1, "a driver table holds one block"
        return self

    def schema(self):
        from ray.data.dataset import Schema

        return Schema(self._accessors()[0].schema()) if self.blocks else None

    def count(self) -> int:
        return sum(accessor.num_rows() for accessor in self._accessors())

    def size_bytes(self) -> int:
        return sum(accessor.size_bytes() for accessor in self._accessors())

    def take_all(self) -> list[dict]:
        return [row for accessor in self._accessors() for row in accessor.iter_rows(public_row_format=True)]

    def to_pandas(self) -> pd.DataFrame:
        frames = [accessor.to_pandas() for accessor in self._accessors()]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def column(self, name: str) -> np.ndarray:
        """One column of every block, concatenated (the driver's copy, not a Ray fetch)."""
        return np.concatenate([accessor.to_numpy(name) for accessor in self._accessors()])

    def split_at_indices(self, indices: list[int]) -> list["DriverTable"]:
        """As `Dataset.split_at_indices` of a one-block table: zero-copy row slices."""
        (accessor,) = self._accessors()
        bounds = [0, *indices, accessor.num_rows()]
        return [DriverTable([accessor.slice(start, end, copy=False)]) for start, end in zip(bounds, bounds[1:])]

    def to_dataset(self) -> ray.data.Dataset:
        """The blocks put into Ray's object store as a materialized Dataset (no Ray Data execution:
        `ray.data.from_blocks` keeps the blocks as they are)."""
        return ray.data.from_blocks(self.blocks)


def read_in_driver(cfg) -> Optional[tuple[DriverTable, str]]:
    """The raw table as a `DriverTable` when the driver already holds it and the run keeps its
    data in memory (`data.in_memory`): the digits set. None: build through Ray Data."""
    from raytrain_kit.data.sources import _digits_frame

    if cfg.data.source == "digits" and cfg.data.in_memory:
        return DriverTable.from_pandas(_digits_frame()), "digits"
    return None
