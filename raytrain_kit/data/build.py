"""The entry point: a `DataConfig` to the checked, split, prepared `{"train", "val"}` datasets
and their `DataSpec`."""

from __future__ import annotations

from typing import Optional

import numpy as np
import ray

from raytrain_kit.config import Experiment
from raytrain_kit.data.sources import check_local_file, read_table, select_columns, _schema
from raytrain_kit.data.spec import DataSpec
from raytrain_kit.data.split import preserved_order, split_by_key
from raytrain_kit.data.stats import CONSTANT_STD, _pack, check_stats, collect_stats
from raytrain_kit.errors import DataError



def _finish(batch: dict, *, pivot: Optional[np.ndarray], offset: Optional[np.ndarray], std: Optional[np.ndarray],
            classification: bool) -> dict:
    x = batch["x"]
    if pivot is not None:
        # Constant columns (digits' blank border pixels) keep scale 1 instead of dividing by zero.
        x = ((x - pivot) - offset) / np.where(std > CONSTANT_STD, std, 1.0)
    y = batch["y"].astype(np.int64) if classification else batch["y"].astype(np.float32)
    return {"x": x.astype(np.float32), "y": y}


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
