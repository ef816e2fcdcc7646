"""`raytrain-kit submit`: send an experiment to a Ray cluster as a Ray job and follow it.

A thin wrapper over Ray's `JobSubmissionClient`: the config is validated here first (a bad one
never reaches the cluster), the working directory travels as the job's `working_dir`, optional
pip requirements go into its runtime environment, and the job's logs are streamed until it ends.
Token authentication is Ray's own: set RAY_AUTH_MODE=token and the cluster's token
(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token). Exercised by
`tests/test_submit.py` against a real `ray start --head`.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from raytrain_kit.config import load_experiment
from raytrain_kit.errors import ConfigError, RunError, short_message


def submit_job(config: str, *, address: str, overrides: Sequence[str] = (), working_dir: str = ".",
               requirements: Optional[str] = None, follow: bool = True, poll_s: float = 1.0) -> str:
    """Submit `raytrain-kit train CONFIG --set ...`; returns the job's final status (or id if not following)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    load_experiment(config, overrides)  # raises ConfigError before anything is sent
    config_path = Path(config).resolve()
    root = Path(working_dir).resolve()
    if not config_path.is_relative_to(root):
        raise ConfigError(f"{config}: must lie inside the working directory {root}, which is what the job receives")
    runtime_env: dict = {"working_dir": str(root)}
    if requirements:
        if not Path(requirements).is_file():
            raise ConfigError(f"--requirements: {requirements}: file not found")
        runtime_env["pip"] = [ln.strip() for ln in Path(requirements).read_text().splitlines()
                              if ln.strip() and not ln.lstrip().startswith("#")]
    entrypoint = shlex.join(["raytrain-kit", "train", str(config_path.relative_to(root)),
                             *[arg for o in overrides for arg in ("--set", o)]])
    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(f"--address: cannot submit to {address} ({type(e).__name__}: {short_message(e)}); "
                          "is the dashboard reachable (ray dashboard cluster.yaml) and the auth token set?") from None
    print(f"submitted job {job_id}: {entrypoint}", flush=True)
    if not follow:
        return job_id
    printed = 0
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        sys.stdout.write(logs[printed:])
        sys.stdout.flush()
        printed = len(logs)
        if status in terminal:
            break
        time.sleep(poll_s)
    print(f"job {job_id}: {status.value}", flush=True)
    if status != JobStatus.SUCCEEDED:
        raise RunError(f"job {job_id} ended {status.value}; logs: ray job logs --address {address} {job_id}")
    return status.value
