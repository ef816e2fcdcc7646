"""Pictures of finished runs and sweeps; reads only what they wrote.

`write_report(DIR)` (the CLI's `raytrain-kit report DIR`, also run at the end of `train` and
`tune`) tells a run from a sweep and writes, next to its data:
- for a run: `curves.png` (train/val loss, accuracy, lr, samples/s and where each epoch's time
  went), from `metrics.csv`, else from `summary.json`'s history;
- for a sweep: `sweep.png` (the metric against each searched value, a log axis for loguniform
  values, categories for choices, and the learning curves of the best trials) and
  `parallel.png` (parallel coordinates of the trials, coloured by the metric);
- for a classification run, `confusion.png` (the validation confusion matrix of the summary's
  checkpoint, with the class names on its axes);
- `report.md`, which embeds them with a table of the top trials or the run's summary.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd
import yaml

from raytrain_kit.storage import path_exists, read_run_file, write_run_file

SWEEP_PNG, PARALLEL_PNG, CURVES_PNG, REPORT_MD = "sweep.png", "parallel.png", "curves.png", "report.md"
CONFUSION_PNG = "confusion.png"
NUM_CURVES = 5  # best trials whose learning curves are drawn


def _read(directory: str, name: str) -> bytes:
    return read_run_file(directory, name)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, directory: str, name: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    _pyplot().close(fig)
    return write_run_file(directory, name, buffer.getvalue())


def _axis_values(column: pd.Series) -> tuple[Any, list[str] | None]:
    """Numbers as they are; anything else (choices of names or lists) as category positions."""
    numeric = pd.to_numeric(column, errors="coerce")
    if numeric.notna().all():
        return numeric, None
    labels = sorted({str(v) for v in column})
    return column.astype(str).map({label: i for i, label in enumerate(labels)}), labels


def _sweep_data(directory: str):
    from raytrain_kit.config import build_experiment
    from raytrain_kit.sweep import HISTORY_PARQUET, TRIALS_PARQUET

    cfg = build_experiment(yaml.safe_load(_read(directory, "config.yaml")))
    trials = pd.read_parquet(io.BytesIO(_read(directory, TRIALS_PARQUET)))
    history = pd.read_parquet(io.BytesIO(_read(directory, HISTORY_PARQUET)))
    return cfg, trials, history


def plot_sweep(directory: str) -> str:
    from raytrain_kit.sweep import sweep_metric

    plt = _pyplot()
    cfg, trials, history = _sweep_data(directory)
    metric, mode = sweep_metric(cfg)
    scored = trials[trials["best_value"].notna()]
    keys = list(cfg.tune.space)
    num_panels = len(keys) + 1
    columns = min(num_panels, 3)
    rows = -(-num_panels // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    axes = axes.ravel()
    stopped = scored["status"] != "finished"
    for ax, key in zip(axes, keys):
        x, labels = _axis_values(scored[key])
        ax.scatter(x[~stopped], scored["best_value"][~stopped], c="tab:blue", label="ran all epochs")
        if stopped.any():
            ax.scatter(x[stopped], scored["best_value"][stopped], c="tab:gray", marker="x", label="stopped early")
        if cfg.tune.space[key].kind == "loguniform":
            ax.set_xscale("log")
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {metric}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    curves = axes[len(keys)]
    for trial_id in scored["trial_id"].head(NUM_CURVES):
        rows_of = history[history["trial_id"] == trial_id].sort_values("epoch")
        if metric in rows_of:
            curves.plot(rows_of["epoch"], rows_of[metric], marker=".", label=trial_id)
    curves.set_xlabel("epoch")
    curves.set_ylabel(metric)
    curves.set_title(f"best {min(NUM_CURVES, len(scored))} trials", fontsize=10)
    curves.legend(fontsize=7)
    curves.grid(alpha=0.3)
    for ax in axes[num_panels:]:
        ax.set_visible(False)
    fig.suptitle(f"sweep {cfg.run.name}: {len(trials)} trials, {metric} ({mode})")
    fig.tight_layout()
    return _save(fig, directory, SWEEP_PNG)


def plot_parallel(directory: str) -> str:
    """One line per scored trial through an axis per searched key and one for the metric, each
    scaled to [0, 1] (log scale for loguniform keys); the colour is the metric."""
    import numpy as np

    from raytrain_kit.sweep import sweep_metric

    plt = _pyplot()
    cfg, trials, _ = _sweep_data(directory)
    metric, mode = sweep_metric(cfg)
    scored = trials[trials["best_value"].notna()].reset_index(drop=True)
    keys = list(cfg.tune.space)
    axes_values, tick_labels = [], []
    for key in keys:
        values, labels = _axis_values(scored[key])
        values = np.asarray(values, dtype=np.float64)
        if cfg.tune.space[key].kind == "loguniform":
            values = np.log10(values)
        low, high = float(np.min(values)), float(np.max(values))
        axes_values.append((values - low) / (high - low) if high > low else np.full_like(values, 0.5))
        if labels is not None:
            tick_labels.append(", ".join(labels) if len(labels) <= 4 else f"{len(labels)} choices")
        else:
            shown = (10 ** low, 10 ** high) if cfg.tune.space[key].kind == "loguniform" else (low, high)
            tick_labels.append(f"{shown[0]:.3g} .. {shown[1]:.3g}")
    target = scored["best_value"].to_numpy(dtype=np.float64)
    low, high = float(target.min()), float(target.max())
    axes_values.append((target - low) / (high - low) if high > low else np.full_like(target, 0.5))
    tick_labels.append(f"{low:.4g} .. {high:.4g}")
    matrix = np.stack(axes_values, axis=1)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * matrix.shape[1]), 4.2))
    colours = plt.get_cmap("viridis" if mode == "max" else "viridis_r")
    for i in np.argsort(target if mode == "max" else -target):  # best drawn last, on top
        ax.plot(range(matrix.shape[1]), matrix[i], color=colours(axes_values[-1][i]), alpha=0.8, linewidth=1.4)
    names = keys + [f"best {metric}"]
    ax.set_xticks(range(len(names)), [f"{n}\n{t}" for n, t in zip(names, tick_labels)], fontsize=8)
    ax.set_yticks([0, 1], ["low", "high"])
    for x in range(len(names)):
        ax.axvline(x, color="black", linewidth=0.6)
    mappable = plt.cm.ScalarMappable(cmap=colours, norm=plt.Normalize(low, high))
    fig.colorbar(mappable, ax=ax, label=f"best {metric}")
    ax.set_title(f"sweep {cfg.run.name}: {len(scored)} trials", fontsize=10)
    fig.tight_layout()
    return _save(fig, directory, PARALLEL_PNG)


def run_metrics(directory: str) -> pd.DataFrame:
    """A run's epochs: `metrics.csv`, else (a run from before it existed) summary.json's history."""
    import json

    from raytrain_kit.tracking import METRICS_CSV

    if path_exists(f"{directory}/{METRICS_CSV}"):
        return pd.read_csv(io.BytesIO(_read(directory, METRICS_CSV)))
    return pd.DataFrame(json.loads(_read(directory, "summary.json"))["history"])


def plot_run(directory: str) -> str:
    plt = _pyplot()
    frame = run_metrics(directory)
    panels = [("loss", ["train_loss", "val_loss"]), ("accuracy", ["train_accuracy", "val_accuracy"]),
              ("learning rate", ["lr"]), ("samples/s", ["samples_per_s"])]
    panels = [(title, [c for c in cols if c in frame and frame[c].notna().any()]) for title, cols in panels]
    panels = [(title, cols) for title, cols in panels if cols]
    timing = [c for c in ("data_s", "compute_s", "sync_s") if c in frame]
    num_panels = len(panels) + bool(timing)
    columns = min(num_panels, 3)
    rows = -(-num_panels // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.3 * rows), squeeze=False)
    axes = axes.ravel()
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes[num_panels:]:
        ax.set_visible(False)
    for ax, (title, cols) in zip(axes, panels):
        for col in cols:
            rows = frame[frame[col].notna()]
            ax.plot(rows["epoch"], rows[col], marker=".", label=col)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(cols) > 1:
            ax.legend(fontsize=8)
        if title == "learning rate" and (frame["lr"] > 0).all():
            ax.set_yscale("log")
    if timing:
        ax = axes[num_panels - 1]
        bottom = None
        for col in timing:
            ax.bar(frame["epoch"], frame[col], bottom=bottom, label=col.removesuffix("_s"))
            bottom = frame[col] if bottom is None else bottom + frame[col]
        ax.set_title("seconds per epoch", fontsize=10)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.suptitle(f"run {directory.rstrip('/').rsplit('/', 1)[-1]}")
    fig.tight_layout()
    return _save(fig, directory, CURVES_PNG)


def plot_confusion(directory: str, summary: dict) -> str:
    """The validation confusion matrix of the summary's checkpoint, class names on both axes:
    each cell the number of rows, coloured by the share of its true class (a row), so a small
    class's mistakes show as clearly as a large one's."""
    plt = _pyplot()
    counts = np.asarray(summary["confusion"], dtype=np.float64)
    names = [str(c) for c in summary["classes"]]
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = min(3.0 + 0.45 * len(names), 14.0)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, names, rotation=45 if max(map(len, names)) > 3 else 0, ha="right" if max(map(len, names)) > 3 else "center")
    ax.set_yticks(ticks, names)
    if len(names) <= 30:  # beyond that the numbers would not fit their cells
        for (i, j), n in np.ndenumerate(counts):
            ax.text(j, i, f"{int(n)}", ha="center", va="center", fontsize=8,
                    color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    epoch = summary.get("checkpoint", "").rstrip("/").rsplit("_", 1)[-1].lstrip("0") or "?"
    ax.set_title(f"validation confusion, epoch {epoch} ({int(counts.sum())} rows)", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    return _save(fig, directory, CONFUSION_PNG)


def _markdown_table(frame: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def write_report(directory: str, *, num_top: int = 10) -> list[str]:
    """Every picture of a run or sweep directory and the `report.md` that shows them; returns the
    paths written. Raises DataError for a directory that holds neither."""
    import json

    from raytrain_kit.errors import DataError
    from raytrain_kit.sweep import TRIALS_PARQUET, sweep_metric

    directory = directory.rstrip("/")
    if path_exists(f"{directory}/{TRIALS_PARQUET}"):
        cfg, trials, _ = _sweep_data(directory)
        metric, mode = sweep_metric(cfg)
        written = [plot_sweep(directory), plot_parallel(directory)]
        shown = [c for c in ("trial_id", *cfg.tune.space, "best_value", "best_epoch", "epochs_run", "status", "wall_s")
                 if c in trials]
        text = (f"# Sweep {cfg.run.name}\n\n{len(trials)} trials, {cfg.tune.search} search, {cfg.tune.scheduler} "
                f"scheduler; best {metric} ({mode}) first.\n\n{_markdown_table(trials[shown].head(num_top))}\n\n"
                f"![metric against each searched value, and the best trials' curves]({SWEEP_PNG})\n\n"
                f"![parallel coordinates of the trials]({PARALLEL_PNG})\n")
    elif path_exists(f"{directory}/summary.json"):
        summary = json.loads(_read(directory, "summary.json"))
        written = [plot_run(directory)]
        facts = pd.DataFrame([{"status": summary["status"], "metric": summary["metric"],
                               "best": summary["best_value"], "best epoch": summary["best_epoch"],
                               "epochs": summary["epochs_completed"], "wall s": summary["wall_s"],
                               "start-up s": (summary.get("startup") or {}).get("first_step")}])
        text = (f"# Run {directory.rsplit('/', 1)[-1]}\n\n{_markdown_table(facts)}\n\n"
                "*wall s*: seconds from the data built and the preflight passed to the run's end; "
                "*start-up s*: from this process's start to the first optimizer step "
                "(`startup` in summary.json gives each stage).\n\n"
                + (f"Error: {summary['error']}\n\n" if summary.get("error") else "")
                + f"![learning curves, lr, throughput and time per epoch]({CURVES_PNG})\n")
        if summary.get("confusion") and summary.get("classes"):
            written.append(plot_confusion(directory, summary))
            text += f"\n![validation confusion matrix of the summary's checkpoint]({CONFUSION_PNG})\n"
    else:
        raise DataError(f"{directory}: neither a run (summary.json) nor a sweep (trials.parquet); "
                        "give the directory that train or tune printed")
    return written + [write_run_file(directory, REPORT_MD, text)]
