"""The floor under the kit's start-up: Ray started as `raytrain-kit train` starts it
(`cluster.connect`, embedded, without the State API), then a stock `TorchTrainer` with 2 workers
whose train function only notes the time. No data, no model,
no preflight: what any Ray Train program pays on this machine before its first line of training.
Prints one JSON line with the wall-clock times Ray was ready and the train function began.

    python benchmarks/bare_train.py STORAGE_DIR
"""

from __future__ import annotations

import json
import sys
import time


def note_start(config: dict) -> None:
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        with open(config["path"], "w") as f:
            f.write(str(time.time()))


def main() -> None:
    storage = sys.argv[1]
    from raytrain_kit.cluster import connect

    connect(state_api=False)
    ray_ready = time.time()
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    path = f"{storage}/train_fn_started"
    TorchTrainer(note_start, train_loop_config={"path": path}, scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(name="bare", storage_path=storage)).fit()
    with open(path) as f:
        print(json.dumps({"ray_ready": ray_ready, "train_fn": float(f.read())}))


if __name__ == "__main__":
    main()
