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


def _pack(frame: pd.DataFrame, *, numeric: list[str], categorical: list[str], label: str, label_is_text: bool) -> dict:
    """A table's rows as `x` (numeric features, float64, NaN where missing), `y` (the label:
    float64, or text for class names; NaN / None where missing) and one text column per
    categorical feature, `c0`, `c1`, ... (None where missing)."""
    x = (frame[numeric].to_numpy(dtype=np.float64, na_value=np.nan) if numeric
         else np.zeros((len(frame), 0), dtype=np.float64))
    y = _as_text(frame[label]) if label_is_text else frame[label].to_numpy(dtype=np.float64, na_value=np.nan)
    return {"x": x, "y": y, **{f"c{i}": _as_text(frame[c]) for i, c in enumerate(categorical)}}


def categorical_columns(batch: dict) -> list:
    """A packed batch's categorical columns `c0`, `c1`, ..., in order."""
    return [batch[f"c{i}"] for i in range(len(batch)) if f"c{i}" in batch]


def _as_text(column: pd.Series) -> np.ndarray:
    """A column's values as text, None where missing; whole numbers without a decimal point, so a
    code column reads '3' whether CSV typed it int or float."""
    def text(v):
        if isinstance(v, (float, np.floating)) and float(v).is_integer():
            return str(int(v))
        return str(v)

    missing = column.isna().to_numpy()
    return np.array([None if gone else text(v) for v, gone in zip(column.to_numpy(dtype=object), missing)], dtype=object)


