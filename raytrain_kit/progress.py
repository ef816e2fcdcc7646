"""What `train` prints while it runs: a live bar for the current epoch on a terminal, one line per
finished epoch, and nothing but the result under --quiet.

The bar is fed by rank 0's in-epoch progress (`worker._progress_sender`), the lines by each
epoch's report. Without a terminal (a Ray job, a CI log) there is no bar, only the lines.
Exercised by `raytrain-kit train jobs/digits.yaml`.
"""

from __future__ import annotations

import shutil
import sys
import threading
from typing import Optional, TextIO

QUIET, NORMAL, VERBOSE = 0, 1, 2


def format_epoch(m: dict, *, total_epochs: int) -> str:
    parts = [f"epoch {m['epoch']:>3}/{total_epochs}", f"train_loss {m['train_loss']:.4f}"]
    if "val_loss" in m:
        parts.append(f"val_loss {m['val_loss']:.4f}")
    if "val_accuracy" in m:
        parts.append(f"val_accuracy {m['val_accuracy']:.4f}")
    parts += [f"lr {m['lr']:.2e}", f"{m['samples_per_s']:,.0f} samples/s"]
    if "data_s" in m:  # where the epoch's time went
        sync = f" sync {m['sync_s']:.2f}s" if "sync_s" in m else ""  # not measured under fsdp/hsdp
        parts.append(f"(data {m['data_s']:.2f}s compute {m['compute_s']:.2f}s{sync})")
    if m.get("checkpoint"):
        parts.append("[checkpoint]")
    if m.get("nonfinite_steps"):
        parts.append(f"[{m['nonfinite_steps']} non-finite step(s) skipped]")
    return "  ".join(parts)


# Start-up stages a user can act on, each timed from the end of the one before (see
# `launch.startup_seconds`); stages in between are counted in the next one shown.
_STARTUP_SHOWN = (("ray_ready", "Ray"), ("datasets_built", "data"), ("preflight_done", "preflight"),
                  ("worker_started", "Train workers"), ("data_ready", "model and shards"), ("first_step", "first step"))


def format_startup(stages: dict) -> Optional[str]:
    """`startup: 19.9 s to the first step (Ray 5.6 s, data 2.4 s, ...)`; None if no step was taken."""
    if "first_step" not in stages:
        return None
    parts, before = [], 0.0
    for stage, label in _STARTUP_SHOWN:
        if stage in stages:
            parts.append(f"{label} {stages[stage] - before:.1f} s")
            before = stages[stage]
    return f"startup:       {stages['first_step']:.1f} s to the first step ({', '.join(parts)})"


def format_bar(p: dict, *, total_epochs: int, width: int = 24) -> str:
    """`epoch 3/15 [#########.......]  57%  1,234 samples/s  ETA 3s  loss 0.1234`"""
    done = min(1.0, p["batch"] / max(p["num_batches"], 1))
    filled = int(round(done * width))
    rate = p["samples"] / max(p["elapsed_s"], 1e-9)
    eta = p["elapsed_s"] * (1 - done) / done if done > 0 else float("nan")
    return (f"epoch {p['epoch']:>3}/{total_epochs} [{'#' * filled}{'.' * (width - filled)}] {done:4.0%}  "
            f"{rate:,.0f} samples/s  ETA {eta:.0f}s  loss {p['loss']:.4f}")


class Progress:
    """Prints a run's progress to `stream` (stdout). Thread-safe: reports arrive on a follower thread."""

    def __init__(self, *, total_epochs: int, verbosity: int = NORMAL, stream: Optional[TextIO] = None):
        self.total_epochs, self.verbosity = total_epochs, verbosity
        self.stream = stream or sys.stdout
        self.live = verbosity >= NORMAL and self.stream.isatty()
        self.bar_shown = False
        self.lock = threading.Lock()

    @property
    def wants_bar(self) -> bool:
        return self.live

    def line(self, text: str) -> None:
        if self.verbosity < NORMAL:
            return
        with self.lock:
            self._clear()
            print(text, file=self.stream, flush=True)

    def epoch(self, metrics: dict) -> None:
        self.line(format_epoch(metrics, total_epochs=self.total_epochs))

    def bar(self, p: dict) -> None:
        if not self.live:
            return
        columns = shutil.get_terminal_size((100, 20)).columns
        with self.lock:
            self.stream.write("\r" + format_bar(p, total_epochs=self.total_epochs)[:columns - 1])
            self.stream.flush()
            self.bar_shown = True

    def close(self) -> None:
        with self.lock:
            self._clear()

    def __getstate__(self) -> dict:
        # A sweep's callbacks hold `line`, and Tune pickles its callbacks with the experiment.
        return {k: v for k, v in self.__dict__.items() if k not in ("lock", "stream")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, lock=threading.Lock(), stream=sys.stdout)

    def _clear(self) -> None:
        if self.bar_shown:
            columns = shutil.get_terminal_size((100, 20)).columns
            self.stream.write("\r" + " " * (columns - 1) + "\r")
            self.bar_shown = False
