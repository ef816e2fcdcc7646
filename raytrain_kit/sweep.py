"""Sweeps: Ray Tune over the training spine, optionally with k-fold cross-validated trials.

Owns the translation of `tune:` into a Tune search space, search algorithm and scheduler, the
resource arithmetic that packs trials onto the cluster without a stuck trial, the trial
function (each trial is one `launch.fit` per fold, configured through `with_overrides`, the
same path as `--set`), and the sweep's outputs: `trials.csv` / `trials.parquet`,
`history.parquet` and `best.yaml`. Exercised by `raytrain-kit tune jobs/sweep_digits.yaml`.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import ray
from ray import tune

from raytrain_kit import checkpoint as ckpt
from raytrain_kit import launch
from raytrain_kit.config import Experiment, SearchDomain, to_yaml, with_overrides
from raytrain_kit.data import DataSpec, build_datasets, build_folds, describe_data
from raytrain_kit.errors import ConfigError, RunError, short_message
from raytrain_kit.preflight import run_preflight
from raytrain_kit.storage import read_run_file
from raytrain_kit.tracking import check_tracking, end_mlflow_run, start_mlflow_run

TRIALS_CSV, TRIALS_PARQUET, HISTORY_PARQUET, BEST_YAML = "trials.csv", "trials.parquet", "history.parquet", "best.yaml"
SWEEP_JSON = "sweep.json"  # the sweep's summary: metric, best trial and value, trials, wall time
POINTER_FILE = "train_checkpoints.json"
TUNER_PKL, TUNER_COPY = "tuner.pkl", "tuner.pkl.whole"  # Tune's pickled Tuner, and the kit's copy of it
# Each trial's driver only waits on its Train runs: it reserves memory, never a CPU, so the CPUs
# stay whole for training workers (a fractional CPU per trial driver leaves the last trial's
# workers a fraction short, and they wait forever). Every Ray node has the memory resource.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 1024**2}
# Metrics that are averaged over folds and also reported per fold and as a standard deviation.
FOLD_METRICS = ("val_loss", "val_accuracy", "train_loss", "train_accuracy")


# ---------------------------------------------------------------------------------------------
# Search space, search algorithm, scheduler


def build_domain(domain: SearchDomain, *, for_grid_search: bool = False):
    kind, args = domain.kind, domain.args
    if kind == "choice" and for_grid_search:
        return tune.grid_search(list(args))
    return {
        "loguniform": lambda: tune.loguniform(*args),
        "uniform": lambda: tune.uniform(*args),
        "quniform": lambda: tune.quniform(*args),
        "randint": lambda: tune.randint(*args),
        "choice": lambda: tune.choice(list(args)),
        "grid": lambda: tune.grid_search(list(args)),
    }[kind]()


def build_param_space(cfg: Experiment) -> dict[str, Any]:
    """Flat: dotted config key -> Tune domain. A trial's config is exactly its overrides."""
    grid = cfg.tune.search == "grid"
    return {key: build_domain(domain, for_grid_search=grid) for key, domain in cfg.tune.space.items()}


def sweep_metric(cfg: Experiment) -> tuple[str, str]:
    metric = cfg.tune.metric or cfg.metric
    mode = cfg.tune.mode or (cfg.mode if metric == cfg.metric else ("max" if metric.endswith("accuracy") else "min"))
    return metric, mode


def build_search_alg(cfg: Experiment, *, max_concurrent: int):
    t = cfg.tune
    metric, mode = sweep_metric(cfg)
    if t.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        searcher = OptunaSearch(metric=metric, mode=mode, sampler=optuna.samplers.TPESampler(seed=t.seed))
        return tune.search.ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
    # Tune's max_concurrent_trials only limits a Searcher; the variant generator limits itself.
    return tune.search.BasicVariantGenerator(random_state=t.seed, max_concurrent=max_concurrent)


def build_scheduler(cfg: Experiment):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    t = cfg.tune
    if t.scheduler == "asha":
        # "epoch", not Tune's own iteration count: a trial resumed from a checkpoint goes on
        # counting where it was, so the rungs stay right.
        return ASHAScheduler(time_attr="epoch", max_t=t.max_epochs or cfg.train.epochs,
                             grace_period=t.grace_period, reduction_factor=t.reduction_factor)
    if t.scheduler == "pbt":
        mutations = {key: build_domain(domain) for key, domain in t.space.items()
                     if key == "optim.lr" or key.startswith("regularization.")}
        return PopulationBasedTraining(time_attr="epoch", perturbation_interval=t.perturbation_interval,
                                       hyperparam_mutations=mutations)
    return FIFOScheduler()


# ---------------------------------------------------------------------------------------------
# Resources


