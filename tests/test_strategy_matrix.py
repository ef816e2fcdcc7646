"""Every optimizer the config offers runs under every strategy and precision and takes the same
steps as one process: one Ray Train run of 4 workers walks the whole matrix (`strategy_matrix.py`)
with the kit's own train state and epoch, and the test compares it with one process here."""

from __future__ import annotations

import json

import numpy as np
import pytest

from strategy_matrix import OPTIMIZERS, PRECISIONS, STRATEGIES, matrix_per_worker, step_losses

# fp32: the README's "same maths" (summation order is all that differs). bf16: each world runs its
# matmuls on different slices of the batch, each rounded to bf16 (8 significant bits, a spacing of
# 2^-7 = 7.8e-3 relative), so one process and 4 workers agree to about that; sharding itself
# changes nothing beyond fp32 round-off at a fixed worker count.
RTOL = {"fp32": 1e-5, "bf16": 1e-2}
RTOL_SHARDED_VS_DDP = 1e-4


@pytest.fixture(scope="module")
def matrix(ray_session, tmp_path_factory) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = tmp_path_factory.mktemp("matrix") / "losses.json"
    TorchTrainer(matrix_per_worker, train_loop_config={"out": str(out)},
                 scaling_config=ScalingConfig(num_workers=4, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(storage_path=str(out.parent / "ray"), name="matrix")).fit()
    return json.loads(out.read_text())


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_strategy_and_precision_takes_one_process_steps(matrix, optimizer):
    """Issue case: SGD's fused kernel has no DTensor rule, so `optim.name: sgd` crashed at the
    first step of every fsdp/hsdp run."""
    for precision in PRECISIONS:
        reference = step_losses(optimizer, "ddp", precision, rank=0, world_size=1)
        assert len(set(np.round(reference, 4))) == len(reference)  # it moves: not a comparison of constants
        for strategy in STRATEGIES:
            got = matrix[f"{optimizer}/{strategy}/{precision}"]
            assert not isinstance(got, str), (optimizer, strategy, precision, got)
            np.testing.assert_allclose(got, reference, rtol=RTOL[precision],
                                       err_msg=f"{optimizer}/{strategy}/{precision}")
            np.testing.assert_allclose(got, matrix[f"{optimizer}/ddp/{precision}"], rtol=RTOL_SHARDED_VS_DDP,
                                       err_msg=f"{optimizer}/{strategy}/{precision} against ddp")


@pytest.mark.parametrize("strategy", STRATEGIES[1:])
def test_a_nan_in_one_ranks_gradient_shard_stops_the_step_on_every_rank(matrix, strategy):
    """Without clipping the step's finiteness check reads each rank's own shards; every rank must
    refuse the step, or the ranks' weights part ways (rank 0 answers here, the NaN is rank 3's)."""
    assert matrix[f"nonfinite/{strategy}"] == [True, False]
