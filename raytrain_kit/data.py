"""Ray Datasets for an experiment: read, check the schema, split, standardize, describe.

Owns everything between a `DataConfig` and the `{"train", "val"}` datasets handed to
`TorchTrainer(datasets=...)`: the four sources, a single statistics pass that finds schema
problems (missing or non-numeric columns, NaN/inf, labels out of range) before any training
worker starts, a seeded train/validation split by row contents (the same rows for the same seed
whatever the session or block layout), and the `DataSpec` models are built from.
Rows leave here as two columns, `x` (float32 feature vector) and `y` (label).
Exercised by `raytrain-kit validate jobs/tabular_mlp.yaml` and `tests/test_data.py`.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import ray

from raytrain_kit.config import Experiment
from raytrain_kit.errors import DataError, short_message


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about the data, and what the worker needs to batch it."""

    num_features: int
    num_classes: int  # 0 for regression
    input_shape: tuple[int, ...]  # per-sample shape the feature vector is viewed as
    num_train_rows: int
    num_val_rows: int
    feature_names: tuple[str, ...] = field(default=())
    constant_features: tuple[str, ...] = field(default=())  # no spread in the training split: left unscaled

    @property
    def task(self) -> str:
        return "classification" if self.num_classes else "regression"

    @property
    def num_outputs(self) -> int:
        return self.num_classes or 1


# ---------------------------------------------------------------------------------------------
# Reading


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (pixels 0..16, labels), read from the file scikit-learn ships:
    the same arrays as `sklearn.datasets.load_digits`, without its second of importing sklearn."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.exists():  # another layout: let scikit-learn find its file
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.data, bunch.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int64)


def _digits_frame() -> pd.DataFrame:
    pixels, labels = digits_arrays()
    # Pixels are counts 0..16; scale to [0, 1] as is conventional for this data set.
    frame = pd.DataFrame((pixels / 16.0).astype(np.float32), columns=[f"pixel_{i}" for i in range(64)])
    frame["label"] = labels.astype(np.int64)
    return frame


