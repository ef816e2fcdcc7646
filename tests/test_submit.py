"""Job submission against a real `ray start --head` with token authentication: the README's
`ray job submit` command, then `raytrain-kit submit`. The head gets its own ports, temp dir and
process group, and is ended by that group's id."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHORT = ["--set", "train.epochs=2", "--set", "model.channels=[8]", "--set", "preflight.enabled=false"]


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_head():
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    gcs, dash, node_manager, object_manager, client, agent_grpc, agent_http, runtime_env, metrics = _free_ports(9)
    temp_dir = tempfile.mkdtemp(dir="/tmp", prefix="rtk-")  # Ray's socket paths must stay short
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": generate_new_authentication_token(),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
               f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
               f"--ray-client-server-port={client}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--dashboard-agent-listen-port={agent_http}", f"--runtime-env-agent-port={runtime_env}",
               f"--metrics-export-port={metrics}", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    head = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            assert head.poll() is None, f"ray start --head exited: {head.stdout.read()[-3000:]}"
            probe = subprocess.run(["ray", "job", "list", "--address", address], env=env, capture_output=True,
                                   text=True, timeout=60)
            if probe.returncode == 0:
                break
            assert time.time() < deadline, probe.stderr
            time.sleep(1)
        yield address, env
    finally:
        _end_group(head)


def _end_group(process: subprocess.Popen) -> None:
    """End the head's whole process group (raylet, GCS, dashboard, workers) by its id."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


def _readme_submit_command() -> list[str]:
    readme = (REPO / "README.md").read_text()
    line = next(ln.strip() for ln in readme.splitlines() if ln.strip().startswith("ray job submit "))
    return shlex.split(line)


def test_ray_job_submit_as_in_the_readme(ray_head, tmp_path):
    address, env = ray_head
    command = _readme_submit_command()
    assert command[:3] == ["ray", "job", "submit"] and "--working-dir" in command
    command[command.index("--address") + 1] = address
    command = [re.sub(r"s3://\S+", str(tmp_path), part) for part in command] + SHORT
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job_id = re.search(r"(raysubmit_\w+)", done.stdout).group(1)
    status = subprocess.run(["ray", "job", "status", "--address", address, job_id], env=env, capture_output=True,
                            text=True, timeout=60)
    assert f"Job '{job_id}' succeeded" in status.stdout, status.stdout + status.stderr
    summary = json.loads((tmp_path / "digits" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_completed"] == 2

    # Without the token the job server refuses.
    anonymous = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    refused = subprocess.run(["ray", "job", "list", "--address", address], env=anonymous, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode != 0


def test_raytrain_kit_submit(ray_head, tmp_path):
    address, env = ray_head
    done = subprocess.run([sys.executable, "-m", "raytrain_kit", "submit", "jobs/digits.yaml", "--address", address,
                           "--set", f"run.storage_path={tmp_path}", *SHORT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "epoch   2/2" in done.stdout and done.stdout.rstrip().endswith("SUCCEEDED")
    assert json.loads((tmp_path / "digits" / "summary.json").read_text())["status"] == "finished"

    bad = subprocess.run([sys.executable, "-m", "raytrain_kit", "submit", "jobs/digits.yaml", "--address", address,
                          "--set", "optim.lr=-1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "optim.lr: Input should be greater than 0" in bad.stderr
    assert "submitted job" not in bad.stdout  # validated locally: nothing reached the cluster
