"""The experiment: one frozen pydantic model per concern, loaded from YAML with overrides.

Owns the public config interface (key names, defaults, allowed values), the single override
function shared by `--set` and Tune trials (`with_overrides`), error messages that name the
field and suggest the nearest valid key, and the README's generated config reference.
Exercised by `raytrain-kit validate jobs/digits.yaml --set optim.lr=3e-4`.
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raytrain_kit.errors import ConfigError, short_message


class _Section(BaseModel):
    # Field docstrings become descriptions, which the README reference is generated from.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class DataConfig(_Section):
    source: Literal["digits", "csv", "parquet", "images", "synthetic"] = "digits"
    """Where rows come from: scikit-learn's 8x8 digits, a CSV or Parquet file/folder, image files, or seeded synthetic data."""
    path: Optional[str] = None
    """csv/parquet: file or folder; images: a folder with one sub-folder of images per class (named after it), or a CSV/Parquet manifest of paths and labels. A local path or any URI pyarrow reads (s3://, gs://, hdfs://)."""
    image_column: str = "path"
    """images, manifest: the column of image paths (relative to the manifest's folder, absolute, or URIs)."""
    image_size: Optional[list[int]] = None
    """images: [H, W] every image is resized to (bilinear); omitted means the first image's size."""
    channels: Literal[1, 3] = 3
    """images: 1 (grayscale) or 3 (RGB) channels; the model reads [channels, H, W], scaled to [0, 1] and normalized per channel with the training split's mean and standard deviation."""
    on_bad_file: Literal["error", "skip"] = "error"
    """images: a file that cannot be decoded is an error naming it, or is skipped (the number skipped and the first is printed)."""
    features: Optional[list[str]] = None
    """Feature columns, in order; omitted means every column except the label."""
    label: str = "label"
    """Label column. Classification: class indices 0..k-1 are used as they are; any other labels (names such as 'setosa', or numbers such as {1, 2} or {-1, 1}) are classes numbered in sorted order by an encoder fitted on the training split, and their names are kept in the run. Regression: a number."""
    task: Literal["classification", "regression"] = "classification"
    """Cross-entropy with accuracy, or mean squared error."""
    num_classes: Optional[int] = Field(default=None, ge=0)
    """Classes. Files, omitted: labels that are exactly 0..k-1 are class indices as they are, any others are classes numbered in sorted order. Files, given: integer labels are class indices as they are, each in [0, num_classes) (a class may be absent). Synthetic: default 2 for classification, 0 (a continuous target) for regression."""
    val_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    """Fraction of rows held out for validation by a seeded split (seed: train.seed)."""
    num_rows: int = Field(default=10_000, ge=10)
    """Synthetic only: number of rows; make it large for benchmarks."""
    num_features: int = Field(default=20, ge=1)
    """Synthetic only: number of features."""
    noise: float = Field(default=0.1, ge=0.0)
    """Synthetic only: standard deviation of the noise added to the target's logits or values."""
    input_shape: Optional[list[int]] = None
    """Per-sample shape the feature vector is reshaped to: [C, H, W] for cnn, [T, F] or [C, H, W] for rnn. Digits: [1, 8, 8]."""
    standardize: bool = True
    """Scale each feature to zero mean and unit variance with statistics of the training split."""
    shuffle: bool = True
    """Reshuffle each worker's training shard every epoch (seeded by train.seed and the epoch)."""
    categorical: Optional[list[str]] = None
    """Feature columns to one-hot encode; omitted means every string column. List integer or boolean columns (codes, ids) here to encode them too."""
    max_categories: int = Field(default=20, ge=1)
    """Categorical columns: one indicator feature for each of the most frequent values in the training split, up to this many (ties: the smaller value first)."""
    other_category: bool = True
    """Categorical columns: one more indicator, '<other>', for the values beyond max_categories and those the training split lacks. False: a column with more training values than max_categories is an error, and an unseen value encodes as all zeros."""
    missing: Literal["error", "drop", "impute"] = "error"
    """Missing values (empty, NA, NaN) in features: an error naming each column; drop the rows that hold any; or impute them from the training split (numeric: the mean; categorical: the most frequent value). A missing label is an error unless rows are dropped."""
    in_memory: bool = True
    """Materialize the prepared data once and keep each worker's shard in its memory; turn off for shards larger than a worker's memory (then every epoch streams from Ray Data)."""


