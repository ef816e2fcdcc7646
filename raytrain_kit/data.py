"""Ray Datasets for an experiment: read, check the schema, split, standardize, describe.

Owns everything between a `DataConfig` and the `{"train", "val"}` datasets handed to
`TorchTrainer(datasets=...)`: the four sources, a single statistics pass that finds schema
problems (missing or non-numeric columns, NaN/inf, labels out of range) before any training
worker starts, a seeded train/validation split, and the `DataSpec` models are built from.
Rows leave here as two columns, `x` (float32 feature vector) and `y` (label).
Exercised by `raytrain-kit validate jobs/tabular_mlp.yaml` and `tests/test_data.py`.
"""

from __future__ import annotations

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
        num_classes = 2 if d.num_classes is None else d.num_classes
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


def select_columns(cfg: Experiment, schema, where: str) -> list[str]:
    """The feature columns, after checking that they and the label exist and are numeric."""
    d = cfg.data
    names = list(schema.names)
    if d.label not in names:
        raise DataError(f"data.label: column {d.label!r} not found in {where} (columns: {', '.join(names[:20])})")
    features = list(d.features) if d.features else [n for n in names if n != d.label]
    missing = [f for f in features if f not in names]
    if missing:
        raise DataError(f"data.features: column(s) {', '.join(map(repr, missing))} not found in {where}")
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
    """Per-block sufficient statistics: counts, sums, sums of squares, non-finite cells, label range."""
    x, y = batch["x"].astype(np.float64), batch["y"].astype(np.float64)
    finite_x = np.isfinite(x)
    xz = np.where(finite_x, x, 0.0)
    finite_y = y[np.isfinite(y)]
    return {
        "count": np.array([len(y)]),
        "sum": xz.sum(axis=0, keepdims=True),
        "sumsq": (xz * xz).sum(axis=0, keepdims=True),
        "bad_x": (~finite_x).sum(axis=0, keepdims=True),
        "bad_y": np.array([len(y) - len(finite_y)]),
        "y_min": np.array([finite_y.min() if len(finite_y) else np.inf]),
        "y_max": np.array([finite_y.max() if len(finite_y) else -np.inf]),
        "y_nonint": np.array([int((finite_y != np.round(finite_y)).sum())]),
    }


@dataclass
class _Stats:
    count: int
    mean: np.ndarray
    std: np.ndarray
    bad_x: np.ndarray
    bad_y: int
    y_min: float
    y_max: float
    y_nonint: int


def collect_stats(ds: ray.data.Dataset) -> _Stats:
    rows = [r for r in ds.map_batches(_block_stats, batch_size=None, batch_format="numpy").take_all()
            if r["count"]]
    count = int(sum(r["count"] for r in rows))
    if not count:
        empty = np.zeros(0)
        return _Stats(count=0, mean=empty, std=empty, bad_x=empty, bad_y=0, y_min=np.inf, y_max=-np.inf, y_nonint=0)
    total = sum(r["sum"] for r in rows)
    total_sq = sum(r["sumsq"] for r in rows)
    mean = total / max(count, 1)
    var = np.maximum(total_sq / max(count, 1) - mean * mean, 0.0)
    return _Stats(
        count=count, mean=mean, std=np.sqrt(var),
        bad_x=sum(r["bad_x"] for r in rows), bad_y=int(sum(r["bad_y"] for r in rows)),
        y_min=float(min(r["y_min"] for r in rows)), y_max=float(max(r["y_max"] for r in rows)),
        y_nonint=int(sum(r["y_nonint"] for r in rows)),
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
        elif num_classes < 2:
            problems.append(f"label column {d.label!r} in {where} has a single class; classification needs two or more")
    if problems:
        raise DataError(*problems)
    return num_classes


def _finish(batch: dict, *, mean: Optional[np.ndarray], std: Optional[np.ndarray], classification: bool) -> dict:
    x = batch["x"]
    if mean is not None:
        # Constant columns (digits' blank border pixels) keep scale 1 instead of dividing by zero.
        x = (x - mean) / np.where(std > 1e-12, std, 1.0)
    y = batch["y"].astype(np.int64) if classification else batch["y"].astype(np.float32)
    return {"x": x.astype(np.float32), "y": y}


# ---------------------------------------------------------------------------------------------
# The entry point


def build_datasets(cfg: Experiment) -> tuple[dict[str, ray.data.Dataset], DataSpec]:
    """Train/val Ray Datasets with columns `x`, `y`, checked before any worker starts."""
    d = cfg.data
    raw, where = read_table(cfg)
    features = select_columns(cfg, _schema(raw, where), where)
    classification = d.task == "classification"
    packed = raw.map_batches(_pack, batch_format="pandas", fn_kwargs=dict(features=features, label=d.label))
    # A fixed block layout before the seeded shuffle keeps the split identical run to run.
    packed = packed.materialize() if d.in_memory else packed
    stats = collect_stats(packed)
    if stats.count < 2:
        raise DataError(f"data.path: {where} has {stats.count} row(s); need at least 2 to split")
    num_classes = check_stats(cfg, stats, features=features, where=where)
    train, val = packed.train_test_split(test_size=d.val_fraction, shuffle=True, seed=cfg.train.seed)
    # Standardize with training statistics only, so validation stays unseen.
    scale = collect_stats(train) if d.standardize else None
    finish = dict(mean=scale.mean if scale else None, std=scale.std if scale else None,
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
    spec = DataSpec(num_features=len(features), num_classes=num_classes, input_shape=input_shape,
                    num_train_rows=num_train, num_val_rows=num_val, feature_names=tuple(features))
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
    context = ray.data.DataContext.get_current()
    ordered = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # the same rows reach the same worker every run
    try:
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
    finally:
        context.execution_options.preserve_order = ordered


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
    words = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
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
    context = ray.data.DataContext.get_current()
    ordered = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # same block order, same split across workers
    try:
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
    finally:
        context.execution_options.preserve_order = ordered


def spec_to_dict(spec: DataSpec) -> dict:
    """The spec as plain data, for a Ray task's or Train worker's config."""
    return {**asdict(spec), "input_shape": list(spec.input_shape), "feature_names": list(spec.feature_names)}


def spec_from_dict(raw: dict) -> DataSpec:
    return DataSpec(**{**raw, "input_shape": tuple(raw["input_shape"]), "feature_names": tuple(raw["feature_names"])})
