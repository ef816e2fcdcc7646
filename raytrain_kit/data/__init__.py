"""Ray Datasets for an experiment: read, check the schema, split, fit the preprocessing, describe.

Owns everything between a `DataConfig` and the `{"train", "val"}` datasets handed to
`TorchTrainer(datasets=...)`, one module per step in the order the data flows:
`sources` (the readers and the choice of columns), `stats` (one statistics pass that finds
schema problems before any training worker starts), `split` (a seeded train/validation split by
row contents, and cross-validation folds), `encode` (the preprocessing fitted on the training
split: standardization, imputation, one-hot encoding, class names), `build` (the entry point, `build_datasets`), `in_driver`
(a small table the driver holds, taken through the same steps without a Ray Data execution),
`spec` (the `DataSpec` models are built from) and `shards` (each worker's piece, read into memory).
Rows leave here as two columns, `x` (float32 features) and `y` (label).
Exercised by `raytrain-kit validate jobs/tabular_mlp.yaml` and `tests/test_data.py`.
"""

from raytrain_kit.data.build import build_datasets
from raytrain_kit.data.encode import describe_preprocessing, encode_batch
from raytrain_kit.data.shards import BlockRange, read_block_ranges, split_for_workers
from raytrain_kit.data.sources import check_local_file, digits_arrays, read_table, select_columns
from raytrain_kit.data.spec import DataSpec, describe_constant_features, describe_data, spec_from_dict, spec_to_dict
from raytrain_kit.data.split import assign_folds, build_folds, preserved_order, row_keys, split_by_key
from raytrain_kit.data.stats import CONSTANT_STD, collect_stats, merge_moments

__all__ = [
    "BlockRange", "CONSTANT_STD", "DataSpec", "assign_folds", "build_datasets", "build_folds", "check_local_file",
    "collect_stats", "describe_constant_features", "describe_data", "describe_preprocessing", "encode_batch", "digits_arrays", "merge_moments", "preserved_order",
    "read_block_ranges", "read_table", "row_keys", "select_columns", "spec_from_dict", "spec_to_dict",
    "split_by_key", "split_for_workers",
]