class ModelConfig(_Section):
    kind: Literal["mlp", "cnn", "rnn", "custom"] = "mlp"
    """Architecture: multilayer perceptron, small conv net for [C, H, W] input, LSTM/GRU over a sequence (an image row by row), or your own."""
    hidden: list[int] = Field(default_factory=lambda: [128])
    """mlp: hidden layer widths; cnn: widths of the fully connected head after the convolutions."""
    channels: list[int] = Field(default_factory=lambda: [32, 64])
    """cnn: output channels of each conv block (conv, activation, 2x2 max-pool while the image is at least 2x2)."""
    kernel_size: int = Field(default=3, ge=1)
    """cnn: convolution kernel size (odd sizes keep the spatial shape)."""
    activation: Literal["relu", "gelu", "tanh", "silu", "leaky_relu"] = "relu"
    """Nonlinearity between layers (also the gain used by kaiming initialization)."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout probability after each hidden layer (and between stacked RNN layers)."""
    cell: Literal["lstm", "gru"] = "lstm"
    """rnn: recurrent cell."""
    hidden_size: int = Field(default=64, ge=1)
    """rnn: hidden state size per direction."""
    num_layers: int = Field(default=1, ge=1)
    """rnn: stacked recurrent layers."""
    bidirectional: bool = False
    """rnn: read the sequence in both directions."""
    target: Optional[str] = None
    """custom: 'package.module:callable' called as callable(data_spec, **kwargs), returning an nn.Module."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """custom: keyword arguments passed to the target."""
    sync_batchnorm: bool = False
    """Convert BatchNorm layers to torch.nn.SyncBatchNorm: training batch statistics over all workers' samples, not each worker's own (GPUs only: torch implements it for CUDA). Either way every worker evaluates rank 0's running statistics, the checkpoint's."""


InitScheme = Literal[
    "default", "zeros", "normal", "truncated_normal", "xavier_uniform", "xavier_normal",
    "kaiming_uniform", "kaiming_normal", "orthogonal",
]


class InitConfig(_Section):
    scheme: InitScheme = "default"
    """Weight initialization of linear, conv and recurrent weights; 'default' keeps PyTorch's own."""
    std: float = Field(default=0.02, gt=0.0)
    """normal / truncated_normal: standard deviation (truncated at +-2 std)."""
    gain: float = Field(default=1.0, gt=0.0)
    """xavier_* and orthogonal: scale factor."""
    bias: Optional[float] = None
    """Constant every bias starts at; omitted means 0 for every scheme but 'default' (which keeps PyTorch's biases)."""


class OptimConfig(_Section):
    name: Literal["sgd", "adagrad", "rmsprop", "adam", "adamw"] = "adam"
    """Optimizer."""
    lr: float = Field(default=1e-3, gt=0.0)
    """Peak learning rate (the schedule scales it)."""
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0)
    """sgd and rmsprop: momentum."""
    nesterov: bool = False
    """sgd: Nesterov momentum (needs momentum > 0)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """adam / adamw: coefficients of the running averages of the gradient and its square."""
    eps: float = Field(default=1e-8, gt=0.0)
    """adagrad, rmsprop, adam, adamw: term added to the denominator for numerical stability."""
    alpha: float = Field(default=0.99, gt=0.0, lt=1.0)
    """rmsprop: smoothing constant of the squared-gradient average."""

    @model_validator(mode="after")
    def _check(self) -> "OptimConfig":
        if self.nesterov and (self.name != "sgd" or self.momentum <= 0):
            raise ValueError("nesterov needs name: sgd and momentum > 0; set optim.nesterov: false or raise optim.momentum")
        for b in self.betas:
            if not 0.0 <= b < 1.0:
                raise ValueError(f"betas must lie in [0, 1), got {list(self.betas)}")
        return self


class ScheduleConfig(_Section):
    kind: Literal["constant", "exponential", "step", "cosine", "plateau"] = "constant"
    """Learning-rate schedule, a function of the optimizer step (plateau: of the validation metric per epoch)."""
    warmup_steps: int = Field(default=0, ge=0)
    """Linear warmup: lr * (step + 1) / warmup_steps for the first steps; the schedule starts after it."""
    decay_steps: int = Field(default=1000, ge=1)
    """exponential: steps over which the lr is multiplied by decay_rate once."""
    decay_rate: float = Field(default=0.96, gt=0.0)
    """exponential: lr * decay_rate ** (step / decay_steps), as Keras' ExponentialDecay."""
    staircase: bool = False
    """exponential: decay in whole steps, lr * decay_rate ** floor(step / decay_steps)."""
    step_size: int = Field(default=1000, ge=1)
    """step: steps between multiplications by gamma."""
    gamma: float = Field(default=0.1, gt=0.0)
    """step: factor applied every step_size steps."""
    min_lr: float = Field(default=0.0, ge=0.0)
    """Floor of the decayed lr; cosine ends exactly here."""
    patience: int = Field(default=2, ge=0)
    """plateau: epochs without improvement of train.metric before the lr is reduced."""
    factor: float = Field(default=0.5, gt=0.0, lt=1.0)
    """plateau: factor the lr is multiplied by on a plateau."""


