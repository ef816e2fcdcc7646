"""Ray Data ingestion: sources, seeded splits, schema checks, standardization."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raytrain_kit.config import build_experiment
from raytrain_kit.data import build_datasets
from raytrain_kit.errors import DataError


def _arrays(ds):
    batches = list(ds.iter_batches(batch_format="numpy", batch_size=None))
    return np.concatenate([b["x"] for b in batches]), np.concatenate([b["y"] for b in batches])


def test_digits_split_is_seeded_disjoint_and_complete(ray_session):
    cfg = build_experiment({"data": {"source": "digits", "val_fraction": 0.25, "standardize": False}})
    datasets, spec = build_datasets(cfg)
    assert (spec.num_features, spec.num_classes, spec.input_shape) == (64, 10, (1, 8, 8))
    assert spec.num_train_rows + spec.num_val_rows == 1797 and spec.num_val_rows == 450
    x_train, y_train = _arrays(datasets["train"])
    x_val, _ = _arrays(datasets["val"])
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0  # pixels scaled to [0, 1]
    train_rows = {r.tobytes() for r in x_train}
    assert not any(r.tobytes() in train_rows for r in x_val if (r > 0).sum() > 20)
    again, _ = build_datasets(cfg)
    assert np.array_equal(_arrays(again["train"])[1], y_train)
    other, _ = build_datasets(cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 1})}))
    assert not np.array_equal(_arrays(other["train"])[1], y_train)


def test_csv_columns_standardized_with_train_statistics(ray_session, tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(5, 3, 400), "b": rng.normal(-2, 0.1, 400), "note": ["x"] * 400,
                          "target": rng.integers(0, 3, 400)})
    path = tmp_path / "table.csv"
    frame.to_csv(path, index=False)
    cfg = build_experiment({"data": {"source": "csv", "path": str(path), "label": "target",
                                     "features": ["b", "a"]}})
    datasets, spec = build_datasets(cfg)
    assert spec.feature_names == ("b", "a") and spec.num_classes == 3
    x, y = _arrays(datasets["train"])
    assert np.allclose(x.mean(axis=0), 0, atol=1e-4) and np.allclose(x.std(axis=0), 1, atol=1e-3)
    assert set(np.unique(y)) == {0, 1, 2}


def test_parquet_written_by_ray_data_reads_back(ray_session, tmp_path):
    import ray

    synthetic = build_experiment({"data": {"source": "synthetic", "num_rows": 3000, "num_features": 6,
                                           "num_classes": 4}})
    from raytrain_kit.data import read_table

    table, _ = read_table(synthetic)
    table.write_parquet(str(tmp_path / "synth"))
    cfg = build_experiment({"data": {"source": "parquet", "path": str(tmp_path / "synth")}})
    datasets, spec = build_datasets(cfg)
    assert spec.num_features == 6 and spec.num_classes == 4
    assert spec.num_train_rows + spec.num_val_rows == 3000
    assert ray.data.read_parquet(str(tmp_path / "synth")).count() == 3000


def test_synthetic_regression_is_seeded(ray_session):
    cfg = build_experiment({"data": {"source": "synthetic", "num_rows": 2000, "num_features": 5,
                                     "num_classes": 0, "task": "regression", "noise": 0.0}})
    datasets, spec = build_datasets(cfg)
    assert spec.num_classes == 0 and spec.num_outputs == 1
    x, y = _arrays(datasets["train"])
    assert y.dtype == np.float32
    # Noise-free targets are an exact linear function of the (standardized) features.
    design = np.c_[x, np.ones(len(x))]
    residual = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
    assert np.abs(residual).max() < 1e-3
    assert np.array_equal(_arrays(build_datasets(cfg)[0]["train"])[1], y)


def test_bad_label_range_names_column_and_file(ray_session, tmp_path):
    path = tmp_path / "labels.csv"
    pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "label": [0, 1, 2, 7]}).to_csv(path, index=False)
    cfg = build_experiment({"data": {"source": "csv", "path": str(path), "num_classes": 3}})
    with pytest.raises(DataError, match=rf"label column 'label' in {path} has value 7 outside \[0, 3\)"):
        build_datasets(cfg)


def test_digits_read_from_scikit_learns_file_equal_load_digits():
    from sklearn.datasets import load_digits

    from raytrain_kit.data import digits_arrays

    pixels, labels = digits_arrays()
    bunch = load_digits()
    assert pixels.shape == (1797, 64) and np.array_equal(pixels, bunch.data)
    assert labels.dtype == np.int64 and np.array_equal(labels, bunch.target)
