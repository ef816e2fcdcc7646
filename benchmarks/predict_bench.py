"""Batch inference: `raytrain-kit predict` against a plain torch loop over the exported model.

Both predict the same rows, synthetic tables with 64 numeric features and 10 classes stored as 8
Parquet files, with the same trained MLP (64 -> 512 -> 512 -> 10, trained by the kit on 20,000
rows of the same table). The kit: `predict_run` on this process's Ray, 2 actors of 1 CPU each
(reading the Parquet files, the fitted standardization, the forward passes in batches of 1,024,
the probabilities, the Parquet files written). The reference, one process: `raytrain-kit
export`'s model and record, pandas reading the same files, the same standardization, torch's
forward passes in batches of 1,024 with its default threads (every core), softmax, and pandas
writing one Parquet file. Rows/s of each from the start to the last file written, alternately
(reference, kit, reference, kit); a size's ratio is the median of its rounds'.

Sizes: 2,000,000 rows (1.1 GB of Parquet; the goal: the kit >= 0.8x) and 200,000 rows (reported
beside its floor). The kit also predicts 64 rows: its fixed cost (Ray Data's read and write
passes, 2 actors started, torch imported and the model loaded in each), which the plain loop in
an already-running process does not pay and which no rate of prediction recovers on a small
table. Writes benchmarks/results/predict.json.

    python benchmarks/predict_bench.py [--quick]     # or: python -m benchmarks --only predict
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results"
GOAL, GOAL_ROWS = 0.8, 2_000_000  # the kit's rate over the reference's, on a table of GOAL_ROWS
NUM_FEATURES, NUM_CLASSES, BATCH = 64, 10, 1024


def write_table(folder: Path, num_rows: int) -> list[str]:
    """A seeded table (a random linear teacher), as 8 Parquet files; the feature names."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((num_rows, NUM_FEATURES)) * 3 + 1
    teacher = rng.standard_normal((NUM_FEATURES, NUM_CLASSES))
    names = [f"f{i}" for i in range(NUM_FEATURES)]
    frame = pd.DataFrame(x, columns=names).assign(label=(x @ teacher).argmax(axis=1), row_id=np.arange(num_rows))
    folder.mkdir(parents=True)
    for i, part in enumerate(np.array_split(np.arange(num_rows), 8)):
        frame.iloc[part].to_parquet(folder / f"part{i}.parquet")
    return names


def train_model(work: Path) -> str:
    from raytrain_kit.config import build_experiment
    from raytrain_kit.launch import fit

    train_rows = work / "train"
    write_table(train_rows, 20_000)
    cfg = build_experiment({
        "data": {"source": "parquet", "path": str(train_rows), "label": "label", "features": [f"f{i}" for i in range(NUM_FEATURES)]},
        "model": {"kind": "mlp", "hidden": [512, 512]}, "train": {"epochs": 1, "batch_size": 256},
        "scaling": {"num_workers": 1}, "preflight": {"enabled": False}, "tracking": {"tensorboard": False},
        "run": {"name": "model", "storage_path": str(work / "runs")}})
    return fit(cfg)["run_dir"]


def plain_rows_per_s(run_dir: str, rows: Path, out: Path) -> float:
    """The reference: the exported model in this process, as a user would write it."""
    import torch

    from raytrain_kit.config import load_experiment
    from raytrain_kit.data import spec_from_dict
    from raytrain_kit.launch import export_run
    from raytrain_kit.models import build_model

    export_run(run_dir, str(out.parent / "model.pt"))
    started = time.perf_counter()
    record = json.loads((out.parent / "model.data.json").read_text())
    model = build_model(load_experiment(Path(run_dir) / "config.yaml"), spec_from_dict(record))
    model.load_state_dict(torch.load(out.parent / "model.pt", weights_only=True))
    model.eval()
    prep = record["preprocessing"]
    frame = pd.read_parquet(rows)
    x = (frame[prep["numeric"]].to_numpy(np.float64) - np.array(prep["pivot"]) - np.array(prep["offset"])) / np.array(prep["scale"])
    inputs = torch.from_numpy(x.astype(np.float32))
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(inputs[i:i + BATCH]).double(), dim=1) for i in range(0, len(inputs), BATCH)]).numpy()
    result = pd.DataFrame({"row_id": frame["row_id"], "label": frame["label"], "prediction": probs.argmax(axis=1)})
    for j in range(NUM_CLASSES):
        result[f"prob_{j}"] = probs[:, j]
    result.to_parquet(out)
    return len(frame) / (time.perf_counter() - started)


