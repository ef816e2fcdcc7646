"""Shared storage on a real two-node cluster: a local run.storage_path that one node cannot see
stops the run before training; one that every node sees passes. The second node runs in its
own mount namespace, where an empty tmpfs hides one folder, as on a machine without that mount."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from ray_heads import end_group, start_head, start_node, token_env

REPO = Path(__file__).resolve().parents[1]

DRIVER = """
import sys, time, ray
from raytrain_kit.config import build_experiment
from raytrain_kit.errors import ConfigError
from raytrain_kit.launch import check_shared_storage
ray.init(address=sys.argv[1], logging_level="ERROR")
deadline = time.time() + 90
while sum(n["Alive"] for n in ray.nodes()) < 2:
    assert time.time() < deadline, "the second node never joined"
    time.sleep(0.5)
for path in sys.argv[2:]:
    try:
        check_shared_storage(build_experiment({"run": {"name": "x", "storage_path": path}}))
        print("OK", path)
    except ConfigError as e:
        print("ERR", e)
"""


def test_node_local_storage_is_refused_on_a_multi_node_cluster(tmp_path):
    masked, shared = tmp_path / "masked", tmp_path / "shared"
    masked.mkdir(), shared.mkdir()
    env = token_env()
    head, gcs, _ = start_head(env, num_cpus=1)
    node = None
    try:
        time.sleep(3)
        assert head.poll() is None, head.stdout.read()[-3000:]
        node = start_node(env, gcs=gcs, num_cpus=1, masked=str(masked))
        done = subprocess.run([sys.executable, "-c", DRIVER, f"127.0.0.1:{gcs}", str(masked), str(shared)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith(("OK", "ERR"))]
        assert lines[0].startswith(f"ERR run.storage_path: {masked} is local to this machine, and 1 of 2 nodes "
                                   "cannot see it"), lines
        assert "use shared storage" in lines[0]
        assert lines[1] == f"OK {shared}"
        assert list(masked.iterdir()) == [] and list(shared.iterdir()) == []  # the markers are gone
    finally:
        if node is not None:
            end_group(node)
        end_group(head)