class RegularizationConfig(_Section):
    l1: float = Field(default=0.0, ge=0.0)
    """L1 penalty l1 * sum|w| on weights (not biases or normalization layers), added to the loss."""
    l2: float = Field(default=0.0, ge=0.0)
    """L2 penalty l2 * sum w^2 on weights (not biases or normalization layers), added to the loss."""
    weight_decay: float = Field(default=0.0, ge=0.0)
    """Decoupled weight decay w -= lr * weight_decay * w on weights, for every optimizer (AdamW's own for adamw)."""
    grad_clip_norm: Optional[float] = Field(default=None, gt=0.0)
    """Clip the global gradient norm to this value before each step."""


class TrainConfig(_Section):
    epochs: int = Field(default=10, ge=1)
    """Passes over the training data."""
    batch_size: int = Field(default=64, ge=1)
    """Samples per worker per forward pass; an optimizer step's global batch is batch_size * train.grad_accum_steps * scaling.num_workers."""
    seed: int = 0
    """Seeds the split, initialization, shuffling and dropout: same seed and worker count, same metrics."""
    eval_every: int = Field(default=1, ge=1)
    """Evaluate on the validation split every this many epochs (and on the last and checkpoint epochs)."""
    metric: Optional[Literal["val_loss", "val_accuracy", "train_loss"]] = None
    """Metric that ranks checkpoints and drives plateau; default val_accuracy for classification, val_loss for regression."""
    mode: Optional[Literal["min", "max"]] = None
    """Whether the metric is minimized or maximized; default follows the metric (max for accuracy)."""
    on_nonfinite: Literal["stop", "skip", "rollback"] = "stop"
    """A step with NaN/inf loss or gradients is never applied. stop: end the run (the latest good checkpoint is the result); skip: drop the step and go on; rollback: restore the latest checkpoint and lower the lr."""
    max_skipped_steps: int = Field(default=10, ge=0)
    """skip / rollback: non-finite steps (or rollbacks) tolerated before the run stops."""
    rollback_lr_factor: float = Field(default=0.5, gt=0.0, lt=1.0)
    """rollback: factor the lr (and the schedule's base) is multiplied by at each rollback."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Arithmetic of forward and backward: fp32; bf16 autocast (CPU and GPU; under fsdp/hsdp parameters are gathered in bf16, gradients reduced in fp32); fp16 with a gradient scaler (GPU only). Weights and optimizer state stay fp32."""
    grad_accum_steps: int = Field(default=1, ge=1)
    """Micro-batches of batch_size accumulated into each optimizer step; gradients are synchronised only on the last one. Schedules count optimizer steps."""
    activation_checkpointing: bool = False
    """Keep only each block's input in the forward pass and recompute the rest in the backward (torch.utils.checkpoint, non-reentrant): less activation memory for about one more forward per step, the same losses. Blocks: mlp and cnn, each Linear/Conv2d layer with the layers after it that hold no parameters (activation, dropout, pooling); rnn, the recurrent layer and the head; custom models, the modules named in scaling.fsdp_blocks (required)."""


class ScalingConfig(_Section):
    num_workers: int = Field(default=1, ge=1)
    """Data-parallel training workers (processes)."""
    strategy: Literal["ddp", "fsdp", "hsdp"] = "ddp"
    """ddp: every worker holds the whole model; fsdp: parameters, gradients and optimizer state sharded across all workers (FSDP2); hsdp: sharded within groups of shard_group_size workers, replicated across groups (keeps the heavy traffic inside a node)."""
    shard_group_size: Optional[int] = Field(default=None, ge=1)
    """hsdp: workers per shard group (typically the workers of one node); must divide num_workers."""
    fsdp_blocks: Optional[list[str]] = None
    """fsdp/hsdp: class names of the modules sharded as one unit each (gathered just before use, freed after); with train.activation_checkpointing, also the modules recomputed as one unit each. Default: Linear, Conv2d and recurrent layers for mlp/cnn/rnn; for custom models only the whole model unless given."""
    meta_init: bool = True
    """fsdp/hsdp: build the model on PyTorch's meta device (shapes only), shard it, then create each worker's shards one module at a time, with the values one process builds from train.seed (bit for bit): a worker holds its shards and one module's full weights at a time instead of the whole model (a saving that grows with the number of blocks: none when one layer is most of the model). false: every worker builds the whole model first and then shards it. A custom model that cannot be built this way falls back with a warning."""
    use_gpu: bool = False
    """One GPU per worker (NCCL); otherwise CPU with gloo."""
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    """CPUs each worker reserves; fractions allowed."""
    max_failures: int = Field(default=2, ge=-1)
    """Worker-group restarts after a worker or node dies (-1: no limit); each restart resumes from the latest checkpoint."""

    @property
    def single_process(self) -> bool:
        """One ddp worker: no process group needed, so a sweep trial trains in its own process
        instead of a Ray Train run (launch.runs_in_process)."""
        return self.num_workers == 1 and self.strategy == "ddp"


