"""Ray Data ingestion: sources, seeded splits, schema checks, standardization."""

from __future__ import annotations

import math
import re
import time
from fractions import Fraction

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


def _table(tmp_path, rng):
    """A small classification table with two exact duplicate rows (they must share a side)."""
    frame = pd.DataFrame({"a": rng.normal(size=300), "b": rng.normal(3, 2, size=300), "label": rng.integers(0, 3, 300)})
    frame = pd.concat([frame, frame.iloc[:2]], ignore_index=True)
    frame.to_csv(tmp_path / "table.csv", index=False)
    (tmp_path / "parts").mkdir()
    shuffled = frame.sample(frac=1.0, random_state=1)  # another row order, in three files
    for i in range(3):
        shuffled.iloc[i::3].to_parquet(tmp_path / "parts" / f"part{i}.parquet", index=False)
    return frame


def test_same_seed_same_split_in_one_session_whatever_the_block_layout(ray_session, tmp_path):
    """The split is a seeded hash of each row's contents: builds in one session, streamed or in
    memory, from one CSV or three Parquet files in another row order, give the same rows."""
    _table(tmp_path, np.random.default_rng(0))
    base = {"source": "csv", "path": str(tmp_path / "table.csv"), "label": "label", "val_fraction": 0.2}
    builds = [build_datasets(build_experiment({"data": base}))[0] for _ in range(3)]
    for name in ("train", "val"):
        first = _arrays(builds[0][name])
        for other in builds[1:]:  # the same rows in the same order: standardized alike, shuffled alike
            assert all(np.array_equal(a, b) for a, b in zip(first, _arrays(other[name])))

    def rows(data: dict) -> dict[str, list[bytes]]:
        datasets, spec = build_datasets(build_experiment({"data": {**data, "standardize": False}}))
        assert (spec.num_train_rows, spec.num_val_rows) == (241, 61)  # 302 rows: 302 - int(302 * 0.8) to val
        return {name: sorted(np.append(x, np.float32(y)).tobytes() for x, y in zip(*_arrays(ds)))
                for name, ds in datasets.items()}

    in_memory = rows(base)
    assert rows({**base, "in_memory": False}) == in_memory
    assert rows({**base, "source": "parquet", "path": str(tmp_path / "parts")}) == in_memory
    assert not set(in_memory["train"]) & set(in_memory["val"])  # the duplicated rows share a side
    other_seed = build_datasets(build_experiment({"data": base, "train": {"seed": 1}}))[0]
    assert not np.array_equal(_arrays(other_seed["val"])[0], _arrays(builds[0]["val"])[0])


def test_standardizing_keeps_the_variance_of_a_column_with_a_large_offset(ray_session, tmp_path):
    rng = np.random.default_rng(0)
    pd.DataFrame({"ts": 1e9 + 10 * rng.normal(size=200), "ms": 1.7e12 + rng.normal(size=200),
                  "a": rng.normal(size=200), "label": rng.integers(0, 2, 200)}).to_csv(tmp_path / "t.csv", index=False)
    datasets, _ = build_datasets(build_experiment({"data": {"source": "csv", "path": str(tmp_path / "t.csv"),
                                                            "label": "label"}}))
    x, _ = _arrays(datasets["train"])
    assert np.allclose(x.astype(np.float64).std(axis=0), 1.0, atol=1e-6)  # E[x^2] - mean^2 gave 0.668 for ts
    assert np.allclose(x.astype(np.float64).mean(axis=0), 0.0, atol=1e-6)


def test_a_constant_column_is_reported_and_centred_not_divided_by_zero(ray_session, tmp_path):
    from raytrain_kit.data import describe_constant_features

    rng = np.random.default_rng(0)
    pd.DataFrame({"a": rng.normal(size=100), "flat": np.full(100, 1e9), "label": rng.integers(0, 2, 100)}).to_csv(
        tmp_path / "t.csv", index=False)
    datasets, spec = build_datasets(build_experiment({"data": {"source": "csv", "path": str(tmp_path / "t.csv"),
                                                               "label": "label"}}))
    assert spec.constant_features == ("flat",)
    x, _ = _arrays(datasets["train"])
    assert np.all(x[:, 1] == 0.0) and np.isclose(x[:, 0].std(), 1.0, atol=1e-6)
    assert describe_constant_features(spec) == ("data: 1 column(s) constant in the training split, centred but not "
                                                "scaled: flat (they carry no information; drop them from data.features)")


def test_merged_block_moments_equal_numpy_over_the_whole_column():
    from raytrain_kit.data import merge_moments

    rng = np.random.default_rng(1)
    column = np.concatenate([1e9 + 10 * rng.normal(size=n) for n in (1, 7, 50, 3)])[:, None]
    blocks = np.split(column, [1, 8, 58])
    parts = [(np.array([len(b)], dtype=float), b[0], (b - b[0]).mean(axis=0), ((b - b.mean(axis=0)) ** 2).sum(axis=0))
             for b in blocks]
    parts.insert(2, (np.zeros(1), np.zeros(1), np.zeros(1), np.zeros(1)))  # an empty block changes nothing
    n, pivot, offset, m2 = merge_moments(parts)
    mean = pivot + offset
    exact = [Fraction(float(v)) for v in column[:, 0]]
    exact_mean = sum(exact) / len(exact)
    exact_std = math.sqrt(sum((v - exact_mean) ** 2 for v in exact) / len(exact))
    assert n[0] == 61 and mean[0] == pytest.approx(float(exact_mean), rel=1e-15)
    assert np.sqrt(m2[0] / n[0]) == pytest.approx(exact_std, rel=1e-9)


