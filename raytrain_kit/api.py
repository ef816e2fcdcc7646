"""The Python API: the CLI's commands as functions, for notebooks and scripts.

    import raytrain_kit as rk

    experiment = rk.load_experiment("jobs/digits.yaml", {"train.epochs": 5})
    result = rk.train(experiment)               # a RunResult: run_dir, best_value, metrics, ...
    model = rk.load_model(result.run_dir)       # the summary's checkpoint, with its preprocessing
    model.predict(frame)                        # a DataFrame: prediction, prob_<class>

The same validation and errors as the CLI: each function raises the kit's error classes
(`raytrain_kit.errors`: ConfigError, DataError, PreflightError, RunError), never exits. The
first call that needs Ray starts the one `raytrain-kit train` would (or joins `RAY_ADDRESS`);
later calls in the process reuse it. Exercised by `tests/test_api.py`, which runs the README's
example as written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from raytrain_kit.config import Experiment
from raytrain_kit.errors import ConfigError, DataError

ExperimentLike = Union[Experiment, str, os.PathLike]
Log = Optional[Callable[[str], None]]
PREDICT_BATCH_ROWS = 4096  # rows per forward pass in `LoadedModel.predict`: bounded memory, few calls


def load_experiment(path: Union[str, os.PathLike], overrides: Union[Sequence[str], Mapping[str, Any]] = ()) -> Experiment:
    """A YAML experiment with `overrides` (`{"train.epochs": 5}` or `["train.epochs=5"]`, as
    `--set`), validated; a local data file is checked as `train` checks it before Ray starts.
    Raises ConfigError or DataError."""
    from raytrain_kit import config
    from raytrain_kit.data import check_local_file

    cfg = config.load_experiment(path, overrides)
    check_local_file(cfg)
    return cfg


def _experiment(experiment: ExperimentLike) -> Experiment:
    return experiment if isinstance(experiment, Experiment) else load_experiment(experiment)


@dataclass(frozen=True)
class RunResult:
    """A finished (or failed-and-recorded) run: `summary` is its summary.json."""

    run_dir: str
    status: str
    metric: str
    best_value: Optional[float]
    best_epoch: Optional[int]
    checkpoint: Optional[str]
    summary: dict

    @property
    def metrics(self) -> pd.DataFrame:
        """One row per epoch: every reported metric (as metrics.csv holds them)."""
        return pd.DataFrame(self.summary["history"])


def train(experiment: ExperimentLike, *, resume: bool = False, log: Log = None,
          on_epoch: Optional[Callable[[dict], None]] = None, on_progress: Optional[Callable[[dict], None]] = None
          ) -> RunResult:
    """Train as `raytrain-kit train` does (`--resume` continues the run). `log` receives the
    lines `train` prints before its epochs (data, training plan); default: silent. `on_epoch`
    receives each epoch's metrics (a dict, as metrics.csv's row) as it ends; `on_progress` the
    steps within an epoch (`launch.fit`). Raises KitError subclasses."""
    from raytrain_kit.launch import fit

    summary = fit(_experiment(experiment), resume=resume, log=log or (lambda line: None), on_epoch=on_epoch,
                  on_progress=on_progress)
    return RunResult(run_dir=summary["run_dir"], status=summary["status"], metric=summary["metric"],
                     best_value=summary["best_value"], best_epoch=summary["best_epoch"],
                     checkpoint=summary["checkpoint"], summary=summary)


@dataclass(frozen=True)
class SweepResult:
    """A finished sweep: `trials` is trials.csv (best first); `best_yaml` trains the winner."""

    run_dir: str
    metric: str
    best_value: float
    best_config: dict
    best_yaml: str
    trials: pd.DataFrame
    summary: dict


def tune(experiment: ExperimentLike, *, resume: bool = False, log: Log = None) -> SweepResult:
    """Run the experiment's sweep (its `tune` section) as `raytrain-kit tune` does. Raises
    ConfigError without a tune section, and KitError subclasses."""
    from raytrain_kit.sweep import run_sweep

    cfg = _experiment(experiment)
    if cfg.tune is None:
        raise ConfigError("the experiment has no tune section; add tune.space (see the README's sweep section), "
                          "or call train() for a single run")
    summary = run_sweep(cfg, resume=resume, log=log or (lambda line: None))
    return SweepResult(run_dir=summary["run_dir"], metric=summary["metric"], best_value=summary["best_value"],
                       best_config=summary["best_config"], best_yaml=summary["best_yaml"], trials=summary["table"],
                       summary={k: v for k, v in summary.items() if k != "table"})


def check(experiment: ExperimentLike):
    """The preflight gradient check, as `raytrain-kit check` runs it: a `PreflightReport`
    (`.to_dict()`, `.format_table()`). Raises PreflightError when a check fails."""
    import ray

    from raytrain_kit.cluster import connect
    from raytrain_kit.data import build_datasets
    from raytrain_kit.launch import check_model_builds
    from raytrain_kit.preflight import run_preflight

    cfg = _experiment(experiment)
    if not ray.is_initialized():
        connect()
    datasets, spec = build_datasets(cfg)
    check_model_builds(cfg, spec)
    return run_preflight(cfg, datasets["train"], spec)


def export(run_dir: str, out: str, *, epoch: Optional[int] = None) -> str:
    """`raytrain-kit export`: the checkpoint's model as a plain state_dict at `out`, and its data
    record beside it. Returns the checkpoint used. Raises ConfigError or RunError."""
    from raytrain_kit.launch import export_run

    return export_run(run_dir, out, epoch=epoch)[0]


@dataclass(frozen=True)
class PredictionResult:
    """What `predict` wrote and how its rows scored."""

    out: str  # the folder of part files written (Parquet, or CSV when it ends in .csv)
    rows: int
    num_actors: int  # actors that predicted rows
    checkpoint: str
    source: str  # where the rows came from
    scored_rows: int  # rows with a label of the run's classes (or a finite value, for regression)
    accuracy: Optional[float]  # over the scored rows; None for regression or without labels
    loss: Optional[float]  # mean cross-entropy (squared error for regression) over the scored rows
    unseen_labels: int  # rows whose label is none of the run's classes: not scored


def predict(run_dir: str, data: Optional[str] = None, out: Optional[str] = None, *, split: str = "val",
            epoch: Optional[int] = None, batch_size: int = 1024, num_workers: int = 2, use_gpu: bool = False,
            log: Log = None) -> PredictionResult:
    """`raytrain-kit predict`: the run's model over `data` (a file, folder or URI; None: the run's
    own `split`) as Ray Data batch inference on `num_workers` actors (one GPU each when `use_gpu`),
    written to the folder `out` (`inference.predict_run`); `log` receives the line `predict` prints
    before it starts. For a DataFrame in memory, use `load_model(run_dir).predict(frame)`. Raises
    ConfigError or DataError."""
    from raytrain_kit.inference import predict_run

    if not out:
        raise ConfigError("out: give the folder to write the predictions to")
    result = predict_run(run_dir, data, out, split=split, epoch=epoch, batch_size=batch_size, num_workers=num_workers,
                         use_gpu=use_gpu, log=log or (lambda line: None))
    return PredictionResult(**result)


# ---------------------------------------------------------------------------------------------
# A trained model with its preprocessing


@dataclass
class LoadedModel:
    """A run's model (CPU, eval mode) with the data spec and fitted preprocessing it was trained
    with: `features(frame)` builds its inputs from raw rows exactly as training did; `predict`."""

    model: Any  # torch.nn.Module
    experiment: Experiment
    spec: Any  # raytrain_kit.data.DataSpec
    checkpoint: str

    @property
    def classes(self) -> Optional[list]:
        """Class names in index order (classification), else None."""
        if self.experiment.data.task != "classification":
            return None
        return list(self.spec.classes) or list(range(self.spec.num_outputs))

    def features(self, frame: pd.DataFrame):
        """Model inputs float32 [N, *input_shape] from raw rows holding the training features
        (a label column may be there; it is ignored). Raises DataError naming a missing column, a
        column of the wrong type, an image that cannot be read or an array of another shape."""
        import torch

        prep = self.spec.preprocessing
        x = _encoded_rows(frame, self.experiment, prep, tuple(self.spec.input_shape))
        return torch.from_numpy(x).view(-1, *self.spec.input_shape)

    def predict(self, frame: pd.DataFrame, *, batch_rows: int = PREDICT_BATCH_ROWS) -> pd.DataFrame:
        """One row per input row (same index): `prediction` (the class name, or the value for
        regression) and, for classification, `prob_<class>` per class; forward passes of at most
        `batch_rows` rows. Raises DataError."""
        return self.predict_inputs(self.features(frame), index=frame.index, batch_rows=batch_rows)

    def predict_inputs(self, x, *, index=None, batch_rows: int = PREDICT_BATCH_ROWS) -> pd.DataFrame:
        """`predict` for inputs already built (`features`, or a run's encoded rows): float32
        [N, *input_shape] or (N, num_features), a tensor or an array; forward passes of at most
        `batch_rows` rows."""
        import torch

        x = torch.as_tensor(np.asarray(x, dtype=np.float32)).view(-1, *self.spec.input_shape)
        device = next(self.model.parameters()).device  # the CPU, or a predict actor's GPU
        with torch.no_grad():
            outputs = torch.cat([self.model(x[i:i + batch_rows].to(device)).cpu() for i in range(0, len(x), batch_rows)]) \
                if len(x) else torch.zeros((0, self.spec.num_outputs))
        classes = self.classes
        if classes is None:
            return pd.DataFrame({"prediction": outputs[:, 0].double().numpy()}, index=index)
        probs = torch.softmax(outputs.double(), dim=1).numpy()
        out = pd.DataFrame({"prediction": np.asarray(classes, dtype=object)[probs.argmax(axis=1)]}, index=index)
        for j, name in enumerate(classes):
            out[f"prob_{name}"] = probs[:, j]
        return out


def read_run_record(run_dir: str, *, epoch: Optional[int] = None) -> tuple[Experiment, str, Any]:
    """(the run's experiment, the checkpoint `load_model` would use, its DataSpec with the
    fitted preprocessing), read without torch or Ray. Raises ConfigError (no run, checkpoint or
    record there)."""
    import yaml

    from raytrain_kit import checkpoint as ckpt
    from raytrain_kit.config import build_experiment
    from raytrain_kit.data import spec_from_dict
    from raytrain_kit.kept import checkpoint_record, chosen_checkpoint
    from raytrain_kit.storage import path_exists, read_run_file

    run_dir = run_dir.rstrip("/")
    if not path_exists(f"{run_dir}/config.yaml"):
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml); give one as `train` printed it")
    cfg = build_experiment(yaml.safe_load(read_run_file(run_dir, "config.yaml")))
    checkpoint = chosen_checkpoint(run_dir, epoch=epoch)
    record = checkpoint_record(checkpoint, ckpt.DATA_FILE)
    if not record or not record.get("preprocessing"):
        raise ConfigError(f"{checkpoint}: no fitted preprocessing (data.json) in this checkpoint; it was written by an "
                          "older raytrain-kit: train the run again (or --resume it one epoch) to record it")
    return cfg, checkpoint, spec_from_dict(record)


def load_model(run_dir: str, *, epoch: Optional[int] = None) -> LoadedModel:
    """The model of a run's checkpoint (the summary's: the best saved epoch's; or `epoch`'s),
    sharded checkpoints reassembled, with the config and fitted preprocessing it was trained
    with. Raises ConfigError (no run or checkpoint there) or RunError (unreadable)."""
    from raytrain_kit.kept import read_model_state
    from raytrain_kit.models import build_model

    cfg, checkpoint, spec = read_run_record(run_dir, epoch=epoch)
    model = build_model(cfg, spec)
    model.load_state_dict(read_model_state(checkpoint))  # strict: the checkpoint is this model's
    model.eval()
    return LoadedModel(model=model, experiment=cfg, spec=spec, checkpoint=checkpoint)


def _encoded_rows(frame: pd.DataFrame, cfg: Experiment, prep: dict, input_shape: tuple) -> np.ndarray:
    """Raw rows -> the model's input rows (float32 (N, num_features)), by the run's record."""
    from raytrain_kit.data.encode import encode_features
    from raytrain_kit.data.images import decode_images, pack_arrays
    from raytrain_kit.data.stats import _as_text

    d = cfg.data
    if d.source == "images":
        _require(frame, [d.image_column])
        decoded = decode_images(pd.DataFrame({"path": frame[d.image_column].astype(str).to_numpy(), "label": 0.0}),
                                shape=input_shape, label_is_text=False)
        _raise_bad(decoded["bad"], what=f"column {d.image_column!r}:")
        return encode_features(decoded, prep=prep)
    if prep.get("array"):
        column = prep["array"]["name"]
        _require(frame, [column])
        packed = pack_arrays(frame, column=column, shape=tuple(prep["array"]["shape"]), label=None, label_is_text=False)
        _raise_bad(packed["bad"], what=f"column {column!r}: a row holds an array of another shape than the model's "
                                        f"{prep['array']['shape']}:")
        return encode_features(packed, prep=prep)
    names = [c["name"] for c in prep["categorical"]]
    _require(frame, [*prep["numeric"], *names])
    wrong = [c for c in prep["numeric"] if not (pd.api.types.is_numeric_dtype(frame[c]) or frame[c].isna().all())]
    if wrong:
        raise DataError(f"column(s) {', '.join(map(repr, wrong))} hold text where the model was trained on numbers; "
                        "pass the columns as the training data had them")
    x = frame[prep["numeric"]].to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isnan(x).any() and prep["impute_numeric"] is None:
        column = prep["numeric"][int(np.argwhere(np.isnan(x))[0][1])]
        raise DataError(f"column {column!r} has missing values, and the run was trained with data.missing: "
                        f"{d.missing} (nothing to fill them with); fill or drop those rows")
    return encode_features({"x": x, **{f"c{i}": _as_text(frame[c]) for i, c in enumerate(names)}}, prep=prep)


def _require(frame: pd.DataFrame, columns: list[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        shown = ", ".join(map(repr, columns[:8])) + (f", ... ({len(columns)} columns)" if len(columns) > 8 else "")
        raise DataError(f"column(s) {', '.join(map(repr, missing))} missing from the rows to predict; the model "
                        f"reads {shown}")


def _raise_bad(bad: np.ndarray, *, what: str) -> None:
    reasons = [r for r in bad if r]
    if reasons:
        more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
        raise DataError(f"{what} {reasons[0]}{more}")
