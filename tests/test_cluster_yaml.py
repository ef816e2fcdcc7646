"""cluster.yaml: valid for Ray's own cluster launcher, and installs what pyproject.toml declares."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and {"cpu_worker", "gpu_worker"} <= set(types)
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))
    # Nothing but SSH from outside: the dashboard and job server stay on the head's loopback.
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start


def test_cluster_installs_this_project_with_the_same_ray():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    installs = [c for c in config["setup_commands"] if "pip install" in c]
    assert any(re.search(rf'"{project["name"]} @ git\+https://[^"]+@[\w.\-]+"', c) for c in installs), installs
    # Every package a setup command names is the project or one of its declared dependencies.
    declared = {re.split(r"[\[<>=!~ ]", d)[0].lower() for d in project["dependencies"]} | {project["name"], "pip"}
    for command in installs:
        requirements = [t for t in shlex.split(command.split("pip install", 1)[1]) if not t.startswith("-")]
        for requirement in requirements:
            assert re.split(r"[\[<>=!~ @]", requirement)[0].lower() in declared, (requirement, command)
    ray_pin = next(d for d in project["dependencies"] if d.startswith("ray["))
    assert "==" in ray_pin  # the version every node and laptop must share


def test_readme_commands_name_files_that_exist():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    commands = [ln.strip() for block in blocks for ln in block.splitlines() if ln.strip()]
    named = {tok for ln in commands for tok in shlex.split(ln.split("#", 1)[0], posix=True)
             if re.fullmatch(r"[\w./-]+\.(ya?ml|txt|toml)", tok)}
    assert {"cluster.yaml", "jobs/digits.yaml", ".ci/constraints.txt"} <= named
    for path in named:
        assert (REPO / path).is_file(), path
    ci = (REPO / ".ci/run").read_text()
    test_command = next(ln for ln in commands if "pytest" in ln).split("&&")[-1].strip()
    assert test_command in ci  # CI runs exactly the README's test command
