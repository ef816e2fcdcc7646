"""`raytrain-kit advise`: `advise.py`'s measurements as one Ray task where the experiment's
workers would run, on real training rows, before any run; then the table, advice.yaml (the
recommended values as `--set` keys) and advice.png.

Parts (`--only`): `init`, the signal-propagation diagnostic of every init scheme the kit offers on
the experiment's model; `memory`, the per-worker plan of ddp, hsdp and fsdp at the configured
worker count and micro-batch against each worker's share of its node's memory. (The learning-rate
range test, issue #21's third part, is not built yet.) Exercised by `tests/test_advise.py`.
"""

from __future__ import annotations

import json
import math
from typing import Callable, Optional, Sequence

import numpy as np
import ray
import torch

from raytrain_kit.advise import (ADVICE_PNG, diagnose_inits, draw_advice, fit_activation_bytes, plan_state_bytes,
                                 plan_strategies)
from raytrain_kit.config import Experiment, build_experiment, with_overrides
from raytrain_kit.data import DataSpec, spec_from_dict, spec_to_dict
from raytrain_kit.models import build_model
from raytrain_kit.parallel import find_blocks
from raytrain_kit.steps import build_loss_fn

PARTS = ("init", "memory")
ADVICE_YAML = "advice.yaml"
BATCH_ROWS = 64  # training rows measured: the diagnostic's batch; activations fitted from 32 and 64
SCHEMES = ("kaiming_normal", "kaiming_uniform", "xavier_uniform", "xavier_normal", "orthogonal", "normal",
           "truncated_normal", "default")  # every scheme but zeros, best-known first (ties keep this order)
STRATEGY_ORDER = ("ddp", "hsdp", "fsdp")  # least communication first: the first that fits is recommended


def gathered_bytes(model: torch.nn.Module, cfg: Experiment) -> int:
    """Full weights a sharded worker holds beside its shards while it computes (FSDP2): the
    root's own parameters (gathered for the whole forward), and the largest block's three times
    (it, the next one prefetched, and its gradients before the reduce-scatter)."""
    blocks = find_blocks(model, cfg)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}

    def size(params) -> int:
        return sum(p.numel() * p.element_size() for p in params)

    largest = max((size(block.parameters()) for block in blocks), default=0)
    return size(p for p in model.parameters() if id(p) not in in_blocks) + 3 * largest


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
    gathered = {s: 0 if s == "ddp" else gathered_bytes(model, cfg) for s in STRATEGY_ORDER}
    per_row, fixed = fit_activation_bytes(model, inputs, targets, loss_fn)
    plans, recommended = plan_strategies(state, gathered, activation_per_row=per_row, activation_fixed=fixed,
                                         micro_batch=cfg.train.batch_size, available_bytes=available_bytes)
    return {"recommended": recommended, "available_bytes": available_bytes, "micro_batch": cfg.train.batch_size,
            "num_workers": n, "activation_bytes_per_row": per_row, "plans": [p.__dict__ for p in plans]}


@ray.remote(num_cpus=1, max_retries=0)
def advise_task(experiment: dict, spec: dict, x: np.ndarray, y: np.ndarray, parts: list[str], available_bytes: int) -> dict:
    """The measurements on `x`, `y` (encoded training rows) where Ray places the task."""
    cfg, spec = build_experiment(experiment), spec_from_dict(spec)
    inputs = torch.tensor(x, dtype=torch.float32).view(-1, *spec.input_shape)
    targets = torch.tensor(y)
    loss_fn = build_loss_fn(classification=spec.task == "classification")
    out = {}
    if "init" in parts:
        out["init"] = _init_part(cfg, spec, inputs, targets, loss_fn)
    if "memory" in parts:
        out["memory"] = _memory_part(cfg, spec, inputs, targets, loss_fn, available_bytes)
    return out


