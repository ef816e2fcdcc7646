"""Batch inference at cluster scale: a run's model over rows, with Ray Data.

`predict_run` reads the rows, runs `map_batches` over a pool of actors, each of which loads the
run's model once (`api.load_model`: the summary's checkpoint, sharded ones reassembled), and
writes the predictions with Ray Data's writers (a folder of Parquet or CSV files: one per block,
written by the tasks, so nothing passes through the driver). Two sources of rows:

- `data` given: new raw rows read as training reads them (CSV, Parquet, an image folder or
  manifest; local or any pyarrow URI), turned into model inputs with the run's fitted
  preprocessing (`LoadedModel.features`); the output keeps every input column that is not a
  model feature (ids, keys, the label), then `prediction` and `prob_<class>`.
- `data` omitted: the run's own data, rebuilt with the same seed and the checkpoint's
  preprocessing (the same rows in the same split as training, encoded the same way), and one
  split of it (`split`): its accuracy on `val` is the run's val_accuracy.

A label column present is scored: accuracy and mean loss (cross-entropy, or squared error for
regression), as `steps.evaluate` computes them. Exercised by `tests/test_predict.py`.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np
import pandas as pd
import ray

from raytrain_kit.api import LoadedModel, load_model
from raytrain_kit.config import Experiment, with_overrides
from raytrain_kit.errors import DataError

LABEL = "label"  # the output's label column, when the rows come from the run's own data
_SCORES = ("_correct", "_loss", "_scored")  # per-row scoring columns, summed then dropped
ACTORS_START_TIMEOUT_S = 600  # the pool's actors must all start within this (a busy cluster may queue them)
TASKS_PER_ACTOR = 4  # blocks per actor: enough to balance the pool, few enough to cost nothing
_ACTOR = "_actor"  # the process that predicted the row: how many actors shared the work


class _Predictor:
    """One actor of the pool: the model loaded once, then batch after batch of rows."""

    def __init__(self, run_dir: str, epoch: Optional[int], encoded: bool):
        import torch

        torch.set_num_threads(1)  # one CPU per actor: the pool, not each actor, spreads the work
        self.loaded, self.encoded = load_model(run_dir, epoch=epoch), encoded

    def __call__(self, batch) -> pd.DataFrame:
        loaded, cfg = self.loaded, self.loaded.experiment
        if self.encoded:  # the run's own rows (numpy): `x` already encoded, `y` a class index or value
            out = loaded.predict_inputs(batch["x"])
            labels = np.asarray(batch["y"])
            if loaded.classes is not None:
                labels = np.asarray(loaded.classes, dtype=object)[labels.astype(np.int64)]
            keep = pd.DataFrame({LABEL: labels})
        else:
            out = loaded.predict(batch)
            keep = batch[[c for c in batch.columns if c not in _feature_columns(loaded)]]
        label = LABEL if self.encoded else (cfg.data.label if cfg.data.label in batch.columns else None)
        result = pd.concat([keep, out], axis=1)
        result = pd.concat([result, _scores(result, label=label, classes=loaded.classes)], axis=1)
        result[_ACTOR] = os.getpid()
        return result


def _feature_columns(loaded: LoadedModel) -> set[str]:
    d, prep = loaded.experiment.data, loaded.spec.preprocessing
    if d.source == "images":
        return {d.image_column}
    if prep.get("array"):
        return {prep["array"]["name"]}
    return {*prep["numeric"], *(c["name"] for c in prep["categorical"])}


def _scores(result: pd.DataFrame, *, label: Optional[str], classes: Optional[list]) -> pd.DataFrame:
    """Per-row correctness and loss where the row has a label the run knows."""
    n = len(result)
    if label is None:
        return pd.DataFrame({"_correct": np.zeros(n), "_loss": np.zeros(n), "_scored": np.zeros(n)}, index=result.index)
    truth = result[label]
    if classes is None:  # regression: squared error
        error = (result["prediction"].to_numpy(np.float64) - truth.to_numpy(np.float64)) ** 2
        known = np.isfinite(error)
        return pd.DataFrame({"_correct": np.zeros(n), "_loss": np.where(known, error, 0.0), "_scored": known * 1.0},
                            index=result.index)
    index = {str(c): j for j, c in enumerate(classes)}
    codes = np.fromiter((index.get(str(v), -1) for v in truth), dtype=np.int64, count=n)
    known = codes >= 0
    probs = result[[f"prob_{c}" for c in classes]].to_numpy(np.float64)
    picked = probs[np.arange(n), np.where(known, codes, 0)]
    loss = np.where(known, -np.log(np.maximum(picked, 1e-300)), 0.0)
    correct = known & (probs.argmax(axis=1) == codes)
    return pd.DataFrame({"_correct": correct * 1.0, "_loss": loss, "_scored": known * 1.0}, index=result.index)


def _rows(loaded: LoadedModel, data: Optional[str], *, split: str) -> tuple[ray.data.Dataset, bool, str]:
    """(rows, whether they are already encoded, where they came from)."""
    from raytrain_kit.data import build_datasets
    from raytrain_kit.data.images import list_images
    from raytrain_kit.data.sources import read_table

    cfg = loaded.experiment
    if data is None:
        datasets, _ = build_datasets(cfg, fitted=loaded.spec.preprocessing)
        rows = datasets["train"].union(datasets["val"]) if split == "all" else datasets[split]
        return rows, True, f"the run's {split} rows"
    if "://" not in data and not os.path.exists(data):
        raise DataError(f"DATA: {os.path.abspath(data)}: no such file or folder")
    source = cfg.data.source if cfg.data.source == "images" else ("csv" if data.lower().endswith(".csv") else "parquet")
    reading: Experiment = with_overrides(cfg, {"data.source": source, "data.path": data})
    if source == "images":
        paths, labels, where = list_images(reading)
        frame = pd.DataFrame({cfg.data.image_column: paths, cfg.data.label: labels})
        return ray.data.from_pandas(frame), False, where
    return read_table(reading)[0], False, data


def predict_run(run_dir: str, data: Optional[str], out: str, *, split: str = "val", epoch: Optional[int] = None,
                batch_size: int = 1024, num_workers: int = 2, log: Callable[[str], None] = lambda line: None) -> dict:
    """Predict `data`'s rows (or the run's own `split`) with the run's model on `num_workers`
    actors and write them to `out` (a folder of Parquet files; CSV when `out` ends in .csv).
    Returns {"rows", "accuracy", "loss", "scored_rows", "num_actors" (that predicted rows), "out",
    "checkpoint", "source"}.
    Raises ConfigError (no run, checkpoint or record) and DataError (rows the model cannot read)."""
    if not ray.is_initialized():
        from raytrain_kit.cluster import connect

        connect()
    loaded = load_model(run_dir, epoch=epoch)  # here first: a bad run directory fails before any actor starts
    rows, encoded, source = _rows(loaded, data, split=split)
    if not encoded:  # a few rows through the same transform here: a missing or mistyped column is one line
        loaded.features(rows.limit(20).to_pandas())
    log(f"predict:       {source} with {loaded.checkpoint}, {num_workers} actor(s)")
    # An actor takes whole blocks, and one file (or a small split) is often one block: cut the
    # rows into a few blocks per actor, or one actor would predict them all. Materialized first:
    # the pool's actors hold every CPU while they wait for rows, and the reads need one too.
    rows = rows.repartition(TASKS_PER_ACTOR * num_workers).materialize()
    # Every actor up before the first rows go out: the first one ready would otherwise take all of
    # a small input while the others still import torch. (The dataset's own copy of the context.)
    rows.context.wait_for_min_actors_s = ACTORS_START_TIMEOUT_S
    predicted = rows.map_batches(_Predictor, fn_constructor_kwargs={"run_dir": run_dir, "epoch": epoch, "encoded": encoded},
                                 batch_size=batch_size, batch_format="numpy" if encoded else "pandas",
                                 concurrency=(num_workers, num_workers), num_cpus=1)
    try:
        predicted = predicted.materialize()  # once: both the scores and the files come from it
    except Exception as e:  # an actor's DataError (a bad image or value further in) arrives wrapped by Ray
        raise _kit_error(e) from None
    # One pass for the totals: each block's sums and actors, combined here (a few numbers a block).
    blocks = predicted.map_batches(_block_totals, batch_format="pandas", batch_size=None).take_all()
    sums = {c: sum(b[c] for b in blocks) for c in (*_SCORES, "rows")}
    written = predicted.drop_columns([*_SCORES, _ACTOR])
    (written.write_csv if out.lower().endswith(".csv") else written.write_parquet)(out)
    scored = int(sums["_scored"])
    num_actors = len({a for b in blocks for a in b["actors"].split(",") if a})
    return {"rows": int(sums["rows"]), "scored_rows": scored, "out": out, "checkpoint": loaded.checkpoint, "source": source,
            "num_actors": num_actors,
            "accuracy": sums["_correct"] / scored if scored and loaded.classes is not None else None,
            "loss": sums["_loss"] / scored if scored else None}


def _block_totals(batch: pd.DataFrame) -> pd.DataFrame:
    """A block of predictions as one row: its score sums, row count and the actors that made it."""
    totals = {c: [float(batch[c].sum())] for c in _SCORES}
    actors = ",".join(str(a) for a in sorted(set(batch[_ACTOR].tolist())))
    return pd.DataFrame({**totals, "rows": [len(batch)], "actors": [actors]})


def _kit_error(error: BaseException) -> BaseException:
    """The kit's own error inside Ray's wrappers (RayTaskError, UserCodeException), else `error`."""
    from raytrain_kit.errors import KitError

    seen = error
    for _ in range(10):
        if isinstance(seen, KitError):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
        if seen is None:
            break
    return error
