"""The seeded train/validation split and cross-validation folds, both by a seeded hash of each
row's contents (`row_keys`), so the same seed gives the same rows whatever the session, node or
block layout."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Optional

import numpy as np
import pandas as pd
import ray

from raytrain_kit.config import Experiment
from raytrain_kit.data.in_driver import DriverTable
from raytrain_kit.data.spec import DataSpec
from raytrain_kit.data.stats import categorical_columns
from raytrain_kit.errors import DataError



@contextlib.contextmanager
def preserved_order():
    """Ray Data keeps block order within this block (a dataset made here keeps the setting for
    its later executions, in workers too). Off, blocks come out in task completion order, so
    which rows a worker or a split gets would depend on timing."""
    context = ray.data.DataContext.get_current()
    before = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        yield
    finally:
        context.execution_options.preserve_order = before


ONE_TASK_SORT_BYTES = 64 * 2**20  # a keyed table up to this size is sorted by one task, its keys read whole


def sort_by_key(keyed: ray.data.Dataset) -> ray.data.Dataset:
    """The table in key order. Ray Data's distributed sort (sample, partition, merge) costs 5-9 s
    of tasks on 2 cores even for a few thousand rows; a table that fits one task's memory is
    gathered into one block and sorted there in milliseconds. Either way the rows come out in
    the same order (identical rows share a key and are interchangeable), so the split does not
    depend on which path ran."""
    if keyed.size_bytes() > ONE_TASK_SORT_BYTES:
        return keyed.sort("key").materialize()
    return keyed.repartition(1).map_batches(_sorted_block, batch_size=None, batch_format="numpy").materialize()


def sorted_keys(keyed: ray.data.Dataset) -> np.ndarray:
    """The key column of a table `sort_by_key` returned, in order: a small table's one block is
    fetched as it is (a Ray Data pass over it would cost seconds of start-up); a large one's key
    column alone is streamed to the driver (8 bytes a row)."""
    if isinstance(keyed, DriverTable):
        return keyed.column("key")
    if keyed.size_bytes() > ONE_TASK_SORT_BYTES:
        return np.concatenate([b["key"] for b in keyed.select_columns(["key"]).iter_batches(
            batch_size=None, batch_format="numpy")])
    from ray.data.block import BlockAccessor

    refs = [entry.ref for bundle in keyed.iter_internal_ref_bundles() for entry in bundle.blocks]
    return np.concatenate([BlockAccessor.for_block(block).to_numpy("key") for block in ray.get(refs)])


def _sorted_block(batch: dict) -> dict:
    order = np.argsort(batch["key"], kind="stable")
    return {name: values[order] for name, values in batch.items()}


def split_by_key(packed: ray.data.Dataset, *, val_fraction: float, seed: int
                 ) -> tuple[ray.data.Dataset, ray.data.Dataset, int]:
    """The seeded train/validation split: rows ordered by `row_keys` (a seeded hash of each
    row's contents, so a seeded random permutation that no block layout, session, node or read
    order changes), the first `n - int(n * (1 - val_fraction))` to validation. Identical rows share a key
    and so a side: a duplicate never sits on both. Only the keys (8 bytes a row) come to the
    driver. Returns (train, val, number of validation rows); both keep the key order, which the
    per-epoch shuffles start from. Raises DataError when a side would be empty."""
    keyed = sort_by_key(packed.map_batches(_add_key, batch_format="numpy", fn_kwargs={"seed": seed}).materialize())
    keys = sorted_keys(keyed)
    wanted = len(keys) - int(len(keys) * (1 - val_fraction))  # as Ray's train_test_split counts
    cut = int(np.searchsorted(keys, keys[min(wanted, len(keys) - 1)], side="left")) if wanted else 0
    if cut == 0 and wanted:  # the first key's duplicates fill the whole wanted share: take them all
        cut = int(np.searchsorted(keys, keys[0], side="right"))
    if cut == 0 or cut == len(keys):
        raise DataError(f"data.val_fraction: {val_fraction} leaves an empty split of {len(keys)} rows")
    val, train = keyed.split_at_indices([cut])
    return train, val, cut


# ---------------------------------------------------------------------------------------------
# Cross-validation folds (sweeps with tune.cv_folds)

_MIX = np.uint64(0x9E3779B97F4A7C15)


def row_keys(x: np.ndarray, y: np.ndarray, *, seed: int, text: tuple = ()) -> np.ndarray:
    """A seeded 64-bit hash of each row's contents: the same row gets the same key on every run,
    on any node, in any block, which is what makes folds reproducible without a global row index.
    `y` may be text (class names); `text` holds a table's categorical columns (object arrays)."""
    # Every bit of the value: float64 rows (the raw table, before the split) hash both halves, so
    # values that only float64 tells apart (timestamps, ids) are not taken for duplicates.
    exact = np.ascontiguousarray(x if x.dtype == np.float64 else x.astype(np.float32))
    words = exact.reshape(len(exact), -1).view(np.uint32).astype(np.uint64)
    coef = np.random.default_rng(seed).integers(1, 2**63, size=words.shape[1] + 1, dtype=np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):  # arithmetic mod 2**64 is the point
        h = (words * coef[:-1]).sum(axis=1, dtype=np.uint64)
        h += _label_bits(y) * coef[-1]
        if text:  # their own coefficients, so a table without text columns keeps its keys
            more = np.random.default_rng([seed, 1]).integers(1, 2**63, size=len(text), dtype=np.uint64) | np.uint64(1)
            for column, c in zip(text, more):
                h += _text_bits(column) * c
        # splitmix64's finalizer spreads the bits, so key order is a seeded random permutation.
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


