"""Memory benchmark: what each worker holds under ddp and under fsdp, side by side in one run.

A 54.6M-parameter MLP (1024 -> 4 x 4096 -> 10) with AdamW, 2 workers, trained one epoch by the
kit on synthetic data, once per strategy. Per worker (the larger of the two; FSDP2 shards evenly):
the bytes of parameters + gradients + optimizer state it holds, counted from its local tensors
and shards (the kit's `state_mb` metric), and the peak resident memory of its process
(`peak_rss_mb`); then fsdp's figures as a ratio of ddp's. Writes benchmarks/results/memory.json.

    python benchmarks/memory_bench.py [--quick]   # --quick: a 3.2M-parameter MLP, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL = 0.55  # fsdp's parameter + gradient + optimizer bytes per worker, as a fraction of ddp's


def experiment(strategy: str, *, quick: bool, storage: str):
    from raytrain_kit.config import build_experiment

    width, features = (1024, 256) if quick else (4096, 1024)
    return build_experiment({
        "data": {"source": "synthetic", "num_rows": 640 if quick else 1280, "num_features": features, "num_classes": 10},
        "model": {"kind": "mlp", "hidden": [width] * 4},
        "optim": {"name": "adamw", "lr": 1e-4}, "regularization": {"weight_decay": 0.01},
        "train": {"epochs": 1, "batch_size": 32},
        "scaling": {"num_workers": 2, "strategy": strategy, "max_failures": 0},
        "preflight": {"enabled": False}, "tracking": {"tensorboard": False},
        "run": {"name": strategy, "storage_path": storage}})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small MLP: checks that the benchmark runs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    import ray
    import torch

    from raytrain_kit.cluster import connect
    from raytrain_kit.data import build_datasets
    from raytrain_kit.launch import fit
    from raytrain_kit.models import build_model, num_parameters

    connect()
    storage = tempfile.mkdtemp(prefix="raytrain-kit-memory-")
    started = time.perf_counter()
    figures = {}
    try:
        for strategy in ("ddp", "fsdp"):
            cfg = experiment(strategy, quick=args.quick, storage=storage)
            datasets, spec = build_datasets(cfg)
            last = fit(cfg, datasets_and_spec=(datasets, spec))["final_metrics"]
            figures[strategy] = {"state_mb": last["state_mb"], "peak_rss_mb": last["peak_rss_mb"]}
        parameters = num_parameters(build_model(cfg, spec))
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    ratio = {k: figures["fsdp"][k] / figures["ddp"][k] for k in ("state_mb", "peak_rss_mb")}
    # What the counts should be: fp32 parameters, gradients and AdamW's two moments, 4 x 4 bytes.
    expected_ddp_mb = parameters * 16 / 2**20
    result = {"machine": {"platform": platform.platform(), "cores": os.cpu_count(), "torch": torch.__version__,
                          "ray": ray.__version__},
              "quick": args.quick, "parameters": parameters, "optimizer": "adamw", "num_workers": 2,
              "ddp": figures["ddp"], "fsdp": figures["fsdp"], "ratio": ratio, "goal": GOAL,
              "expected_ddp_state_mb": expected_ddp_mb, "seconds": time.perf_counter() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(result, indent=1))

    print(f"\n{parameters:,}-parameter MLP, AdamW, 2 workers ({os.cpu_count()} cores, torch {torch.__version__})\n")
    print("| per worker | ddp | fsdp | fsdp / ddp | goal |")
    print("|---|---|---|---|---|")
    print(f"| parameters + gradients + optimizer state | {figures['ddp']['state_mb']:,.1f} MB | "
          f"{figures['fsdp']['state_mb']:,.1f} MB | {ratio['state_mb']:.3f} | <= {GOAL} |")
    print(f"| peak RSS of the worker process | {figures['ddp']['peak_rss_mb']:,.0f} MB | "
          f"{figures['fsdp']['peak_rss_mb']:,.0f} MB | {ratio['peak_rss_mb']:.3f} | reported |")
    print(f"\n(ddp's count should be {expected_ddp_mb:,.1f} MB: 4 fp32 tensors per parameter)")
    print(f"wrote {args.out / 'memory.json'} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
