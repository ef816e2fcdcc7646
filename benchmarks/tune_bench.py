"""The sweep against what a user would write instead, and ASHA against the full budget.

Runs, one after the other on the same idle machine, each as the command a user types:
`python benchmarks/optuna_sweep.py` (a plain Optuna study in one process: the same CNN, search
space, epochs, schedule and successive-halving pruning), then `raytrain-kit tune
jobs/sweep_digits.yaml` with ASHA (the shipped sweep) and with FIFO (every trial trains every
epoch). Prints and writes to benchmarks/results/tune.json:

- kit (ASHA) wall time over Optuna's, whole commands (Ray's start and the report included) and
  sweep phases only (the kit's Tune run against Optuna's study), at their best val_accuracy;
  goal: <= 2.0x, within 1 point;
- ASHA's wall time over FIFO's (goal: <= 0.45x) and the epochs each trained (from every trial
  run's summary, not only those the scheduler saw);
- the median per-trial overhead: a trial's time in Tune (`time_total_s`) minus its epochs'
  training and validation seconds (goal: <= 1.5 s for single-worker trials);
- the floor under any Ray sweep of torch trials here (a command of its own; `--no-floor` skips it):
  Ray started as the kit starts it, one process per CPU with torch imported and an optimizer
  built, Ray ended; with each sweep's epoch seconds spread over its processes, the least each
  sweep could take, and so the least the two ratios above could be.

    python benchmarks/tune_bench.py            # the shipped sweep: 27 trials, 12 epochs
    python benchmarks/tune_bench.py --quick    # 6 trials, 4 epochs: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
QUICK = ["--set", "tune.num_samples=6", "--set", "train.epochs=4"]


def timed(command: list[str]) -> tuple[float, str]:
    """Wall seconds of a command run as a user would (its own process group, Ray's env unset)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
                          start_new_session=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return wall, done.stdout


def run_optuna(quick: bool) -> dict:
    wall, out = timed([sys.executable, str(ROOT / "benchmarks" / "optuna_sweep.py"), *(["--quick"] if quick else [])])
    return {**json.loads(out.strip().splitlines()[-1]), "wall_s": round(wall, 2)}


def trial_overheads(sweep_dir: Path) -> list[float]:
    """Per trial: its seconds in Tune minus its epochs' training and validation seconds."""
    overheads = []
    for results in sweep_dir.glob("*/result.json"):
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        if rows:
            epochs = sum(r.get("epoch_s", 0.0) + r.get("val_s", 0.0) for r in rows)
            overheads.append(rows[-1]["time_total_s"] - epochs)
    return overheads


def run_kit(scheduler: str, *, storage: str, quick: bool) -> dict:
    import pandas as pd

    name = f"bench_{scheduler}"
    wall, _ = timed([sys.executable, "-m", "raytrain_kit", "tune", str(ROOT / "jobs" / "sweep_digits.yaml"), "-q",
                     "--set", f"tune.scheduler={scheduler}", "--set", f"run.name={name}",
                     "--set", f"run.storage_path={storage}", *(QUICK if quick else [])])
    sweep_dir = Path(storage) / name
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    table = pd.read_csv(sweep_dir / "trials.csv")
    # Epochs the workers finished, from each trial's run, not only those the scheduler saw.
    trained = sum(json.loads(p.read_text())["epochs_completed"] for p in sweep_dir.glob("runs/*/summary.json"))
    overheads = trial_overheads(sweep_dir)
    for picture in ("sweep.png", "parallel.png"):
        if (sweep_dir / picture).exists():
            shutil.copy(sweep_dir / picture, OUT / f"tune_{scheduler}_{picture}")
    return {"scheduler": scheduler, "best_val_accuracy": sweep["best_value"], "epochs_trained": trained,
            "epochs_reported": int(table["epochs_run"].sum()), "num_trials": len(table),
            "num_stopped": int((table["status"] == "stopped").sum()), "wall_s": round(wall, 2),
            "sweep_s": sweep["wall_s"], "median_trial_overhead_s": round(statistics.median(overheads), 3),
            "training_s": round(training_s(sweep_dir), 2), "trials_at_once": sweep["trials_at_once"],
            "trials": table[["optim.lr", "init.scheme", "regularization.l2"]].round(12).values.tolist()}


FLOOR = """
import sys, time
import ray
from raytrain_kit.cluster import connect, disconnect
started = time.perf_counter()
connect(state_api=False)  # as `raytrain-kit tune` starts Ray for one-worker trials

@ray.remote(num_cpus=1)
class TrialProcess:
    def ready(self):
        import torch
        model = torch.nn.Linear(4, 2)
        torch.optim.Adam(model.parameters())  # the first optimizer imports torch._dynamo, as in every trial process
        return True

processes = [TrialProcess.remote() for _ in range(int(ray.cluster_resources()["CPU"]))]
ray.get([p.ready.remote() for p in processes])
ready = time.perf_counter()
disconnect()
print(round(ready - started, 2), round(time.perf_counter() - started, 2))
"""


def run_floor() -> dict:
    """What any Ray sweep of torch trials pays on this machine before and after its epochs: Ray
    started as the kit starts it, one process per CPU with torch imported and an optimizer built,
    Ray ended. Its Python start and imports count too: it runs as a command."""
    wall, out = timed([sys.executable, "-c", FLOOR])
    to_ready, _ = map(float, out.strip().splitlines()[-1].split())
    return {"wall_s": round(wall, 2), "ready_s": to_ready}


def training_s(sweep_dir: Path) -> float:
    """Seconds of epochs (training and validation) over every trial's run, from their metrics."""
    import pandas as pd

    total = 0.0
    for metrics in sweep_dir.glob("runs/*/metrics.csv"):
        frame = pd.read_csv(metrics)
        total += float(frame.get("epoch_s", 0).sum() + frame.get("val_s", 0).sum())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 trials of 4 epochs: checks that it runs")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip the floor (Ray and one torch process per CPU, about 12 s)")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for tune.json")
    args = parser.parse_args()
    import ray
    import torch

    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tune-bench-") as storage:
        optuna_result = run_optuna(args.quick)
        asha = run_kit("asha", storage=storage, quick=args.quick)
        fifo = run_kit("fifo", storage=storage, quick=args.quick)
        floor = run_floor() if args.floor else None
    same_trials = sorted(map(str, fifo["trials"])) == sorted(map(str, asha["trials"]))
    figures = {
        "kit_vs_optuna_wall": round(asha["wall_s"] / optuna_result["wall_s"], 3),
        "kit_vs_optuna_sweep": round(asha["sweep_s"] / optuna_result["study_s"], 3),
        "accuracy_gap_vs_optuna_points": round((optuna_result["best_val_accuracy"] - asha["best_val_accuracy"]) * 100, 3),
        "asha_vs_fifo_wall": round(asha["wall_s"] / fifo["wall_s"], 3),
        "asha_vs_fifo_sweep": round(asha["sweep_s"] / fifo["sweep_s"], 3),
        "asha_vs_fifo_epochs": round(asha["epochs_trained"] / fifo["epochs_trained"], 3),
        "asha_vs_fifo_accuracy_points": round((asha["best_val_accuracy"] - fifo["best_val_accuracy"]) * 100, 3),
        "median_trial_overhead_s": asha["median_trial_overhead_s"],
    }
    if floor:
        # The least a Ray sweep could take: the floor, then its epochs spread over its processes.
        least = {r["scheduler"]: floor["wall_s"] + r["training_s"] / r["trials_at_once"] for r in (asha, fifo)}
        figures.update(least_asha_s=round(least["asha"], 2), least_fifo_s=round(least["fifo"], 2),
                       least_kit_vs_optuna_wall=round(least["asha"] / optuna_result["wall_s"], 3),
                       least_asha_vs_fifo_wall=round(least["asha"] / least["fifo"], 3))
    print(f"\n{asha['num_trials']} trials; FIFO and ASHA sampled the same values: {same_trials}\n")
    print("| sweep | best val_accuracy | epochs trained | trials stopped early | command s | sweep s | median trial overhead s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| plain Optuna, one process | {optuna_result['best_val_accuracy']:.4f} | {optuna_result['epochs_trained']} | "
          f"{optuna_result['num_pruned']} | {optuna_result['wall_s']} | {optuna_result['study_s']} | - |")
    for r in (asha, fifo):
        print(f"| kit, {r['scheduler']} | {r['best_val_accuracy']:.4f} | {r['epochs_trained']} | {r['num_stopped']} | "
              f"{r['wall_s']} | {r['sweep_s']} | {r['median_trial_overhead_s']} |")
    if floor:
        print(f"| floor: Ray, {asha['trials_at_once']} torch processes | - | 0 | - | {floor['wall_s']} | - | - |")
    f = figures
    print(f"\nkit (ASHA) vs Optuna: {f['kit_vs_optuna_wall']:.2f}x the command's wall time (goal <= 2.0x), "
          f"{f['kit_vs_optuna_sweep']:.2f}x the sweep's, best accuracy {-f['accuracy_gap_vs_optuna_points']:+.2f} points (goal: within 1)")
    print(f"ASHA vs FIFO: wall time {f['asha_vs_fifo_wall']:.2f}x (goal <= 0.45x; sweep {f['asha_vs_fifo_sweep']:.2f}x), "
          f"epochs {f['asha_vs_fifo_epochs']:.2f}x, best accuracy {f['asha_vs_fifo_accuracy_points']:+.2f} points")
    print(f"median per-trial overhead: {f['median_trial_overhead_s']:.2f} s (goal <= 1.5 s)")
    if floor:
        print(f"the least a Ray sweep could take (floor {floor['wall_s']} s + epochs / processes): ASHA "
              f"{f['least_asha_s']} s = {f['least_kit_vs_optuna_wall']:.2f}x Optuna's command, FIFO {f['least_fifo_s']} s; "
              f"ASHA/FIFO {f['least_asha_vs_fifo_wall']:.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tune.json").write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "ray": ray.__version__},
        "quick": args.quick, "same_trials": same_trials, "optuna": optuna_result, "asha": asha, "fifo": fifo,
        "floor": floor, **figures,
    }, indent=1))
    print(f"wrote {args.out / 'tune.json'}")


if __name__ == "__main__":
    main()
