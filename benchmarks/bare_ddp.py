"""The floor under the kit's scaling: `plain.py`'s loop, unchanged, as the train function of a
stock `TorchTrainer` (Ray Train's process group over gloo, one CPU per worker) on Ray started as
`raytrain-kit train` starts it. What any Ray Train program's training pays on this machine for
Ray's own processes (GCS, raylet, agents, Train's controller and synchronization actor) beside
its workers, with nothing of the kit's. Prints `plain.py`'s events of rank 0, one JSON per line.

    python benchmarks/bare_ddp.py STORAGE_DIR NUM_WORKERS PLAIN_ARGS...
"""

from __future__ import annotations

import contextlib
import io
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run_plain_loop(config: dict) -> None:
    import ray.train

    sys.path.insert(0, config["here"])
    import plain

    events = io.StringIO()
    with contextlib.redirect_stdout(events):
        plain.main(config["args"])
    if ray.train.get_context().get_world_rank() == 0:
        with open(config["events"], "w") as f:
            f.write(events.getvalue())


def main() -> None:
    storage, num_workers, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    from raytrain_kit.cluster import connect

    connect(state_api=False)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    events = os.path.join(storage, f"bare_ddp_{num_workers}.jsonl")
    TorchTrainer(run_plain_loop, train_loop_config={"here": HERE, "args": args, "events": events},
                 scaling_config=ScalingConfig(num_workers=num_workers, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=f"bare_ddp_{num_workers}", storage_path=storage)).fit()
    with open(events) as f:
        sys.stdout.write(f.read())


if __name__ == "__main__":
    main()