def kit_rows_per_s(run_dir: str, rows: Path, out: Path) -> tuple[float, dict]:
    from raytrain_kit.inference import predict_run

    started = time.perf_counter()
    result = predict_run(run_dir, str(rows), str(out), batch_size=BATCH, num_workers=2)
    return result["rows"] / (time.perf_counter() - started), result


def compare(run_dir: str, rows: Path, work: Path, *, rounds: int) -> dict:
    """Alternate rounds of the reference and the kit on `rows`; their rates and the median ratio."""
    pairs, kit_result = [], {}
    for _ in range(rounds):
        out = Path(tempfile.mkdtemp(dir=work))
        plain = plain_rows_per_s(run_dir, rows, out / "plain.parquet")
        kit, kit_result = kit_rows_per_s(run_dir, rows, out / "kit")
        pairs.append((kit, plain))
    ratios = [k / p for k, p in pairs]
    median = statistics.median(ratios)
    kit, plain = min(pairs, key=lambda pair: abs(pair[0] / pair[1] - median))
    return {"num_rows": kit_result["rows"], "kit_rows_per_s": round(kit, 1), "plain_rows_per_s": round(plain, 1),
            "kit_s": round(kit_result["rows"] / kit, 2), "plain_s": round(kit_result["rows"] / plain, 2),
            "ratio": round(median, 3), "ratios": [round(r, 3) for r in ratios], "num_actors": kit_result["num_actors"]}


def fixed_cost_s(run_dir: str, work: Path) -> float:
    """The kit's time to predict 64 rows: its cost before and after any row is predicted."""
    write_table(work / "tiny", 64)
    started = time.perf_counter()
    from raytrain_kit.inference import predict_run

    predict_run(run_dir, str(work / "tiny"), str(work / "tiny_out"), batch_size=BATCH, num_workers=2)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20,000 rows, one round: checks that it runs")
    args = parser.parse_args()
    sizes = [(20_000, 1)] if args.quick else [(2_000_000, 2), (200_000, 2)]
    from raytrain_kit.cluster import connect

    connect()
    results = []
    with tempfile.TemporaryDirectory(prefix="predict-bench-") as folder:
        work = Path(folder)
        run_dir = train_model(work)
        fixed = fixed_cost_s(run_dir, work)
        for num_rows, rounds in sizes:
            write_table(work / f"rows{num_rows}", num_rows)
            results.append(compare(run_dir, work / f"rows{num_rows}", work, rounds=rounds))
            shutil.rmtree(work / f"rows{num_rows}")
    print("| benchmark | kit | reference | ratio | goal |\n|---|---|---|---|---|")
    for r in results:
        goal = f">= {GOAL}x" if r["num_rows"] == GOAL_ROWS else "reported"
        print(f"| predict ({r['num_rows']:,} rows, {r['num_actors']} actors) | {r['kit_rows_per_s']:,.0f} rows/s "
              f"({r['kit_s']:.1f} s) | {r['plain_rows_per_s']:,.0f} rows/s ({r['plain_s']:.1f} s; plain torch, one process) "
              f"| {r['ratio']:.2f}x | {goal} |")
    print(f"fixed cost of the kit (64 rows, 2 actors): {fixed:.1f} s")
    from machine import machine

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "predict.json").write_text(json.dumps({
        "machine": machine(), "quick": args.quick, "goal": GOAL, "goal_rows": GOAL_ROWS, "fixed_cost_s": round(fixed, 2),
        "sizes": results}, indent=1))
    print(f"wrote {OUT / 'predict.json'}")


if __name__ == "__main__":
    main()
