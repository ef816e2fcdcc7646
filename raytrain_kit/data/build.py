"""The entry point: a `DataConfig` to the checked, split, prepared `{"train", "val"}` datasets
and their `DataSpec`."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import numpy as np
import pandas as pd
import ray

from raytrain_kit.config import Experiment
from raytrain_kit.data.sources import Columns, check_local_file, read_table, select_columns, _schema
from raytrain_kit.data.spec import DataSpec
from raytrain_kit.data.split import preserved_order, split_by_key
from raytrain_kit.data.images import array_shape, drop_bad_rows, pack_arrays, read_images
from raytrain_kit.data.in_driver import DriverTable, read_in_driver
from raytrain_kit.data.encode import check_labels_known, encode_batch, feature_names, fit_preprocessing, num_features
from raytrain_kit.data.stats import _pack, _Stats, check_stats, collect_stats
from raytrain_kit.errors import DataError



def build_datasets(cfg: Experiment, *, fitted: Optional[dict] = None) -> tuple[dict[str, ray.data.Dataset], DataSpec]:
    """Train/val Ray Datasets with columns `x` (float32 features) and `y` (labels), checked before
    any worker starts. The same seed gives the same rows in each, in the same order, in any
    session (`split_by_key`). The preprocessing is fitted on the training split, or is `fitted`
    (a resumed run's, from its checkpoint: the transform it trained with). Raises DataError."""
    with preserved_order():
        return _build_datasets(cfg, fitted=fitted)


def _build_datasets(cfg: Experiment, *, fitted: Optional[dict]) -> tuple[dict[str, ray.data.Dataset], DataSpec]:
    d = cfg.data
    check_local_file(cfg)
    if d.source == "images":
        raw, where, shape, label_is_text = read_images(cfg)
        columns = Columns(numeric=(), categorical=(), label_is_text=label_is_text, array="image", array_shape=shape)
    else:
        # A table the driver holds is built here, without a Ray Data execution (`in_driver`).
        raw, where = read_in_driver(cfg) or read_table(cfg)
        columns = select_columns(cfg, _schema(raw, where), where)
        if columns.array:
            columns = replace(columns, array_shape=array_shape(raw, columns.array, where))
    packed, stats, notes = pack_table(cfg, raw, columns=columns, where=where)
    label = check_stats(cfg, stats, columns=columns, where=where)
    train, val, _ = split_by_key(packed, val_fraction=d.val_fraction, seed=cfg.train.seed)
    # Fitted on the training split only, so validation stays unseen.
    prep = fitted or fit_preprocessing(cfg, train, columns=columns, label=label, whole=stats, where=where)
    prep = {**prep, **notes} if fitted is None else prep
    check_labels_known(cfg, val, prep, split="validation", where=where)
    if fitted:  # the data may have changed since the checkpoint's run fitted its classes
        check_labels_known(cfg, train, prep, split="training", where=where)
    encode = dict(prep=prep, classification=d.task == "classification")
    train = train.map_batches(encode_batch, batch_format="numpy", fn_kwargs=encode)
    val = val.map_batches(encode_batch, batch_format="numpy", fn_kwargs=encode)
    if isinstance(train, DriverTable):
        train, val = train.to_dataset(), val.to_dataset()
    elif d.in_memory:
        train, val = train.materialize(), val.materialize()
    num_train, num_val = train.count(), val.count()
    if num_val == 0 or num_train == 0:
        raise DataError(f"data.val_fraction: {d.val_fraction} leaves an empty split of {stats.count} rows")
    return {"train": train, "val": val}, _spec(cfg, prep, label_classes=label.num_classes, where=where,
                                               num_train=num_train, num_val=num_val)


def pack_table(cfg: Experiment, raw: ray.data.Dataset, *, columns: Columns, where: str
               ) -> tuple[ray.data.Dataset, _Stats, dict]:
    """The table packed (`stats._pack`, `images.pack_arrays`; images come decoded), its statistics
    (of the rows kept), and what was left out: rows with a missing value (data.missing: drop),
    image files that cannot be decoded (data.on_bad_file: skip). Raises DataError for bad rows
    that are not skipped."""
    d = cfg.data
    if d.source == "images":
        packed = raw  # decoded as it was read
    elif columns.array:
        packed = raw.map_batches(pack_arrays, batch_format="pandas", fn_kwargs=dict(
            column=columns.array, shape=columns.array_shape, label=d.label, label_is_text=columns.label_is_text))
    else:
        packed = raw.map_batches(_pack, batch_format="pandas", fn_kwargs=dict(
            numeric=list(columns.numeric), categorical=list(columns.categorical), label=d.label,
            label_is_text=columns.label_is_text))
    packed = packed.materialize() if d.in_memory else packed  # read once: statistics, then the split
    notes = {"rows_dropped": 0}
    if columns.array:
        packed, num_skipped, first = drop_bad_rows(cfg, packed, column=None if d.source == "images" else columns.array,
                                                   shape=columns.array_shape, where=where)
        if num_skipped:
            packed = packed.materialize() if d.in_memory else packed
            notes.update(files_skipped=num_skipped, first_skipped=first)
    stats = collect_stats(packed)
    if d.missing == "drop" and stats.incomplete:
        notes["rows_dropped"] = stats.incomplete
        packed = packed.map_batches(_drop_incomplete, batch_format="numpy")
        packed = packed.materialize() if d.in_memory else packed
        stats = collect_stats(packed)
    if stats.count < 2:
        dropped = f" ({notes['rows_dropped']} dropped for a missing value)" if notes["rows_dropped"] else ""
        raise DataError(f"data.path: {where} has {stats.count} row(s){dropped}; need at least 2 to split")
    return packed, stats, notes


def _drop_incomplete(batch: dict) -> dict:
    keep = ~np.isnan(batch["x"]).any(axis=1)
    for name, values in batch.items():
        if name == "y" or (name != "x" and values.dtype.kind in "OUS"):
            keep &= ~pd.isna(values)
    return {name: values[keep] for name, values in batch.items()}


def _spec(cfg: Experiment, prep: dict, *, label_classes: int, where: str, num_train: int, num_val: int) -> DataSpec:
    names, width = feature_names(prep), num_features(prep)
    array = prep.get("array")
    default = tuple(array["shape"]) if array else (width,)
    input_shape = tuple(cfg.data.input_shape) if cfg.data.input_shape else tuple(cfg.input_shape or default)
    if int(np.prod(input_shape)) != width:
        raise DataError(f"data.input_shape: {list(input_shape)} holds {int(np.prod(input_shape))} values, "
                        f"but {where} has {width} features" + (f" ({array['name']} {list(array['shape'])})" if array else ""))
    # Labels that already are class indices 0..k-1 name their classes by those integers, so a
    # prediction compares equal to the label column it is scored against.
    classes = prep["classes"] or list(range(label_classes))
    return DataSpec(num_features=width, num_classes=len(classes) if cfg.data.task == "classification" else 0,
                    input_shape=input_shape, num_train_rows=num_train, num_val_rows=num_val,
                    feature_names=tuple(names), constant_features=tuple(prep["constant"]), classes=tuple(classes),
                    preprocessing=prep)
