"""Images and array columns (#17): a class-folder tree of real PNG files and the same pixels as a
Parquet array column train the digits CNN alike; bad files and mixed shapes are one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raytrain_kit.cli import main
from raytrain_kit.config import build_experiment
from raytrain_kit.data import build_datasets, check_local_file
from raytrain_kit.errors import DataError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory) -> Path:
    """jobs/data/write_digits_images.py's output, as the recipe's README step makes it."""
    out = tmp_path_factory.mktemp("digits")
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "data" / "write_digits_images.py"), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote 1797 PNG files under {out / 'images'} and {out / 'digits_arrays.parquet'}"
    return out


def _history(run: Path) -> list[dict]:
    return json.loads((run / "summary.json").read_text())["history"]


def test_image_folder_job_reaches_95_percent_and_the_parquet_arrays_train_alike(ray_session, digits_files, tmp_path, capsys):
    common = ["--set", f"run.storage_path={tmp_path}"]
    recipe = str(REPO / "jobs" / "digits_images.yaml")
    assert main(["train", recipe, *common, "--set", f"data.path={digits_files / 'images'}"]) == 0
    out = capsys.readouterr().out
    assert "data: image [1, 8, 8] normalized per channel (training mean 0.305); 10 classes: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9" in out
    summary = json.loads((tmp_path / "digits_images" / "summary.json").read_text())
    assert summary["final_metrics"]["val_accuracy"] >= 0.95
    assert summary["classes"] == [str(d) for d in range(10)] and np.array(summary["confusion"]).sum() == 360
    # checkpoint.every_epochs: 5 saves epochs 5, 10, 15: the line says when the best is not among them.
    (line,) = [line for line in out.splitlines() if line.startswith("checkpoint:")]
    saved = summary["best_epoch"] in (5, 10, 15)
    assert line.endswith(f"(the best saved epoch's; epoch {summary['best_epoch']} was not saved: "
                         "checkpoint.every_epochs is 5)") != saved, line

    # The same 8-bit pixels as one [1, 8, 8] array per Parquet row, class names as text: the same
    # rows in each split, the same normalization, so the same run, metric for metric.
    assert main(["train", recipe, *common, "--set", "run.name=arrays", "--set", "data.source=parquet",
                 "--set", f"data.path={digits_files / 'digits_arrays.parquet'}", "--set", "data.label=label"]) == 0
    images, arrays = _history(tmp_path / "digits_images"), _history(tmp_path / "arrays")
    assert [h["val_accuracy"] for h in arrays] == [h["val_accuracy"] for h in images]
    assert [h["train_loss"] for h in arrays] == pytest.approx([h["train_loss"] for h in images], rel=1e-6)


def _tree(root: Path, *, num_per_class: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(num_per_class):
            Image.fromarray(rng.integers(0, 255, (6, 5, 3), dtype=np.uint8), mode="RGB").save(root / label / f"{i}.png")
    return root


def test_images_are_resized_normalized_on_training_statistics_and_a_manifest_reads_the_same(ray_session, tmp_path):
    root = _tree(tmp_path / "tree")
    Image.fromarray(np.zeros((12, 9, 3), dtype=np.uint8), mode="RGB").save(root / "dog" / "big.png")  # resized
    cfg = build_experiment({"data": {"source": "images", "path": str(root), "image_size": [4, 4]},
                            "model": {"kind": "cnn", "channels": [2], "hidden": [4]}})
    datasets, spec = build_datasets(cfg)
    assert spec.input_shape == (3, 4, 4) and spec.classes == ("cat", "dog") and spec.num_train_rows + spec.num_val_rows == 25
    x = np.concatenate([b["x"] for b in datasets["train"].iter_batches(batch_size=None, batch_format="numpy")])
    per_channel = x.reshape(len(x), 3, -1).transpose(1, 0, 2).reshape(3, -1)
    assert per_channel.mean(axis=1) == pytest.approx([0, 0, 0], abs=1e-6)  # the training split's statistics
    assert per_channel.std(axis=1) == pytest.approx([1, 1, 1], rel=1e-5)
    # A manifest of the same files (paths relative to it) gives the same rows.
    manifest = pd.DataFrame({"file": [str(p.relative_to(root)) for p in sorted(root.rglob("*.png"))]})
    manifest["animal"] = [Path(f).parent.name for f in manifest["file"]]
    manifest.to_csv(root / "manifest.csv", index=False)
    cfg = build_experiment({"data": {"source": "images", "path": str(root / "manifest.csv"), "image_column": "file",
                                     "label": "animal", "image_size": [4, 4]},
                            "model": {"kind": "cnn", "channels": [2], "hidden": [4]}})
    again = np.concatenate([b["x"] for b in build_datasets(cfg)[0]["train"].iter_batches(batch_size=None, batch_format="numpy")])
    assert np.array_equal(again, x)


def test_bad_images_and_arrays_exit_2_with_one_line(ray_session, tmp_path, capsys):
    root = _tree(tmp_path / "tree")
    (root / "dog" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    _tree(tmp_path / "empty_dog", num_per_class=3)
    (tmp_path / "empty_dog" / "bird").mkdir()
    rows = [np.zeros((1, 2, 2)).tolist()] * 20 + [np.zeros((1, 3, 2)).tolist()] * 3
    pd.DataFrame({"image": rows, "label": [0, 1] * 10 + [0, 1, 0]}).to_parquet(tmp_path / "mixed.parquet")
    cases = [
        ({"source": "images", "path": str(root)},
         f"error: data.path: {root / 'dog' / '3.png'}: cannot read as an image (UnidentifiedImageError: cannot "
         f"identify image file '{root / 'dog' / '3.png'}'); fix or remove the file(s), or set data.on_bad_file: skip"),
        ({"source": "images", "path": str(tmp_path / "empty_dog")},
         f"error: data.path: class folder {tmp_path / 'empty_dog' / 'bird'} holds no images"),
        ({"source": "parquet", "path": str(tmp_path / "mixed.parquet")},
         f"error: column 'image' in {tmp_path / 'mixed.parquet'}: 3 row(s) hold arrays of another shape than the "
         "first row's [1, 2, 2] (the first of them: shape [1, 3, 2]); every row's array must have one shape"),
    ]
    for data, expected in cases:
        config = tmp_path / "bad.yaml"
        config.write_text(json.dumps({"data": data, "model": {"kind": "cnn", "channels": [2], "hidden": [4]},
                                      "run": {"storage_path": str(tmp_path / "runs")}}))
        assert main(["train", str(config)]) == 2, data
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(expected), (err, expected)
    # A listing's faults are found before Ray starts (the CLI's check of local data), in a moment.
    with pytest.raises(DataError, match="class folder .*bird holds no images"):
        check_local_file(build_experiment({"data": {"source": "images", "path": str(tmp_path / "empty_dog")},
                                           "model": {"kind": "cnn", "channels": [2], "hidden": [4]}}))
    # Skipped instead, the bad file is counted and named, and the rest train.
    cfg = build_experiment({"data": {"source": "images", "path": str(root), "on_bad_file": "skip"},
                            "model": {"kind": "cnn", "channels": [2], "hidden": [4]}})
    _, spec = build_datasets(cfg)
    assert spec.num_train_rows + spec.num_val_rows == 23 and spec.preprocessing["files_skipped"] == 1
    assert spec.preprocessing["first_skipped"].startswith(f"{root / 'dog' / '3.png'}: cannot read as an image")