def _block_stats(batch: dict) -> dict:
    """Per-block statistics: row count, and per numeric column the finite values' count, mean and
    sum of squared deviations from that mean (two passes over the block, so no cancellation
    however large the column's offset), non-finite and missing cells; missing cells of each
    categorical column; rows holding any missing value; the label's range."""
    x = batch["x"].astype(np.float64)
    y = batch["y"]
    text_label = y.dtype.kind in "OUS"
    categorical = categorical_columns(batch)
    finite_x = np.isfinite(x)
    n = finite_x.sum(axis=0)
    # The mean as pivot + offset: the pivot is one of the column's own values, so x - pivot is
    # exact for values near it and the offset carries the digits a float64 mean of 1e12-sized
    # values rounds away (which would leak into the merge's between-block term).
    first = np.argmax(finite_x, axis=0)
    pivot = np.where(n > 0, x[first, np.arange(x.shape[1])], 0.0) if x.shape[1] else np.zeros(0)
    shifted = np.where(finite_x, x - pivot, 0.0)
    offset = shifted.sum(axis=0) / np.maximum(n, 1)
    deviation = np.where(finite_x, shifted - offset, 0.0)
    missing_c = np.array([[int(pd.isna(c).sum()) for c in categorical]], dtype=np.int64).reshape(1, len(categorical))
    label_missing = pd.isna(y) if text_label else np.isnan(y.astype(np.float64))
    incomplete = np.isnan(x).any(axis=1) | label_missing
    for c in categorical:
        incomplete |= pd.isna(c)
    finite_y = np.zeros(0) if text_label else y[np.isfinite(y)].astype(np.float64)
    return {
        "count": np.array([len(y)]),
        "n": n[None, :],
        "pivot": pivot[None, :],
        "offset": offset[None, :],
        "m2": (deviation * deviation).sum(axis=0, keepdims=True),
        "bad_x": (~finite_x).sum(axis=0, keepdims=True),
        "missing_x": np.isnan(x).sum(axis=0, keepdims=True),
        "missing_c": missing_c,
        "incomplete": np.array([int(incomplete.sum())]),
        "bad_y": np.array([int(label_missing.sum()) if text_label else len(y) - len(finite_y)]),
        "missing_y": np.array([int(label_missing.sum())]),
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
    pivot: np.ndarray  # per numeric column: the mean is pivot + offset (see merge_moments)
    offset: np.ndarray
    std: np.ndarray
    bad_x: np.ndarray  # per numeric column: NaN, inf and missing cells
    bad_y: int  # label cells that are missing (or NaN, inf)
    y_min: float
    y_max: float
    y_nonint: int
    y_seen: np.ndarray  # (TRACKED_CLASSES,) bool: the class indices that occur
    missing_x: np.ndarray = None  # per numeric column: missing (NaN) cells
    missing_c: np.ndarray = None  # per categorical column: missing cells
    missing_y: int = 0
    incomplete: int = 0  # rows holding a missing value anywhere

    @property
    def mean(self) -> np.ndarray:
        return self.pivot + self.offset


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
    """The statistics of a packed table (`_pack`'s columns), in one Ray Data pass; only one small
    row per block comes to the driver."""
    rows = [r for r in ds.map_batches(_block_stats, batch_size=None, batch_format="numpy").take_all()
            if r["count"]]
    count = int(sum(r["count"] for r in rows))
    if not count:
        empty = np.zeros(0)
        return _Stats(count=0, pivot=empty, offset=empty, std=empty, bad_x=empty, bad_y=0, y_min=np.inf, y_max=-np.inf, y_nonint=0,
                      y_seen=np.zeros(TRACKED_CLASSES, dtype=bool), missing_x=empty, missing_c=empty)
    # One row per block (take_all splits each block's one-row batch); each array (num_columns,).
    n, pivot, offset, m2 = merge_moments([(r["n"], r["pivot"], r["offset"], r["m2"]) for r in rows])
    return _Stats(
        count=count, pivot=pivot, offset=offset, std=np.sqrt(m2 / np.maximum(n, 1)),
        bad_x=sum(r["bad_x"] for r in rows), bad_y=int(sum(r["bad_y"] for r in rows)),
        y_min=float(min(r["y_min"] for r in rows)), y_max=float(max(r["y_max"] for r in rows)),
        y_nonint=int(sum(r["y_nonint"] for r in rows)),
        y_seen=np.logical_or.reduce([r["y_seen"] for r in rows]),
        missing_x=sum(r["missing_x"] for r in rows), missing_c=sum(r["missing_c"] for r in rows),
        missing_y=int(sum(r["missing_y"] for r in rows)), incomplete=int(sum(r["incomplete"] for r in rows)),
    )


@dataclass(frozen=True)
class LabelPlan:
    """How labels become classes: `num_classes` (0: regression) is known now for class indices;
    `encoded` labels (names, or numbers other than 0..k-1) are numbered by an encoder fitted on
    the training split, which also sets the number of classes (`encode.fit_preprocessing`)."""

    num_classes: int
    encoded: bool = False


def check_stats(cfg: Experiment, stats: _Stats, *, columns, where: str) -> LabelPlan:
    """Raise a DataError naming each bad column; say how the labels become classes."""
    d = cfg.data
    problems = _missing_problems(cfg, stats, columns=columns, where=where)
    if columns.array and int(np.sum(stats.bad_x)):
        problems.append(f"column {columns.array!r} in {where} holds {int(np.sum(stats.bad_x))} NaN or inf value(s) "
                        "in its arrays; clean them")
    if stats.bad_y:
        kind = "missing" if columns.label_is_text or stats.missing_y == stats.bad_y else "NaN, inf or missing"
        problems.append(f"label column {d.label!r} in {where} has {stats.bad_y} {kind} value(s)"
                        + ("; set data.missing: drop to leave those rows out" if stats.missing_y else ""))
    plan = LabelPlan(num_classes=0)
    if d.task == "classification" and not stats.bad_y:
        plan, label_problems = _label_plan(cfg, stats, label_is_text=columns.label_is_text, where=where)
        problems += label_problems
    if problems:
        raise DataError(*problems)
    return plan


def _missing_problems(cfg: Experiment, stats: _Stats, *, columns, where: str) -> list[str]:
    """Non-finite numbers are always errors; missing cells unless data.missing says what to do."""
    remedy = "; set data.missing: drop or impute, or clean it"
    allowed = cfg.data.missing != "error"
    problems = []
    for i, name in enumerate(columns.numeric):
        num_missing, num_bad = int(stats.missing_x[i]), int(stats.bad_x[i])
        if num_bad > num_missing:
            problems.append(f"column {name!r} in {where} has {num_bad - num_missing} inf value(s); clean it")
        if num_missing and not allowed:
            problems.append(f"column {name!r} in {where} has {num_missing} NaN or missing value(s){remedy}")
    if not allowed:
        problems += [f"column {name!r} in {where} has {int(n)} missing value(s){remedy}"
                     for name, n in zip(columns.categorical, stats.missing_c) if n]
    return problems


def _label_plan(cfg: Experiment, stats: _Stats, *, label_is_text: bool, where: str) -> tuple[LabelPlan, list[str]]:
    d = cfg.data
    declared = d.num_classes if d.source != "synthetic" else (d.num_classes or 2)
    if label_is_text:
        return LabelPlan(num_classes=declared or 0, encoded=True), []
    if stats.y_nonint:
        return LabelPlan(0), [f"label column {d.label!r} in {where} has {stats.y_nonint} non-integer value(s); "
                              "classification needs class labels (or set data.task: regression)"]
    if declared:
        if stats.y_min < 0 or stats.y_max >= declared:
            bad = stats.y_min if stats.y_min < 0 else stats.y_max
            return LabelPlan(0), [f"label column {d.label!r} in {where} has value {bad:g} outside [0, {declared}); "
                                  "with data.num_classes set, labels must be class indices (or leave it unset "
                                  "to number the labels found)"]
        return LabelPlan(declared), _class_problems(stats, declared, label=d.label, where=where)
    if stats.y_min == stats.y_max:
        return LabelPlan(0), [f"label column {d.label!r} in {where} has a single class (every label is "
                              f"{stats.y_min:g}); classification needs two or more"]
    top = int(stats.y_max)
    if stats.y_min >= 0 and top < TRACKED_CLASSES and stats.y_seen[: top + 1].all():
        return LabelPlan(top + 1), _class_problems(stats, top + 1, label=d.label, where=where)
    return LabelPlan(0, encoded=True), []  # {1, 2}, {-1, 1}, sparse codes: numbered by the encoder


CONSTANT_STD = 1e-12  # a training column with no more spread than this is constant: centred, never scaled


def _class_problems(stats: _Stats, num_classes: int, *, label: str, where: str) -> list[str]:
    """A label column must hold two classes or more."""
    if num_classes > TRACKED_CLASSES:
        return []  # too many classes to track one by one; the range check above still ran
    seen = np.flatnonzero(stats.y_seen[:num_classes])
    if len(seen) < 2:
        only = f" (every label is {int(seen[0])})" if len(seen) else ""
        return [f"label column {label!r} in {where} has a single class{only}; classification needs two or more"]
    return []
