"""Pictures of finished runs and sweeps; reads only what they wrote.

`plot_sweep(DIR)` draws `sweep.png`: the sweep's metric against each searched value (a log axis
for loguniform values, categories for choices) and the learning curves of the best trials.
Exercised by `raytrain-kit tune jobs/sweep_digits.yaml`, which writes it at the end.
"""

from __future__ import annotations

import io
from typing import Any

import pandas as pd
import yaml

SWEEP_PNG = "sweep.png"
NUM_CURVES = 5  # best trials whose learning curves are drawn


def _read(directory: str, name: str) -> bytes:
    from raytrain_kit.launch import filesystem

    fs, path = filesystem(directory)
    with fs.open_input_stream(f"{path}/{name}") as f:
        return f.read()


def _axis_values(column: pd.Series) -> tuple[Any, list[str] | None]:
    """Numbers as they are; anything else (choices of names or lists) as category positions."""
    numeric = pd.to_numeric(column, errors="coerce")
    if numeric.notna().all():
        return numeric, None
    labels = sorted({str(v) for v in column})
    return column.astype(str).map({label: i for i, label in enumerate(labels)}), labels


def plot_sweep(directory: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raytrain_kit.config import build_experiment
    from raytrain_kit.launch import write_run_file
    from raytrain_kit.sweep import HISTORY_PARQUET, TRIALS_PARQUET, sweep_metric

    cfg = build_experiment(yaml.safe_load(_read(directory, "config.yaml")))
    metric, mode = sweep_metric(cfg)
    trials = pd.read_parquet(io.BytesIO(_read(directory, TRIALS_PARQUET)))
    history = pd.read_parquet(io.BytesIO(_read(directory, HISTORY_PARQUET)))
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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return write_run_file(directory, SWEEP_PNG, buffer.getvalue())
