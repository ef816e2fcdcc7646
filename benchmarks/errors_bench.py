"""Bad input is reported at the speed of `validate`: seconds to the error line, no Ray started.

Each case is a command a user types, timed from its start to its exit (the error line is its
last output): `raytrain-kit train -v CONFIG` with a missing local file, a missing label column,
and a CSV whose header repeats a column name, side by side with `raytrain-kit validate` on a
good config (`jobs/tabular_mlp.yaml`), in alternating rounds (median of 5). Goal: each error
within 1.5x of `validate`'s time, with exit code 2, one `error:` line, and no sign that Ray
started (with `-v` Ray's start would print "Started a local Ray instance"). Writes
benchmarks/results/errors.json.

    python benchmarks/errors_bench.py [--quick]   # --quick: 2 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
GOAL = 1.5  # an error's seconds over validate's


def cases(folder: Path) -> dict[str, list[str]]:
    """Command lines: the reference, then one per kind of bad local table."""
    (folder / "dup.csv").write_text("a,a,b,label\n1,2,3,0\n4,5,6,1\n")
    (folder / "ok.csv").write_text("a,b,label\n1,2,0\n4,5,1\n")
    bad = {"missing file": ("missing.csv", "label"), "missing column": ("ok.csv", "target"),
           "duplicate column": ("dup.csv", "label")}
    kit = [sys.executable, "-m", "raytrain_kit"]
    commands = {"validate (good config)": [*kit, "validate", str(ROOT / "jobs" / "tabular_mlp.yaml")]}
    for name, (table, label) in bad.items():
        config = folder / f"{name.replace(' ', '_')}.yaml"
        config.write_text(yaml.safe_dump({"data": {"source": "csv", "path": str(folder / table), "label": label},
                                          "run": {"storage_path": str(folder / "runs")}}))
        commands[f"train -v: {name}"] = [*kit, "train", "-v", str(config)]
    return commands


def timed(command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return time.perf_counter() - started, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds: checks that it runs")
    args = parser.parse_args()
    rounds = 2 if args.quick else 5
    with tempfile.TemporaryDirectory(prefix="errors-bench-") as folder:
        commands = cases(Path(folder))
        seconds: dict[str, list[float]] = {name: [] for name in commands}
        checks: dict[str, dict] = {}
        for _ in range(rounds):  # alternating, so a slower minute weighs on every command alike
            for name, command in commands.items():
                wall, done = timed(command)
                seconds[name].append(wall)
                lines = done.stderr.strip().splitlines()
                checks[name] = {"exit_code": done.returncode, "error_line": lines[-1] if lines else "",
                                "one_error_line": len(lines) == 1 and lines[0].startswith("error: "),
                                "ray_started": "Started a local Ray instance" in done.stdout + done.stderr}
    reference = statistics.median(seconds["validate (good config)"])
    rows = {}
    print("| command | median s | over validate | exit | one error line | Ray started | goal met |")
    print("|---|---|---|---|---|---|---|")
    for name, values in seconds.items():
        median = statistics.median(values)
        c = checks[name]
        is_error = name != "validate (good config)"
        met = (not is_error) or (median / reference <= GOAL and c["exit_code"] == 2 and c["one_error_line"]
                                 and not c["ray_started"])
        rows[name] = {"median_s": round(median, 3), "seconds": [round(v, 3) for v in values],
                      "over_validate": round(median / reference, 3), **c, "goal_met": met}
        print(f"| {name} | {median:.2f} | {median / reference:.2f}x | {c['exit_code']} | "
              f"{c['one_error_line'] if is_error else '-'} | {c['ray_started']} | {met if is_error else '-'} |")
    from machine import machine

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "errors.json").write_text(json.dumps({
        "machine": machine(),
        "quick": args.quick, "rounds": rounds, "goal": GOAL, "commands": rows}, indent=1))
    print(f"wrote {OUT / 'errors.json'}")


if __name__ == "__main__":
    main()