class CheckpointConfig(_Section):
    every_epochs: int = Field(default=1, ge=1)
    """Save a checkpoint every this many epochs; the last epoch is always saved."""
    keep: int = Field(default=2, ge=1)
    """Checkpoints kept: the best this many by train.metric, and always the latest (where --resume continues); summary.json points at the best."""


class RunConfig(_Section):
    name: Optional[str] = None
    """Run directory name under storage_path; default the config file's name. --resume continues it."""
    storage_path: str = "runs"
    """Where runs are written: a local directory (relative to the current directory) or a URI (s3://, gs://)."""


class TrackingConfig(_Section):
    tensorboard: bool = True
    """Write TensorBoard event files under the run's `tensorboard/` folder: every reported metric per epoch, and the histograms below."""
    histogram_every: int = Field(default=5, ge=0)
    """Every this many epochs (and at the last), histograms of each layer's weights and the norm of its gradient at the epoch's last step; 0: never."""
    mlflow_uri: Optional[str] = None
    """MLflow tracking URI (a local `file:` store or a server); when set, each run logs its config, its metrics per epoch and its best checkpoint there, and each sweep trial is a child run. Needs `pip install 'raytrain-kit[mlflow]'`."""
    mlflow_experiment: str = "raytrain-kit"
    """MLflow experiment the runs are logged under."""


class PreflightConfig(_Section):
    enabled: bool = True
    """Check the model's gradients numerically (float64, one small batch) before any training worker starts."""
    batch_size: int = Field(default=8, ge=1)
    """Rows of the training data the check runs on."""
    num_directions: int = Field(default=4, ge=1)
    """Random directions in parameter space compared with finite differences."""
    rtol: float = Field(default=1e-5, gt=0.0)
    """Relative tolerance between the autograd and the finite-difference directional derivatives."""
    fail_on: Literal["error", "warning"] = "error"
    """Stop the launch on errors only, or on warnings too (all-zero or unused gradients)."""


# Sections a sweep may not search: every trial shares one prepared data set and one resource
# shape (so trials can be packed onto the cluster), and run/preflight/tune describe the sweep itself.
UNSEARCHABLE = {
    "data": "every trial shares the data prepared once by the sweep driver",
    "scaling": "every trial needs the same resources so the sweep can pack them onto the cluster",
    "run": "the sweep names and places each trial's run itself",
    "preflight": "the gradient check runs once, before the sweep",
    "tune": "a sweep cannot search its own settings",
    "tracking": "records are set for the whole sweep",
}


class SearchDomain(BaseModel):
    """One searched value: exactly one of the keys, e.g. `{loguniform: [1.0e-4, 1.0e-1]}`."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    loguniform: Optional[tuple[float, float]] = None
    """[lower, upper], both > 0: sampled uniformly in log space (plots use a log axis)."""
    uniform: Optional[tuple[float, float]] = None
    """[lower, upper]: sampled uniformly."""
    quniform: Optional[tuple[float, float, float]] = None
    """[lower, upper, q]: sampled uniformly, rounded to a multiple of q."""
    randint: Optional[tuple[int, int]] = None
    """[lower, upper): an integer."""
    choice: Optional[list[Any]] = None
    """One of the listed values, picked at random (or by the search algorithm)."""
    grid: Optional[list[Any]] = None
    """Every listed value, each in its own trial(s) (search: random or grid)."""

    @model_validator(mode="after")
    def _check(self) -> "SearchDomain":
        given = [k for k in SearchDomain.model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            kinds = ", ".join(SearchDomain.model_fields)
            raise ValueError(f"give exactly one of {kinds}; got {', '.join(given) or 'none'}")
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("choice", "grid") and not value:
            raise ValueError(f"{kind}: the list is empty; give at least one value")
        if kind in ("loguniform", "uniform", "quniform", "randint"):
            lower, upper = value[0], value[1]
            if lower >= upper:
                raise ValueError(f"{kind}: lower {lower} must be below upper {upper}")
            if kind == "loguniform" and lower <= 0:
                raise ValueError(f"loguniform: lower {lower} must be > 0 (log scale)")
            if kind == "quniform" and value[2] <= 0:
                raise ValueError(f"quniform: q {value[2]} must be > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in SearchDomain.model_fields if getattr(self, k) is not None)

    @property
    def args(self) -> Any:
        return getattr(self, self.kind)

    def candidates(self) -> list[Any]:
        """Values that must all make a valid experiment: the bounds, or every listed value."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return [self.args[0], self.args[1]]


