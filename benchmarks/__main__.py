"""`python -m benchmarks [--quick] [--only NAME ...]`: every benchmark, side by side with its
reference in one run; a Markdown table on stdout and `benchmarks/results/<name>.json`.

The performance set (overhead, scaling, startup, ingest, end_to_end; see benchmarks/perf.py)
runs by default. The benchmarks of other issues plug in by name and run only when asked:
`--only gradcheck` (benchmarks/gradcheck_bench.py), `--only tune` (benchmarks/tune_bench.py),
`--only memory` (benchmarks/memory_bench.py), `--only errors` (benchmarks/errors_bench.py),
`--only predict` (benchmarks/predict_bench.py) and `--only advise` (benchmarks/advise_bench.py).
`--quick` shrinks every size for a smoke run (CI checks that it runs and emits every figure,
never a speed threshold).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PERF = ("overhead", "scaling", "startup", "ingest", "end_to_end")
SCRIPTS = {"gradcheck": "gradcheck_bench.py", "tune": "tune_bench.py", "memory": "memory_bench.py",
           "errors": "errors_bench.py", "predict": "predict_bench.py", "advise": "advise_bench.py"}  # their own issues' benchmarks




def rows_of(name: str, r: dict) -> list[tuple[str, str, str, str, str]]:
    """Table rows: (benchmark, kit, reference, ratio, goal)."""
    if name == "overhead":
        return [(f"overhead ({w}, {'compute' if w == 'mlp' else 'input'}-bound)",
                 f"{v['kit_samples_per_s']:,.0f} samples/s", f"{v['plain_samples_per_s']:,.0f} samples/s (plain loop)",
                 f"{v['ratio']:.3f}" + (f" (median of {len(v['ratios'])})" if "ratios" in v else ""),
                 f">= {v['goal']}") for w, v in r.items()]
    if name == "scaling":
        return [("scaling (2 workers vs 1)", f"{r['two_workers_samples_per_s']:,.0f} samples/s",
                 f"{r['one_worker_samples_per_s']:,.0f} samples/s (1 worker)",
                 f"efficiency {r['efficiency']:.3f}, {r['relative_to_plain_ddp']:.3f} of plain DDP's",
                 f">= {r['goal']} of plain DDP's"),
                ("scaling, plain DDP (torchrun 2 vs 1 process)", f"{r['plain_ddp_two_processes_samples_per_s']:,.0f} samples/s",
                 f"{r['plain_one_process_samples_per_s']:,.0f} samples/s (1 process)",
                 f"efficiency {r['plain_ddp_efficiency']:.3f}", "reported")] + ([
                ("scaling floor: plain loop in a stock TorchTrainer", f"{r['floor_two_workers_samples_per_s']:,.0f} samples/s",
                 f"{r['floor_one_worker_samples_per_s']:,.0f} samples/s (1 worker)",
                 f"{r['floor_relative_to_plain_ddp']:.3f} of plain DDP's", "reported"),
                ("scaling over its floor", f"speed-up {r['speedup']:.3f}", "the floor's",
                 f"{r['relative_to_floor']:.3f}", "reported")] if "relative_to_floor" in r else [])
    if name == "startup":
        # Re-based on the floor below: Ray Train alone starts 4-5x slower than torchrun on 2 cores.
        rows = [("startup (to first step)", f"{r['kit_s']:.1f} s", f"{r['torchrun_s']:.1f} s (torchrun)",
                 f"{r['ratio']:.2f}x", "reported")]
        if "ray_train_floor_s" in r:
            rows.append(("startup floor: Ray + empty TorchTrainer", f"{r['ray_train_floor_s']:.1f} s",
                         f"{r['torchrun_s']:.1f} s (torchrun)", f"{r['floor_ratio']:.2f}x", "reported"))
            rows.append((f"startup over its floor, median of {len(r['pairs'])} alternating pairs", f"{r['kit_s']:.1f} s",
                         f"{r['ray_train_floor_s']:.1f} s (floor)", f"{r['over_floor']:.3f}x "
                         f"({', '.join(format(p['over_floor'], '.3f') for p in r['pairs'])})", f"<= {r['floor_goal']}x"))
        return rows
    if name == "ingest":
        rows = [("ingest (Parquet -> batches)", f"{r['ingest_rows_per_s']:,.0f} rows/s",
                 f"{r['train_step_rows_per_s']:,.0f} rows/s (training step)", f"{r['ratio']:.2f}x",
                 f">= {r['goal']}x")]
        for key, what in (("images", "8x8 gray"), ("images_rgb", "32x32 RGB")):
            if key in r:
                i = r[key]
                rows.append((f"ingest (image folder, {what} -> decoded batches)", f"{i['decoded_images_per_s']:,.0f} images/s",
                             f"{i['cnn_two_workers_images_per_s']:,.0f} images/s (the CNN, 2 workers)",
                             f"{i['ratio']:.2f}x", f">= {i['goal']}x" if i["goal"] else "reported (below the floor)"))
        return rows
    if name == "end_to_end":
        kit = f"{r['kit_s']:.1f} s" if r["kit_s"] else "not reached"
        ref = f"{r['plain_s']:.1f} s" if r["plain_s"] else "not reached"
        return [(f"end_to_end (to {r['target_val_accuracy']} val accuracy)", kit, f"{ref} (torchrun)",
                 f"{r['ratio']:.2f}x" if r["ratio"] else "-", "reported")]
    return [(name, "see results JSON", "", "", "")]


def run_perf(names: list[str], *, quick: bool) -> dict[str, dict]:
    import perf

    from raytrain_kit.cluster import connect

    work = perf.scratch()
    results: dict[str, dict] = {}
    try:
        # First, while no Ray runs on the machine: the kit's process starts its own, and
        # torchrun's reference must meet the same idle machine.
        if "startup" in names or "end_to_end" in names:
            startup, end_to_end = perf.startup_and_end_to_end(quick, work)
            results.update({k: v for k, v in (("startup", startup), ("end_to_end", end_to_end)) if k in names})
        if "scaling" in names:  # each side starts its own processes (and Ray) on an idle machine
            results["scaling"] = perf.scaling(quick, work)
        if {"overhead", "ingest"} & set(names):  # an idle Ray beside another benchmark would skew it
            connect(state_api=False)  # as `raytrain-kit train` starts it
        if "overhead" in names:
            results["overhead"] = perf.overhead(quick, work)
        if "ingest" in names:
            results["ingest"] = perf.ingest(quick, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run (under 3 minutes on 2 cores)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results (default: benchmarks/results)")
    parser.add_argument("--only", action="append", choices=[*PERF, *SCRIPTS], metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join([*PERF, *SCRIPTS])}")
    args = parser.parse_args(argv)
    names = args.only or list(PERF)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine import machine

    started = time.perf_counter()
    info = machine()
    results = run_perf([n for n in names if n in PERF], quick=args.quick)
    for name in (n for n in names if n in SCRIPTS):  # standalone scripts write their own JSON
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / SCRIPTS[name]), *(["--quick"] if args.quick else [])],
                       check=True)
    args.out.mkdir(parents=True, exist_ok=True)
    table = ["| benchmark | kit | reference | ratio | goal |", "|---|---|---|---|---|"]
    for name, result in results.items():
        (args.out / f"{name}.json").write_text(json.dumps({"machine": info, "quick": args.quick, **result}, indent=1))
        table += ["| " + " | ".join(row) + " |" for row in rows_of(name, result)]
    if not results:  # only standalone scripts ran; they printed their own tables
        return 0
    print(f"\n{info['cores']} cores, torch {info['torch']}, ray {info['ray']}, {info['platform']}"
          f"{' (--quick sizes)' if args.quick else ''}\n")
    print("\n".join(table))
    print(f"\nwrote {', '.join(str(args.out / f'{n}.json') for n in results)} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
