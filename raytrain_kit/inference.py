"""Batch inference at cluster scale: a run's model over rows, with Ray Data.

`predict_run` reads the rows, runs `map_batches` over a pool of actors, each of which loads the
run's model once (`api.load_model`: the summary's checkpoint, sharded ones reassembled), and
streams the predictions into a Ray Data datasink (`_PredictionSink`: a folder of Parquet or CSV
files, one per block, written by the tasks as the actors produce them, each returning its
block's score totals, so no prediction passes through the driver). `check_inputs` makes its
first checks without Ray. Two sources of rows:

- `data` given: new raw rows read as training reads them (CSV, Parquet, an image folder or
  manifest; local or any pyarrow URI), turned into model inputs with the run's fitted
  preprocessing (`LoadedModel.features`); the output keeps every input column that is not a
  model feature (ids, keys, the label), then `prediction` and `prob_<class>`.
- `data` omitted: the run's own data, rebuilt with the same seed and the checkpoint's
  preprocessing (the same rows in the same split as training, encoded the same way), and one
  split of it (`split`): its accuracy on `val` is the run's val_accuracy.

A label column present is scored: accuracy and mean loss (cross-entropy, or squared error for
regression), as `steps.evaluate` computes them; a label that is none of the run's classes is
counted, not scored. Exercised by `tests/test_predict.py` and, for a sharded checkpoint,
`tests/test_cli.py::test_fsdp_job_in_bf16_then_export`; timed by `benchmarks/predict_bench.py`.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np
import pandas as pd
import ray
from ray.data.datasource import BlockBasedFileDatasink

from raytrain_kit.api import LoadedModel, load_model
from raytrain_kit.config import Experiment, with_overrides
from raytrain_kit.errors import DataError

_SCORES = ("_correct", "_loss", "_scored", "_unseen")  # per-row scoring columns, summed then dropped
ACTORS_START_TIMEOUT_S = 600  # the pool's actors must all start within this (a busy cluster may queue them)
TASKS_PER_ACTOR = 4  # blocks per actor: enough to balance the pool, few enough to cost nothing
_ACTOR = "_actor"  # the process that predicted the row: how many actors shared the work
INPUT_BYTES_PER_CALL = 16 * 2**20  # model inputs (float32) per actor call, at most (or one forward batch)
MAX_ROWS_PER_CALL = 65_536  # rows per actor call, at most
HEAD_ROWS = 20  # rows checked in the driver before any actor starts


class _Predictor:
    """One actor of the pool: the model loaded once, then batch after batch of rows."""

    def __init__(self, run_dir: str, epoch: Optional[int], encoded: bool, batch_size: int, use_gpu: bool = False):
        import torch

        torch.set_num_threads(1)  # one CPU per actor: the pool, not each actor, spreads the work
        self.loaded, self.encoded, self.batch_size = load_model(run_dir, epoch=epoch), encoded, batch_size
        if use_gpu:  # Ray gave this actor one GPU (CUDA_VISIBLE_DEVICES): the forward passes run there
            self.loaded.model.to("cuda")

    def __call__(self, batch) -> pd.DataFrame:
        loaded, cfg = self.loaded, self.loaded.experiment
        if self.encoded:  # the run's own rows (numpy): `x` already encoded, `y` a class index or value
            out = loaded.predict_inputs(batch["x"], batch_rows=self.batch_size)
            labels = np.asarray(batch["y"])
            if loaded.classes is not None:
                labels = np.asarray(loaded.classes, dtype=object)[labels.astype(np.int64)]
            keep = pd.DataFrame({cfg.data.label: labels})  # the run's label column, by its name
        else:
            out = loaded.predict(batch, batch_rows=self.batch_size)
            keep = batch[[c for c in batch.columns if c not in _feature_columns(loaded)]]
        label = cfg.data.label if self.encoded or cfg.data.label in batch.columns else None
        result = pd.concat([keep, out], axis=1)
        result = pd.concat([result, _scores(result, label=label, classes=loaded.classes)], axis=1)
        result[_ACTOR] = os.getpid()
        return result


def _rows_per_call(loaded: LoadedModel, batch_size: int, *, rows_per_block: int) -> int:
    """Rows handed to an actor per call: at least a forward batch, and as many more as keep the
    call's encoded inputs near INPUT_BYTES_PER_CALL. The per-call costs (the raw rows' columns
    checked and encoded, the output frame built) are then paid per few tens of thousands of table
    rows, not per forward batch, while an image's bigger rows keep a call's memory bounded. At
    most a block's rows: Ray Data joins blocks up to a call's size, which would hand one actor a
    small input whole."""
    row_bytes = 4 * int(np.prod(loaded.spec.input_shape))
    return max(1, min(rows_per_block, max(batch_size, min(MAX_ROWS_PER_CALL, INPUT_BYTES_PER_CALL // row_bytes))))


def _feature_columns(loaded: LoadedModel) -> set[str]:
    d, prep = loaded.experiment.data, loaded.spec.preprocessing
    if d.source == "images":
        return {d.image_column}
    if prep.get("array"):
        return {prep["array"]["name"]}
    return {*prep["numeric"], *(c["name"] for c in prep["categorical"])}


def _scores(result: pd.DataFrame, *, label: Optional[str], classes: Optional[list]) -> pd.DataFrame:
    """Per-row correctness and loss where the row has a label the run knows; `_unseen` marks a
    label given that is none of the run's classes (not scored, but counted and reported)."""
    n = len(result)
    zeros = np.zeros(n)
    if label is None:
        return pd.DataFrame({"_correct": zeros, "_loss": zeros, "_scored": zeros, "_unseen": zeros}, index=result.index)
    truth = result[label]
    if classes is None:  # regression: squared error
        error = (result["prediction"].to_numpy(np.float64) - truth.to_numpy(np.float64)) ** 2
        known = np.isfinite(error)
        return pd.DataFrame({"_correct": zeros, "_loss": np.where(known, error, 0.0), "_scored": known * 1.0,
                             "_unseen": zeros}, index=result.index)
    # A label's class index by its text (how classes are recorded), -1 for one the run never saw.
    codes = pd.Categorical(truth.astype(str), categories=[str(c) for c in classes]).codes.astype(np.int64)
    known = codes >= 0
    probs = result[[f"prob_{c}" for c in classes]].to_numpy(np.float64)
    picked = probs[np.arange(n), np.where(known, codes, 0)]
    loss = np.where(known, -np.log(np.maximum(picked, 1e-300)), 0.0)
    correct = known & (probs.argmax(axis=1) == codes)
    unseen = ~known & truth.notna().to_numpy()
    return pd.DataFrame({"_correct": correct * 1.0, "_loss": loss, "_scored": known * 1.0, "_unseen": unseen * 1.0},
                        index=result.index)


