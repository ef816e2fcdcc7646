"""Bring your own table: class names, categorical columns and missing values, fitted on the
training split only and carried by the run (#17). The pure transform is checked by hand; the
fitting on real Ray Datasets; the penguins recipe end to end through `raytrain-kit train`."""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from raytrain_kit.cli import main
from raytrain_kit.config import build_experiment, load_experiment
from raytrain_kit.data import build_datasets, encode_batch, spec_from_dict
from raytrain_kit.data.encode import feature_names
from raytrain_kit.data.stats import _pack
from raytrain_kit.models import build_model

REPO = Path(__file__).resolve().parents[1]


def _arrays(ds):
    batches = list(ds.iter_batches(batch_format="numpy", batch_size=None))
    return np.concatenate([b["x"] for b in batches]), np.concatenate([b["y"] for b in batches])


def test_encode_batch_imputes_standardizes_and_one_hot_encodes_by_hand():
    prep = {"numeric": ["a", "b"], "pivot": [1.0, 10.0], "offset": [0.5, 0.0], "scale": [2.0, 1.0],
            "impute_numeric": [1.5, 4.0],
            "categorical": [{"name": "color", "values": ["blue", "red"], "other": True, "impute": "red"},
                            {"name": "size", "values": ["L", "S"], "other": False, "impute": None}],
            "classes": ["no", "yes"]}
    batch = {"x": np.array([[3.5, np.nan], [np.nan, 12.0]]), "y": np.array(["yes", "no"], dtype=object),
             "c0": np.array(["green", None], dtype=object), "c1": np.array(["S", "XL"], dtype=object)}
    out = encode_batch(batch, prep=prep, classification=True)
    # a: (3.5 - 1 - 0.5) / 2 = 1; the missing a is its mean 1.5 -> 0. b: missing -> 4 -> -6; 12 -> 2.
    # color: green was never seen -> <other>; missing -> imputed red. size: XL unseen, no <other> -> zeros.
    assert out["x"].tolist() == [[1.0, -6.0, 0, 0, 1, 0, 1], [0.0, 2.0, 0, 1, 0, 0, 0]]
    assert out["x"].dtype == np.float32 and out["y"].tolist() == [1, 0]
    assert feature_names(prep) == ["a", "b", "color=blue", "color=red", "color=<other>", "size=L", "size=S"]