@pytest.mark.parametrize("labels,expected", [
    ([1] * 40, "has a single class (every label is 1); classification needs two or more"),
    ([0] * 40, "has a single class (every label is 0)"),
])
def test_a_label_column_with_a_single_class_is_refused(ray_session, tmp_path, labels, expected):
    rng = np.random.default_rng(0)
    pd.DataFrame({"a": rng.normal(size=len(labels)), "y": labels}).to_csv(tmp_path / "t.csv", index=False)
    for declared in ({}, {"num_classes": 4}):  # declared or not
        with pytest.raises(DataError, match=re.escape(f"label column 'y' in {tmp_path / 't.csv'} {expected}")):
            build_datasets(build_experiment({"data": {"source": "csv", "path": str(tmp_path / "t.csv"), "label": "y",
                                                      **declared}}))


@pytest.mark.parametrize("labels,classes", [
    ([1, 2] * 20, (1, 2)),  # numbered from 1
    ([-1, 1] * 20, (-1, 1)),  # a margin classifier's labels
    ([0, 3] * 20, (0, 3)),  # sparse codes
    (["setosa", "virginica", "versicolor", "setosa"] * 10, ("setosa", "versicolor", "virginica")),
])
def test_labels_that_are_not_class_indices_become_classes_in_sorted_order(ray_session, tmp_path, labels, classes):
    a = np.random.default_rng(0).normal(size=len(labels))
    pd.DataFrame({"a": a, "y": labels}).to_csv(tmp_path / "t.csv", index=False)
    datasets, spec = build_datasets(build_experiment({"data": {"source": "csv", "path": str(tmp_path / "t.csv"),
                                                               "label": "y", "val_fraction": 0.25}}))
    assert spec.num_classes == len(classes) and spec.classes == classes
    # Each row's class index is its label's place in the sorted classes, in both splits: the row
    # is found by its feature, un-standardized.
    prep = spec.preprocessing
    for name in ("train", "val"):
        x, y = _arrays(datasets[name])
        recovered = x[:, 0].astype(np.float64) * prep["scale"][0] + prep["pivot"][0] + prep["offset"][0]
        rows = np.abs(recovered[:, None] - a[None, :]).argmin(axis=1)
        assert [classes[i] for i in y] == [labels[r] for r in rows]
    # Declared, integer labels are class indices as they are (an absent class is the user's choice).
    if isinstance(labels[0], int) and min(labels) >= 0:
        declared = {"source": "csv", "path": str(tmp_path / "t.csv"), "label": "y", "num_classes": 4}
        spec = build_datasets(build_experiment({"data": declared}))[1]
        assert spec.num_classes == 4 and spec.classes == (0, 1, 2, 3)  # integers, as the labels are


def test_synthetic_regression_without_num_classes_has_a_continuous_target(ray_session):
    datasets, spec = build_datasets(build_experiment({"data": {"source": "synthetic", "task": "regression",
                                                               "num_rows": 400}}))
    _, y = _arrays(datasets["train"])
    assert spec.num_classes == 0 and y.dtype == np.float32
    assert len(np.unique(y)) == len(y)  # a continuous target, not class indices {0.0, 1.0}