def _rows(loaded: LoadedModel, data: Optional[str], *, split: str, num_blocks: int
          ) -> tuple[ray.data.Dataset, Optional[pd.DataFrame], str]:
    """(rows in about `num_blocks` blocks, a few of them read here when they are raw (else None:
    the run's own rows, already encoded), where they came from)."""
    from raytrain_kit.data import build_datasets
    from raytrain_kit.data.images import list_images
    from raytrain_kit.data.sources import read_head, read_table

    cfg = loaded.experiment
    if data is None:
        datasets, _ = build_datasets(cfg, fitted=loaded.spec.preprocessing)
        rows = datasets["train"].union(datasets["val"]) if split == "all" else datasets[split]
        return rows, None, "all of the run's rows" if split == "all" else f"the run's {split} rows"
    reading = _reading(cfg, data)
    if reading.data.source == "images":
        paths, labels, where = list_images(reading)
        frame = pd.DataFrame({cfg.data.image_column: paths, cfg.data.label: labels})
        pieces = [p for p in np.array_split(frame, min(num_blocks, len(frame))) if len(p)] or [frame]
        return ray.data.from_pandas(pieces), frame.head(HEAD_ROWS), where
    return read_table(reading, num_blocks=num_blocks)[0], read_head(reading, HEAD_ROWS), data


def _reading(cfg: Experiment, data: str) -> Experiment:
    """The run's experiment reading `data` instead: an image folder for an image run, else CSV
    (by the extension) or Parquet. Raises DataError when a local `data` does not exist."""
    if "://" not in data and not os.path.exists(data):
        raise DataError(f"DATA: {os.path.abspath(data)}: no such file or folder")
    source = cfg.data.source if cfg.data.source == "images" else ("csv" if data.lower().endswith(".csv") else "parquet")
    return with_overrides(cfg, {"data.source": source, "data.path": data})


def check_inputs(run_dir: str, data: Optional[str], *, epoch: Optional[int] = None) -> None:
    """`predict_run`'s first checks, without Ray, torch or the model (the CLI runs them before
    Ray starts, so bad input is one line in a second): a run directory with a checkpoint and its
    record; DATA that exists; a table's first rows through the run's preprocessing (a missing or
    mistyped column). Raises ConfigError or DataError."""
    from raytrain_kit.api import _encoded_rows, read_run_record
    from raytrain_kit.data.sources import read_head

    cfg, _, spec = read_run_record(run_dir, epoch=epoch)
    if data is None:
        return
    reading = _reading(cfg, data)
    if reading.data.source != "images":  # an image's bytes are read by the actors
        _encoded_rows(read_head(reading, HEAD_ROWS), cfg, spec.preprocessing, tuple(spec.input_shape))