def _table(n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    frame = pd.DataFrame({"id": np.arange(n, dtype=float), "a": rng.normal(size=n),
                          "color": rng.choice(["red", "blue", "green"], n), "size": rng.choice(["S", "M", "L"], n),
                          "label": rng.choice(["cat", "dog"], n)})
    frame.loc[5, ["a", "color"]] = [1e6, "magenta"]  # a category and a value range only this row has
    frame.loc[[2, 9, 14], "size"] = None
    frame.loc[[3, 20], "a"] = np.nan
    return frame


def test_preprocessing_is_fitted_on_the_training_split_only(ray_session, tmp_path):
    frame = _table()
    frame.to_csv(tmp_path / "t.csv", index=False)
    for seed in range(10):  # the first seed that puts row 5 in validation (the data is fixed: so is the seed)
        cfg = build_experiment({"data": {"source": "csv", "path": str(tmp_path / "t.csv"), "val_fraction": 0.5,
                                         "missing": "impute"}, "train": {"seed": seed}})
        datasets, spec = build_datasets(cfg)
        prep = spec.preprocessing
        x_train, _ = _arrays(datasets["train"])
        ids = np.rint(x_train[:, 0] * prep["scale"][0] + prep["pivot"][0] + prep["offset"][0]).astype(int)
        if 5 not in ids:
            break
    assert 5 not in ids, "no seed of ten put row 5 in validation"
    train = frame.iloc[sorted(ids)]
    assert len(train) == spec.num_train_rows and spec.num_train_rows + spec.num_val_rows == len(frame)
    # Numeric: the mean and spread of the training rows (missing cells left out), never row 5's 1e6.
    a = train["a"].dropna().to_numpy()
    assert prep["pivot"][1] + prep["offset"][1] == pytest.approx(a.mean(), rel=1e-12)
    assert prep["scale"][1] == pytest.approx(a.std(), rel=1e-9)
    assert prep["impute_numeric"][1] == pytest.approx(a.mean(), rel=1e-12)
    # Categorical: the training rows' values; the most frequent training size imputes.
    color, size = prep["categorical"]
    assert color["values"] == sorted(train["color"].unique()) and "magenta" not in color["values"]
    counts = train["size"].value_counts()
    assert size["impute"] == min(v for v, n in counts.items() if n == counts.max())
    assert prep["imputed"] == {"a": 2, "size": 3}  # cells of the whole table
    # Row 5 in validation: its colour falls to <other>, its value is far outside training's range.
    x_val, _ = _arrays(datasets["val"])
    names = list(spec.feature_names)
    row = x_val[np.argmax(x_val[:, names.index("a")])]
    assert row[names.index("a")] > 1e4 and row[names.index("color=<other>")] == 1.0
    assert x_train[:, names.index("color=<other>")].sum() == 0
    assert spec.classes == ("cat", "dog")


def test_missing_values_drop_counts_the_rows_and_error_names_the_columns(ray_session, tmp_path, capsys):
    frame = _table()
    frame.to_csv(tmp_path / "t.csv", index=False)
    cfg = build_experiment({"data": {"source": "csv", "path": str(tmp_path / "t.csv"), "missing": "drop"}})
    datasets, spec = build_datasets(cfg)
    incomplete = int(frame[["a", "size"]].isna().any(axis=1).sum())
    assert spec.preprocessing["rows_dropped"] == incomplete == 5
    assert spec.num_train_rows + spec.num_val_rows == len(frame) - incomplete
    config = tmp_path / "bad.yaml"
    config.write_text(json.dumps({"data": {"source": "csv", "path": str(tmp_path / "t.csv")},
                                  "run": {"storage_path": str(tmp_path / "runs")}}))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: column 'a' in {tmp_path / 't.csv'} has 2 NaN or missing value(s); set data.missing: "
                   "drop or impute, or clean it",
                   f"error: column 'size' in {tmp_path / 't.csv'} has 3 missing value(s); set data.missing: drop or "
                   "impute, or clean it"]


def test_the_penguins_ship_with_palmerpenguins():
    palmerpenguins = pytest.importorskip("palmerpenguins")
    assert filecmp.cmp(Path(palmerpenguins.__file__).parent / "data" / "penguins.csv",
                       REPO / "jobs" / "data" / "penguins.csv", shallow=False)