def _label_bits(y: np.ndarray) -> np.ndarray:
    y = np.ascontiguousarray(y)
    return _text_bits(y) if y.dtype.kind in "OUS" else y.astype(np.float64).view(np.uint64)


def _text_bits(column: np.ndarray) -> np.ndarray:
    # pandas' hash of each value (SipHash with a fixed key): the same text gives the same bits in
    # every process, unlike Python's salted hash().
    return pd.util.hash_array(np.asarray(column, dtype=object), categorize=False).astype(np.uint64)


def _add_key(batch: dict, *, seed: int) -> dict:
    text = tuple(categorical_columns(batch))
    return {**batch, "key": row_keys(batch["x"], batch["y"], seed=seed, text=text)}


def assign_folds(keys: np.ndarray, labels: Optional[np.ndarray], *, num_folds: int) -> np.ndarray:
    """Fold of each row. Classification (labels given): each class's rows, in key order, are dealt
    round-robin into the folds from a class-dependent start, so every class splits as evenly as
    its count allows and fold sizes stay within one row of each other per class. Regression:
    rows in key order are dealt round-robin. Keys are seeded hashes, so both are random splits."""
    fold = np.empty(len(keys), dtype=np.int64)
    groups = np.unique(labels) if labels is not None else [None]
    for label in groups:
        rows = np.flatnonzero(labels == label) if labels is not None else np.arange(len(keys))
        order = rows[np.argsort(keys[rows], kind="stable")]
        start = int(label) % num_folds if label is not None else 0
        fold[order] = (np.arange(len(order)) + start) % num_folds
    return fold


def _select_fold(batch: dict, *, sorted_keys: np.ndarray, folds: np.ndarray, fold: int, inside: bool) -> dict:
    where = np.searchsorted(sorted_keys, batch["key"])
    keep = (folds[where] == fold) == inside
    return {"x": batch["x"][keep], "y": batch["y"][keep]}


def build_folds(cfg: Experiment, train: ray.data.Dataset, spec: DataSpec, *,
                num_folds: int) -> list[tuple[dict[str, ray.data.Dataset], DataSpec]]:
    """k seeded folds of the training split: fold i validates on its rows and trains on the rest,
    stratified for classification. Only each row's key and label (16 bytes) come to the driver;
    the rows themselves stay in Ray's object store. Same seed, same folds."""
    with preserved_order():  # same block order, same split across workers
        keyed = train.map_batches(_add_key, batch_format="numpy", fn_kwargs={"seed": cfg.train.seed}).materialize()
        pairs = [b for b in keyed.select_columns(["key", "y"]).iter_batches(batch_size=None, batch_format="numpy")]
        keys = np.concatenate([b["key"] for b in pairs])
        labels = np.concatenate([b["y"] for b in pairs]) if spec.task == "classification" else None
        fold_of_row = assign_folds(keys, labels, num_folds=num_folds)
        order = np.argsort(keys, kind="stable")
        lookup = {"sorted_keys": keys[order], "folds": fold_of_row[order]}
        # Identical rows share a key and so a fold: a duplicate never sits on both sides of a split.
        fold_of_row = lookup["folds"][np.searchsorted(lookup["sorted_keys"], keys)]
        folds = []
        for i in range(num_folds):
            part = {name: keyed.map_batches(_select_fold, batch_format="numpy",
                                            fn_kwargs={**lookup, "fold": i, "inside": inside})
                    for name, inside in (("train", False), ("val", True))}
            num_val = int((fold_of_row == i).sum())
            if not num_val or num_val == len(keys):
                raise DataError(f"tune.cv_folds: {num_folds} folds of {len(keys)} training rows leave fold {i} "
                                "empty; use fewer folds")
            if cfg.data.in_memory:
                part = {name: ds.materialize() for name, ds in part.items()}
            folds.append((part, replace(spec, num_train_rows=len(keys) - num_val, num_val_rows=num_val)))
        return folds
