"""One statistics pass over a packed table (`x`, `y`): per-column moments merged stably across
blocks, non-finite cells, the label's range and classes; `check_stats` turns them into errors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import ray

from raytrain_kit.config import Experiment
from raytrain_kit.errors import DataError



# ---------------------------------------------------------------------------------------------
# Packing and statistics (pure functions over pandas / numpy batches, run by Ray Data)


def _pack(frame: pd.DataFrame, *, features: list[str], label: str) -> dict:
    x = frame[features].to_numpy(dtype=np.float64, na_value=np.nan)
    y = frame[label].to_numpy(dtype=np.float64, na_value=np.nan)
    return {"x": x, "y": y}


def _block_stats(batch: dict) -> dict:
    """Per-block statistics: row count, and per column the finite values' count, mean and sum of
    squared deviations from that mean (two passes over the block, so no cancellation however
    large the column's offset), non-finite cells; the label's range."""
    x, y = batch["x"].astype(np.float64), batch["y"].astype(np.float64)
    finite_x = np.isfinite(x)
    n = finite_x.sum(axis=0)
    # The mean as pivot + offset: the pivot is one of the column's own values, so x - pivot is
    # exact for values near it and the offset carries the digits a float64 mean of 1e12-sized
    # values rounds away (which would leak into the merge's between-block term).
    first = np.argmax(finite_x, axis=0)
    pivot = np.where(n > 0, x[first, np.arange(x.shape[1])], 0.0)
    shifted = np.where(finite_x, x - pivot, 0.0)
    offset = shifted.sum(axis=0) / np.maximum(n, 1)
    deviation = np.where(finite_x, shifted - offset, 0.0)
    finite_y = y[np.isfinite(y)]
    return {
        "count": np.array([len(y)]),
        "n": n[None, :],
        "pivot": pivot[None, :],
        "offset": offset[None, :],
        "m2": (deviation * deviation).sum(axis=0, keepdims=True),
        "bad_x": (~finite_x).sum(axis=0, keepdims=True),
        "bad_y": np.array([len(y) - len(finite_y)]),
        "y_min": np.array([finite_y.min() if len(finite_y) else np.inf]),
        "y_max": np.array([finite_y.max() if len(finite_y) else -np.inf]),
        "y_nonint": np.array([int((finite_y != np.round(finite_y)).sum())]),
        "y_seen": _classes_seen(finite_y)[None, :],
    }


TRACKED_CLASSES = 4096  # class indices below this are tracked one by one (which classes occur)


def _classes_seen(labels: np.ndarray) -> np.ndarray:
    """Which class indices in [0, TRACKED_CLASSES) occur: shape (TRACKED_CLASSES,), bool."""
    seen = np.zeros(TRACKED_CLASSES, dtype=bool)
    indices = labels[(labels == np.round(labels)) & (labels >= 0) & (labels < TRACKED_CLASSES)]
    seen[indices.astype(np.int64)] = True
    return seen


@dataclass
class _Stats:
    count: int
    pivot: np.ndarray  # per column: the mean is pivot + offset (see merge_moments)
    offset: np.ndarray
    std: np.ndarray
    bad_x: np.ndarray
    bad_y: int
    y_min: float
    y_max: float
    y_nonint: int
    y_seen: np.ndarray  # (TRACKED_CLASSES,) bool: the class indices that occur


def merge_moments(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Merge per-block (count, pivot, offset, M2) column statistics into the whole table's, in
    block order. The mean is pivot + offset (`_block_stats`), kept apart because their float64
    sum would round away digits (standardize as (x - pivot) - offset); M2 is the sum of squared
    deviations from the mean, so the population variance is M2 / count.
    Chan, Golub and LeVeque's pairwise update ("Updating formulae and a pairwise algorithm for
    computing sample variances", 1979), stable where E[x^2] - E[x]^2 cancels: a column of
    1e9 + 10 * N(0, 1) keeps all its variance. Shapes: each array (num_columns,)."""
    n, pivot, offset, m2 = (np.array(a, dtype=np.float64) for a in parts[0])
    for n_b, pivot_b, offset_b, m2_b in parts[1:]:
        total = n + n_b
        # Pivots of one column are close, so their difference is exact: the deltas keep every digit.
        delta = np.where(n > 0, (pivot_b - pivot) + (offset_b - offset), 0.0)
        share = np.divide(n_b, total, out=np.zeros_like(delta), where=total > 0)
        pivot = np.where(n > 0, pivot, pivot_b)
        offset = np.where(n > 0, offset + delta * share, offset_b)
        m2 = m2 + m2_b + delta * delta * n * share
        n = total
    return n, pivot, offset, m2


def collect_stats(ds: ray.data.Dataset) -> _Stats:
    rows = [r for r in ds.map_batches(_block_stats, batch_size=None, batch_format="numpy").take_all()
            if r["count"]]
    count = int(sum(r["count"] for r in rows))
    if not count:
        empty = np.zeros(0)
        return _Stats(count=0, pivot=empty, offset=empty, std=empty, bad_x=empty, bad_y=0, y_min=np.inf, y_max=-np.inf, y_nonint=0,
                      y_seen=np.zeros(TRACKED_CLASSES, dtype=bool))
    # One row per block (take_all splits each block's one-row batch); each array (num_columns,).
    n, pivot, offset, m2 = merge_moments([(r["n"], r["pivot"], r["offset"], r["m2"]) for r in rows])
    return _Stats(
        count=count, pivot=pivot, offset=offset, std=np.sqrt(m2 / np.maximum(n, 1)),
        bad_x=sum(r["bad_x"] for r in rows), bad_y=int(sum(r["bad_y"] for r in rows)),
        y_min=float(min(r["y_min"] for r in rows)), y_max=float(max(r["y_max"] for r in rows)),
        y_nonint=int(sum(r["y_nonint"] for r in rows)),
        y_seen=np.logical_or.reduce([r["y_seen"] for r in rows]),
    )


def check_stats(cfg: Experiment, stats: _Stats, *, features: list[str], where: str) -> int:
    """Raise a DataError naming each bad column; return the number of classes (0: regression)."""
    d = cfg.data
    problems = [f"column {features[i]!r} in {where} has {int(n)} NaN, inf or missing value(s); clean or impute it"
                for i, n in enumerate(stats.bad_x) if n]
    if stats.bad_y:
        problems.append(f"label column {d.label!r} in {where} has {stats.bad_y} NaN, inf or missing value(s)")
    num_classes = 0
    if d.task == "classification" and not stats.bad_y:
        declared = d.num_classes if d.source != "synthetic" else (d.num_classes or 2)
        num_classes = declared if declared else int(stats.y_max) + 1
        if stats.y_nonint:
            problems.append(f"label column {d.label!r} in {where} has {stats.y_nonint} non-integer value(s); "
                            "classification needs class indices (or set data.task: regression)")
        elif stats.y_min < 0 or stats.y_max >= num_classes:
            bad = stats.y_min if stats.y_min < 0 else stats.y_max
            problems.append(f"label column {d.label!r} in {where} has value {bad:g} outside [0, {num_classes}); "
                            "labels must be class indices (check data.num_classes)")
        else:
            problems += _class_problems(stats, num_classes, declared=bool(declared), label=d.label, where=where)
    if problems:
        raise DataError(*problems)
    return num_classes


CONSTANT_STD = 1e-12  # a training column with no more spread than this is constant: centred, never scaled


def _class_problems(stats: _Stats, num_classes: int, *, declared: bool, label: str, where: str) -> list[str]:
    """A label column must hold two classes or more; an inferred class count (max + 1) must not
    leave classes that never occur (labels 1..k, or sparse codes, are not class indices)."""
    if num_classes > TRACKED_CLASSES:
        return []  # too many classes to track one by one; the range check above still ran
    seen = np.flatnonzero(stats.y_seen[:num_classes])
    if len(seen) < 2:
        only = f" (every label is {int(seen[0])})" if len(seen) else ""
        return [f"label column {label!r} in {where} has a single class{only}; classification needs two or more"]
    missing = sorted(set(range(num_classes)) - set(seen.tolist()))
    if missing and not declared:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        return [f"label column {label!r} in {where} has labels up to {num_classes - 1} but class(es) {shown} never "
                f"occur; relabel the classes 0..k-1, or set data.num_classes to keep empty classes"]
    return []