@dataclass(frozen=True)
class SweepPlan:
    num_folds: int
    in_process: bool  # trials train in their own reused process, not through Ray Train (launch.runs_in_process)
    parallel_folds: bool  # all of a trial's folds train at once (in-process: in turns, epoch by epoch)
    cpus_per_trial: float
    gpus_per_trial: float
    max_concurrent_trials: int

    def trial_resources(self) -> dict[str, float]:
        """What Tune reserves for a trial's process. In-process trials train there: the worker's
        CPUs (and GPU). Otherwise the trial's driver only waits on its Train runs, whose workers
        reserve the CPUs themselves: see TRIAL_DRIVER_RESOURCES."""
        if not self.in_process:
            return TRIAL_DRIVER_RESOURCES
        return {"CPU": self.cpus_per_trial, **({"GPU": self.gpus_per_trial} if self.gpus_per_trial else {})}


def plan_resources(cfg: Experiment, total: dict[str, float], *, can_grow: bool) -> SweepPlan:
    """How many trials fit at once, and whether a trial's folds run side by side. A cluster that
    cannot grow (an embedded Ray) refuses a plan that would leave a trial waiting forever; there,
    streamed data (`data.in_memory: false`) keeps a CPU free for Ray Data's tasks."""
    s, t = cfg.scaling, cfg.tune
    num_folds = t.cv_folds or 1
    in_process = launch.runs_in_process(cfg)
    cpus, gpus = s.num_workers * s.cpus_per_worker, float(s.num_workers if s.use_gpu else 0)
    have_cpu, have_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if not cfg.data.in_memory and not can_grow:
        have_cpu -= 1
    eps = 1e-9
    if in_process:  # one process trains the folds in turns: no more CPUs for more folds
        parallel = num_folds > 1
        per_trial_cpu, per_trial_gpu = cpus, gpus
    else:
        parallel = num_folds > 1 and num_folds * cpus <= have_cpu + eps and num_folds * gpus <= have_gpu + eps
        per_trial_cpu, per_trial_gpu = cpus * (num_folds if parallel else 1), gpus * (num_folds if parallel else 1)
    fits = math.floor((have_cpu + eps) / per_trial_cpu)
    if per_trial_gpu:
        fits = min(fits, math.floor((have_gpu + eps) / per_trial_gpu))
    if fits < 1 and not can_grow:
        spare = " (one kept free for streaming Ray Data)" if not cfg.data.in_memory else ""
        raise ConfigError(f"scaling: a trial needs {per_trial_cpu:g} CPUs and {per_trial_gpu:g} GPUs, but the Ray cluster "
                          f"has {max(have_cpu, 0):g} CPUs{spare} and {have_gpu:g} GPUs; lower scaling.num_workers or "
                          "scaling.cpus_per_worker")
    if t.max_concurrent_trials and t.max_concurrent_trials > fits and not can_grow:
        raise ConfigError(f"tune.max_concurrent_trials: {t.max_concurrent_trials} trials x {per_trial_cpu:g} CPUs do not fit "
                          f"in the cluster's {have_cpu:g} CPUs; at most {fits} run at once here (omit the key for that)")
    return SweepPlan(num_folds=num_folds, in_process=in_process, parallel_folds=parallel, cpus_per_trial=per_trial_cpu,
                     gpus_per_trial=per_trial_gpu, max_concurrent_trials=t.max_concurrent_trials or max(fits, 1))


# ---------------------------------------------------------------------------------------------
# The trial: one fit per fold, epochs forwarded to Tune once every fold has reported them


