"""Fitted preprocessing: what is learned from the training split and applied to every row after.

`fit_preprocessing` learns, from the training split only, the numeric columns' means and
standard deviations (standardization, mean imputation), each categorical column's most frequent
values (one-hot encoding, most-frequent imputation) and the label's classes (a label encoder).
The result is plain JSON-able data, a `preprocessing` dict, kept in the run's `DataSpec`, in
every checkpoint (`data.json`) and beside `raytrain-kit export`'s model, so resume, export and
prediction apply exactly the training-time transform (`encode_batch`, a pure function).

Why not `ray.data.preprocessors` for the fitting: its `OneHotEncoder(max_categories=...)` keeps
a set of the top values without their counts (no count of what fell to `other`, ties broken by
block order), refuses nulls at fit time, and every preprocessor is its own pass over the data.
One `count_values` pass here counts every categorical column and the label at once, and the
numeric moments come from the stable statistics pass the split already needs (`stats.py`).
Exercised by `raytrain-kit train jobs/penguins.yaml` and `tests/test_encode.py`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import ray

from raytrain_kit.config import Experiment
from raytrain_kit.data.stats import CONSTANT_STD, LabelPlan, _Stats, collect_stats
from raytrain_kit.errors import DataError

OTHER = "<other>"  # the indicator of values beyond data.max_categories or unseen in training


# ---------------------------------------------------------------------------------------------
# Counting (one Ray Data pass; only value counts come to the driver)


def _block_counts(batch: dict, *, columns: list[str]) -> pd.DataFrame:
    frames = [pd.DataFrame({"column": [], "count": [], "text": [], "number": []}).astype(
        {"column": str, "count": np.int64, "text": str, "number": np.float64})]
    for name in columns:
        values = batch[name]
        counts = pd.Series(values, dtype=object).value_counts(dropna=True)
        numeric = values.dtype.kind not in "OUS"
        # Text and numbers in columns of their own, every block alike, so Ray unifies one schema.
        frames.append(pd.DataFrame({
            "column": name, "count": counts.to_numpy(dtype=np.int64),
            "text": ["" if numeric else str(v) for v in counts.index],
            "number": [float(v) if numeric else np.nan for v in counts.index],
        }))
    return pd.concat(frames, ignore_index=True)


def count_values(ds: ray.data.Dataset, columns: list[str]) -> dict[str, list[tuple]]:
    """For each of a packed table's `columns`: its non-missing values and how often each occurs,
    most frequent first, ties by value (so the order depends on the data only, not on blocks).
    Returns {column: [(value, count), ...]}; values are text, or floats for a numeric label."""
    if not columns:
        return {}
    parts = ds.map_batches(_block_counts, batch_format="numpy", batch_size=None,
                           fn_kwargs={"columns": columns}).to_pandas()
    result = {name: [] for name in columns}
    if len(parts):
        parts["value"] = parts["text"].astype(object).where(parts["number"].isna(), parts["number"])
        for name, group in parts.groupby("column", sort=False):
            totals = group.groupby("value", sort=True)["count"].sum()
            ranked = sorted(totals.items(), key=lambda item: (-item[1], item[0]))
            result[name] = [(v, int(n)) for v, n in ranked]
    return result


# ---------------------------------------------------------------------------------------------
# Fitting (the driver, once per run; a sweep's driver once for every trial)


def fit_preprocessing(cfg: Experiment, train: ray.data.Dataset, *, columns, label: LabelPlan, whole: _Stats,
                      where: str) -> dict:
    """The transform learned from the training split (a packed table: `stats._pack`'s columns).
    `whole`: the statistics of the whole table, for the counts of what is imputed.
    Returns the `preprocessing` dict `encode_batch` applies. Raises DataError for a categorical
    column with more values than data.max_categories when data.other_category is off, or for
    encoded labels with a single class."""
    d = cfg.data
    if columns.array:
        return _fit_array(cfg, train, columns=columns, label=label, where=where)
    impute = d.missing == "impute"
    scale = collect_stats(train) if (d.standardize or impute) and columns.numeric else None
    names = [f"c{i}" for i in range(len(columns.categorical))] + (["y"] if label.encoded else [])
    counts = count_values(train, names)
    categorical = [_fit_category(cfg, name, counts[f"c{i}"], where=where) for i, name in enumerate(columns.categorical)]
    mean = scale.mean if scale is not None else None
    prep = {
        "numeric": list(columns.numeric),
        "pivot": scale.pivot.tolist() if scale is not None and d.standardize else None,
        "offset": scale.offset.tolist() if scale is not None and d.standardize else None,
        "scale": np.where(scale.std > CONSTANT_STD, scale.std, 1.0).tolist() if scale is not None and d.standardize else None,
        "constant": [n for n, s in zip(columns.numeric, scale.std) if s <= CONSTANT_STD] if scale is not None and d.standardize else [],
        "impute_numeric": np.nan_to_num(mean).tolist() if impute and mean is not None else None,
        "categorical": categorical,
        "classes": _fit_classes(cfg, counts["y"], label=label, where=where) if label.encoded else None,
        "imputed": _imputed_cells(columns, whole) if impute else {},
    }
    return prep


def channel_axis(shape: tuple[int, ...]) -> int:
    """The axis an array is normalized along: channels of [C, H, W], features of a sequence [T, F],
    each element of a vector."""
    return 0 if len(shape) == 3 else len(shape) - 1


def _fit_array(cfg: Experiment, train: ray.data.Dataset, *, columns, label: LabelPlan, where: str) -> dict:
    """One array feature: mean and standard deviation per channel (`channel_axis`) over the
    training split, each element's moments merged with Chan et al.'s update (`merge_moments`)."""
    shape = tuple(columns.array_shape)
    prep = {"numeric": [], "pivot": None, "offset": None, "scale": None, "constant": [], "impute_numeric": None,
            "categorical": [], "imputed": {},
            "array": {"name": columns.array, "shape": list(shape), "axis": channel_axis(shape)},
            "classes": _fit_classes(cfg, count_values(train, ["y"])["y"], label=label, where=where) if label.encoded else None}
    if not cfg.data.standardize:
        return prep
    stats = collect_stats(train)
    axis = channel_axis(shape)
    # Each element's (pivot, offset, M2) -> the channel's, vectorized: the pairwise update of
    # Chan, Golub and LeVeque (1979) summed over equal counts (every row holds every element).
    by_channel = lambda a: np.moveaxis(np.asarray(a, dtype=np.float64).reshape(shape), axis, 0).reshape(shape[axis], -1)
    pivot, offset, m2 = by_channel(stats.pivot), by_channel(stats.offset), by_channel(stats.std ** 2 * stats.count)
    deviation = (pivot - pivot[:, :1]) + offset  # each element's mean from its channel's first pivot, exactly
    channel_offset = deviation.mean(axis=1)
    channel_m2 = m2.sum(axis=1) + stats.count * ((deviation - channel_offset[:, None]) ** 2).sum(axis=1)
    channel_std = np.sqrt(channel_m2 / (stats.count * pivot.shape[1]))
    prep["pivot"], prep["offset"] = pivot[:, 0].tolist(), channel_offset.tolist()
    prep["scale"] = np.where(channel_std > CONSTANT_STD, channel_std, 1.0).tolist()
    return prep


def _fit_category(cfg: Experiment, name: str, counts: list[tuple], *, where: str) -> dict:
    d = cfg.data
    if len(counts) > d.max_categories and not d.other_category:
        raise DataError(f"data.max_categories: column {name!r} in {where} has {len(counts)} distinct values in the "
                        f"training split, more than data.max_categories ({d.max_categories}); raise it, or set "
                        "data.other_category: true to put the rarest in one '<other>' indicator")
    kept = counts[: d.max_categories]
    return {
        "name": name,
        "values": sorted(v for v, _ in kept),  # indicator order: by value, so names read in order
        "other": d.other_category,
        "num_other": int(sum(n for _, n in counts[d.max_categories:])),  # training rows that fall to <other>
        "impute": (counts[0][0] if counts else None) if d.missing == "impute" else None,
    }


def _fit_classes(cfg: Experiment, counts: list[tuple], *, label: LabelPlan, where: str) -> list:
    d = cfg.data
    classes = sorted(v for v, _ in counts)
    if all(isinstance(v, float) for v in classes):
        classes = [int(v) for v in classes]  # labels checked integer: {1, 2} reads as 1, 2
    if len(classes) < 2:
        only = f" (every label is {classes[0]!r})" if classes else ""
        raise DataError(f"label column {d.label!r} in {where} has a single class in the training split{only}; "
                        "classification needs two or more")
    if label.num_classes and label.num_classes != len(classes):
        raise DataError(f"data.num_classes: {label.num_classes}, but label column {d.label!r} in {where} holds "
                        f"{len(classes)} classes in the training split; leave data.num_classes unset")
    return classes


def check_labels_known(cfg: Experiment, ds: ray.data.Dataset, prep: dict, *, split: str, where: str) -> None:
    """Encoded labels: every label in `ds` (a packed split) must be one of the fitted classes:
    those the training split taught, or a resumed run's checkpoint. Raises DataError."""
    classes = prep.get("classes")
    if not classes:
        return
    known = {str(c) for c in classes}
    unseen = [(v, n) for v, n in count_values(ds, ["y"])["y"] if _label_text(v) not in known]
    if unseen:
        shown = ", ".join(f"{_label_text(v)!r} ({n} row(s))" for v, n in unseen[:5])
        taught = "the training split" if split == "validation" else "the run's checkpoint"
        raise DataError(f"label column {cfg.data.label!r} in {where}: label(s) {shown} occur in the {split} split "
                        f"but are not among the classes of {taught} ({len(classes)}); the model cannot learn them: "
                        "drop those rows, or change data.val_fraction or train.seed")


def _label_text(value) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _imputed_cells(columns, whole: _Stats) -> dict[str, int]:
    cells = dict(zip(columns.numeric, (int(n) for n in whole.missing_x)))
    cells.update(zip(columns.categorical, (int(n) for n in whole.missing_c)))
    return {name: n for name, n in cells.items() if n}


# ---------------------------------------------------------------------------------------------
# Applying (a pure function of a packed batch; run by Ray Data, and by anything that predicts)


def encode_batch(batch: dict, *, prep: dict, classification: bool) -> dict:
    """A packed batch (`x` float64 (N, num_numeric), `y`, categorical `c0`, `c1`, ...) as the model
    reads it: `x` float32 (N, num_features), numeric columns imputed and standardized, then each
    categorical column's indicators; `y` int64 class indices (classification) or float32."""
    return {"x": encode_features(batch, prep=prep), "y": encode_labels(batch["y"], prep=prep, classification=classification)}


def encode_features(batch: dict, *, prep: dict) -> np.ndarray:
    """`encode_batch`'s features alone (rows to predict need no label): float32 (N, num_features)."""
    x = np.asarray(batch["x"], dtype=np.float64)
    if prep.get("array"):
        return _normalize_array(x, prep)
    if prep["impute_numeric"] is not None:
        x = np.where(np.isnan(x), np.asarray(prep["impute_numeric"]), x)
    if prep["pivot"] is not None:
        # Constant columns (digits' blank border pixels) keep scale 1 instead of dividing by zero.
        x = ((x - np.asarray(prep["pivot"])) - np.asarray(prep["offset"])) / np.asarray(prep["scale"])
    parts = [x.astype(np.float32)]
    parts += [_one_hot(batch[f"c{i}"], category) for i, category in enumerate(prep["categorical"])]
    return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


def _normalize_array(x: np.ndarray, prep: dict) -> np.ndarray:
    if prep["pivot"] is None:
        return x.astype(np.float32)
    shape, axis = prep["array"]["shape"], prep["array"]["axis"]
    along = [1] * len(shape)
    along[axis] = shape[axis]  # channel statistics broadcast over the other axes
    view = lambda values: np.asarray(values, dtype=np.float64).reshape(along)
    arrays = x.reshape(len(x), *shape)
    arrays = ((arrays - view(prep["pivot"])) - view(prep["offset"])) / view(prep["scale"])
    return arrays.reshape(len(x), -1).astype(np.float32)


def _one_hot(values: np.ndarray, category: dict) -> np.ndarray:
    values = np.asarray(values, dtype=object)
    if category["impute"] is not None:
        values = np.where(pd.isna(values), category["impute"], values)
    index = {v: j for j, v in enumerate(category["values"])}
    codes = np.fromiter((index.get(v, -1) for v in values), dtype=np.int64, count=len(values))
    width = len(index) + (1 if category["other"] else 0)
    out = np.zeros((len(values), width), dtype=np.float32)
    known = codes >= 0
    out[np.flatnonzero(known), codes[known]] = 1.0
    if category["other"]:
        out[~known, -1] = 1.0
    return out


def encode_labels(y: np.ndarray, *, prep: dict, classification: bool) -> np.ndarray:
    """Labels as the loss reads them: class indices for classification (through the fitted
    classes when labels were encoded; -1 for a label outside them), else float32 values."""
    if not classification:
        return np.asarray(y, dtype=np.float32)
    classes = prep.get("classes")
    if not classes:
        return np.asarray(y).astype(np.int64)
    index = {str(c): j for j, c in enumerate(classes)}
    return np.fromiter((index.get(_label_text(v), -1) for v in np.asarray(y, dtype=object)),
                       dtype=np.int64, count=len(y))


def num_features(prep: dict) -> int:
    """The width of the model's input row."""
    if prep.get("array"):
        return int(np.prod(prep["array"]["shape"]))
    return len(feature_names(prep))


def feature_names(prep: dict) -> list[str]:
    """The model's input features in order: numeric columns, then `column=value` indicators; for
    an array feature, its name and shape (one entry)."""
    if prep.get("array"):
        return [f"{prep['array']['name']}{prep['array']['shape']}"]
    names = list(prep["numeric"])
    for category in prep["categorical"]:
        names += [f"{category['name']}={v}" for v in category["values"]]
        names += [f"{category['name']}={OTHER}"] if category["other"] else []
    return names


def describe_preprocessing(prep: dict) -> Optional[str]:
    """The line a run prints about what the data needed: rows dropped, cells imputed, categorical
    columns encoded, labels numbered; None when the table was used as it is."""
    parts = []
    if prep.get("files_skipped"):
        parts.append(f"skipped {prep['files_skipped']} image file(s) that cannot be decoded (the first: "
                     f"{prep['first_skipped']})")
    if prep.get("array") and prep["pivot"] is not None:
        shown = ", ".join(f"{p + o:.3g}" for p, o in zip(prep["pivot"], prep["offset"]))
        parts.append(f"{prep['array']['name']} {prep['array']['shape']} normalized per channel (training mean {shown})")
    if prep.get("rows_dropped"):
        parts.append(f"{prep['rows_dropped']} row(s) with a missing value dropped")
    if prep.get("imputed"):
        parts.append(f"imputed {sum(prep['imputed'].values())} cell(s) from the training split ("
                     + ", ".join(f"{name} {n}" for name, n in prep["imputed"].items()) + ")")
    for category in prep["categorical"]:
        other = f" + <other> ({category['num_other']} training rows)" if category["other"] else ""
        parts.append(f"{category['name']} one-hot: {len(category['values'])} value(s){other}")
    if prep.get("classes"):
        shown = ", ".join(map(str, prep["classes"][:10])) + (", ..." if len(prep["classes"]) > 10 else "")
        parts.append(f"{len(prep['classes'])} classes: {shown}")
    return "data: " + "; ".join(parts) if parts else None
