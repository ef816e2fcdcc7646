"""A driver run under chaos: a kit command in its own process group (the driver and the embedded
Ray it starts), whose Train workers or whole group are SIGKILLed on a seeded schedule, and
readers of what each kill leaves behind."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional



@dataclass
class Driver:
    """A `raytrain-kit` command started in its own session; its output lines arrive in `lines`."""

    command: list[str]
    cwd: Path
    process: subprocess.Popen = field(init=False)
    lines: "queue.Queue[str]" = field(default_factory=queue.Queue)
    output: list[str] = field(default_factory=list)

    def __post_init__(self):
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.process = subprocess.Popen(self.command, cwd=self.cwd, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.output.append(line.rstrip("\n"))
            self.lines.put(line.rstrip("\n"))

    def alive(self) -> bool:
        return self.process.poll() is None

    def processes(self) -> list[int]:
        """The driver and everything it started (Ray's GCS, raylet, and the raylet's workers)."""
        return [self.process.pid, *descendants(self.process.pid)]

    def train_workers(self) -> list[int]:
        return [pid for pid in descendants(self.process.pid) if "RayTrainWorker" in command_line(pid)]

    def kill_group(self) -> None:
        """SIGKILL the driver's process group, then wait until every Ray worker process it had
        started is gone (they outlive their raylet by a second or two, in their own groups, and
        a Train worker may still write to the run): the moment a user would run `--resume`.
        What else lingers (a process still starting, which no task has reached) is ended by id."""
        started = self.processes()
        workers = [pid for pid in started if command_line(pid).startswith("ray::")]
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(map(running, workers)):
            time.sleep(0.05)
        assert not [pid for pid in workers if running(pid)], "Ray workers outlived their driver by 30 s"
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                if running(pid):
                    os.kill(pid, signal.SIGKILL)

    def finish(self, timeout_s: float = 300) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        finally:
            if self.alive():
                self.kill_group()


def _stat(pid: int) -> Optional[list[str]]:
    """/proc/<pid>/stat's fields after the command name (state, ppid, ...); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def running(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Every living process below `pid` (its children, theirs, ...), from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) and stat[0] not in ("Z", "X"):
            parents[int(entry.name)] = int(stat[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def wait_for(condition: Callable[[], bool], driver: Driver, *, timeout_s: float = 120, poll_s: float = 0.005) -> bool:
    """Poll `condition` until it holds (True) or the driver has exited (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        if not driver.alive():
            return False
        time.sleep(poll_s)
    raise AssertionError("chaos: a kill moment never came: " + "\n".join(driver.output[-20:]))


def registered(run_dir: Path) -> set[str]:
    """The checkpoints Ray Train's snapshot lists (read while it may be being replaced)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    for _ in range(50):
        try:
            return {r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text())["checkpoint_results"]}
        except FileNotFoundError:
            return set()
        except ValueError:
            time.sleep(0.01)
    raise AssertionError(f"{snapshot} never parsed")


def on_disk(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.glob("checkpoint_epoch_*")}


def reported_epochs(run_dir: Path) -> int:
    """Rows of metrics.csv: the epochs the driver has reported so far."""
    try:
        return max(0, len((run_dir / "metrics.csv").read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


def latest_epoch(names: set[str]) -> int:
    return max((int(n.rsplit("_", 1)[1]) for n in names), default=0)


def first_line(driver: Driver, prefix: str | tuple[str, ...], *, timeout_s: float = 120) -> Optional[str]:
    """The driver's first output line from now on that starts with `prefix` (or one of them); None
    if it exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = driver.lines.get(timeout=0.05)
        except queue.Empty:
            if not driver.alive() and driver.lines.empty():
                return None
            continue
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no line {prefix!r} in {timeout_s} s: " + "\n".join(driver.output[-20:]))


def terminated_trials(sweep_dir: Path) -> set[str]:
    """The trials Tune's whole state files (of any session) record as finished."""
    done = set()
    for state in sweep_dir.glob("experiment_state-*.json"):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (ValueError, KeyError, FileNotFoundError):
            continue  # cut short by a kill, or caught mid-write
        done |= {t["trial_id"] for t in (json.loads(raw) for raw, _ in trials) if t["status"] == "TERMINATED"}
    return done


def state_stamps(sweep_dir: Path) -> dict[str, int]:
    """{experiment state file: its mtime in ns}: changes each time Tune saves its state."""
    stamps = {}
    for state in sweep_dir.glob("experiment_state-*.json"):
        try:
            stamps[state.name] = state.stat().st_mtime_ns
        except FileNotFoundError:
            continue
    return stamps