def aggregate_folds(per_fold: list[dict]) -> dict:
    """One Tune result from the same epoch of every fold: the mean of each metric, and for the
    validation/training metrics also their standard deviation and each fold's value."""
    if len(per_fold) == 1:
        return {k: v for k, v in per_fold[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out: dict[str, Any] = {}
    for key, first in per_fold[0].items():
        if not isinstance(first, (int, float)) or isinstance(first, bool) or not all(key in m for m in per_fold):
            continue
        values = np.array([m[key] for m in per_fold], dtype=np.float64)
        out[key] = float(values.mean()) if key not in ("epoch", "step") else first
        if key in FOLD_METRICS:
            out[f"{key}_std"] = float(values.std(ddof=1))
            out.update({f"fold{i}_{key}": float(v) for i, v in enumerate(values)})
    return out


@ray.remote(num_cpus=0)
class StopBoard:
    """Trials the scheduler has stopped, posted by the sweep driver the moment it decides. Tune
    stops a trial's actor only after the step in flight returns, a whole epoch later; trials
    watch this board instead and abort their Train runs at once."""

    def __init__(self):
        self.stopped: set[str] = set()
        self.allowed: dict[str, int] = {}  # trial -> the last epoch the scheduler let it pass

    def stop(self, trial_id: str) -> None:
        self.stopped.add(trial_id)

    def is_stopped(self, trial_id: str) -> bool:
        return trial_id in self.stopped

    def allow(self, trial_id: str, epoch: int) -> None:
        self.allowed[trial_id] = max(epoch, self.allowed.get(trial_id, 0))

    def decision(self, trial_id: str, epoch: int) -> Optional[str]:
        """For a worker waiting at a gate epoch: "stop", "go", or None (not decided yet)."""
        if trial_id in self.stopped:
            return "stop"
        return "go" if self.allowed.get(trial_id, 0) >= epoch else None


def gate_epochs(cfg: Experiment) -> list[int]:
    """The epochs after which ASHA may stop a trial (its rungs, and max_epochs when it ends
    before train.epochs). Workers wait there for the decision instead of training an epoch the
    scheduler may throw away; at every other epoch ASHA always lets a trial go on."""
    t = cfg.tune
    if t is None or t.scheduler != "asha":
        return []
    max_t = min(t.max_epochs or cfg.train.epochs, cfg.train.epochs)
    gates, rung = set(), t.grace_period
    while rung < max_t:
        gates.add(rung)
        rung *= t.reduction_factor
    if max_t < cfg.train.epochs:
        gates.add(max_t)
    return sorted(gates)


class TrialTrainable(tune.Trainable):
    """One trial. Each `step` returns the next epoch that every fold has trained, aggregated.

    A single-worker ddp trial (`launch.runs_in_process`) trains its folds in this process, one
    epoch of each per `step` (`launch.StepwiseRun`): no Ray Train run, so no start-up per trial,
    and Tune reuses the process for the next trial (`reset_config`) with torch and the data
    loaded. Under ASHA nothing waits at a gate: a stopped trial is simply never stepped again.

    Other trials run a `launch.fit` (a `TorchTrainer` run) per fold in background threads. When a
    scheduler stops one, its Train runs are aborted through their controllers (workers shut down
    and free their CPUs): at once when the driver posts the decision on the `StopBoard`, else in
    `cleanup` or `reset_config` instead of leaving them to die with the trial's process."""

    def setup(self, config: dict, *, base: Experiment, data: list[tuple[dict, DataSpec]], parallel_folds: bool,
              board_name: Optional[str] = None, gates: Sequence[int] = (), mlflow_parent: Optional[str] = None):
        import logging

        # Ray logs each persisted checkpoint at INFO; the sweep prints one line per trial.
        for name in ("ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.base, self.data, self.board_name, self.gates, self.mlflow_parent = base, data, board_name, gates, mlflow_parent
        self.parallel_folds = parallel_folds  # TorchTrainer runs: a trial's folds train at once
        self.num_folds = len(data)
        self._begin(config)
        # This process trains trial after trial (Tune's actor reuse): what it keeps for good
        # (torch, Ray, the data) is frozen out of Python's garbage collections once, here,
        # instead of being scanned again at every run's start (loop.run_epochs).
        gc.collect()
        gc.freeze()

    def _begin(self, config: dict) -> None:
        self.cfg = with_overrides(self.base, config)  # the same override path as --set
        self.in_process = launch.runs_in_process(self.cfg)
        gate = ({"board": self.board_name, "trial": self.trial_id, "epochs": list(self.gates)}
                if self.board_name and self.gates and not self.in_process else None)
        self.link = launch.TrialLink(gate=gate, parent_mlflow_run=self.mlflow_parent)
        self.starts: Optional[list[str]] = None  # checkpoints to continue from (resume, PBT clone)
        self.latest: Optional[list[str]] = None  # this trial's latest Train checkpoint per fold
        self.runs: list[launch.StepwiseRun] = []  # in-process
        self.events: queue.Queue = queue.Queue()  # TorchTrainer runs' epochs, from their threads
        self.threads: list[threading.Thread] = []
        self.by_epoch: dict[int, dict[int, dict]] = {}
        self.num_done = 0
        self.last: dict = {}

    def reset_config(self, new_config: dict) -> bool:
        """The next trial in this process (Tune's actor reuse): end this trial's runs, start afresh."""
        self._end()
        self._begin(new_config)
        return True

    def _attempt(self) -> int:
        """A restarted trial trains new runs (attempt 1, 2, ...) from its checkpoint; earlier ones stay."""
        attempt = 0
        while launch.path_exists(f"{launch.storage_root(self.cfg)}/{_run_name(self.trial_id, 0, self.num_folds, attempt)}"):
            attempt += 1
        return attempt

    def _fold_link(self, fold: int) -> launch.TrialLink:
        return replace(self.link, init_checkpoint=self.starts[fold] if self.starts else None)

    def _fold_cfg(self, fold: int, attempt: int) -> Experiment:
        return with_overrides(self.cfg, {"run.name": _run_name(self.trial_id, fold, self.num_folds, attempt)})

    def step(self) -> dict:
        if self.starts and not (self.runs or self.threads):
            # A killed driver's trial process trains on to its last epoch before it dies, and its
            # run prunes the checkpoint Tune last saw (`kept_checkpoint`): the trial may continue
            # from its final checkpoint. It has nothing left to train; its result is that epoch's.
            final = final_epoch_result(self.starts, epochs=self.cfg.train.epochs)
            if final is not None:
                self.latest = self.starts
                return {**final, "done": True}
        return self._step_in_process() if self.in_process else self._step_with_trainer()

    def _step_in_process(self) -> dict:
        if not self.runs:
            attempt = self._attempt()
            self.runs = [launch.StepwiseRun(self._fold_cfg(i, attempt), datasets_and_spec=self.data[i],
                                            trial=self._fold_link(i)) for i in range(self.num_folds)]
        per_fold = [run.next_epoch() for run in self.runs]
        if all(m is not None for m in per_fold):
            paths = [m.get("checkpoint") for m in per_fold]
            if all(paths):
                self.latest = paths
            self.last = aggregate_folds(per_fold)
            if self.last["epoch"] < self.cfg.train.epochs and not any(m.get("nonfinite_stop") for m in per_fold):
                return self.last
        for run in self.runs:  # the last epoch (or a non-finite stop: RunError): summaries written
            run.close()
        return {**self.last, "done": True}

    def _start_threads(self) -> None:
        attempt = self._attempt()

        def train_fold(i: int) -> None:
            try:
                summary = launch.fit(self._fold_cfg(i, attempt), datasets_and_spec=self.data[i], trial=self._fold_link(i),
                                     on_epoch=lambda m: self.events.put(("epoch", i, m)))
                self.events.put(("done", i, summary))
            except BaseException as e:  # reaches `step`, which fails the trial with it
                self.events.put(("error", i, e))

        def train_in_sequence() -> None:
            for i in range(self.num_folds):
                if not self.link.abort.is_set():
                    train_fold(i)

        self.threads = ([threading.Thread(target=train_fold, args=(i,), daemon=True) for i in range(self.num_folds)]
                        if self.parallel_folds else [threading.Thread(target=train_in_sequence, daemon=True)])
        for thread in self.threads:
            thread.start()
        if self.board_name:
            threading.Thread(target=self._watch_board, args=(self.link.abort, self.threads), daemon=True).start()

    def _watch_board(self, abort: threading.Event, threads: list[threading.Thread]) -> None:
        from ray.exceptions import RayActorError

        try:
            board = ray.get_actor(self.board_name)
        except ValueError:  # no board: the trial is stopped the slow way, by cleanup
            return
        while not abort.is_set() and any(t.is_alive() for t in threads):
            try:
                if ray.get(board.is_stopped.remote(self.trial_id)):
                    abort.set()
            except RayActorError:  # the sweep driver is gone
                return
            time.sleep(0.25)

    def _step_with_trainer(self) -> dict:
        if not self.threads:
            self._start_threads()
        elif self.link.gate and self.last:
            # Tune asks for the next result only when its scheduler let the last one go on:
            # that is the go-ahead for workers waiting at a gate epoch.
            try:
                ray.get_actor(self.board_name).allow.remote(self.trial_id, int(self.last["epoch"]))
            except ValueError:  # the board is gone with its driver: workers pass their gates alone
                pass
        final: Optional[dict] = None
        while True:
            kind, fold, payload = self.events.get()
            if kind == "error":
                raise payload
            if kind == "done":
                self.num_done += 1
                if self.num_done == self.num_folds:  # every fold finished: this is the last result
                    return {**(final or self.last), "done": True}
                continue
            reports = self.by_epoch.setdefault(payload["epoch"], {})
            reports[fold] = payload
            if len(reports) < self.num_folds:
                continue
            del self.by_epoch[payload["epoch"]]
            per_fold = [reports[i] for i in range(self.num_folds)]
            paths = [m.get("checkpoint") for m in per_fold]
            if all(paths):
                self.latest = paths
            self.last = aggregate_folds(per_fold)
            if self.last["epoch"] < self.cfg.train.epochs:
                return self.last
            final = self.last  # held back until the runs have written their summaries

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        # A pointer to the Train checkpoints, not a copy: they already live in the sweep's storage.
        (Path(checkpoint_dir) / POINTER_FILE).write_text(json.dumps({"checkpoints": self.latest or self.starts}))

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        pointed = json.loads((Path(checkpoint_dir) / POINTER_FILE).read_text())["checkpoints"]
        self.starts = [kept_checkpoint(path) for path in pointed] if pointed else pointed

    def _end(self) -> None:
        """Stop this trial's runs: in-process ones write their summaries ("stopped" when epochs are
        left), TorchTrainer ones are aborted and waited for."""
        self.link.abort.set()
        for run in self.runs:
            try:
                run.close(stopped=True)
            except Exception:  # its summary is written; the trial is over either way
                pass
        deadline = time.monotonic() + 60
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def cleanup(self) -> None:
        self._end()


def kept_checkpoint(path: Optional[str]) -> Optional[str]:
    """The Train checkpoint Tune saved for a trial, or, if it is gone, the next one its run kept:
    a trial's process outlives its killed sweep driver by a second or two, training on and
    pruning (`checkpoint.keep`) the checkpoint Tune last saw. None if the run kept none."""
    if path is None or launch.path_exists(path):
        return path
    run, _, name = path.rpartition("/")
    kept = launch.checkpoint_dirs(run)
    later = sorted(e for e in kept if e > int(name.rsplit("_", 1)[1]))
    return kept[later[0]] if later else kept[max(kept)] if kept else None


def final_epoch_result(starts: Sequence[Optional[str]], *, epochs: int) -> Optional[dict]:
    """The Tune result of a trial whose every fold continues from a checkpoint of its run's last
    epoch (`epochs`): that epoch's metrics from each checkpoint's history, aggregated over the
    folds (`aggregate_folds`). None if any fold has epochs left to train (or no checkpoint)."""
    if not starts or not all(starts):
        return None
    last = [json.loads(read_run_file(path, ckpt.HISTORY_FILE))[-1] for path in starts]
    if any(int(entry.get("epoch", 0)) < epochs for entry in last):
        return None
    return aggregate_folds(last)


def _run_name(trial_id: str, fold: int, num_folds: int, attempt: int) -> str:
    return trial_id + (f"_fold{fold}" if num_folds > 1 else "") + (f"_attempt{attempt}" if attempt else "")


# ---------------------------------------------------------------------------------------------
# The sweep


class _PrintTrials(tune.Callback):
    """One line per finished, stopped or failed trial (Tune's own tables are off)."""

    def __init__(self, cfg: Experiment, log: Callable[[str], None], board_name: Optional[str]):
        # By name, not handle: a resumed sweep restores this callback with a new driver's board.
        self.cfg, self.log, self.board_name = cfg, log, board_name
        self.metric, self.mode = sweep_metric(cfg)
        self.num_done = 0

    def _line(self, trial, status: str) -> None:
        self.num_done += 1
        result = trial.last_result or {}
        values = "  ".join(f"{k}={_short(trial.config.get(k))}" for k in self.cfg.tune.space)
        last = result.get(self.metric)
        best = (trial.metric_analysis.get(self.metric) or {}).get(self.mode)
        if not isinstance(last, (int, float)):
            shown = "no result"
        elif isinstance(best, (int, float)) and best != last:
            shown = f"{self.metric} best {best:.4f}, last {last:.4f}"
        else:
            shown = f"{self.metric} {last:.4f} (best)"
        self.log(f"trial {trial.trial_id} {status} at epoch {result.get('epoch', 0)}: {shown}  {values}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        try:  # at the decision: see StopBoard
            if self.board_name:
                ray.get_actor(self.board_name).stop.remote(trial.trial_id)
        except ValueError:
            pass
        self._line(trial, "finished" if _epochs_run(trial.last_result) >= _max_epochs(self.cfg) else "stopped")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, "failed")


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _epochs_run(result: Optional[dict]) -> int:
    return int((result or {}).get("epoch", 0) or 0)


def _max_epochs(cfg: Experiment) -> int:
    return cfg.tune.max_epochs if cfg.tune.scheduler == "asha" and cfg.tune.max_epochs else cfg.train.epochs


def trial_base(cfg: Experiment, directory: str) -> Experiment:
    """What every trial starts from: no sweep section, no second preflight, runs inside the sweep."""
    overrides: dict[str, Any] = {"tune": None, "preflight.enabled": False, "run.storage_path": f"{directory}/runs"}
    if cfg.tune.scheduler == "pbt":
        # A clone starts from another trial's latest checkpoint, which that trial must still keep.
        overrides["checkpoint.keep"] = max(cfg.checkpoint.keep, cfg.train.epochs)
    return with_overrides(cfg, overrides)


def build_tuner(cfg: Experiment, trainable, *, plan: SweepPlan, resume: bool, board_name: Optional[str],
                log: Callable[[str], None]) -> tune.Tuner:
    """The sweep's Tuner: a new one, or (resume) the one saved in the sweep directory, whose
    finished trials are kept and whose unfinished ones continue from their checkpoints."""
    directory = launch.run_dir(cfg)
    if resume:
        return tune.Tuner.restore(directory, trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=build_param_space(cfg))
    metric, mode = sweep_metric(cfg)
    return tune.Tuner(
        trainable, param_space=build_param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=metric, mode=mode, search_alg=build_search_alg(cfg, max_concurrent=plan.max_concurrent_trials),
            scheduler=build_scheduler(cfg), num_samples=cfg.tune.num_samples,
            # In-process trials: the next trial runs in a finished one's process (reset_config).
            reuse_actors=plan.in_process, trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=tune.RunConfig(
            name=cfg.run.name, storage_path=launch.storage_root(cfg), verbose=0,
            callbacks=[_PrintTrials(cfg, log, board_name)],
            # PBT clones a donor's checkpoint some time after it was reported: keep them all
            # (each is a pointer file of a few hundred bytes; the Train checkpoints are kept
            # by trial_base).
            checkpoint_config=tune.CheckpointConfig(
                checkpoint_frequency=1, num_to_keep=None if cfg.tune.scheduler == "pbt" else 2)))


def prepare_trial_data(cfg: Experiment, plan: SweepPlan, *, log: Callable[[str], None]
                       ) -> list[tuple[dict, DataSpec]]:
    """The data every trial shares, built and checked once by the sweep driver: the datasets
    (and the gradient check on them), then one (datasets, spec) per CV fold, or the split itself."""
    datasets, spec = build_datasets(cfg)
    for line in describe_data(spec):
        log(line)
    if cfg.preflight.enabled:
        report = run_preflight(cfg, datasets["train"], spec)
        log(f"preflight: gradient check {report.status} ({report.num_parameters:,} parameters, {report.seconds:.2f} s)")
    if plan.num_folds > 1:
        return build_folds(cfg, datasets["train"], spec, num_folds=plan.num_folds)
    return [(datasets, spec)]


def describe_plan(cfg: Experiment, plan: SweepPlan) -> str:
    """The sweep's one line about how its trials run."""
    return (f"sweep {cfg.run.name}: {cfg.tune.search} search, {cfg.tune.scheduler} scheduler, "
            f"{plan.max_concurrent_trials} trial(s) at a time, {plan.cpus_per_trial:g} CPU(s) each"
            + (", each in a reused process of its own" if plan.in_process else ", each a Ray Train run")
            + (f", {plan.num_folds} folds per trial ({'side by side' if plan.parallel_folds else 'in sequence'})"
               if plan.num_folds > 1 else ""))


def has_tune_state(directory: str) -> bool:
    """Whether Tune can restore the sweep: its tuner and at least one experiment state file
    (Tune restores without the latter only after logging a traceback, and then starts afresh)."""
    import pyarrow.fs as pafs

    from raytrain_kit.storage import filesystem

    if not tune.Tuner.can_restore(directory):
        return False
    fs, path = filesystem(directory)
    return any(i.base_name.startswith("experiment_state-") for i in fs.get_file_info(pafs.FileSelector(path)))


def describe_sweep_state(directory: str) -> str:
    """The resume line: how many trials Tune's newest state file (whole, after
    `check_sweep_state`) records as finished, and how many continue."""
    import pyarrow.fs as pafs

    from raytrain_kit.storage import filesystem, read_run_file

    fs, path = filesystem(directory)
    newest = max(i.base_name for i in fs.get_file_info(pafs.FileSelector(path))
                 if i.base_name.startswith("experiment_state-") and i.base_name.endswith(".json"))
    trials = [json.loads(raw) for raw, _ in json.loads(read_run_file(directory, newest))["trial_data"]]
    finished = sum(t["status"] == "TERMINATED" for t in trials)
    return (f"resume: {finished} trial(s) finished, kept as they are; {len(trials) - finished} continue from their "
            f"latest checkpoints (in new runs, <trial>_attemptN); any not yet started follow")


def keep_tuner_copy(directory: str) -> None:
    """Tune writes `tuner.pkl` in place each time a sweep starts or resumes: a copy taken once it
    is whole (written atomically) lets a resume recover from a kill in the middle of that write."""
    from raytrain_kit.storage import read_run_file, write_run_file

    write_run_file(directory, TUNER_COPY, read_run_file(directory, TUNER_PKL))


def check_sweep_state(directory: str, *, log: Callable[[str], None]) -> None:
    """Before `tune --resume`: Tune writes its state files in place (no temp file and rename), so
    a sweep killed while writing leaves one empty or cut short, and `Tuner.restore` would end in
    an EOFError or a JSON error. Each session writes its own `<kind>-state-<time>` files (the
    experiment's, the searcher's): the newest one cut short gives way to an older one (renamed
    `*.damaged`; trials finished since are trained again, and the log says so); with none older,
    or a damaged `tuner.pkl` without the kit's whole copy (`keep_tuner_copy`), a ConfigError names
    the file and what to do. A pickle (whatever its extension: the basic-variant searcher's
    "json" is one) is whole when it ends with its STOP opcode (b"."); JSON when it parses."""
    import re

    import pyarrow.fs as pafs

    from raytrain_kit.storage import filesystem

    fs, path = filesystem(directory)
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.File)

    def whole(name: str) -> bool:
        with fs.open_input_stream(f"{path}/{name}") as f:
            data = f.read()
        if name.endswith(".pkl") or data.startswith(b"\x80"):  # a pickle (basic-variant-state "*.json" is one)
            return data.endswith(b".")
        try:
            json.loads(data)
            return True
        except ValueError:
            return False

    def refuse(name: str) -> ConfigError:
        return ConfigError(f"--resume: {directory}/{name} is empty or cut short (the sweep was killed while Tune "
                           f"wrote it), so Tune cannot resume the sweep; start it again with --set run.name=<new name> "
                           f"(each finished trial's run stays under {directory}/runs)")

    if TUNER_PKL in names and not whole(TUNER_PKL):
        if TUNER_COPY not in names or not whole(TUNER_COPY):
            raise refuse(TUNER_PKL)
        fs.copy_file(f"{path}/{TUNER_COPY}", f"{path}/{TUNER_PKL}")
        log(f"resume: {TUNER_PKL} was cut short by the crash; restored from the copy the sweep kept ({TUNER_COPY})")
    families: dict[tuple[str, str], list[str]] = {}
    for name in names:  # sorted: each family oldest first
        match = re.fullmatch(r"(.+[-_]state)-\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d\.(json|pkl)", name)
        if match:
            families.setdefault(match.groups(), []).append(name)
    for sessions in families.values():
        while not whole(sessions[-1]):
            damaged = sessions.pop()
            if not sessions:
                raise refuse(damaged)
            fs.move(f"{path}/{damaged}", f"{path}/{damaged}.damaged")
            log(f"resume: {damaged} was cut short by the crash; resuming from {sessions[-1]} (trials finished "
                "since it was written are trained again)")


def decide_restore(cfg: Experiment, directory: str, *, resume: bool, log: Callable[[str], None]) -> bool:
    """Whether Tune restores the sweep in `directory` (its state checked and described in the
    log) or starts it; raises ConfigError for a new sweep over an existing one, or a resume of
    none."""
    exists = launch.path_exists(directory)
    if exists and not resume:
        raise ConfigError(f"run.name: sweep {cfg.run.name!r} already exists at {directory}; pass --resume "
                          "(Python: resume=True) to continue it, or --set run.name=<new name> (Python: an "
                          "override {'run.name': ...}) to start another")
    restore = resume and has_tune_state(directory)
    if resume and not restore:
        if not exists:
            raise ConfigError(f"--resume: no sweep {cfg.run.name!r} at {directory} to continue; drop --resume to start it")
        # Killed before Tune saved its first state: no trial result is kept anywhere, and
        # without --resume the directory would be refused as existing.
        log(f"resume: sweep {cfg.run.name!r} was stopped before Tune saved its state; starting it from the beginning")
    if restore:
        check_sweep_state(directory, log=log)
        log(describe_sweep_state(directory))
    return restore


@contextlib.contextmanager
def _callback_census_skipped() -> Iterator[None]:
    """While the block runs, Ray Tune does not count the run's callbacks by class for its usage
    telemetry (`ray.air._internal.usage.tag_callbacks`, called by every `Tuner.fit` given a
    callback): to compare class names it imports Ray's MLflow, W&B, Comet and Aim integrations,
    and with them mlflow itself, 1.5 s of the sweep driver's CPU on 2 cores while the trial
    processes start, whether or not the sweep tracks to MLflow. The sweep's only callback is its
    own (`_PrintTrials`). Where Ray moves or renames the function, nothing is skipped."""
    from ray.air._internal import usage

    census = getattr(usage, "tag_callbacks", None)
    if census is not None:
        usage.tag_callbacks = lambda callbacks: False
    try:
        yield
    finally:
        if census is not None:
            usage.tag_callbacks = census


def run_sweep(cfg: Experiment, *, resume: bool = False, log: Callable[[str], None] = lambda line: None) -> dict:
    """Run (or continue) the sweep; writes its outputs and returns a summary. Raises KitError."""
    assert cfg.tune is not None, "the CLI refuses a config without a tune section"
    if not ray.is_initialized():  # called from a script: the Ray `raytrain-kit tune` would start
        from raytrain_kit.cluster import connect

        connect(state_api=not cfg.scaling.single_process)
    started = time.perf_counter()
    directory = launch.run_dir(cfg)
    restore = decide_restore(cfg, directory, resume=resume, log=log)
    plan = plan_resources(cfg, ray.cluster_resources(), can_grow=not launch.started_embedded_ray())
    launch.check_shared_storage(cfg)
    data = prepare_trial_data(cfg, plan, log=log)
    if not restore:
        launch.write_run_file(directory, launch.CONFIG_FILE, to_yaml(cfg))
    metric, mode = sweep_metric(cfg)
    log(describe_plan(cfg, plan))

    # Tune's own tables and banners: the sweep prints one line per trial instead.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Every epoch writes a small pointer checkpoint, which Tune warns is frequent; it is cheap.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    check_tracking(cfg)
    # Each trial's run (each fold's) is an MLflow child of the sweep's run.
    mlflow_parent = start_mlflow_run(cfg, directory=directory, resume=resume) if cfg.tracking.mlflow_uri else None
    # Only Train runs wait at gates and need the decision posted; in-process trials are simply not
    # stepped again, and the board's process (which imports the kit) would only cost CPU.
    board_name = None if plan.in_process else "raytrain-kit-stops-" + hashlib.sha1(directory.encode()).hexdigest()[:16]
    board = StopBoard.options(name=board_name, get_if_exists=True).remote() if board_name else None
    trainable = tune.with_resources(
        tune.with_parameters(TrialTrainable, base=trial_base(cfg, directory), data=data,
                             parallel_folds=plan.parallel_folds, board_name=board_name, gates=gate_epochs(cfg),
                             mlflow_parent=mlflow_parent),
        plan.trial_resources())
    tuner = build_tuner(cfg, trainable, plan=plan, resume=restore, board_name=board_name, log=log)
    keep_tuner_copy(directory)  # Tune has written tuner.pkl whole by now
    with _callback_census_skipped():
        results = tuner.fit()
    if board is not None:
        ray.kill(board)
    table, history = trial_table(cfg, results)
    if table.empty or table["best_value"].isna().all():
        errors = "; ".join(e for e in table.get("error", pd.Series(dtype=str)).dropna().unique()[:3]) if not table.empty else ""
        raise RunError(f"sweep {cfg.run.name!r}: no trial reported {metric}" + (f" ({errors})" if errors else ""))
    write_outputs(cfg, directory, table, history)
    best = table.iloc[0]
    if mlflow_parent:
        end_mlflow_run(cfg, mlflow_parent, {"status": "finished", "metric": metric, "best_value": float(best["best_value"])},
                       artifacts=[f"{directory}/{TRIALS_CSV}", f"{directory}/{BEST_YAML}"])
    summary = {"run_dir": directory, "metric": metric, "mode": mode, "num_trials": len(table),
               "best_trial": best["trial_id"], "best_value": float(best["best_value"]),
               "best_config": {k: _plain(best[k]) for k in cfg.tune.space},
               "best_yaml": f"{directory}/{BEST_YAML}", "wall_s": round(time.perf_counter() - started, 2),
               "trials_at_once": plan.max_concurrent_trials, "in_process": plan.in_process}
    launch.write_run_file(directory, SWEEP_JSON, json.dumps(summary, indent=1))
    return {**summary, "table": table}


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


# ---------------------------------------------------------------------------------------------
# Outputs


def trial_table(cfg: Experiment, results) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per trial (its searched values, best and final metric, epochs, status, wall time),
    best first; and every reported epoch of every trial."""
    metric, mode = sweep_metric(cfg)
    rows, epochs = [], []
    for result in results:
        frame = result.metrics_dataframe
        config = result.config or {}
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        row: dict[str, Any] = {"trial_id": trial_id}
        row.update({key: config.get(key) for key in cfg.tune.space})
        scored = frame[frame[metric].notna()] if frame is not None and metric in frame else None
        if scored is not None and len(scored):
            best = scored.loc[scored[metric].idxmax() if mode == "max" else scored[metric].idxmin()]
            row.update(best_value=float(best[metric]), best_epoch=int(best["epoch"]),
                       final_value=float(scored[metric].iloc[-1]), epochs_run=int(frame["epoch"].max()),
                       wall_s=round(float(frame["time_total_s"].max()), 2))
            row.update({c: float(best[c]) for c in best.index if c.startswith("fold") or c == f"{metric}_std"})
            keep = [c for c in frame.columns if c in ("epoch", "time_total_s") or c.startswith(("train_", "val_", "fold"))
                    or c in ("lr", "samples_per_s")]
            epochs.append(frame[keep].assign(trial_id=trial_id))
        else:
            row.update(best_value=None, best_epoch=None, final_value=None, epochs_run=0, wall_s=None)
        failed = result.error is not None
        row["status"] = "failed" if failed else ("finished" if row["epochs_run"] >= _max_epochs(cfg) else "stopped")
        row["error"] = f"{type(result.error).__name__}: {short_message(result.error, last_line=True)}" if failed else None
        rows.append(row)
    table = pd.DataFrame(rows)
    if not table.empty:
        table = table.sort_values("best_value", ascending=mode == "min", na_position="last", kind="stable")
        table = table.reset_index(drop=True)
    history = pd.concat(epochs, ignore_index=True) if epochs else pd.DataFrame()
    return table, history


def best_experiment(cfg: Experiment, table: pd.DataFrame) -> Experiment:
    """The best trial as a complete experiment that `raytrain-kit train` takes unchanged: the
    sweep's config with the trial's values, no tune section, named `<sweep>-best`."""
    best = table.iloc[0]
    return with_overrides(cfg, {"tune": None, "run.name": f"{cfg.run.name}-best",
                                **{key: _plain(best[key]) for key in cfg.tune.space}})


def write_outputs(cfg: Experiment, directory: str, table: pd.DataFrame, history: pd.DataFrame) -> None:
    import io

    for name, frame in ((TRIALS_PARQUET, table), (HISTORY_PARQUET, history)):
        buffer = io.BytesIO()
        # Searched values may mix types (a choice of lists): store them as text for Parquet.
        frame.astype({c: str for c in frame.columns if frame[c].dtype == object and c not in ("trial_id", "status", "error")}
                     ).to_parquet(buffer, index=False)
        launch.write_run_file(directory, name, buffer.getvalue())
    launch.write_run_file(directory, TRIALS_CSV, table.to_csv(index=False))
    launch.write_run_file(directory, BEST_YAML, to_yaml(best_experiment(cfg, table)))
