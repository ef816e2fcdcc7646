"""`raytrain-kit advise` checked against measurement, side by side in one run.

1. Memory: the plan's bytes per worker against the peak a worker measures, for ddp and fsdp on 2
   workers, on jobs/fsdp_mlp.yaml (8.7M parameters, AdamW, 2 micro-batches of 64; in fp32 and
   bf16) and on the digits CNN of jobs/digits.yaml (fp32). `--gpu`: the same on 2 GPU workers
   (CUDA's allocator's peak), which benchmarks/gpu_check.sh runs. Planned: `advisor`'s memory part (state + working bytes: the
   gathered weights, or a gradient on its way into the kept one + activations at the configured
   micro-batch). Measured, in each of 2 Ray Train workers of the
   strategy: PyTorch's profiler (`profile_memory`) records every CPU tensor allocation and free
   from before the model is built to the end of the second training step (the kit's own
   `build_train_state` and `steps.train_epoch`: DDP's buckets, FSDP's gathers, the optimizer's
   state and temporaries, autograd's activations); the running sum of those bytes at its
   highest during the second step is the worker's peak (the larger rank's). Rows are random
   values of the job's shape: activation bytes depend on shapes, not values. Goal: planned
   within 20% of measured, in fp32 (the jobs' own precision); bf16 reported.
2. Cost: `raytrain-kit advise jobs/digits.yaml` (all three parts) against what a run of the job
   takes to start and train one epoch (`raytrain-kit train jobs/digits.yaml --set
   train.epochs=1`: summary.json's start-up to the first step plus the epoch's seconds), both
   timed from their process's start, alternately, twice. Goal: advise below 1.0x.

Writes benchmarks/results/advise.json.

    python benchmarks/advise_bench.py [--quick]     # or: python -m benchmarks --only advise
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results"
MEMORY_GOAL = 0.20  # |planned / measured - 1|
# The jobs' own precision. fsdp's bf16 peak varies from run to run on CPUs (125-141 MB measured for
# fsdp_mlp: the gathers overlap the slow bf16 matmuls differently) and its plan falls short of it
# (0.76-0.86): reported, not yet a goal.
GOAL_PRECISIONS = ("fp32",)
COST_GOAL = 1.0  # advise's seconds over a run's start-up plus one epoch
JOBS = {"fsdp_mlp": "jobs/fsdp_mlp.yaml", "digits_cnn": "jobs/digits.yaml"}


def job_config(job: str, strategy: str, precision: str = "fp32", *, gpu: bool = False):
    from raytrain_kit.config import load_experiment

    return load_experiment(ROOT / JOBS[job], [f"scaling.strategy={strategy}", "scaling.num_workers=2",
                                              f"train.precision={precision}", f"scaling.use_gpu={str(gpu).lower()}"])


def job_spec(job: str):
    from raytrain_kit.data import DataSpec

    if job == "digits_cnn":
        return DataSpec(num_features=64, num_classes=10, input_shape=(1, 8, 8), num_train_rows=1437, num_val_rows=360)
    return DataSpec(num_features=128, num_classes=10, input_shape=(128,), num_train_rows=16000, num_val_rows=4000)


def peak_per_worker(config: dict) -> int:
    """Runs in each Train worker: the peak of tensor bytes allocated from before the model is
    built to the end of its second training step. On CPUs, the profiler's allocation and free
    events summed in time order (the peak within the second step); on a GPU, CUDA's allocator's
    own peak (`max_memory_allocated`)."""
    import ray.train
    import ray.train.torch
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from raytrain_kit.advise import profiled_peak_bytes
    from raytrain_kit.config import build_experiment
    from raytrain_kit.data import spec_from_dict
    from raytrain_kit.loop import build_train_state
    from raytrain_kit.steps import train_epoch

    cfg, spec = build_experiment(config["experiment"]), spec_from_dict(config["spec"])
    context = ray.train.get_context()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    b, accum = cfg.train.batch_size, cfg.train.grad_accum_steps
    generator = torch.Generator().manual_seed(context.get_world_rank())
    x = torch.rand(b * accum, *spec.input_shape, generator=generator).to(device)
    y = torch.randint(0, spec.num_classes, (b * accum,), generator=generator).to(device)

    def two_steps() -> None:
        state = build_train_state(cfg, spec, rank=context.get_world_rank(), world_size=context.get_world_size(),
                                  device=device)
        for step in range(2):
            batches = [(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]) for i in range(accum)]
            with record_function(f"step{step}"):  # its start and end on the profiler's own clock
                train_epoch(state.module, batches, cfg=cfg, optimizer=state.optimizer, scheduler=state.scheduler,
                            penalty_model=state.model, precision=state.precision, scaler=state.scaler)

    if device.type == "cuda":
        baseline = torch.cuda.memory_allocated(device)  # the rows
        torch.cuda.reset_peak_memory_stats(device)
        two_steps()
        return int(torch.cuda.max_memory_allocated(device) - baseline)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        two_steps()
    return profiled_peak_bytes(prof, "step1")


def measured_peak(cfg, spec) -> int:
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from raytrain_kit.data import spec_to_dict
    from raytrain_kit.launch import scaling_config

    with tempfile.TemporaryDirectory(prefix="advise-bench-") as storage:
        trainer = TorchTrainer(peak_per_worker, train_loop_config={"experiment": cfg.model_dump(mode="json"),
                                                                   "spec": spec_to_dict(spec)},
                               scaling_config=scaling_config(cfg), run_config=RunConfig(name="peak", storage_path=storage))
        return max(trainer.fit().return_value, 0)


def planned(cfg, spec) -> dict:
    """The advise command's memory part for the job (its plan for the config's strategy), on random rows."""
    import torch

    from raytrain_kit.advisor import _memory_part
    from raytrain_kit.steps import build_loss_fn

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(64, *spec.input_shape, generator=generator)
    y = torch.randint(0, spec.num_classes, (64,), generator=generator)
    memory = _memory_part(cfg, spec, x, y, build_loss_fn(classification=True), 1 << 40)
    return next(p for p in memory["plans"] if p["strategy"] == cfg.scaling.strategy)


CASES = [("fsdp_mlp", "ddp", "fp32"), ("fsdp_mlp", "fsdp", "fp32"), ("fsdp_mlp", "ddp", "bf16"),
         ("fsdp_mlp", "fsdp", "bf16"), ("digits_cnn", "ddp", "fp32"), ("digits_cnn", "fsdp", "fp32")]


def memory_rows(*, gpu: bool) -> list[dict]:
    rows = []
    for job, strategy, precision in CASES:
        cfg, spec = job_config(job, strategy, precision, gpu=gpu), job_spec(job)
        plan, peak = planned(cfg, spec), measured_peak(cfg, spec)
        rows.append({"job": job, "strategy": strategy, "precision": precision, "device": "gpu" if gpu else "cpu",
                     "planned_bytes": plan["total_bytes"], "planned_state_bytes": plan["state_bytes"],
                     "planned_working_bytes": plan["working_bytes"], "planned_activation_bytes": plan["activation_bytes"],
                     "measured_peak_bytes": peak, "ratio": plan["total_bytes"] / peak})
        print(f"  {job} {strategy} {precision}: planned {plan['total_bytes'] / 2**20:.2f} MB (state "
              f"{plan['state_bytes'] / 2**20:.2f}, working {plan['working_bytes'] / 2**20:.2f}, activations "
              f"{plan['activation_bytes'] / 2**20:.2f}), measured {peak / 2**20:.2f} MB", flush=True)
    return rows


def cost_rounds(rounds: int) -> dict:
    """advise's seconds and a run's start-up + one epoch, alternately, `rounds` times each."""
    advise_s, run_s = [], []
    with tempfile.TemporaryDirectory(prefix="advise-cost-") as work:
        for i in range(rounds):
            out = subprocess.run([sys.executable, "-m", "raytrain_kit", "advise", str(ROOT / "jobs/digits.yaml"),
                                  "--out", f"{work}/advice{i}"], capture_output=True, text=True, check=True).stdout
            advise_s.append(float(re.search(r"advise took ([\d.]+) s", out).group(1)))
            subprocess.run([sys.executable, "-m", "raytrain_kit", "train", str(ROOT / "jobs/digits.yaml"), "-q",
                            "--set", "train.epochs=1", "--set", f"run.storage_path={work}/runs{i}"],
                           capture_output=True, text=True, check=True)
            summary = json.loads(Path(f"{work}/runs{i}/digits/summary.json").read_text())
            run_s.append(summary["startup"]["first_step"] + summary["history"][0]["epoch_s"])
            print(f"  round {i + 1}: advise {advise_s[-1]:.1f} s, run start-up + 1 epoch {run_s[-1]:.1f} s", flush=True)
    ratios = [a / r for a, r in zip(advise_s, run_s)]
    return {"advise_s": advise_s, "run_startup_and_epoch_s": run_s, "ratios": ratios, "ratio": statistics.median(ratios)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round of the cost: checks that it runs")
    parser.add_argument("--part", choices=["memory", "cost"], default=None, help="only this part")
    parser.add_argument("--gpu", action="store_true", help="the memory part on GPU workers (benchmarks/gpu_check.sh)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    args = parser.parse_args()
    from raytrain_kit.cluster import connect, disconnect

    memory, cost = [], None
    if args.part in (None, "memory"):
        connect()
        print("memory: planned vs measured peak per worker", flush=True)
        memory = memory_rows(gpu=args.gpu)
        disconnect()  # the CLI runs below start their own Ray
    if args.part in (None, "cost"):
        print("cost: advise vs a run's start-up and one epoch", flush=True)
        cost = cost_rounds(1 if args.quick else 2)
    print("| benchmark | kit | reference | ratio | goal |\n|---|---|---|---|---|")
    for r in memory:
        print(f"| advise memory plan ({r['job']}, {r['strategy']}, {r['precision']}, 2 {r['device'].upper()} workers) | {r['planned_bytes'] / 2**20:.2f} MB planned "
              f"| {r['measured_peak_bytes'] / 2**20:.2f} MB measured peak | {r['ratio']:.3f} | "
              f"{f'{1 - MEMORY_GOAL:.2f}-{1 + MEMORY_GOAL:.2f}' if r['precision'] in GOAL_PRECISIONS else 'reported'} |")
    if cost:
        print(f"| advise cost (jobs/digits.yaml, all parts) | {statistics.median(cost['advise_s']):.1f} s | "
              f"{statistics.median(cost['run_startup_and_epoch_s']):.1f} s (a run's start-up + 1 epoch) | "
              f"{cost['ratio']:.2f}x (median of {len(cost['ratios'])}) | < {COST_GOAL}x |")
    from machine import machine

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / ("advise_gpu.json" if args.gpu else "advise.json")).write_text(json.dumps({
        "machine": machine(), "quick": args.quick, "memory_goal": MEMORY_GOAL, "cost_goal": COST_GOAL,
        "memory": memory, "cost": cost}, indent=1))
    print(f"wrote {OUT / ('advise_gpu.json' if args.gpu else 'advise.json')}")
    met = all(abs(r["ratio"] - 1) <= MEMORY_GOAL for r in memory if r["precision"] in GOAL_PRECISIONS)
    met = met and (not cost or cost["ratio"] < COST_GOAL)
    print(f"goals {'met' if met else 'MISSED'}")
    return 0 if met or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
