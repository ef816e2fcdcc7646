"""The README's Python example, run as written: train, predict and tune from Python, twice in one
process, identical results the second time and every CPU free after each run; and the API's
errors are the kit's error classes, never an exit."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pandas as pd
import pytest

import raytrain_kit as rk
from raytrain_kit.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]


def _readme_example() -> str:
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- python-api-example:start -->\n", 1)[1].split("<!-- python-api-example:end -->", 1)[0]
    return block.strip().removeprefix("```python").removesuffix("```")


@contextlib.contextmanager
def _repository_root_at(directory: Path):
    """The README says "run from the repository's root": a directory with the repository's jobs/,
    whose runs/ is the test's own."""
    directory.mkdir()
    (directory / "jobs").symlink_to(REPO / "jobs")
    before = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(before)


def _cpus_all_free(ray) -> bool:
    deadline = time.monotonic() + 30  # actors release their CPUs a moment after a run ends
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]:
            return True
        time.sleep(0.5)
    return False


def test_readme_python_example_runs_twice_in_one_process_with_identical_results(ray_session, tmp_path):
    code = compile(_readme_example(), "README.md (Python API)", "exec")
    runs = []
    with _repository_root_at(tmp_path / "root"):  # both in one directory, as a notebook's cell run again
        for _ in ("first", "second"):
            namespace: dict = {}
            exec(code, namespace)
            assert _cpus_all_free(ray_session), ray_session.available_resources()
            runs.append(namespace)
    first, second = runs
    assert first["runs"] != second["runs"]  # each in its own folder, so the second is no "run already exists"

    result, predictions, rows = first["result"], first["predictions"], first["rows"]
    assert result.status == "finished" and result.best_value >= 0.9 and len(result.metrics) == 10
    assert result.checkpoint.endswith(f"checkpoint_epoch_{result.best_epoch:04d}")
    assert list(predictions.columns) == ["prediction", "prob_Adelie", "prob_Chinstrap", "prob_Gentoo"]
    assert len(predictions) == len(rows) == 344 and (predictions["prediction"] == rows["species"]).mean() > 0.9
    assert predictions.filter(like="prob_").sum(axis=1).round(9).eq(1).all()
    # The same config and seed: the same epochs, the same predictions, the same sweep.
    compared = ["epoch", "step", "train_loss", "val_loss", "val_accuracy"]
    pd.testing.assert_frame_equal(second["result"].metrics[compared], result.metrics[compared], check_exact=True)
    pd.testing.assert_frame_equal(second["predictions"], predictions, check_exact=True)
    sweep, again = first["sweep"], second["sweep"]
    assert len(sweep.trials) == 3 and Path(sweep.best_yaml).is_file()
    assert (sweep.best_value, sweep.best_config) == (again.best_value, again.best_config)
    assert sorted(sweep.trials["best_value"]) == sorted(again.trials["best_value"])

    # Bad input raises the kit's error classes, naming what is wrong.
    model = first["model"]
    with pytest.raises(DataError, match="'island' missing from the rows to predict"):
        model.predict(rows.drop(columns=["island"]))
    with pytest.raises(DataError, match="'body_mass_g' hold text where the model was trained on numbers"):
        model.predict(rows.assign(body_mass_g="heavy"))
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.yaml").write_text((Path(result.run_dir) / "config.yaml").read_text())
    with pytest.raises(ConfigError, match="no checkpoint there"):
        rk.load_model(str(empty))
    with pytest.raises(ConfigError, match="not a run directory"):
        rk.load_model(str(tmp_path))
    with pytest.raises(ConfigError, match="no tune section"):
        rk.tune(REPO / "jobs" / "penguins.yaml")