class TuneConfig(_Section):
    space: dict[str, SearchDomain] = Field(default_factory=dict)
    """Searched values keyed by dotted config path, e.g. `optim.lr: {loguniform: [1.0e-4, 1.0e-1]}`; kinds: loguniform, uniform, quniform, randint, choice, grid."""
    search: Literal["random", "grid", "optuna"] = "random"
    """random sampling (grid entries are crossed with the samples), grid (every combination of grid/choice values), or optuna (TPE through Ray's OptunaSearch)."""
    num_samples: int = Field(default=8, ge=1)
    """Trials sampled (random, optuna); for grid, how many times the whole grid is repeated."""
    max_concurrent_trials: Optional[int] = Field(default=None, ge=1)
    """Trials running at once; default: as many as the cluster's CPUs/GPUs fit, from scaling (and cv_folds)."""
    scheduler: Literal["fifo", "asha", "pbt"] = "fifo"
    """fifo: every trial runs all epochs; asha: successive halving stops weak trials early; pbt: population based training perturbs lr and regularization."""
    metric: Optional[Literal["val_loss", "val_accuracy", "train_loss", "train_accuracy"]] = None
    """Metric the search and scheduler optimize (the mean over folds with cv_folds); default train.metric's default."""
    mode: Optional[Literal["min", "max"]] = None
    """Whether the metric is minimized or maximized; default follows the metric."""
    grace_period: int = Field(default=1, ge=1)
    """asha: epochs every trial runs before it can be stopped."""
    reduction_factor: float = Field(default=3.0, gt=1.0)
    """asha: 1/reduction_factor of the trials go on at each rung."""
    max_epochs: Optional[int] = Field(default=None, ge=1)
    """asha: the most epochs a trial runs (default train.epochs)."""
    perturbation_interval: int = Field(default=2, ge=1)
    """pbt: epochs between exploit/explore steps (a multiple of checkpoint.every_epochs)."""
    cv_folds: Optional[int] = Field(default=None, ge=2)
    """k-fold cross-validation: each trial trains k folds of the training split (stratified for classification) and reports the mean and std of the validation metric."""
    seed: int = 0
    """Seeds the sampling of trials (random, optuna), so the same config gives the same trials."""


