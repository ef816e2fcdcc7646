"""Job submission against a real `ray start --head` with token authentication: the README's
`ray job submit` command, then `raytrain-kit submit`. The head gets its own ports, temp dir and
process group, and is ended by that group's id."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_heads import end_group, start_head, token_env

REPO = Path(__file__).resolve().parents[1]
SHORT = ["--set", "train.epochs=2", "--set", "model.channels=[8]", "--set", "preflight.enabled=false"]


@pytest.fixture(scope="module")
def ray_head():
    env = token_env()
    head, _, dash = start_head(env, num_cpus=2)
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
        end_group(head)


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
    # A cluster may grow: the run told Ray's autoscaling coordinator what it needs (an embedded
    # Ray, which cannot, is spared the actor: test_train.py). The digits table runs no Ray Data
    # execution, so the coordinator is there for the run alone.
    actors = subprocess.run(["ray", "list", "actors", "--address", address, "--format", "json", "--limit", "1000"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert actors.returncode == 0, actors.stderr
    assert "_AutoscalingCoordinatorActor" in {a["class_name"] for a in json.loads(actors.stdout)}

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