def test_a_missing_label_suggests_the_nearest_column_and_never_hides_the_label(ray_session, tmp_path):
    columns = {f"f{i}": np.arange(5.0) for i in range(20)}
    pd.DataFrame({**columns, "label": [0, 1, 0, 1, 0]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError) as e:
        build_datasets(build_experiment({"data": {"source": "csv", "path": str(tmp_path / "t.csv"), "label": "malignant"}}))
    message = str(e.value)
    assert message.startswith(f"data.label: column 'malignant' not found in {tmp_path / 't.csv'} (columns: label, f0,")
    assert message.endswith("f18, and 1 more)")  # 21 columns: the label first, then 19 of the 20 features
    with pytest.raises(DataError, match=r"data.label: column 'lable' not found in .*; did you mean 'label'\?"):
        build_datasets(build_experiment({"data": {"source": "csv", "path": str(tmp_path / "t.csv"), "label": "lable"}}))


@pytest.mark.parametrize("data,seed", [({"standardize": True, "val_fraction": 0.3}, 5),
                                       ({"standardize": False, "val_fraction": 0.2}, 0)])
def test_the_driver_build_gives_the_rows_and_statistics_of_ray_data(ray_session, data, seed):
    """A table the driver holds (digits, data.in_memory) is packed, split and encoded in the
    driver (`data/in_driver.py`): the same rows in the same order, the same fitted statistics to
    the bit, as the Ray Data build (data.in_memory: false) of the same config."""
    from raytrain_kit.data import read_block_ranges, split_for_workers
    from raytrain_kit.data.in_driver import DriverTable, read_in_driver

    raw = {"data": {"source": "digits", **data}, "train": {"seed": seed}}
    in_driver = build_experiment(raw)
    by_ray_data = build_experiment({**raw, "data": {**raw["data"], "in_memory": False}})
    assert isinstance(read_in_driver(in_driver)[0], DriverTable) and read_in_driver(by_ray_data) is None
    (driver_sets, driver_spec), (ray_sets, ray_spec) = build_datasets(in_driver), build_datasets(by_ray_data)
    assert driver_spec == ray_spec  # counts, classes, and the preprocessing's pivot, offset and scale
    assert (driver_spec.preprocessing["scale"] is not None) == data["standardize"]
    pieces = split_for_workers(driver_sets, num_workers=1)  # as a worker reads them
    for name in ("train", "val"):
        x, y = _arrays(ray_sets[name])
        read = read_block_ranges(pieces[name][0])
        assert read["x"].dtype == x.dtype == np.float32 and len(y) == getattr(ray_spec, f"num_{name}_rows")
        np.testing.assert_array_equal(read["x"], x)
        np.testing.assert_array_equal(read["y"], y)


def test_the_first_rows_and_the_blocks_of_a_materialized_dataset_come_without_an_execution(ray_session):
    """`head_rows` gives what `take_batch` gives, across block edges, and `source_bundles` lists
    a materialized dataset's blocks from its plan (an execution would start Ray Data's stats and
    autoscaling actors); a lazy dataset has no such list and is taken by Ray Data."""
    import ray

    from raytrain_kit.data.shards import head_rows, source_bundles

    x = np.arange(50 * 3, dtype=np.float32).reshape(50, 3)
    blocks = [pd.DataFrame({"x": list(x[i:i + 20]), "y": np.arange(i, min(i + 20, 50))}) for i in range(0, 50, 20)]
    lazy = ray.data.from_pandas(blocks).map_batches(
        lambda b: {"x": np.stack(b["x"]).astype(np.float32), "y": b["y"]}, batch_format="pandas")
    materialized = lazy.materialize()
    assert source_bundles(lazy) is None
    listed = source_bundles(materialized)
    assert sum(len(b.blocks) for b in listed) == 3  # the first rows cross block edges
    assert [e.ref for b in listed for e in b.blocks] == \
        [e.ref for b in materialized.iter_internal_ref_bundles() for e in b.blocks]
    for num_rows in (7, 20, 33, 50, 80):
        rows, taken = head_rows(materialized, num_rows), materialized.take_batch(num_rows, batch_format="numpy")
        np.testing.assert_array_equal(rows["x"], taken["x"])
        np.testing.assert_array_equal(rows["y"], taken["y"])
        assert len(rows["y"]) == min(num_rows, 50)
    np.testing.assert_array_equal(head_rows(lazy, 33)["x"], x[:33])


@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_the_workers_pieces_are_ray_datas_own_split_cut_without_a_task(ray_session, num_workers):
    """`split_for_workers` gives each worker the rows Ray Data's `split(n, equal=True)` gives it
    (training) and `split_at_indices` at even fractions (validation), across uneven blocks, for a
    materialized and a lazy dataset alike; the materialized one is cut without running a task
    (Ray's task table is unchanged)."""
    import ray

    from raytrain_kit.data import read_block_ranges, split_for_workers

    rows = 61
    x = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
    edges = [0, 7, 8, 30, 44, 61]  # blocks of 7, 1, 22, 14 and 17 rows
    blocks = [pd.DataFrame({"x": list(x[a:b]), "y": np.arange(a, b)}) for a, b in zip(edges, edges[1:])]
    lazy = ray.data.from_pandas(blocks).map_batches(
        lambda b: {"x": np.stack(b["x"]).astype(np.float32), "y": b["y"]}, batch_format="pandas")
    materialized = lazy.materialize()

    def expected(name):
        if name == "train":
            return materialized.split(num_workers, equal=True)
        if num_workers == 1:
            return [materialized]
        return materialized.split_at_indices([rows * i // num_workers for i in range(1, num_workers)])

    def num_tasks():
        time.sleep(2.5)  # task events reach the State API within a second (their report interval)
        return len(ray.util.state.list_tasks(limit=10_000))

    for ds in (materialized, lazy):
        tasks_before = num_tasks() if ds is materialized else None
        pieces = split_for_workers({"train": ds, "val": ds}, num_workers=num_workers)
        if ds is materialized:
            assert num_tasks() == tasks_before
        for name in ("train", "val"):
            assert len(pieces[name]) == num_workers
            for piece, part in zip(pieces[name], expected(name)):
                got, want = read_block_ranges(piece), _arrays(part)
                np.testing.assert_array_equal(got["y"], want[1])
                np.testing.assert_array_equal(got["x"], want[0])
        train_rows = [len(read_block_ranges(p)["y"]) for p in pieces["train"]]
        assert train_rows == [rows // num_workers] * num_workers
        assert sum(len(read_block_ranges(p)["y"]) for p in pieces["val"]) == rows