class Experiment(_Section):
    """A complete experiment; every section has defaults, so a YAML file names only what differs."""

    data: DataConfig = Field(default_factory=DataConfig)
    """Data source, columns, split and input pipeline."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Network architecture."""
    init: InitConfig = Field(default_factory=InitConfig)
    """Weight initialization."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer."""
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    regularization: RegularizationConfig = Field(default_factory=RegularizationConfig)
    """Penalties, decay and clipping."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Training loop."""
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    """Workers and resources."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpoint cadence and retention."""
    run: RunConfig = Field(default_factory=RunConfig)
    """Run name and storage."""
    preflight: PreflightConfig = Field(default_factory=PreflightConfig)
    """Numerical gradient check before training."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Run records beyond metrics.csv: TensorBoard and MLflow."""
    tune: Optional[TuneConfig] = None
    """Sweep (`raytrain-kit tune`): search space, search algorithm, scheduler, cross-validation; ignored by train."""

    @model_validator(mode="after")
    def _check_combinations(self) -> "Experiment":
        problems = []
        d, m = self.data, self.model
        if d.source in ("csv", "parquet", "images") and not d.path:
            problems.append(f"data.path: required for source {d.source!r}; give a file, folder or URI")
        if d.source == "synthetic" and d.num_classes == 0 and d.task != "regression":
            problems.append("data.num_classes: 0 makes a regression target; also set data.task: regression")
        if d.source == "synthetic" and d.task == "regression" and d.num_classes not in (None, 0):
            problems.append(f"data.num_classes: {d.num_classes} classes with data.task: regression; use 0 or task: classification")
        if d.source == "digits" and d.task != "classification":
            problems.append("data.task: digits is a classification data set")
        if d.features and d.label in d.features:
            problems.append(f"data.features: names the label column {d.label!r}; a model must not read its own label")
        if d.features and len(set(d.features)) != len(d.features):
            twice = sorted({f for f in d.features if d.features.count(f) > 1})
            problems.append(f"data.features: lists {', '.join(map(repr, twice))} more than once")
        if m.kind == "custom" and not m.target:
            problems.append("model.target: required for kind 'custom', as 'package.module:callable'")
        if m.target and m.kind != "custom":
            problems.append(f"model.target: only used with kind 'custom' (kind is {m.kind!r})")
        if m.target and (m.target.count(":") != 1 or not all(m.target.split(":"))):
            problems.append(f"model.target: {m.target!r} is not 'package.module:callable'")
        if d.input_shape is not None:
            if any(s < 1 for s in d.input_shape):
                problems.append(f"data.input_shape: {d.input_shape} has a non-positive size")
            if m.kind == "cnn" and len(d.input_shape) != 3:
                problems.append(f"data.input_shape: cnn needs [C, H, W], got {d.input_shape}")
            if m.kind == "rnn" and len(d.input_shape) not in (2, 3):
                problems.append(f"data.input_shape: rnn needs [T, F] or [C, H, W], got {d.input_shape}")
        elif m.kind == "cnn" and d.source in ("csv", "synthetic"):  # images and Parquet array columns carry theirs
            problems.append("data.input_shape: cnn needs an image shape [C, H, W] for the feature vector")
        if d.image_size is not None and (len(d.image_size) != 2 or min(d.image_size) < 1):
            problems.append(f"data.image_size: {d.image_size} is not [H, W] with positive sizes")
        if self.schedule.kind == "plateau" and self.schedule.warmup_steps:
            problems.append("schedule.warmup_steps: not supported with kind 'plateau'; set it to 0 or pick another kind")
        problems += _scaling_problems(self)
        if d.task == "regression" and self.train.metric == "val_accuracy":
            problems.append("train.metric: val_accuracy needs data.task: classification; use val_loss")
        if self.tune is not None:
            problems += _tune_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # Derived, not configured: defaults that follow from other settings.
    @property
    def metric(self) -> str:
        if self.train.metric:
            return self.train.metric
        return "val_accuracy" if self.data.task == "classification" else "val_loss"

    @property
    def mode(self) -> str:
        if self.train.mode:
            return self.train.mode
        return "max" if self.metric == "val_accuracy" else "min"

    @property
    def input_shape(self) -> Optional[list[int]]:
        if self.data.input_shape is not None:
            return list(self.data.input_shape)
        if self.data.source == "images" and self.data.image_size:
            return [self.data.channels, *self.data.image_size]
        return [1, 8, 8] if self.data.source == "digits" else None


SECTIONS = {name: f.annotation for name, f in Experiment.model_fields.items()}
SECTIONS["tune"] = TuneConfig  # Optional[TuneConfig]: a sweep is opt-in