def _synthetic_block(batch: dict, *, seed: int, num_features: int, num_classes: int, noise: float) -> dict:
    """Rows from a fixed random teacher; each block is seeded by its first row id, so data is
    identical whatever the block layout of the range it came from."""
    ids = batch["id"]
    teacher = np.random.default_rng([seed, 0xDA7A])
    weights = teacher.standard_normal((num_features, max(num_classes, 1))) / np.sqrt(num_features)
    rng = np.random.default_rng([seed, int(ids[0]) if len(ids) else 0])
    x = rng.standard_normal((len(ids), num_features)).astype(np.float32)
    scores = x @ weights + noise * rng.standard_normal((len(ids), weights.shape[1]))
    out = {f"f{i}": x[:, i] for i in range(num_features)}
    out["label"] = scores.argmax(axis=1).astype(np.int64) if num_classes else scores[:, 0].astype(np.float32)
    return out


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def read_table(cfg: Experiment) -> tuple[ray.data.Dataset, str]:
    """The raw rows as a lazy Ray Dataset, and a name for error messages."""
    d = cfg.data
    if d.source == "digits":
        return ray.data.from_pandas(_digits_frame()), "digits"
    if d.source == "synthetic":
        # Unset: 2 classes for classification, a continuous target (0 classes) for regression.
        num_classes = d.num_classes if d.num_classes is not None else (2 if d.task == "classification" else 0)
        ds = ray.data.range(d.num_rows, override_num_blocks=max(1, min(64, d.num_rows // 2048)))
        ds = ds.map_batches(_synthetic_block, batch_size=None, fn_kwargs=dict(
            seed=cfg.train.seed, num_features=d.num_features, num_classes=num_classes, noise=d.noise))
        return ds, "synthetic"
    path = d.path
    assert path is not None  # config validation requires it for files
    if _is_local(path):
        path = os.path.abspath(path.removeprefix("file://"))
        if not os.path.exists(path):
            raise DataError(f"data.path: {path}: no such file or folder")
    reader = ray.data.read_csv if d.source == "csv" else ray.data.read_parquet
    try:
        return reader(path), path
    except Exception as e:  # pyarrow and fsspec raise many types for unreadable input
        raise DataError(f"data.path: {path}: cannot read as {d.source} ({type(e).__name__}: {short_message(e)})") from None


def check_local_file(cfg: Experiment) -> None:
    """What can be known about a local csv/parquet source without Ray, so a bad file is reported
    before Ray starts: the path exists, its header or metadata reads, no column name repeats, the
    label and features are there and numeric (CSV types from the first block, as pyarrow infers
    them; Parquet from the metadata). URIs are checked when Ray reads them. Raises DataError."""
    d = cfg.data
    if d.source not in ("csv", "parquet") or not d.path or not _is_local(d.path):
        return
    path = os.path.abspath(d.path.removeprefix("file://"))
    if not os.path.exists(path):
        raise DataError(f"data.path: {path}: no such file or folder")
    try:
        schema = _local_schema(path, d.source)
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several types for unreadable input
        raise DataError(f"data.path: {path}: cannot read as {d.source} ({type(e).__name__}: {short_message(e)})") from None
    twice = sorted({n for n in schema.names if schema.names.count(n) > 1})
    if twice:
        raise DataError(f"data.path: {path} has the column name(s) {', '.join(map(repr, twice))} more than once; "
                        "rename them so each column has its own name")
    select_columns(cfg, schema, path)


def _local_schema(path: str, source: str) -> pa.Schema:
    if source == "parquet":
        import pyarrow.dataset as pads

        return pads.dataset(path, format="parquet").schema
    import pyarrow.csv as pacsv

    files = [path] if os.path.isfile(path) else sorted(
        e.path for e in os.scandir(path) if e.is_file() and not e.name.startswith((".", "_")))
    if not files:
        raise DataError(f"data.path: {path}: the folder holds no files")
    with pacsv.open_csv(files[0]) as reader:  # reads the header and the first block only
        return reader.schema


def _schema(ds: ray.data.Dataset, where: str):
    try:
        schema = ds.schema()
    except Exception as e:  # a malformed file surfaces on the first read
        raise DataError(f"data.path: {where}: cannot read ({type(e).__name__}: {short_message(e)})") from None
    if schema is None:
        raise DataError(f"data.path: {where}: holds no rows")
    return schema


def _numeric(t) -> bool:
    # Ray reports arrow types for Arrow blocks and numpy dtypes for pandas blocks.
    if isinstance(t, pa.DataType):
        return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_null(t)
    try:
        return bool(np.issubdtype(np.dtype(t), np.number) or np.issubdtype(np.dtype(t), np.bool_))
    except TypeError:
        return False


def _nearest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _listed(names: list[str], wanted: str, limit: int = 20) -> str:
    """The columns for a 'not found' message: the likeliest first (close names, then any named
    like a label), then the rest up to `limit`, with how many are left out."""
    likely = difflib.get_close_matches(wanted, names, n=3, cutoff=0.3)
    likely += [n for n in names if n not in likely and n.lower() in ("label", "target", "y", "class")]
    shown = likely + [n for n in names if n not in likely][: max(0, limit - len(likely))]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f", and {more} more" if more > 0 else "")


def select_columns(cfg: Experiment, schema, where: str) -> list[str]:
    """The feature columns, after checking that they and the label exist and are numeric."""
    d = cfg.data
    names = list(schema.names)
    if d.label not in names:
        raise DataError(f"data.label: column {d.label!r} not found in {where}{_nearest(d.label, names)} "
                        f"(columns: {_listed(names, d.label)})")
    features = list(d.features) if d.features else [n for n in names if n != d.label]
    missing = [f for f in features if f not in names]
    if missing:
        raise DataError(f"data.features: column(s) {', '.join(map(repr, missing))} not found in {where}"
                        f"{_nearest(missing[0], names)} (columns: {_listed(names, missing[0])})")
    if not features:
        raise DataError(f"data.features: {where} has no feature columns besides the label {d.label!r}")
    types = dict(zip(schema.names, schema.types))
    problems = [f"column {c!r} in {where} is {types[c]}, not numeric; drop it from data.features or encode it"
                for c in features + [d.label] if not _numeric(types[c])]
    if problems:
        raise DataError(*problems)
    return features


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


def describe_constant_features(spec: DataSpec, limit: int = 8) -> Optional[str]:
    """The line a run prints when standardization left constant columns unscaled, else None."""
    names = spec.constant_features
    if not names:
        return None
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return (f"data: {len(names)} column(s) constant in the training split, centred but not scaled: {shown} "
            "(they carry no information; drop them from data.features)")


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


def _finish(batch: dict, *, pivot: Optional[np.ndarray], offset: Optional[np.ndarray], std: Optional[np.ndarray],
            classification: bool) -> dict:
    x = batch["x"]
    if pivot is not None:
        # Constant columns (digits' blank border pixels) keep scale 1 instead of dividing by zero.
        x = ((x - pivot) - offset) / np.where(std > CONSTANT_STD, std, 1.0)
    y = batch["y"].astype(np.int64) if classification else batch["y"].astype(np.float32)
    return {"x": x.astype(np.float32), "y": y}


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


def split_by_key(packed: ray.data.Dataset, *, val_fraction: float, seed: int
                 ) -> tuple[ray.data.Dataset, ray.data.Dataset, int]:
    """The seeded train/validation split: rows ordered by `row_keys` (a seeded hash of each
    row's contents, so a seeded random permutation that no block layout, session, node or read
    order changes), the first `n - int(n * (1 - val_fraction))` to validation. Identical rows share a key
    and so a side: a duplicate never sits on both. Only the keys (8 bytes a row) come to the
    driver. Returns (train, val, number of validation rows); both keep the key order, which the
    per-epoch shuffles start from. Raises DataError when a side would be empty."""
    keyed = packed.map_batches(_add_key, batch_format="numpy", fn_kwargs={"seed": seed}).sort("key").materialize()
    keys = np.concatenate([b["key"] for b in keyed.select_columns(["key"]).iter_batches(batch_size=None,
                                                                                      batch_format="numpy")])
    wanted = len(keys) - int(len(keys) * (1 - val_fraction))  # as Ray's train_test_split counts
    cut = int(np.searchsorted(keys, keys[min(wanted, len(keys) - 1)], side="left")) if wanted else 0
    if cut == 0 and wanted:  # the first key's duplicates fill the whole wanted share: take them all
        cut = int(np.searchsorted(keys, keys[0], side="right"))
    if cut == 0 or cut == len(keys):
        raise DataError(f"data.val_fraction: {val_fraction} leaves an empty split of {len(keys)} rows")
    val, train = keyed.split_at_indices([cut])
    return train, val, cut


# ---------------------------------------------------------------------------------------------
# The entry point


def build_datasets(cfg: Experiment) -> tuple[dict[str, ray.data.Dataset], DataSpec]:
    """Train/val Ray Datasets with columns `x`, `y`, checked before any worker starts. The same
    seed gives the same rows in each, in the same order, in any session (`split_by_key`)."""
    with preserved_order():
        return _build_datasets(cfg)


def _build_datasets(cfg: Experiment) -> tuple[dict[str, ray.data.Dataset], DataSpec]:
    d = cfg.data
    check_local_file(cfg)
    raw, where = read_table(cfg)
    features = select_columns(cfg, _schema(raw, where), where)
    classification = d.task == "classification"
    packed = raw.map_batches(_pack, batch_format="pandas", fn_kwargs=dict(features=features, label=d.label))
    packed = packed.materialize() if d.in_memory else packed  # read once: statistics, then the split
    stats = collect_stats(packed)
    if stats.count < 2:
        raise DataError(f"data.path: {where} has {stats.count} row(s); need at least 2 to split")
    num_classes = check_stats(cfg, stats, features=features, where=where)
    train, val, _ = split_by_key(packed, val_fraction=d.val_fraction, seed=cfg.train.seed)
    # Standardize with training statistics only, so validation stays unseen.
    scale = collect_stats(train) if d.standardize else None
    finish = dict(pivot=scale.pivot if scale else None, offset=scale.offset if scale else None,
                  std=scale.std if scale else None,
                  classification=classification)
    train = train.map_batches(_finish, batch_format="numpy", fn_kwargs=finish)
    val = val.map_batches(_finish, batch_format="numpy", fn_kwargs=finish)
    if d.in_memory:
        train, val = train.materialize(), val.materialize()
    num_train, num_val = train.count(), val.count()
    if num_val == 0 or num_train == 0:
        raise DataError(f"data.val_fraction: {d.val_fraction} leaves an empty split of {stats.count} rows")
    input_shape = tuple(cfg.input_shape) if cfg.input_shape else (len(features),)
    if int(np.prod(input_shape)) != len(features):
        raise DataError(f"data.input_shape: {list(input_shape)} holds {int(np.prod(input_shape))} values, "
                        f"but {where} has {len(features)} feature columns")
    constant = tuple(f for f, std in zip(features, scale.std) if std <= CONSTANT_STD) if scale else ()
    spec = DataSpec(num_features=len(features), num_classes=num_classes, input_shape=input_shape,
                    num_train_rows=num_train, num_val_rows=num_val, feature_names=tuple(features),
                    constant_features=constant)
    return {"train": train, "val": val}, spec


BlockRange = tuple  # (ObjectRef of a Ray Data block, first row, end row)


def split_for_workers(datasets: dict[str, ray.data.Dataset], *, num_workers: int) -> dict[str, list[list[BlockRange]]]:
    """Each dataset cut once, on the driver, into one piece per worker: the row ranges of blocks
    in Ray's object store that the worker reads (`read_block_ranges`) and trains on from memory.

    For `data.in_memory` runs this replaces Ray Train's streaming split, whose coordinator actor
    and per-worker streaming executor cost several seconds per run before the first step on 2
    cores, against milliseconds for fetching the blocks. Done before the run's workers hold the
    CPUs, since cutting a block is a Ray task. Training pieces are equal (every worker takes the
    same number of steps, as DDP requires; up to num_workers - 1 rows are left out, as in Ray's
    equal split); validation keeps every row. The blocks stay wherever they are: nothing passes
    through the driver, and a worker on another node fetches its own.
    """
    with preserved_order():  # the same rows reach the same worker every run
        pieces = {}
        for name, ds in datasets.items():
            if num_workers == 1:
                parts = [ds.materialize()]
            elif name == "train":
                parts = ds.split(num_workers, equal=True)
            else:
                num_rows = ds.count()
                parts = ds.split_at_indices([num_rows * i // num_workers for i in range(1, num_workers)])
            pieces[name] = [_block_ranges(part) for part in parts]
        return pieces


def _block_ranges(ds: ray.data.Dataset) -> list[BlockRange]:
    ranges = []
    for bundle in ds.iter_internal_ref_bundles():
        for entry, cut in zip(bundle.blocks, bundle.slices):
            start, stop = (0, entry.metadata.num_rows) if cut is None else (cut.start_offset, cut.end_offset)
            ranges.append((entry.ref, start, stop))
    return ranges


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


# ---------------------------------------------------------------------------------------------
# Cross-validation folds (sweeps with tune.cv_folds)

_MIX = np.uint64(0x9E3779B97F4A7C15)


def row_keys(x: np.ndarray, y: np.ndarray, *, seed: int) -> np.ndarray:
    """A seeded 64-bit hash of each row's contents: the same row gets the same key on every run,
    on any node, in any block, which is what makes folds reproducible without a global row index."""
    # Every bit of the value: float64 rows (the raw table, before the split) hash both halves, so
    # values that only float64 tells apart (timestamps, ids) are not taken for duplicates.
    exact = np.ascontiguousarray(x if x.dtype == np.float64 else x.astype(np.float32))
    words = exact.reshape(len(exact), -1).view(np.uint32).astype(np.uint64)
    coef = np.random.default_rng(seed).integers(1, 2**63, size=words.shape[1] + 1, dtype=np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):  # arithmetic mod 2**64 is the point
        h = (words * coef[:-1]).sum(axis=1, dtype=np.uint64)
        h += np.ascontiguousarray(y).astype(np.float64).view(np.uint64) * coef[-1]
        # splitmix64's finalizer spreads the bits, so key order is a seeded random permutation.
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


def _add_key(batch: dict, *, seed: int) -> dict:
    return {**batch, "key": row_keys(batch["x"], batch["y"], seed=seed)}


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


def spec_to_dict(spec: DataSpec) -> dict:
    """The spec as plain data, for a Ray task's or Train worker's config."""
    return {**asdict(spec), "input_shape": list(spec.input_shape), "feature_names": list(spec.feature_names),
            "constant_features": list(spec.constant_features)}


def spec_from_dict(raw: dict) -> DataSpec:
    return DataSpec(**{**raw, "input_shape": tuple(raw["input_shape"]), "feature_names": tuple(raw["feature_names"]),
                       "constant_features": tuple(raw.get("constant_features", ()))})