def test_penguins_train_beside_scikit_learn_and_resume_and_export_keep_the_fitted_transform(
        ray_session, tmp_path, capsys):
    """The penguins recipe through `raytrain-kit train`: class names, imputed cells, one-hot
    columns; its validation accuracy beside scikit-learn's logistic regression on the same split
    and imputation; then the data changes and `--resume` still applies the checkpoint's transform,
    as does `export`."""
    from sklearn.linear_model import LogisticRegression

    data = tmp_path / "penguins.csv"
    shutil.copy(REPO / "jobs" / "data" / "penguins.csv", data)
    common = ["--set", f"run.storage_path={tmp_path / 'runs'}", "--set", f"data.path={data}"]
    assert main(["train", str(REPO / "jobs" / "penguins.yaml"), *common]) == 0
    out = capsys.readouterr().out
    assert ("data: imputed 19 cell(s) from the training split (bill_length_mm 2, bill_depth_mm 2, flipper_length_mm 2, "
            "body_mass_g 2, sex 11); island one-hot: 3 value(s) + <other> (0 training rows); sex one-hot: 2 value(s) "
            "+ <other> (0 training rows); 3 classes: Adelie, Chinstrap, Gentoo") in out
    run = tmp_path / "runs" / "penguins"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["classes"] == ["Adelie", "Chinstrap", "Gentoo"]
    assert summary["data"]["cells_imputed"]["sex"] == 11

    datasets, spec = build_datasets(load_experiment(REPO / "jobs" / "penguins.yaml", [f"data.path={data}"]))
    (x_train, y_train), (x_val, y_val) = _arrays(datasets["train"]), _arrays(datasets["val"])
    reference = LogisticRegression(max_iter=2000).fit(x_train, y_train).score(x_val, y_val)
    kit = summary["final_metrics"]["val_accuracy"]
    with capsys.disabled():  # the side-by-side figure belongs in the test log (pytest -s shows it)
        print(f"\npenguins validation accuracy: raytrain-kit {kit:.4f}, scikit-learn LogisticRegression {reference:.4f} "
              f"({len(y_val)} rows, same split and imputation)")
    assert kit >= reference - 0.02, (kit, reference)
    confusion = np.array(summary["confusion"])
    assert confusion.shape == (3, 3) and confusion.sum() == len(y_val) == spec.num_val_rows
    epoch = int(summary["checkpoint"].rsplit("_", 1)[1])  # the confusion is the summary checkpoint's
    assert epoch == summary["best_epoch"]  # kept: checkpoint.keep keeps the best (it once kept the latest two)
    assert np.trace(confusion) / confusion.sum() == pytest.approx(summary["history"][epoch - 1]["val_accuracy"])
    from PIL import Image

    image = np.asarray(Image.open(run / "confusion.png").convert("L"), dtype=np.float64)
    assert image.shape[0] > 200 and image.std() > 20  # decodes, and is not blank

    # The data changes (new rows: an island never seen, heavier birds); the resumed run keeps the
    # checkpoint's transform, and says so.
    checkpoint_data = json.loads((run / "checkpoint_epoch_0030" / "data.json").read_text())
    extra = pd.read_csv(data).dropna().head(40).assign(island="Atlantis", body_mass_g=9000)
    pd.concat([pd.read_csv(data), extra]).to_csv(data, index=False)
    assert main(["train", str(REPO / "jobs" / "penguins.yaml"), *common, "--resume", "--set", "train.epochs=31"]) == 0
    out = capsys.readouterr().out
    assert "resume: the data is transformed as the run's checkpoint was (its fitted preprocessing)" in out
    resumed = json.loads((run / "checkpoint_epoch_0031" / "data.json").read_text())
    assert resumed["preprocessing"] == checkpoint_data["preprocessing"]
    assert resumed["num_train_rows"] > checkpoint_data["num_train_rows"]  # it did read the new rows

    assert main(["export", str(run), str(tmp_path / "model.pt")]) == 0
    assert json.loads((tmp_path / "model.data.json").read_text()) == resumed
    # The README's recipe for the record, applied by hand to the raw rows (an unseen island and
    # missing cells among them), gives exactly the kit's inputs, and the exported model loads.
    prep, frame = resumed["preprocessing"], pd.read_csv(data)
    names = [c["name"] for c in prep["categorical"]]
    kit = encode_batch(_pack(frame, numeric=prep["numeric"], categorical=names, label="species", label_is_text=True),
                       prep=prep, classification=True)
    np.testing.assert_array_equal(_inputs_as_the_readme_says(frame, prep), kit["x"])
    assert names[0] == "island" and prep["categorical"][0]["values"] == ["Biscoe", "Dream", "Torgersen"]
    assert kit["x"][-40:, len(prep["numeric"]) + 3].tolist() == [1.0] * 40  # the added rows: island=<other>
    model = build_model(load_experiment(run / "config.yaml"), spec_from_dict(resumed))
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))  # strict


def _inputs_as_the_readme_says(frame: pd.DataFrame, prep: dict) -> np.ndarray:
    """README, "The fitted record": impute, standardize, then each categorical column's indicators."""
    x = frame[prep["numeric"]].to_numpy(np.float64)
    x = np.where(np.isnan(x), prep["impute_numeric"], x)
    parts = [(x - np.array(prep["pivot"]) - np.array(prep["offset"])) / np.array(prep["scale"])]
    for c in prep["categorical"]:
        values = frame[c["name"]].fillna(c["impute"]).astype(str)
        parts += [np.stack([(values == v).to_numpy() for v in c["values"]] + [~values.isin(c["values"]).to_numpy()] * c["other"], 1)]
    return np.concatenate(parts, axis=1).astype(np.float32)
