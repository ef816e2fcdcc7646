"""Joining a Ray cluster, or starting an embedded one, the way every command needs it.

`connect` picks the cluster (an address, else RAY_ADDRESS as `ray job submit` sets it, else an
embedded local Ray with its dashboard for the State API, sized for many runs on a small machine),
quiets Ray's own logging and progress bars, and overlaps Ray's start with importing torch. It
imports nothing heavier than Ray, so the CLI can start Ray before the rest of the kit loads.
Exercised by every command and by the suite's shared `ray_session` fixture.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import tempfile
import threading
import time
from typing import Iterator, Optional

import ray

from raytrain_kit.errors import ConfigError, RunError, short_message

# Set when this process started the Ray it uses: such a cluster cannot grow, so a request that
# does not fit will never be scheduled. A real cluster may autoscale to fit it.
_started_embedded_ray = False
_embedded_state_api = True  # whether the embedded Ray this process started serves the State API
_ray_ready_at: Optional[float] = None
# Ray start failures a second try usually gets past (a loaded machine; messages of Ray 2.60).
TRANSIENT_START_FAILURES = ("timed out during startup", "Failed to start the dashboard")
IDLE_WORKERS_KEPT = 6  # worker processes an embedded Ray keeps beyond one per CPU (see `connect`)


def connect(address: Optional[str] = None, *, verbose: bool = False, state_api: bool = True) -> bool:
    """Join `address`, else RAY_ADDRESS (set by `ray job submit`), else start an embedded Ray.

    Returns True when this call started an embedded Ray (its caller ends it: `disconnect`).

    `state_api=False`: the embedded Ray starts no dashboard, for work that never sees a Ray Train
    controller die while this process lives (one `train` command; a sweep whose trials train in
    their own processes). The dashboard serves the State API only Ray Train's placement-group
    clean-up uses (`needs_placement_group_cleaner`); its processes cost about 2 s of CPU at the
    start, and with the cleaner's polling about 3% of a core all through training.
    Ray's own log stream (its actors' and workers' output, which reprints every traceback) reaches
    this process only when `verbose`: the kit prints progress and worker errors itself."""
    global _ray_ready_at, _started_embedded_ray, _embedded_state_api
    if ray.is_initialized():
        return False
    # Ray's start is mostly waiting for its processes; import torch meanwhile (about 1.5 s
    # sooner to the first step on 2 cores). torch imports nothing of Ray's, so the two imports
    # cannot deadlock on each other's module locks.
    preload = threading.Thread(target=importlib.import_module, args=("torch",), daemon=True)
    preload.start()
    # Ray Data's per-dataset log lines and progress bars drown the one line per epoch we print;
    # inherited by the processes of an embedded Ray. Users can still set these themselves.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # Ray Train's controller collects each report when it polls its workers, every 2 s by
    # default, and a worker's next report waits for that (its result queue holds one): an
    # epoch shorter than the interval waits out the rest of it (digits' 0.15 s epochs ran at
    # one per 0.2 s). Train propagates this variable to the controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.05")
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)  # a notice, not a problem
    quiet = dict(logging_level=logging.INFO if verbose else logging.WARNING, configure_logging=True,
                 log_to_driver=verbose)
    if address or os.environ.get("RAY_ADDRESS"):
        _check_reachable(address or os.environ["RAY_ADDRESS"],
                         source=f"--address {address}" if address else f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}")
        ray.init(address=address, **quiet)
    else:
        _start_embedded_ray(quiet, state_api=state_api)
        _started_embedded_ray, _embedded_state_api = True, state_api
    if not verbose:
        _hide_raylet_messages()
    importlib.import_module("ray.data")  # after Ray's start: not at the same time as torch's import
    # Datasets carry the driver's DataContext to Ray Data's actors, so this reaches them too.
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    if not verbose:  # Tune logs a failed trial's whole traceback; the sweep prints it as one line
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    preload.join()
    _ray_ready_at = time.time()
    return not (address or os.environ.get("RAY_ADDRESS"))


def _check_reachable(address: str, *, source: str, timeout_s: float = 5.0) -> None:
    """Raise ConfigError unless a `host:port` cluster address (`ray://` too) accepts a TCP
    connection within `timeout_s`: Ray 2.60's `ray.init` retries an address that nothing listens
    on for minutes before it fails. Other forms ("auto", "local", other schemes) are Ray's to resolve."""
    import socket

    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not host or "/" in host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"{source}: no Ray cluster answers there ({e.strerror or type(e).__name__}); start one "
                          "(`ray start --head`, or `ray up cluster.yaml` and `ray attach`), correct the address, "
                          "or unset it to start an embedded Ray on this machine") from None


def needs_placement_group_cleaner() -> bool:
    """Whether a Ray Train run here keeps Ray Train's PlacementGroupCleaner: a detached actor that
    polls the State API every second and frees the run's CPUs if its controller dies while the
    cluster lives on (a Tune trial's actor stopped under it). Not in an embedded Ray started
    without the State API: the cleaner could not see the controller there, and that Ray ends with
    this process, which is the controller's owner."""
    return not _started_embedded_ray or _embedded_state_api


def can_autoscale() -> bool:
    """Whether the Ray here may grow on demand, so that a run should tell Ray's autoscaling
    coordinator what it needs. Not an embedded Ray: it has this machine's CPUs and no more."""
    return not _started_embedded_ray


