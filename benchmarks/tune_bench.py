"""ASHA versus the full budget: the same sampled trials of `jobs/sweep_digits.yaml`, run once with
FIFO (every trial trains every epoch) and once with ASHA, in one process on one Ray.

Prints the best validation accuracy of each, the epochs each trained in total, and their ratios;
writes benchmarks/results/tune.json and the ASHA sweep's report pictures next to it
(tune_asha_sweep.png, tune_asha_parallel.png). The goal: ASHA within 1 point of FIFO's best accuracy while
training at most 40% of FIFO's epochs.

    python benchmarks/tune_bench.py            # the shipped sweep: 27 trials, 12 epochs
    python benchmarks/tune_bench.py --quick    # 6 trials, 4 epochs: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


OUT = ROOT / "benchmarks" / "results"


def run(scheduler: str, *, storage: str, quick: bool) -> dict:
    import shutil

    from raytrain_kit.config import load_experiment
    from raytrain_kit.report import write_report
    from raytrain_kit.sweep import run_sweep

    overrides = {"tune.scheduler": scheduler, "run.name": f"bench_{scheduler}", "run.storage_path": storage,
                 "preflight.enabled": False}
    if quick:
        overrides.update({"tune.num_samples": 6, "train.epochs": 4})
    cfg = load_experiment(ROOT / "jobs" / "sweep_digits.yaml", overrides)
    started = time.perf_counter()
    summary = run_sweep(cfg)
    wall_s = round(time.perf_counter() - started, 1)
    table = summary["table"]
    # Epochs the workers finished, from each trial's Train run, not only those the scheduler saw:
    # any epoch a stopped trial trained past its last report is compute spent, so it counts.
    trained = sum(json.loads(p.read_text())["epochs_completed"]
                  for p in Path(summary["run_dir"]).glob("runs/*/summary.json"))
    OUT.mkdir(parents=True, exist_ok=True)
    for picture in write_report(summary["run_dir"]):
        if picture.endswith(".png"):
            shutil.copy(picture, OUT / f"tune_{scheduler}_{Path(picture).name}")
    return {"scheduler": scheduler, "best_val_accuracy": summary["best_value"],
            "epochs_trained": trained, "epochs_reported": int(table["epochs_run"].sum()), "num_trials": len(table),
            "num_stopped": int((table["status"] == "stopped").sum()), "wall_s": wall_s,
            "trials": table[["optim.lr", "init.scheme", "regularization.l2"]].round(12).values.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 trials of 4 epochs: checks that it runs")
    args = parser.parse_args()

    import ray
    import torch

    from raytrain_kit.cluster import connect

    connect()
    with tempfile.TemporaryDirectory(prefix="tune-bench-") as storage:
        fifo = run("fifo", storage=storage, quick=args.quick)
        asha = run("asha", storage=storage, quick=args.quick)
    same_trials = sorted(map(str, fifo["trials"])) == sorted(map(str, asha["trials"]))
    accuracy_gap = fifo["best_val_accuracy"] - asha["best_val_accuracy"]
    epoch_ratio = asha["epochs_trained"] / fifo["epochs_trained"]
    time_ratio = asha["wall_s"] / fifo["wall_s"]
    print(f"\n{fifo['num_trials']} trials, the same sampled values in both runs: {same_trials}\n")
    print("| scheduler | best val_accuracy | epochs trained | epochs reported | trials stopped early | wall s |")
    print("|---|---|---|---|---|---|")
    for r in (fifo, asha):
        print(f"| {r['scheduler']} | {r['best_val_accuracy']:.4f} | {r['epochs_trained']} | {r['epochs_reported']} "
              f"| {r['num_stopped']} | {r['wall_s']} |")
    print(f"\nASHA vs FIFO: best accuracy {-accuracy_gap * 100:+.2f} points (goal: within 1), "
          f"epochs {epoch_ratio:.2f}x (goal: <= 0.40), wall time {time_ratio:.2f}x")
    out = OUT
    (out / "tune.json").write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "ray": ray.__version__},
        "quick": args.quick, "same_trials": same_trials, "fifo": fifo, "asha": asha,
        "accuracy_gap_points": round(accuracy_gap * 100, 3), "epoch_ratio": round(epoch_ratio, 4),
        "wall_time_ratio": round(time_ratio, 4),
    }, indent=1))
    print(f"wrote {out / 'tune.json'}")


if __name__ == "__main__":
    main()
