"""Real Ray processes for tests: a head (or an extra node) with its own ports and temp dir, in
its own process group, ended by that group's id and nothing broader: other Rays may be running."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


_HANDED_OUT: set[int] = set()


def free_ports(n: int) -> list[int]:
    """`n` free ports, none handed out before by this process: the OS may give a port it just
    closed again, and Ray refuses to start two of its components on one port (a head's GCS once
    drew its node manager's port)."""
    sockets, ports = [], []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)  # held open until all are chosen: distinct within this call
        port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            ports.append(port)
    for s in sockets:
        s.close()
    _HANDED_OUT.update(ports)
    return ports


def token_env() -> dict:
    """The environment for every process of a test cluster: token auth with a fresh token, so
    nothing reads or writes ~/.ray/auth_token, and this venv's `ray` and `raytrain-kit`."""
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    # Not the session Ray's addresses: a test cluster finds its own.
    return {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")},
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": generate_new_authentication_token(),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def node_ports() -> list[str]:
    node_manager, object_manager, agent_grpc, agent_http, runtime_env, metrics = free_ports(6)
    return [f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--dashboard-agent-listen-port={agent_http}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}"]


def start_head(env: dict, *, num_cpus: int) -> tuple[subprocess.Popen, int, int]:
    """`ray start --head --block` on 127.0.0.1; returns (process, GCS port, dashboard port)."""
    gcs, dash, client = free_ports(3)
    temp_dir = tempfile.mkdtemp(dir="/tmp", prefix="rtk-")  # Ray's socket paths must stay short
    command = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
               f"--ray-client-server-port={client}", *node_ports(), f"--num-cpus={num_cpus}",
               f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    head = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    return head, gcs, dash


def start_node(env: dict, *, gcs: int, num_cpus: int, masked: str = "") -> subprocess.Popen:
    """An extra node joining the head. With `masked`, the node runs in its own mount namespace
    where an empty tmpfs hides that folder: a machine that does not share it."""
    command = ["ray", "start", "--block", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1",
               *node_ports(), f"--num-cpus={num_cpus}", "--disable-usage-stats"]
    if masked:
        script = f"mount -t tmpfs tmpfs {masked} && exec {' '.join(command)}"
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def end_group(process: subprocess.Popen) -> None:
    """End a Ray process's whole group (raylet, GCS, dashboard, workers) by its id."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def kill_driver_when(command: list[str], *, done, cwd, poll_s: float = 0.1, timeout_s: float = 300,
                     extra_env: dict[str, str] | None = None) -> None:
    """Run a kit command in its own process group (the driver and the embedded Ray it starts),
    and SIGKILL that group as soon as `done()` is true: a driver lost mid-run."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (extra_env or {})
    driver = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    try:
        deadline = time.time() + timeout_s
        while time.time() < deadline and not done():
            assert driver.poll() is None, driver.stdout.read()
            time.sleep(poll_s)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