def predict_run(run_dir: str, data: Optional[str], out: str, *, split: str = "val", epoch: Optional[int] = None,
                batch_size: int = 1024, num_workers: int = 2, use_gpu: bool = False,
                log: Callable[[str], None] = lambda line: None) -> dict:
    """Predict `data`'s rows (or the run's own `split`) with the run's model on `num_workers`
    actors (each with a GPU when `use_gpu`) and write them to `out` (a folder of Parquet files; CSV when `out` ends in .csv).
    Returns {"rows", "accuracy", "loss", "scored_rows", "unseen_labels" (rows whose label is none of
    the run's classes: not scored), "num_actors" (that predicted rows), "out", "checkpoint", "source"}.
    Raises ConfigError (no run, checkpoint or record) and DataError (rows the model cannot read)."""
    if not ray.is_initialized():
        from raytrain_kit.cluster import connect

        connect()
    loaded = load_model(run_dir, epoch=epoch)  # here first: a bad run directory fails before any actor starts
    # An actor takes whole blocks, and one file (or a small split) is often one block: a few
    # blocks per actor, or one actor would predict them all.
    num_blocks = TASKS_PER_ACTOR * num_workers
    rows, head, source = _rows(loaded, data, split=split, num_blocks=num_blocks)
    if head is not None:  # a few raw rows through the same transform here: a missing or mistyped column is one line
        loaded.features(head)
    log(f"predict:       {source} with {loaded.checkpoint}, {num_workers} actor(s)")
    # Materialized first: the pool's actors hold every CPU while they wait for rows, and the
    # reads need one too (Ray Data would wait for ever on a cluster the pool fills).
    rows = rows.materialize()
    if rows.num_blocks() < num_blocks:  # a reader that could not split (one small file, the run's own split)
        rows = rows.repartition(num_blocks).materialize()
    # Every actor up before the first rows go out: the first one ready would otherwise take all of
    # a small input while the others still import torch. (The dataset's own copy of the context.)
    rows.context.wait_for_min_actors_s = ACTORS_START_TIMEOUT_S
    encoded = head is None
    predicted = rows.map_batches(_Predictor, fn_constructor_kwargs={"run_dir": run_dir, "epoch": epoch, "encoded": encoded,
                                                                    "batch_size": batch_size, "use_gpu": use_gpu},
                                 batch_size=_rows_per_call(loaded, batch_size, rows_per_block=-(-rows.count() // num_blocks)),
                                 batch_format="numpy" if encoded else "pandas",
                                 concurrency=(num_workers, num_workers), num_cpus=1, num_gpus=1 if use_gpu else 0)
    sink = _PredictionSink(out)
    try:  # one streaming pass: the actors' predictions go to the writers as they come
        predicted.write_datasink(sink, ray_remote_args={"num_cpus": 0})  # writers beside the actors, never after them
    except Exception as e:  # an actor's DataError (a bad image or value further in) arrives wrapped by Ray
        raise _kit_error(e) from None
    sums = {c: sum(t[c] for t in sink.totals) for c in (*_SCORES, "rows")}
    scored = int(sums["_scored"])
    return {"rows": int(sums["rows"]), "scored_rows": scored, "unseen_labels": int(sums["_unseen"]), "out": out,
            "checkpoint": loaded.checkpoint, "source": source, "num_actors": len({a for t in sink.totals for a in t["actors"]}),
            "accuracy": sums["_correct"] / scored if scored and loaded.classes is not None else None,
            "loss": sums["_loss"] / scored if scored else None}


class _PredictionSink(BlockBasedFileDatasink):
    """Ray Data's file writer (one file per write task, Parquet, or CSV when the path ends in
    .csv) that also totals what it writes: each task returns its rows' score sums and the actors
    that predicted them, and `totals` holds every task's after the write (Ray Data hands the
    tasks' returns to `on_write_complete` in the driver). The scoring columns are not written."""

    def __init__(self, path: str):
        super().__init__(path, file_format="csv" if path.lower().endswith(".csv") else "parquet")
        self.totals: list[dict] = []

    def write(self, blocks, ctx) -> dict:
        from ray.data.block import BlockAccessor

        frames = [BlockAccessor.for_block(b).to_pandas() for b in blocks]
        frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        totals = {c: float(frame[c].sum()) if len(frame) else 0.0 for c in _SCORES}
        totals.update(rows=len(frame), actors=sorted(set(frame[_ACTOR].tolist())) if len(frame) else [])
        if len(frame):
            super().write([frame.drop(columns=[*_SCORES, _ACTOR])], ctx)
        return totals

    def write_block_to_file(self, block, file) -> None:
        if self.file_format == "csv":
            import pyarrow.csv as pacsv

            pacsv.write_csv(block.to_arrow(), file)
        else:
            import pyarrow.parquet as pq

            pq.write_table(block.to_arrow(), file)

    def on_write_complete(self, write_result) -> None:
        super().on_write_complete(write_result)
        self.totals = [t for t in write_result.write_returns if t]


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
