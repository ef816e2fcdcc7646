"""Shared fixtures: one embedded Ray for the whole session (started by the kit's own `connect`),
small experiment configs, and a PYTHONPATH that lets Ray workers import the test models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# Ray workers of the embedded cluster inherit the driver's environment: this lets them import
# `test_models_lib` for `model.kind: custom` experiments.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from raytrain_kit.cluster import connect

    os.environ.pop("RAY_ADDRESS", None)
    connect()
    yield ray
    ray.shutdown()


@pytest.fixture
def storage(tmp_path) -> str:
    return str(tmp_path / "runs")