def _start_embedded_ray(quiet: dict, *, state_api: bool) -> None:
    """Start a Ray of this machine's CPUs in this process (`connect`'s third choice)."""
    # "local" never attaches to a stale cluster recorded in the temp dir by `ray start`. The
    # dashboard serves the State API, without which Ray Train's PlacementGroupCleaner cannot
    # see its controller (and stopped Tune trials leak their CPUs); port 0 = any free port.
    # Ray Train's PlacementGroupCleaner finds the State API through RAY_API_SERVER_ADDRESS
    # (inherited by this Ray's processes); left unset it may find another Ray on the machine.
    num_cpus = os.cpu_count() or 1
    # Ray ends an idle worker process (one that ran Ray Data's tasks or the preflight, torch
    # imported) a second after its worker processes outnumber its CPUs, and a run's Train
    # actors (controller, cleaner, synchronization, workers) outnumber 2 CPUs: every later
    # run on this Ray (a sweep's trials, a session of fits) started them anew, about 2 s a
    # run on 2 cores. A few more idle processes cost only memory.
    pool = {"num_workers_soft_limit": num_cpus + IDLE_WORKERS_KEPT}
    # Ray Train watches for preempted nodes (cloud spot instances being drained) with one more
    # actor process per run; an embedded Ray is this machine alone and is never preempted,
    # and that process's start costs a 2-worker run about 1 s on 2 cores. Propagated by Train.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    for attempt in range(2):
        dashboard: dict = dict(include_dashboard=False)
        if state_api:
            port = _free_port()
            os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
            dashboard = dict(include_dashboard=True, dashboard_port=port)
        try:
            ray.init(address="local", num_cpus=num_cpus, _system_config=pool, **dashboard, **quiet)
            return
        except Exception as e:
            ray.shutdown()
            # On a loaded machine the raylet can give up waiting for its agents, or the dashboard
            # fail to come up in time; a second start usually succeeds.
            if not attempt and any(m in str(e) for m in TRANSIENT_START_FAILURES):
                continue
            raise RunError(f"Ray did not start on this machine ({type(e).__name__}: {short_message(e)}); "
                           "on a loaded machine run the command again, or start Ray once with "
                           "`ray start --head` and pass --address auto") from None


def _hide_raylet_messages() -> None:
    """Ray prints the messages its raylet and GCS publish to drivers ("N PYTHON worker processes
    have been started ...", a dead worker's notice) from a thread of its own, whatever
    `log_to_driver` says. The kit reports what matters itself (a worker's error, resources that
    do not fit): only --verbose shows them. With log_to_driver off, that thread is the only
    caller of the function it prints through (ray._private.worker.listen_error_messages)."""
    import ray._private.worker as ray_worker

    ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: None


# Notices Ray's C++ core logs as errors to the driver's stderr: every Ray Data actor pool
# (ray-project/ray#53727; the actors restart as they should, with their arguments kept).
RAY_NOTICES = ("has constructor arguments in the object store and max_restarts > 0",)


@contextlib.contextmanager
def ray_notices_hidden() -> Iterator[None]:
    """While the block runs, this process's stderr (file descriptor 2, where Ray's C++ core
    writes, past Python's `sys.stderr`) goes to a temporary file; afterwards every line of it but
    RAY_NOTICES' is written back to stderr, in order. Ray's log level cannot hide them: setting
    RAY_BACKEND_LOG_LEVEL prints a line of its own."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().splitlines(keepends=True)
                    if not any(notice.encode() in line for notice in RAY_NOTICES)]
            if kept:
                os.write(2, b"".join(kept))


def disconnect(*, wait_s: float = 5.0) -> None:
    """End the embedded Ray this process started, once its work is written, and wait (up to
    `wait_s`) until every process it started is gone. Called explicitly rather than left to
    Ray's exit hook, which first sleeps 0.5 s to print late worker errors (the kit reports those
    itself). In the main thread, and beside nothing that holds or frees a Ray object (the CLI
    draws its report meanwhile, with the cyclic collector off): a Ray object freed during the
    shutdown would call into a core worker that is gone, which ends the process.

    Ray's shutdown ends its raylet, GCS and dashboard but leaves their children (Train's
    controller and workers, a sweep's trial processes, the dashboard's helpers) to notice and
    exit on their own, up to 1.5 s later on 2 cores: without the wait a command returned while
    they were still running (they are listed before the shutdown, from /proc where there is one)."""
    started = _descendants()
    ray.shutdown()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(_running(pid) for pid in started):
        time.sleep(0.02)


def _descendants() -> list[int]:
    """This process's children, theirs, and so on (Linux /proc; elsewhere none)."""
    children: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in filter(str.isdigit, names):
        fields = _proc_stat(int(name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(name))
    found, todo = [], [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _running(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting to be reaped has ended)."""
    fields = _proc_stat(pid)
    return bool(fields) and fields[0] != "Z"


def _proc_stat(pid: int) -> Optional[list[str]]:
    """/proc/<pid>/stat's fields after the command name (state, parent, ...), or None when the
    process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def ray_ready_at() -> Optional[float]:
    """When `connect` had Ray ready in this process (the first stage of a run's start-up)."""
    return _ray_ready_at


def started_embedded_ray() -> bool:
    """Whether this process started the Ray it uses (a cluster that cannot grow)."""
    return _started_embedded_ray


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