def worker_memory_bytes(cfg: Experiment) -> int:
    """Each worker's share of the smallest node's memory (Ray's `memory` resource: what tasks may
    use), the workers spread evenly over the alive nodes."""
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("memory")]
    per_node = math.ceil(cfg.scaling.num_workers / max(len(nodes), 1))
    smallest = min((n["Resources"]["memory"] for n in nodes), default=ray.cluster_resources().get("memory", 0))
    return int(smallest // per_node)


def advice_patch(result: dict, cfg: Experiment) -> dict:
    """The recommended values as `--set` keys: the init scheme; the strategy (and, when none fits,
    the current strategy's largest micro-batch that does)."""
    patch = {}
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
               log: Callable[[str], None] = lambda line: None) -> dict:
    """Measure, write advice.yaml and advice.png into `out_dir` (default: `<run.storage_path>/
    <run.name>_advice`), and return {"init", "memory", "patch", "out_dir"}. Raises ConfigError
    (a model that does not build) and DataError (data that does not read)."""
    import yaml

    from raytrain_kit.advise import InitDiagnosis, LayerStats
    from raytrain_kit.cluster import connect
    from raytrain_kit.data import build_datasets
    from raytrain_kit.launch import check_model_builds, storage_root
    from raytrain_kit.storage import write_run_file

    if not ray.is_initialized():
        connect()
    datasets, spec = build_datasets(cfg)
    check_model_builds(cfg, spec)
    batch = datasets["train"].take_batch(BATCH_ROWS, batch_format="numpy")
    log(f"advise:        {', '.join(parts)} on {len(batch['y'])} training rows")
    result = ray.get(advise_task.remote(cfg.model_dump(mode="json"), spec_to_dict(spec), batch["x"], batch["y"],
                                        list(parts), worker_memory_bytes(cfg)))
    out_dir = out_dir or f"{storage_root(cfg).rstrip('/')}/{cfg.run.name}_advice"
    result["patch"], result["out_dir"] = advice_patch(result, cfg), out_dir
    write_run_file(out_dir, ADVICE_YAML, yaml.safe_dump(result["patch"], sort_keys=False))
    if "init" in result:
        diagnoses = [InitDiagnosis(s["scheme"], [LayerStats(str(i), a, g) for i, (a, g) in
                                                 enumerate(zip(s["activation_std"], s["gradient_rms"]))],
                                   s["gradient_ratio"], s["verdict"]) for s in result["init"]["schemes"]]
        draw_advice(out_dir, diagnoses=diagnoses)
    return result


def format_advice(result: dict) -> str:
    """The printed table: each scheme's verdict, each strategy's bytes per worker, the patch."""
    lines = []
    if "init" in result:
        lines.append("init: the loss gradient at the first layer over the last, at initialization, on real rows")
        lines += [f"  {s['scheme']:<17} {s['gradient_ratio']:>9.2g}  {s['verdict']}" for s in result["init"]["schemes"]]
        lines.append(f"  recommended: {result['init']['recommended']}")
    if "memory" in result:
        m = result["memory"]
        lines.append(f"memory per worker: {m['num_workers']} workers, micro-batch {m['micro_batch']}, "
                     f"{m['available_bytes'] / 2**30:.1f} GiB each (plans fit within 80%)")
        lines.append(f"  {'strategy':<8} {'state':>10} {'gathered':>10} {'activations':>12} {'total':>10}  fits  "
                     "largest micro-batch")
        for p in m["plans"]:
            lines.append(f"  {p['strategy']:<8} {_mib(p['state_bytes'])} {_mib(p['gathered_bytes'])} "
                         f"{_mib(p['activation_bytes']):>12} {_mib(p['total_bytes'])}  {'yes ' if p['fits'] else 'no  '}  "
                         f"{p['max_micro_batch']:,}")
        lines.append(f"  recommended: {m['recommended'] or 'none fits: lower train.batch_size'}")
    sets = " ".join(f"--set {k}={v}" for k, v in result["patch"].items())
    lines.append(f"wrote {result['out_dir']}/{ADVICE_YAML}: {sets}")
    if "init" in result:
        lines.append(f"wrote {result['out_dir']}/{ADVICE_PNG}")
    return "\n".join(lines)


def _mib(n: float) -> str:
    return f"{n / 2**20:>8.1f}MB"


def advice_json(result: dict) -> str:
    return json.dumps(result, indent=1, default=float)
