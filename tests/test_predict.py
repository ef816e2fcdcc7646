"""`raytrain-kit predict`: a run's model over rows as Ray Data batch inference on a pool of actors,
scoring a label column; the same predictions as the model in this process; bad input in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import raytrain_kit as rk
from raytrain_kit.cli import main
from raytrain_kit.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def test_predict_on_the_main_jobs_validation_rows_scores_its_val_accuracy_exactly(ray_session, tmp_path, capsys):
    common = ["--set", f"run.storage_path={tmp_path / 'runs'}", "--set", "train.epochs=3"]
    assert main(["train", str(REPO / "jobs" / "digits.yaml"), *common]) == 0
    run = tmp_path / "runs" / "digits"
    summary = json.loads((run / "summary.json").read_text())
    epoch = int(summary["checkpoint"].rsplit("_", 1)[1])
    capsys.readouterr()

    out = tmp_path / "val_predictions"
    assert main(["predict", str(run), "--split", "val", "--out", str(out), "--batch-size", "64"]) == 0
    printed = capsys.readouterr().out
    val_accuracy = summary["history"][epoch - 1]["val_accuracy"]
    assert f"predicted 360 rows on 2 actor(s); accuracy {val_accuracy:.4f}" in printed, printed
    frame = pd.read_parquet(out)
    assert len(frame) == 360 and list(frame.columns) == ["label", "prediction", *[f"prob_{d}" for d in range(10)]]
    # Exactly the run's figure: the same rows, encoded the same way, the same weights.
    assert (frame["prediction"] == frame["label"]).mean() == val_accuracy
    assert np.allclose(frame.filter(like="prob_").sum(axis=1), 1.0)


def test_predict_new_raw_rows_equals_the_model_in_this_process_and_keeps_their_ids(ray_session, tmp_path, capsys):
    data = tmp_path / "penguins.csv"
    shutil.copy(REPO / "jobs" / "data" / "penguins.csv", data)
    common = ["--set", f"run.storage_path={tmp_path / 'runs'}", "--set", f"data.path={data}", "--set", "train.epochs=5"]
    assert main(["train", str(REPO / "jobs" / "penguins.yaml"), *common]) == 0
    run = tmp_path / "runs" / "penguins"
    rows = pd.read_csv(data).assign(bird_id=lambda f: [f"b{i:03d}" for i in range(len(f))])
    rows.loc[:9, "island"] = "Atlantis"  # never seen in training: island=<other>
    rows.loc[20, "species"] = "Emperor"  # a label that is none of the run's classes: reported, not scored
    rows.to_csv(tmp_path / "new.csv", index=False)
    capsys.readouterr()

    out = tmp_path / "predictions.csv"
    assert main(["predict", str(run), str(tmp_path / "new.csv"), "--out", str(out), "--batch-size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "not scored: 1 row(s) whose label is none of the run's classes" in printed, printed
    frame = pd.concat(pd.read_csv(f) for f in sorted(out.glob("*.csv"))).sort_values("bird_id").reset_index(drop=True)
    # Ids, the label and any column the model does not read are kept; the features are not.
    assert list(frame.columns) == ["species", "bird_id", "prediction", "prob_Adelie", "prob_Chinstrap", "prob_Gentoo"]
    expected = rk.load_model(str(run)).predict(rows).assign(bird_id=rows["bird_id"])
    assert frame["prediction"].tolist() == expected["prediction"].tolist()
    np.testing.assert_allclose(frame["prob_Gentoo"], expected["prob_Gentoo"], rtol=1e-12)
    known = rows["species"] != "Emperor"
    accuracy = (expected["prediction"][known] == rows["species"][known]).mean()
    assert f"predicted 344 rows on 2 actor(s); accuracy {accuracy:.4f}" in printed, printed
    assert "over 343 labelled rows" in printed, printed


def test_bad_input_to_predict_exits_2_with_one_line(ray_session, tmp_path, capsys):
    common = ["--set", f"run.storage_path={tmp_path / 'runs'}", "--set", "train.epochs=1"]
    assert main(["train", str(REPO / "jobs" / "tabular_mlp.yaml"), *common]) == 0
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    features = rk.load_model(str(run)).spec.preprocessing["numeric"]
    table = pd.DataFrame(np.random.default_rng(0).standard_normal((50, len(features))), columns=features)
    table.drop(columns=[features[1]]).to_csv(tmp_path / "short.csv", index=False)
    table.assign(**{features[0]: "x"}).to_csv(tmp_path / "text.csv", index=False)
    no_checkpoint = tmp_path / "no_checkpoint"
    no_checkpoint.mkdir()
    shutil.copy(run / "config.yaml", no_checkpoint / "config.yaml")
    capsys.readouterr()
    cases = [
        ([str(no_checkpoint), str(tmp_path / "short.csv")], f"error: {no_checkpoint}: no checkpoint there"),
        ([str(run), str(tmp_path / "short.csv")], f"error: column(s) '{features[1]}' missing from the rows to predict"),
        ([str(run), str(tmp_path / "text.csv")], f"error: column(s) '{features[0]}' hold text where the model was trained"),
        ([str(run), str(tmp_path / "absent.csv")], f"error: DATA: {tmp_path / 'absent.csv'}: no such file or folder"),
    ]
    for i, (args, expected) in enumerate(cases):
        assert main(["predict", *args, "--out", str(tmp_path / f"out{i}")]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(expected), (err, expected)
    with pytest.raises(DataError, match="missing from the rows to predict"):
        rk.predict(str(run), str(tmp_path / "short.csv"), out=str(tmp_path / "from_python"))
