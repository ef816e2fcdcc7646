"""Seeing what training does: metrics.csv with timing, TensorBoard events, MLflow runs, report
pictures, the progress bar, and a worker's own error first when a run fails."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from raytrain_kit.cli import main
from raytrain_kit.config import build_experiment
from raytrain_kit.launch import STARTUP_STAGES, fit
from raytrain_kit.progress import NORMAL, QUIET, Progress, format_bar, format_startup
from raytrain_kit.tracking import layer_histograms, metrics_table
from records import assert_picture, read_tensorboard

REPO = Path(__file__).resolve().parents[1]
TIMING = ["data_s", "compute_s", "sync_s"]


# ---------------------------------------------------------------------------------------------
# Pure parts


def test_metrics_table_keeps_columns_that_appear_later_and_leaves_blanks():
    text = metrics_table([{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.25, "val_loss": 0.3}])
    frame = pd.read_csv(io.StringIO(text))
    assert list(frame.columns) == ["epoch", "train_loss", "val_loss"]
    assert frame["val_loss"].isna().tolist() == [True, False] and frame["train_loss"].tolist() == [0.5, 0.25]


def test_layer_histograms_count_every_weight_and_its_gradient_norm():
    layer = torch.nn.Linear(3, 2)
    layer(torch.ones(4, 3)).pow(2).sum().backward()
    h = layer_histograms(layer)
    assert set(h) == {"weight", "bias"}
    assert sum(h["weight"]["bucket_counts"]) == h["weight"]["num"] == 6
    assert h["weight"]["sum"] == pytest.approx(float(layer.weight.detach().sum()))
    assert h["bias"]["grad_norm"] == pytest.approx(float(layer.bias.grad.norm()))


def test_progress_bar_only_on_a_terminal_and_lines_unless_quiet():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    p = {"epoch": 2, "batch": 5, "num_batches": 10, "samples": 640, "elapsed_s": 2.0, "loss": 0.1234}
    assert format_bar(p, total_epochs=4, width=10) == \
        "epoch   2/4 [#####.....]  50%  320 samples/s  ETA 2s  loss 0.1234"
    terminal, log, quiet = Terminal(), io.StringIO(), io.StringIO()
    for stream, verbosity in ((terminal, NORMAL), (log, NORMAL), (quiet, QUIET)):
        progress = Progress(total_epochs=4, verbosity=verbosity, stream=stream)
        progress.bar(p)
        progress.line("epoch   2/4  done")
        progress.close()
    assert terminal.getvalue().startswith("\repoch   2/4 [############............]  50%") and "epoch   2/4  done\n" in terminal.getvalue()
    assert log.getvalue() == "epoch   2/4  done\n"  # not a terminal: no bar, no carriage returns
    assert quiet.getvalue() == ""


def test_startup_line_times_each_stage_from_the_end_of_the_one_before():
    stages = {"ray_ready": 5.0, "fit_called": 5.1, "datasets_built": 7.5, "preflight_done": 9.0, "trainer_started": 9.2,
              "worker_started": 17.0, "model_ready": 18.5, "data_ready": 18.6, "first_step": 18.75}
    assert format_startup(stages) == ("startup:       18.8 s to the first step (Ray 5.0 s, data 2.5 s, preflight 1.5 s, "
                                      "Train workers 8.0 s, model and shards 1.6 s, first step 0.1 s)")
    assert format_startup({k: v for k, v in stages.items() if k != "first_step"}) is None  # no step taken


# ---------------------------------------------------------------------------------------------
# A run's records, end to end


def test_run_writes_metrics_csv_tensorboard_mlflow_and_its_report(ray_session, tmp_path):
    from mlflow.tracking import MlflowClient

    store = f"file:{tmp_path / 'mlruns'}"
    cfg = build_experiment({
        "data": {"source": "digits"}, "model": {"kind": "mlp", "hidden": [32]},
        "train": {"epochs": 3, "batch_size": 64}, "optim": {"lr": 0.003},
        "scaling": {"num_workers": 2}, "preflight": {"enabled": False},
        "tracking": {"histogram_every": 2, "mlflow_uri": store, "mlflow_experiment": "tests"},
        "run": {"name": "records", "storage_path": str(tmp_path / "runs")}})
    progress: list[dict] = []
    summary = fit(cfg, on_progress=progress.append)
    run_dir = tmp_path / "runs" / "records"

    # Rank 0's in-epoch progress reached the driver (what the live bar draws), each epoch to its end.
    ends = {p["epoch"]: p for p in progress if p["batch"] == p["num_batches"]}
    assert sorted(ends) == [1, 2, 3] and all(p["samples"] > 0 and p["loss"] > 0 for p in ends.values())

    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2, 3]
    assert set(metrics.columns) >= {"train_loss", "val_loss", "val_accuracy", "lr", "samples_per_s", "epoch_s", *TIMING}
    assert (metrics[TIMING] >= 0).all().all() and (metrics["compute_s"] > 0).all()
    # The three parts are the training pass; evaluation and checkpointing come on top.
    assert (metrics[TIMING].sum(axis=1) <= metrics["epoch_s"] * 1.001).all()
    assert metrics["val_accuracy"].tolist() == pytest.approx([h["val_accuracy"] for h in summary["history"]])
    # Each epoch's end on the worker's clock: after the one before, apart by at least its training pass.
    assert (metrics["wall_time"].diff().dropna() >= metrics["epoch_s"][1:].to_numpy() * 0.999).all()

    # Where the start-up went: every stage, from the driver's and rank 0's clocks, in order.
    stages = summary["startup"]
    assert list(stages) == [s for s in STARTUP_STAGES[1:] if s != "preflight_done"]  # preflight is off here
    assert list(stages.values()) == sorted(stages.values()) and stages["ray_ready"] > 0

    scalars, histograms = read_tensorboard(run_dir / "tensorboard")
    assert scalars["val_accuracy"] == pytest.approx(dict(zip(metrics["epoch"], metrics["val_accuracy"])))
    assert sorted(scalars["lr"]) == [1, 2, 3] and sorted(scalars["sync_s"]) == [1, 2, 3]
    grad_tags = [t for t in scalars if t.startswith("grad_norm/")]
    # Two linear layers (hidden [32]): a weight and a bias each, as histograms and gradient norms.
    assert len(histograms) == 4 and histograms == {"weights/" + t.split("/", 1)[1] for t in grad_tags}
    assert grad_tags and all(sorted(scalars[t]) == [2, 3] for t in grad_tags)  # histogram_every 2, and the last
    assert all(v > 0 for t in grad_tags for v in scalars[t].values())

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("tests")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "records"
    assert run.data.params["optim.lr"] == "0.003" and run.data.params["scaling.num_workers"] == "2"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_accuracy"))
    assert [step for step, _ in history] == [1, 2, 3]
    assert [value for _, value in history] == pytest.approx(metrics["val_accuracy"].tolist())
    assert run.data.metrics["best_val_accuracy"] == pytest.approx(summary["best_value"])
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["best_checkpoint"]

    assert main(["report", str(run_dir)]) == 0
    assert_picture(run_dir / "curves.png")
    report = (run_dir / "report.md").read_text()
    assert "![" in report and "curves.png" in report
    # Its table's figures, and what each column means (a newcomer could not tell what "wall s" timed).
    facts = report.split("\n")[4].strip("| ").split(" | ")
    assert facts[:5] == ["finished", "val_accuracy", f"{summary['best_value']:.4g}", str(summary["best_epoch"]), "3"]
    assert float(facts[5]) == pytest.approx(summary["wall_s"], abs=0.01)
    assert "*wall s*: seconds from the data built" in report and "*start-up s*: from this process's start" in report


def test_every_epoch_reaches_the_records_once_in_order_whichever_way_it_travelled(ray_session, tmp_path):
    """Epochs with a checkpoint (and the first) travel through Ray Train's controller, the others
    straight from rank 0 to the driver (worker.py): here 1, 3, 6 one way and 2, 4, 5 the other."""
    cfg = build_experiment({
        "data": {"source": "digits"}, "model": {"kind": "mlp", "hidden": [32]},
        "train": {"epochs": 6, "batch_size": 64}, "scaling": {"num_workers": 2}, "preflight": {"enabled": False},
        "checkpoint": {"every_epochs": 3, "keep": 2}, "run": {"name": "routes", "storage_path": str(tmp_path / "runs")}})
    arrived: list[dict] = []
    summary = fit(cfg, on_epoch=arrived.append)
    run_dir = tmp_path / "runs" / "routes"

    # As they arrived (the records alone would heal from the last checkpoint's history).
    assert [m["epoch"] for m in arrived] == [1, 2, 3, 4, 5, 6]
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics["epoch"].tolist() == [h["epoch"] for h in summary["history"]] == [1, 2, 3, 4, 5, 6]
    assert metrics["val_accuracy"].tolist() == pytest.approx([h["val_accuracy"] for h in summary["history"]])
    assert metrics["wall_time"].is_monotonic_increasing
    steps_per_epoch = metrics["step"][0]  # 718 rows a worker in batches of 64: 12
    assert steps_per_epoch == 12 and metrics["step"].tolist() == [steps_per_epoch * e for e in range(1, 7)]
    assert pd.read_csv(run_dir / "steps.csv")["step"].tolist() == list(range(1, 6 * steps_per_epoch + 1))
    assert sorted(p.name for p in run_dir.glob("checkpoint_epoch_*")) == ["checkpoint_epoch_0003", "checkpoint_epoch_0006"]


def test_report_refuses_a_folder_that_is_neither_run_nor_sweep(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path}: neither a run (summary.json) nor a sweep "
                                               "(trials.parquet); give the directory that train or tune printed")


# ---------------------------------------------------------------------------------------------
# A worker that raises


def test_worker_error_comes_first_with_rank_epoch_and_log_and_no_ray_traceback(ray_session, tmp_path, capfd):
    """The CLI in this process, on the suite's Ray (started as the CLI starts one: Ray's log stream
    off); `capfd` takes everything written to this process's stdout and stderr, Ray's included."""
    config = tmp_path / "boom.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"source": "digits"}, "train": {"epochs": 2}, "preflight": {"enabled": False},
        "model": {"kind": "custom", "target": "test_models_lib:build_failing_mlp",
                  "kwargs": {"fail_at_step": 3, "error": "ValueError", "message": "boom in worker"}},
        "scaling": {"num_workers": 2, "max_failures": 0},
        "run": {"name": "boom", "storage_path": str(tmp_path / "runs")}}))
    assert main(["train", str(config)]) == 1
    out, err = capfd.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors[0].startswith("error: ValueError: boom in worker (rank 0 on node ")
    assert errors[0].endswith(", epoch 1, step 3)")
    log = tmp_path / "runs" / "boom" / "logs" / "rank0.log"
    assert errors[1] == f"error: full log of worker rank 0: {log}"
    assert "Traceback (most recent call last)" in log.read_text() and "boom in worker" in log.read_text()
    assert "Traceback" not in out + err and "TrainingFailedError" not in out + err and "RayTaskError" not in out + err
    assert json.loads((tmp_path / "runs" / "boom" / "summary.json").read_text())["status"] == "failed"