def _unknown_path(dotted: str) -> Optional[str]:
    """Why a dotted key names no config value (with the nearest valid key), or None if it does."""
    model: Any = Experiment
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = SECTIONS if model is Experiment else model.model_fields
        if part not in fields:
            where = ".".join(parts[:i])
            valid = [f"{where}.{k}" if where else k for k in fields]
            close = difflib.get_close_matches(".".join(parts[: i + 1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            return f"unknown key{hint}"
        model = SECTIONS[part] if model is Experiment else model.model_fields[part].annotation
        if get_origin(model) is dict:  # model.kwargs.<anything>
            return None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None if i == len(parts) - 1 else f"{'.'.join(parts[: i + 1])} is a value, not a section"
    return f"{dotted} is a section; name one of its keys"


def _is_integer_field(dotted: str) -> bool:
    """Whether a (known) dotted key holds an int, e.g. train.batch_size, model.hidden_size."""
    model: Any = Experiment
    for part in dotted.split("."):
        fields = SECTIONS if model is Experiment else getattr(model, "model_fields", {})
        if part not in fields:
            return False
        model = SECTIONS[part] if model is Experiment else fields[part].annotation
    if get_origin(model) is not Union and model is not int:  # list[int] is a list, not an integer
        return False
    args = [a for a in get_args(model) if a is not type(None)] or [model]  # Optional[int] -> int
    return all(a is int for a in args)


def _scaling_problems(cfg: "Experiment") -> list[str]:
    s, t = cfg.scaling, cfg.train
    problems = []
    if s.strategy == "hsdp":
        if s.shard_group_size is None:
            problems.append("scaling.shard_group_size: required for strategy hsdp (workers per shard group, "
                            "e.g. the workers of one node)")
        elif s.num_workers % s.shard_group_size:
            problems.append(f"scaling.shard_group_size: {s.shard_group_size} does not divide scaling.num_workers "
                            f"({s.num_workers}); hsdp needs equal shard groups")
    elif s.shard_group_size is not None:
        problems.append(f"scaling.shard_group_size: only used with strategy hsdp (strategy is {s.strategy!r})")
    if s.fsdp_blocks is not None and s.strategy == "ddp" and not t.activation_checkpointing:
        problems.append("scaling.fsdp_blocks: only used with strategy fsdp or hsdp, or with "
                        "train.activation_checkpointing (strategy is 'ddp')")
    if t.activation_checkpointing and cfg.model.kind == "custom" and s.fsdp_blocks is None:
        problems.append("train.activation_checkpointing: a custom model's blocks are not known; name their "
                        "classes in scaling.fsdp_blocks (e.g. [TransformerBlock])")
    if cfg.model.sync_batchnorm and not s.use_gpu:
        problems.append("model.sync_batchnorm: torch's SyncBatchNorm runs on GPUs only (scaling.use_gpu: true); "
                        "on CPU leave it false (every worker still evaluates the checkpoint's statistics)")
    if t.precision == "fp16" and not s.use_gpu:
        problems.append("train.precision: fp16 needs GPUs (scaling.use_gpu: true); on CPU use bf16 or fp32")
    if s.strategy != "ddp" and t.on_nonfinite == "rollback":
        problems.append(f"train.on_nonfinite: rollback keeps a copy of the whole model in memory, which strategy "
                        f"{s.strategy} exists to avoid; use stop or skip")
    return problems


def _tune_problems(cfg: "Experiment") -> list[str]:
    """Sweep settings that would fail after trials started: caught at load time instead."""
    t = cfg.tune
    problems = []
    if not t.space:
        problems.append("tune.space: empty; name at least one dotted key to search, e.g. optim.lr: {loguniform: [1.0e-4, 1.0e-1]}")
    base = cfg.model_dump(mode="json")
    base.pop("tune")
    for key, domain in t.space.items():
        reason = _unknown_path(key)
        if reason:
            problems.append(f"tune.space.{key}: {reason}")
            continue
        section = key.split(".")[0]
        if section in UNSEARCHABLE:
            problems.append(f"tune.space.{key}: {section}.* cannot be searched: {UNSEARCHABLE[section]}")
            continue
        if domain.kind in ("loguniform", "uniform", "quniform") and _is_integer_field(key):
            problems.append(f"tune.space.{key}: is an integer key; {domain.kind} samples fractions (every trial would "
                            "fail at set-up); use randint: [lower, upper), choice: [...] or grid: [...]")
            continue
        for value in domain.candidates():
            try:
                Experiment.model_validate(_apply(base, {key: value}))
            except ValidationError as e:
                problem = _describe(e.errors()[0])
                problems.append(f"tune.space.{key}: {domain.kind} value {value!r} makes an invalid experiment ({problem})")
                break
        if t.search == "grid" and domain.kind not in ("grid", "choice"):
            problems.append(f"tune.space.{key}: search grid enumerates values; use grid: [...] or choice: [...] "
                            f"instead of {domain.kind}, or set tune.search: random")
        if t.search == "optuna" and domain.kind == "grid":
            problems.append(f"tune.space.{key}: optuna does not take grid; use choice: [...] or tune.search: random")
    metric = t.metric or cfg.metric
    if metric.endswith("accuracy") and cfg.data.task != "classification":
        problems.append(f"tune.metric: {metric} is not reported for data.task: {cfg.data.task}; use val_loss or train_loss")
    if metric.startswith("val_") and cfg.train.eval_every != 1:
        problems.append(f"tune.metric: {metric} is reported only every train.eval_every={cfg.train.eval_every} epochs; "
                        "schedulers compare it every epoch, so set train.eval_every: 1")
    if t.scheduler == "asha" and t.max_epochs is not None and t.max_epochs > cfg.train.epochs:
        problems.append(f"tune.max_epochs: {t.max_epochs} is more than train.epochs ({cfg.train.epochs})")
    if t.scheduler == "pbt":
        if not any(k == "optim.lr" or k.startswith("regularization.") for k in t.space):
            problems.append("tune.scheduler: pbt perturbs optim.lr and regularization.*; search at least one of them")
        if t.cv_folds:
            problems.append("tune.cv_folds: not supported with scheduler pbt (a trial would clone k fold models); "
                            "use asha or fifo")
        if t.perturbation_interval % cfg.checkpoint.every_epochs:
            problems.append(f"tune.perturbation_interval: {t.perturbation_interval} is not a multiple of "
                            f"checkpoint.every_epochs ({cfg.checkpoint.every_epochs}); pbt clones checkpoints")
        if t.search == "optuna":
            problems.append("tune.search: optuna cannot be combined with scheduler pbt; use random")
    return problems


# ---------------------------------------------------------------------------------------------
# Loading and overrides


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`["optim.lr=3e-4", "model.hidden=[64, 64]"]` -> {"optim.lr": 0.0003, ...}; values are YAML."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected dotted.key=value, e.g. --set optim.lr=3e-4")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({short_message(e)})") from None
    return out


def _key_path(dotted: str) -> list[str]:
    """The nested keys a dotted override names. Keys of `tune.space` are dotted config paths
    themselves, so what follows `tune.space.` is one key, e.g. `tune.space.optim.lr` ->
    ["tune", "space", "optim.lr"]; a trailing search kind sets that entry's kind alone:
    `tune.space.optim.lr.loguniform` -> ["tune", "space", "optim.lr", "loguniform"]."""
    parts = dotted.split(".")
    if parts[:2] != ["tune", "space"] or len(parts) < 3:
        return parts
    rest = parts[2:]
    if len(rest) > 1 and rest[-1] in SearchDomain.model_fields:
        return ["tune", "space", ".".join(rest[:-1]), rest[-1]]
    return ["tune", "space", ".".join(rest)]


def _apply(raw: dict, overrides: Mapping[str, Any]) -> dict:
    """Set dotted keys in a nested dict (a copy), creating sections as needed."""
    raw = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        parts = _key_path(dotted)
        if len(parts) == 4 and parts[:2] == ["tune", "space"]:
            # A new search kind replaces the entry's old one: a domain holds exactly one kind.
            space = (raw.get("tune") or {}).get("space") or {}
            if isinstance(space.get(parts[2]), dict):
                space[parts[2]] = {}
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is {child!r}, not a section; cannot set {dotted}")
            node = child
        node[parts[-1]] = value
    return raw


def build_experiment(raw: Mapping[str, Any], *, source: str = "config") -> Experiment:
    """Validate a plain dict into an Experiment, turning pydantic errors into one line each."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Experiment.model_validate(dict(raw))
    except ValidationError as e:
        raise ConfigError(*[_describe(err) for err in e.errors()]) from None


def with_overrides(cfg: Experiment, overrides: Mapping[str, Any]) -> Experiment:
    """The one override path: `--set` and every Tune trial. Returns a new, re-validated config."""
    raw = cfg.model_dump(mode="json", exclude_unset=False)
    return build_experiment(_apply(raw, overrides))


def load_experiment(path: str | os.PathLike, overrides: Sequence[str] | Mapping[str, Any] = ()) -> Experiment:
    """Read a YAML experiment (safe_load), apply `--set` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({short_message(e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    raw = _apply(raw, overrides)
    # A run is named after its config unless it says otherwise, so `--resume` finds it again.
    run = raw.get("run")
    if run is None or (isinstance(run, dict) and run.get("name") is None):
        raw = _apply(raw, {"run.name": path.stem})
    return build_experiment(raw, source=str(path))


def to_yaml(cfg: Experiment) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Error messages


def _model_at(loc: Sequence[Any]) -> Optional[type[BaseModel]]:
    model: Any = Experiment
    skip_key = False
    for part in loc:
        if skip_key:  # the key of a dict field (tune.space.<dotted key>)
            skip_key = False
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        model = fields[part].annotation
        args = [a for a in get_args(model) if a is not type(None)]
        if get_origin(model) is Union and len(args) == 1:  # Optional[Section]
            model = args[0]
        if get_origin(model) is dict:
            model, skip_key = get_args(model)[1], True
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _describe(err: Mapping[str, Any]) -> str:
    loc = [p for p in err["loc"] if isinstance(p, str)]
    path = ".".join(str(p) for p in err["loc"]) or "config"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        valid = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{'.'.join(loc[:-1] + close)}'?" if close else ""
        return f"{path}: unknown key{hint} (valid keys: {', '.join(valid)})"
    if kind == "value_error":
        # Our own cross-field checks already name their fields, one per line.
        msg = str(err.get("ctx", {}).get("error", err["msg"]))
        return msg if not loc else f"{path}: {msg}"
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{path}: {err['msg']}{shown}"


# ---------------------------------------------------------------------------------------------
# README reference


def _type_name(annotation: Any) -> str:
    args = [a for a in get_args(annotation) if a is not type(None)]
    origin = get_origin(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin is Union:
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def config_reference_markdown() -> str:
    """The README's config reference, generated from the models so it cannot drift."""
    lines = []
    for section, model in SECTIONS.items():
        lines += [f"### `{section}` — {Experiment.model_fields[section].description}", "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            default = field.get_default(call_default_factory=True)
            shown = "—" if default is None else f"`{default if not isinstance(default, tuple) else list(default)}`"
            typ = _type_name(field.annotation).replace("|", "\\|")
            lines.append(f"| `{section}.{name}` | {typ} | {shown} | {field.description} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
