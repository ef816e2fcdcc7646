"""`raytrain-kit advise`: `advise.py`'s measurements as Ray work where the experiment's workers
would run, on real training rows, before any run; then the table, advice.yaml (the recommended
values as `--set` keys) and advice.png.

Parts (`--only`):
- `lr`: the learning-rate range test (`range_test.py`) on the experiment's own workers, strategy,
  precision and global batch: a `TorchTrainer` of `scaling.num_workers` workers whose every step
  is a training step of the run's, the loss averaged over every worker's rows;
- `init`: the signal-propagation diagnostic of every init scheme the kit offers on the
  experiment's model;
- `memory`: the per-worker plan of ddp, hsdp and fsdp at the configured worker count and
  micro-batch against each worker's share of its node's memory.
`init` and `memory` run on 64 training rows: in the range test's rank 0 when `lr` is asked
for (one start-up for all three), else as one Ray task. Exercised by `tests/test_advise.py`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np
import ray
import torch

from raytrain_kit.advise import (ADVICE_PNG, LrSuggestion, diagnose_inits, draw_advice, fit_activation_bytes,
                                 plan_state_bytes, plan_strategies, range_test_lrs, shard_numel, smoothing_for,
                                 suggest_lr)
from raytrain_kit.config import Experiment, build_experiment, with_overrides
from raytrain_kit.data import DataSpec, read_block_ranges, spec_from_dict, spec_to_dict, split_for_workers
from raytrain_kit.data.shards import head_rows
from raytrain_kit.errors import ConfigError, RunError, traceback_text
from raytrain_kit.materialize import build_on_meta
from raytrain_kit.models import build_model
from raytrain_kit.parallel import LOW_PRECISION, find_blocks
from raytrain_kit.recompute import apply_activation_checkpointing
from raytrain_kit.steps import build_loss_fn

PARTS = ("lr", "init", "memory")
LR_RANGE = (1e-6, 10.0)  # the range test's first and last rates: 7 decades, from too small for any optimizer to diverging
LR_STEPS = 200  # its steps: on jobs/digits.yaml 100 gave picks 3x apart between seeds, 200 within 1.3x
ADVICE_YAML = "advice.yaml"
STAGE_NAMES = {"ray": "Ray", "data": "data", "workers": "Train workers", "ready": "model, shards, init and memory",
               "measured": "range test", "written": "files"}
BATCH_ROWS = 64  # training rows measured: the diagnostic's batch; activations fitted from 32 and 64
SCHEMES = ("kaiming_normal", "kaiming_uniform", "xavier_uniform", "xavier_normal", "orthogonal", "normal",
           "truncated_normal", "default")  # every scheme but zeros, best-known first (ties keep this order)
STRATEGY_ORDER = ("ddp", "hsdp", "fsdp")  # least communication first: the first that fits is recommended


def working_bytes(model: torch.nn.Module, cfg: Experiment, strategy: str) -> int:
    """Bytes a worker holds beside its state while a step computes (measured against the
    profiler's peak by benchmarks/advise_bench.py).

    fsdp/hsdp (FSDP2): the root's own parameters, gathered for the whole forward, and the largest
    block's three times (it, the next one prefetched, and its full gradients before the
    reduce-scatter), in bf16/fp16 bytes under those precisions (FSDP2 gathers in them); and once
    more in fp32, the reduce-scatter's flat input. ddp: autograd computes each weight's gradient
    as a new tensor and then adds it into the kept one (a gradient accumulated over micro-batches, or DDP's bucket that the
    gradient views): one gradient of the largest parameter at a time; none for one worker
    without accumulation, whose gradients are the new tensors themselves."""
    def size(params) -> int:
        return sum(p.numel() * p.element_size() for p in params)

    if strategy == "ddp":
        adds = cfg.scaling.num_workers > 1 or cfg.train.grad_accum_steps > 1
        return max((size([p]) for p in model.parameters() if p.requires_grad), default=0) if adds else 0
    blocks = find_blocks(model, cfg)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    largest = max((size(block.parameters()) for block in blocks), default=0)
    low = LOW_PRECISION.get(cfg.train.precision)
    scale = low.itemsize / 4 if low is not None else 1.0  # the kit's parameters are fp32; gathers in `low`
    # + the reduce-scatter's input, the block's gradients copied flat, in fp32 (the kit's reduce_dtype)
    return round(scale * (size(p for p in model.parameters() if id(p) not in in_blocks) + 3 * largest) + largest)


def build_bytes(model: torch.nn.Module, cfg: Experiment, spec: DataSpec, strategy: str, *, num_shards: int) -> int:
    """A worker's peak while it builds its model, before any step (`materialize.py`): ddp, the
    whole model; fsdp/hsdp built on the meta device, its shards plus the largest module's full
    tensors and its chunk of them (`distribute_tensor`'s copy); built whole first
    (`scaling.meta_init: false`, or a model that cannot be built on the meta device), the whole
    model plus the chunk `fully_shard` copies out of the largest module (each module's full
    tensors are freed as its shards replace them). Measured: tests/test_materialize.py."""
    def size(tensors, shards: int = 1) -> int:
        return sum(shard_numel(t.shape, shards) * t.element_size() for t in tensors if t is not None)

    whole = size(model.parameters())
    if strategy == "ddp":
        return whole
    largest = max((size(m._parameters.values()) + size(m._buffers.values()) for m in model.modules()), default=0)
    chunk = -(-largest // num_shards)
    if cfg.scaling.meta_init and build_on_meta(cfg, spec)[1] is None:
        return size(model.parameters(), num_shards) + largest + chunk
    return whole + chunk


def _init_part(cfg: Experiment, spec: DataSpec, inputs, targets, loss_fn) -> dict:
    def build(scheme: str) -> torch.nn.Module:
        return build_model(with_overrides(cfg, {"init.scheme": scheme}), spec).train()

    diagnoses, best = diagnose_inits(build, SCHEMES, inputs, targets, loss_fn)
    return {"recommended": best, "schemes": [
        {"scheme": d.scheme, "gradient_ratio": d.gradient_ratio, "verdict": d.verdict,
         "gradient_rms": [s.gradient_rms for s in d.stats], "activation_std": [s.activation_std for s in d.stats]}
        for d in diagnoses]}


def _memory_part(cfg: Experiment, spec: DataSpec, inputs, targets, loss_fn, available_bytes: int) -> dict:
    model = build_model(cfg, spec).train()
    n = cfg.scaling.num_workers
    shards = {"ddp": 1, "hsdp": min(cfg.scaling.shard_group_size or n, n), "fsdp": n}
    state = {s: plan_state_bytes(model, cfg, num_shards=shards[s]) for s in STRATEGY_ORDER}
    working = {s: working_bytes(model, cfg, s) for s in STRATEGY_ORDER}
    build = {s: build_bytes(model, cfg, spec, s, num_shards=shards[s]) for s in STRATEGY_ORDER}
    activations = _activation_fits(model, cfg, inputs, targets, loss_fn)
    plans, recommended = plan_strategies(state, working, activations=activations, micro_batch=cfg.train.batch_size,
                                         available_bytes=available_bytes, build_bytes=build)
    return {"recommended": recommended, "available_bytes": available_bytes, "gpu": cfg.scaling.use_gpu,
            "micro_batch": cfg.train.batch_size, "num_workers": n,
            "activation_bytes_per_row": {s: a[0] for s, a in activations.items()}, "plans": [p.__dict__ for p in plans]}


def _activation_fits(model, cfg: Experiment, inputs, targets, loss_fn) -> dict[str, tuple[float, int]]:
    """Each strategy's activations (`fit_activation_bytes`) in the run's precision. fp32: one fit
    for all. bf16/fp16: ddp's under autocast (which also keeps the weights' cast copies for the
    backward: a fixed part), the sharded ones' on the model cast to that type, as FSDP2's
    policy computes (its gathered weights are the working bytes)."""
    # Under train.activation_checkpointing: the model recomputing its regions, its peak profiled
    recomputing = cfg.train.activation_checkpointing
    if recomputing:
        model = apply_activation_checkpointing(copy.deepcopy(model), cfg)
    low = LOW_PRECISION.get(cfg.train.precision)
    if low is None:
        fit = fit_activation_bytes(model, inputs, targets, loss_fn, profiled=recomputing)
        return {s: fit for s in STRATEGY_ORDER}
    with torch.autocast("cpu", dtype=low):
        ddp = fit_activation_bytes(model, inputs, targets, loss_fn, profiled=recomputing)
    cast = copy.deepcopy(model).to(low)
    sharded = fit_activation_bytes(cast, inputs.to(low), targets, lambda outputs, y: loss_fn(outputs.float(), y),
                                   profiled=recomputing)
    return {s: ddp if s == "ddp" else sharded for s in STRATEGY_ORDER}


def measure(experiment: dict, spec: dict, x: np.ndarray, y: np.ndarray, parts: Sequence[str],
            available_bytes: int) -> dict:
    """The init and memory parts on `x`, `y` (encoded training rows), where this runs.
    `available_bytes` None: a GPU run's, each worker's GPU memory (this process's GPU's)."""
    cfg, spec = build_experiment(experiment), spec_from_dict(spec)
    if available_bytes is None and "memory" in parts:
        available_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    inputs = torch.tensor(x, dtype=torch.float32).view(-1, *spec.input_shape)
    targets = torch.tensor(y)
    loss_fn = build_loss_fn(classification=spec.task == "classification")
    out = {}
    if "init" in parts:
        out["init"] = _init_part(cfg, spec, inputs, targets, loss_fn)
    if "memory" in parts:
        out["memory"] = _memory_part(cfg, spec, inputs, targets, loss_fn, available_bytes)
    return out


@ray.remote(num_cpus=1, max_retries=0)
def advise_task(experiment: dict, spec: dict, x: np.ndarray, y: np.ndarray, parts: list[str], available_bytes: int) -> dict:
    """`measure` where Ray places the task (without the range test: no workers to start)."""
    return measure(experiment, spec, x, y, parts, available_bytes)


def range_test_per_worker(config: dict) -> None:
    """Runs in every Train worker: on rank 0 first the other parts asked for, then on every rank
    the range test on this worker's piece of the training rows. Rank 0 writes
    {"lr": {"lrs", "losses", "seconds"}, and the other parts} to `config["out_dir"]`'s
    RANGE_TEST_FILE; a failing worker leaves its account in `config["out_dir"]/logs`
    (`worker.write_failure`)."""
    import ray.train
    import ray.train.torch

    from raytrain_kit.loop import InMemoryData, StreamedData, build_train_state
    from raytrain_kit.range_test import range_test
    from raytrain_kit.storage import write_run_file
    from raytrain_kit.worker import write_failure

    entered = time.time()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    try:
        cfg, spec = build_experiment(config["experiment"]), spec_from_dict(config["spec"])
        piece = read_block_ranges(config["shards"][rank]) if cfg.data.in_memory else None
        x, y = (config["x"], config["y"]) if config["x"] is not None else (piece["x"][:BATCH_ROWS], piece["y"][:BATCH_ROWS])
        out = measure(config["experiment"], config["spec"], x, y, config["parts"],
                      config["available_bytes"]) if rank == 0 and config["parts"] else {}
        out["worker_started"] = entered
        device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
        state = build_train_state(cfg, spec, rank=rank, world_size=world_size, device=device)
        if cfg.data.in_memory:
            data = InMemoryData.from_arrays(state, piece, None)
        else:
            data = StreamedData(ray.train.get_dataset_shard("train"), None, state)
        out["worker_ready"] = time.time()
        lrs = range_test_lrs(*config["lr_range"], config["lr_steps"])
        started = time.perf_counter()
        losses = range_test(state, data, lrs)
        out["lr"] = {"lrs": lrs[:len(losses)].tolist(), "losses": losses, "seconds": time.perf_counter() - started}
        if rank == 0:
            write_run_file(config["out_dir"], RANGE_TEST_FILE, json.dumps(out))
    except Exception as e:
        write_failure(config["out_dir"], e, rank=rank, epoch=None, step=None)
        raise


RANGE_TEST_FILE = "range_test.json"  # rank 0's result, in the out folder as soon as it has it


def _fit_range_test(cfg: Experiment, datasets: dict, spec: DataSpec, config: dict, out_dir: str,
                    then: Callable[[dict], None]) -> dict:
    """The range test's `TorchTrainer` (a run named `range_test` under `out_dir`, removed after):
    rank 0's result, on which `then` runs (the pictures, the patch) while Ray Train winds its
    workers down (about a second). Rank 0 leaves its result in `out_dir` (shared storage, as a
    run's records) the moment it has it. Raises RunError with the failing worker's own error."""
    from ray.train import DataConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from raytrain_kit.launch import _worker_error, scaling_config
    from raytrain_kit.storage import filesystem, path_exists, read_run_file

    in_memory = cfg.data.in_memory
    if in_memory:
        config["shards"] = split_for_workers({"train": datasets["train"]}, num_workers=cfg.scaling.num_workers)["train"]
    trainer = TorchTrainer(
        range_test_per_worker, train_loop_config=config, scaling_config=scaling_config(cfg),
        run_config=RunConfig(name="range_test", storage_path=out_dir, logging_config=LoggingConfig(log_level="WARNING")),
        datasets=None if in_memory else {"train": datasets["train"]},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ray.data.ExecutionOptions(preserve_order=True)))
    started, failure = time.time(), []

    def fit() -> None:  # off the main thread, Train installs no Ctrl-C handler of its own
        try:
            trainer.fit()
        except Exception as e:  # noqa: BLE001 - TrainingFailedError and friends, raised below
            failure.append(e)

    fitting = threading.Thread(target=fit, daemon=True)
    fitting.start()
    _import_pyplot()  # the driver waits ~20 s for the workers: import the pictures' library meanwhile
    poll_s = 0.5 if "://" in out_dir else 0.05
    try:
        while not path_exists(f"{out_dir}/{RANGE_TEST_FILE}"):
            if not fitting.is_alive():
                break
            time.sleep(poll_s)
        result, error = None, None
        if path_exists(f"{out_dir}/{RANGE_TEST_FILE}"):
            result = json.loads(read_run_file(out_dir, RANGE_TEST_FILE))
            try:
                then(result)
            except Exception as e:  # noqa: BLE001 - raised once the workers are gone
                error = e
        fitting.join()
        if failure:
            raise RunError(*_worker_error(failure[0], out_dir, since=started), traceback=traceback_text(failure[0]))
        if error is not None:
            raise error
        if result is None:  # the workers ended without a word: nothing to advise from
            raise RunError(f"the range test's workers ended without writing their result to {out_dir}")
        return result
    finally:
        fs, path = filesystem(out_dir)
        for name, delete in (("range_test", fs.delete_dir), (RANGE_TEST_FILE, fs.delete_file)):
            try:
                delete(f"{path}/{name}")  # Ray Train's records of a run that keeps nothing; the handover
            except OSError:
                pass


def check_lr_range(lr_range: Sequence[float], lr_steps: int) -> None:
    """Refuse a range test that cannot run (before Ray starts). Raises ConfigError."""
    try:
        range_test_lrs(*lr_range, lr_steps)
    except ValueError as e:
        raise ConfigError(f"--lr-range/--lr-steps: {e}") from None


def _import_pyplot() -> None:
    from raytrain_kit.report import _pyplot

    _pyplot()


def lr_result(measured: dict, *, lr_steps: int, num_workers: int, global_batch: int) -> dict:
    """The range test's verdict (`advise.suggest_lr`) beside its curve. Raises ConfigError when
    the loss diverged before the test had enough steps to pick from."""
    try:
        s: LrSuggestion = suggest_lr(measured["lrs"], measured["losses"], beta=smoothing_for(lr_steps))
    except ValueError as e:
        raise ConfigError(f"--lr-range: {e} (--lr-range MIN MAX)") from None
    lrs = measured["lrs"]
    return {**measured, "suggested": float(f"{s.lr:.2g}"), "index": s.index, "stop": s.stop,
            "diverged_at": lrs[s.stop] if s.stop < len(lrs) else None, "smoothed": s.smoothed.tolist(),
            "num_steps": lr_steps, "num_workers": num_workers, "global_batch": global_batch}


def worker_memory_bytes(cfg: Experiment) -> Optional[int]:
    """Each worker's share of the smallest node's memory (Ray's `memory` resource: what tasks may
    use), the workers spread evenly over the alive nodes. None for a GPU run: each worker has
    its GPU's memory, which the measuring process reads off its own GPU."""
    if cfg.scaling.use_gpu:
        return None
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("memory")]
    per_node = math.ceil(cfg.scaling.num_workers / max(len(nodes), 1))
    smallest = min((n["Resources"]["memory"] for n in nodes), default=ray.cluster_resources().get("memory", 0))
    return int(smallest // per_node)


def advice_patch(result: dict, cfg: Experiment) -> dict:
    """The recommended values as `--set` keys: the learning rate; the init scheme; the strategy
    (and, when none fits, the current strategy's largest micro-batch that does)."""
    patch = {}
    if "lr" in result:
        patch["optim.lr"] = result["lr"]["suggested"]
    if "init" in result:
        patch["init.scheme"] = result["init"]["recommended"]
    if "memory" in result:
        memory = result["memory"]
        if memory["recommended"] is not None:
            patch["scaling.strategy"] = memory["recommended"]
        else:
            current = next(p for p in memory["plans"] if p["strategy"] == cfg.scaling.strategy)
            patch["train.batch_size"] = max(current["max_micro_batch"], 1)
    return patch


def run_advise(cfg: Experiment, *, parts: Sequence[str] = PARTS, out_dir: Optional[str] = None,
               lr_range: tuple[float, float] = LR_RANGE, lr_steps: int = LR_STEPS, started: Optional[float] = None,
               log: Callable[[str], None] = lambda line: None) -> dict:
    """Measure, write advice.yaml and advice.png into `out_dir` (default: `<run.storage_path>/
    <run.name>_advice`), and return {"lr", "init", "memory" (those asked for), "patch",
    "out_dir", "seconds" (since `started`, default now), "stages"}. Raises ConfigError (a model
    that does not build, resources the cluster lacks, a range test that diverged at once),
    DataError (data that does not read) and RunError (a worker of the range test failed)."""
    import yaml

    from raytrain_kit.cluster import connect
    from raytrain_kit.data import build_datasets
    from raytrain_kit.launch import check_model_builds, check_resources, check_streaming_resources, storage_root
    from raytrain_kit.storage import path_exists, write_run_file

    started = started or time.time()
    if "lr" in parts:
        check_lr_range(lr_range, lr_steps)
    if not ray.is_initialized():
        connect()
    times = {"ray": time.time()}
    datasets, spec = build_datasets(cfg)
    check_model_builds(cfg, spec)
    out_dir = out_dir or f"{storage_root(cfg).rstrip('/')}/{cfg.run.name}_advice"
    out_dir = out_dir if "://" in out_dir else os.path.abspath(out_dir)  # Ray Train's storage must be absolute
    others = [p for p in parts if p != "lr"]
    # The range test's rank 0 measures the others on the first rows of its own piece; otherwise
    # the driver takes them (`head_rows`).
    batch = ({"x": None, "y": None} if "lr" in parts and cfg.data.in_memory or not others
             else head_rows(datasets["train"], BATCH_ROWS))
    times["data"] = time.time()
    log(f"advise:        {', '.join(parts)} on {cfg.scaling.num_workers} worker(s)")
    measured = dict(experiment=cfg.model_dump(mode="json"), spec=spec_to_dict(spec), x=batch["x"], y=batch["y"],
                    parts=others, available_bytes=worker_memory_bytes(cfg) if "memory" in parts else 0)

    def write(result: dict) -> None:  # the verdicts, advice.yaml and advice.png
        times["measured"] = time.time()
        if "lr" in result:
            result["lr"] = lr_result(result["lr"], lr_steps=lr_steps, num_workers=cfg.scaling.num_workers,
                                     global_batch=cfg.train.batch_size * cfg.train.grad_accum_steps * cfg.scaling.num_workers)
            times["workers"], times["ready"] = result.pop("worker_started"), result.pop("worker_ready")
        result["patch"], result["out_dir"] = advice_patch(result, cfg), out_dir
        result["replaced"] = path_exists(f"{out_dir}/{ADVICE_YAML}")
        write_run_file(out_dir, ADVICE_YAML, yaml.safe_dump(result["patch"], sort_keys=False))
        if "lr" in result or "init" in result:
            _draw(result, out_dir)
        times["written"] = time.time()

    if "lr" in parts:
        check_resources(cfg)
        check_streaming_resources(cfg, datasets)
        result = _fit_range_test(cfg, datasets, spec, {**measured, "lr_range": list(lr_range), "lr_steps": lr_steps,
                                                       "out_dir": out_dir}, out_dir, then=write)
    else:
        result = ray.get(advise_task.options(num_gpus=1 if cfg.scaling.use_gpu else 0).remote(**measured))
        write(result)
    result["seconds"], result["stages"] = time.time() - started, _stages(started, times)
    return result


def _stages(started: float, times: dict) -> dict[str, float]:
    """Seconds of each stage, from `started`: Ray, data, the workers' start, their model and rows
    (and the init and memory parts on rank 0), the range test until its result is back, the files
    (while Ray Train ends its workers). Without the range test: Ray, data, the measurements'
    task, the files."""
    out, last = {}, started
    for name in ("ray", "data", "workers", "ready", "measured", "written"):
        if name in times:
            out[name], last = max(times[name] - last, 0.0), times[name]
    return out


def _draw(result: dict, out_dir: str) -> None:
    from raytrain_kit.advise import InitDiagnosis, LayerStats

    diagnoses, lr = None, result.get("lr")
    if "init" in result:
        diagnoses = [InitDiagnosis(s["scheme"], [LayerStats(str(i), a, g) for i, (a, g) in
                                                 enumerate(zip(s["activation_std"], s["gradient_rms"]))],
                                   s["gradient_ratio"], s["verdict"]) for s in result["init"]["schemes"]]
    suggestion = LrSuggestion(lr["lrs"][lr["index"]], lr["index"], lr["stop"], np.asarray(lr["smoothed"])) if lr else None
    draw_advice(out_dir, lrs=lr and lr["lrs"], losses=lr and lr["losses"], suggestion=suggestion, diagnoses=diagnoses)


def format_advice(result: dict) -> str:
    """The printed table: the range test's pick, each scheme's verdict, each strategy's bytes per
    worker, the patch."""
    lines = []
    if "lr" in result:
        r = result["lr"]
        end = f"diverged at lr {r['diverged_at']:.2g}" if r["diverged_at"] is not None else "never diverged"
        lines.append(f"lr: range test, {len(r['losses'])} of {r['num_steps']} steps from {r['lrs'][0]:.0e} on "
                     f"{r['num_workers']} worker(s), global batch {r['global_batch']}, {r['seconds']:.1f} s ({end})")
        lines.append(f"  recommended: {r['suggested']:g} (the smoothed loss's steepest descent)")
    if "init" in result:
        lines.append("init: the loss gradient at the first layer over the last, at initialization, on real rows")
        lines += [f"  {s['scheme']:<17} {s['gradient_ratio']:>9.2g}  {s['verdict']}" for s in result["init"]["schemes"]]
        lines.append(f"  recommended: {result['init']['recommended']}")
    if "memory" in result:
        m = result["memory"]
        lines.append(f"memory per worker: {m['num_workers']} workers, micro-batch {m['micro_batch']}, "
                     f"{m['available_bytes'] / 2**30:.1f} GiB each{' (GPU memory)' if m.get('gpu') else ''} "
                     "(plans fit within 80%)")
        lines.append(f"  {'strategy':<8} {'state':>10} {'working':>10} {'activations':>12} {'total':>10} "
                     f"{'building':>10}  fits  largest micro-batch")
        for p in m["plans"]:
            lines.append(f"  {p['strategy']:<8} {_mib(p['state_bytes'])} {_mib(p['working_bytes'])} "
                         f"{_mib(p['activation_bytes']):>12} {_mib(p['total_bytes'])} {_mib(p['build_bytes'])}  "
                         f"{'yes ' if p['fits'] else 'no  '}  {p['max_micro_batch']:,}")
        lines.append(f"  recommended: {m['recommended'] or 'none fits: lower train.batch_size'}")
    sets = " ".join(f"--set {k}={v}" for k, v in result["patch"].items())
    lines.append(f"wrote {result['out_dir']}/{ADVICE_YAML}: {sets}")
    if result.get("replaced"):
        lines.append("  (it replaced the advice there of an earlier advise: --out DIR keeps each variant's)")
    if "lr" in result or "init" in result:
        lines.append(f"wrote {result['out_dir']}/{ADVICE_PNG}")
    names = {**STAGE_NAMES, **({} if "init" in result or "memory" in result else {"ready": "model and shards"})}
    if "lr" not in result:  # one Ray task measured the other parts
        names["measured"] = " and ".join(part for part in ("init", "memory") if part in result)
    stages = ", ".join(f"{names[k]} {v:.1f} s" for k, v in result["stages"].items())
    stages += f", the workers' end {result['seconds'] - sum(result['stages'].values()):.1f} s" if "lr" in result else ""
    lines.append(f"advise took {result['seconds']:.1f} s from the process's start ({stages})")
    return "\n".join(lines)


def _mib(n: float) -> str:
    return f"{n / 2**20:>8.1f}MB"


def advice_json(result: dict) -> str:
    return json.dumps(result, indent=1, default=float)
