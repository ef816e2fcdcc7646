"""Reading: the five sources as lazy Ray Datasets, the checks a local file allows before Ray
starts, and the choice of feature columns (`select_columns`)."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import ray

from raytrain_kit.config import Experiment
from raytrain_kit.data.images import is_array_type
from raytrain_kit.errors import DataError, short_message



# ---------------------------------------------------------------------------------------------
# Reading


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (pixels 0..16, labels), read from the file scikit-learn ships:
    the same arrays as `sklearn.datasets.load_digits`, without its second of importing sklearn."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.exists():  # another layout: let scikit-learn find its file
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.data, bunch.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int64)


def _digits_frame() -> pd.DataFrame:
    pixels, labels = digits_arrays()
    # Pixels are counts 0..16; scale to [0, 1] as is conventional for this data set.
    frame = pd.DataFrame((pixels / 16.0).astype(np.float32), columns=[f"pixel_{i}" for i in range(64)])
    frame["label"] = labels.astype(np.int64)
    return frame


def _synthetic_block(batch: dict, *, seed: int, num_features: int, num_classes: int, noise: float) -> dict:
    """Rows from a fixed random teacher; each block is seeded by its first row id, so data is
    identical whatever the block layout of the range it came from."""
    ids = batch["id"]
    teacher = np.random.default_rng([seed, 0xDA7A])
    weights = teacher.standard_normal((num_features, max(num_classes, 1))) / np.sqrt(num_features)
    rng = np.random.default_rng([seed, int(ids[0]) if len(ids) else 0])
    x = rng.standard_normal((len(ids), num_features)).astype(np.float32)
    scores = x @ weights + noise * rng.standard_normal((len(ids), weights.shape[1]))
    out = {f"f{i}": x[:, i] for i in range(num_features)}
    out["label"] = scores.argmax(axis=1).astype(np.int64) if num_classes else scores[:, 0].astype(np.float32)
    return out


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def read_table(cfg: Experiment, *, num_blocks: Optional[int] = None) -> tuple[ray.data.Dataset, str]:
    """The raw rows as a lazy Ray Dataset, and a name for error messages. `num_blocks`: read csv
    and parquet into about that many blocks (Ray Data's `override_num_blocks`; default: its own
    choice by size, often one block per file)."""
    d = cfg.data
    if d.source == "digits":
        return ray.data.from_pandas(_digits_frame()), "digits"
    if d.source == "synthetic":
        # Unset: 2 classes for classification, a continuous target (0 classes) for regression.
        num_classes = d.num_classes if d.num_classes is not None else (2 if d.task == "classification" else 0)
        ds = ray.data.range(d.num_rows, override_num_blocks=max(1, min(64, d.num_rows // 2048)))
        ds = ds.map_batches(_synthetic_block, batch_size=None, fn_kwargs=dict(
            seed=cfg.train.seed, num_features=d.num_features, num_classes=num_classes, noise=d.noise))
        return ds, "synthetic"
    path = d.path
    assert path is not None  # config validation requires it for files
    if _is_local(path):
        path = os.path.abspath(path.removeprefix("file://"))
        if not os.path.exists(path):
            raise DataError(f"data.path: {path}: no such file or folder")
    try:
        if d.source == "csv":
            import pyarrow.csv as pacsv

            # "NA", "" and the like are missing in text columns too, as pandas reads them (pyarrow
            # keeps them as strings by default, which would make "NA" a category of its own).
            return ray.data.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True),
                                     override_num_blocks=num_blocks), path
        return _read_parquet(path, num_blocks), path
    except Exception as e:  # pyarrow and fsspec raise many types for unreadable input
        raise DataError(f"data.path: {path}: cannot read as {d.source} ({type(e).__name__}: {short_message(e)})") from None


def _read_parquet(path: str, num_blocks: Optional[int]) -> ray.data.Dataset:
    """`ray.data.read_parquet` with Ray Data's V1 Parquet reader unless the user chose one
    (RAY_DATA_USE_DATASOURCE_V2). Ray 2.60's default, V2, lists a folder in a task of its own
    before reading: measured here, 8 files of 64 rows took 4.4-8.1 s to materialize against V1's
    0.4-2.0 s, and 8 files of 25,000 rows 3.3-4.2 s against 0.7-0.9 s, read into one block
    whatever `override_num_blocks` says (V1: one per file). The dataset keeps its own copy of the
    context, so the switch holds for this read only."""
    if "RAY_DATA_USE_DATASOURCE_V2" in os.environ:
        return ray.data.read_parquet(path, override_num_blocks=num_blocks)
    context = ray.data.DataContext.get_current()
    chosen, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(path, override_num_blocks=num_blocks)
    finally:
        context.use_datasource_v2 = chosen


def read_head(cfg: Experiment, num_rows: int) -> pd.DataFrame:
    """The first `num_rows` rows of a csv or parquet `data.path` (local or a pyarrow URI), read in
    this process with pyarrow's dataset reader (no Ray task: a cheap look at the columns and their
    types, as `read_table` will read them). Raises DataError (missing or unreadable)."""
    import pyarrow.csv as pacsv
    import pyarrow.dataset as pads

    path = cfg.data.path
    assert path is not None and cfg.data.source in ("csv", "parquet")
    if _is_local(path):
        path = os.path.abspath(path.removeprefix("file://"))
        if not os.path.exists(path):
            raise DataError(f"data.path: {path}: no such file or folder")
    file_format = pads.CsvFileFormat(convert_options=pacsv.ConvertOptions(strings_can_be_null=True)) \
        if cfg.data.source == "csv" else "parquet"
    try:
        return pads.dataset(path, format=file_format).head(num_rows).to_pandas()
    except Exception as e:  # pyarrow and fsspec raise many types for unreadable input
        raise DataError(f"data.path: {path}: cannot read as {cfg.data.source} ({type(e).__name__}: {short_message(e)})") from None


def check_local_file(cfg: Experiment) -> None:
    """What can be known about a local csv/parquet source without Ray, so a bad file is reported
    before Ray starts: the path exists, its header or metadata reads, no column name repeats, the
    label and features are there and numeric (CSV types from the first block, as pyarrow infers
    them; Parquet from the metadata); for images, the listing (class folders or manifest). URIs
    are checked when Ray reads them; an image's bytes when Ray Data decodes it. Raises DataError."""
    d = cfg.data
    if d.source == "images" and d.path and _is_local(d.path):
        from raytrain_kit.data.images import list_images

        list_images(cfg)  # a missing path, no class folder, an empty one, a manifest's columns
        return
    if d.source not in ("csv", "parquet") or not d.path or not _is_local(d.path):
        return
    path = os.path.abspath(d.path.removeprefix("file://"))
    if not os.path.exists(path):
        raise DataError(f"data.path: {path}: no such file or folder")
    try:
        schema = _local_schema(path, d.source)
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several types for unreadable input
        raise DataError(f"data.path: {path}: cannot read as {d.source} ({type(e).__name__}: {short_message(e)})") from None
    twice = sorted({n for n in schema.names if schema.names.count(n) > 1})
    if twice:
        raise DataError(f"data.path: {path} has the column name(s) {', '.join(map(repr, twice))} more than once; "
                        "rename them so each column has its own name")
    select_columns(cfg, schema, path)


def _local_schema(path: str, source: str) -> pa.Schema:
    if source == "parquet":
        import pyarrow.dataset as pads

        return pads.dataset(path, format="parquet").schema
    import pyarrow.csv as pacsv

    files = [path] if os.path.isfile(path) else sorted(
        e.path for e in os.scandir(path) if e.is_file() and not e.name.startswith((".", "_")))
    if not files:
        raise DataError(f"data.path: {path}: the folder holds no files")
    with pacsv.open_csv(files[0]) as reader:  # reads the header and the first block only
        return reader.schema


def _schema(ds: ray.data.Dataset, where: str):
    try:
        schema = ds.schema()
    except Exception as e:  # a malformed file surfaces on the first read
        raise DataError(f"data.path: {where}: cannot read ({type(e).__name__}: {short_message(e)})") from None
    if schema is None:
        raise DataError(f"data.path: {where}: holds no rows")
    return schema


def _numeric(t) -> bool:
    # Ray reports arrow types for Arrow blocks and numpy dtypes for pandas blocks.
    if isinstance(t, pa.DataType):
        return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_null(t)
    try:
        return bool(np.issubdtype(np.dtype(t), np.number) or np.issubdtype(np.dtype(t), np.bool_))
    except TypeError:
        return False


def _nearest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _listed(names: list[str], wanted: str, limit: int = 20) -> str:
    """The columns for a 'not found' message: the likeliest first (close names, then any named
    like a label), then the rest up to `limit`, with how many are left out."""
    likely = difflib.get_close_matches(wanted, names, n=3, cutoff=0.3)
    likely += [n for n in names if n not in likely and n.lower() in ("label", "target", "y", "class")]
    shown = likely + [n for n in names if n not in likely][: max(0, limit - len(likely))]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f", and {more} more" if more > 0 else "")


@dataclass(frozen=True)
class Columns:
    """The columns a table contributes: numeric features, categorical features (one-hot encoded
    later), and whether the label is text (class names) rather than numbers."""

    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    label_is_text: bool = False
    array: Optional[str] = None  # the one feature, when it is an array (images, a Parquet list/tensor column)
    array_shape: tuple[int, ...] = ()

    @property
    def features(self) -> tuple[str, ...]:
        return self.numeric + self.categorical


def _textual(t) -> bool:
    if isinstance(t, pa.DataType):
        if pa.types.is_dictionary(t):
            t = t.value_type
        return pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", bool)(t)
    return np.dtype(t) == np.dtype(object) if not isinstance(t, str) else False


def select_columns(cfg: Experiment, schema, where: str) -> Columns:
    """The feature columns, after checking that they and the label exist: numbers are numeric
    features, text (and the columns data.categorical lists) categorical ones; a text label holds
    class names. Raises DataError naming each column of another type."""
    d = cfg.data
    names = list(schema.names)
    if d.label not in names:
        raise DataError(f"data.label: column {d.label!r} not found in {where}{_nearest(d.label, names)} "
                        f"(columns: {_listed(names, d.label)})")
    features = list(d.features) if d.features else [n for n in names if n != d.label]
    listed = list(d.categorical or [])
    missing = [f for f in features + listed if f not in names]
    if missing:
        field = "data.features" if missing[0] in features else "data.categorical"
        raise DataError(f"{field}: column(s) {', '.join(map(repr, missing))} not found in {where}"
                        f"{_nearest(missing[0], names)} (columns: {_listed(names, missing[0])})")
    if not features:
        raise DataError(f"data.features: {where} has no feature columns besides the label {d.label!r}")
    unused = [c for c in listed if c not in features]
    if unused:
        raise DataError(f"data.categorical: column(s) {', '.join(map(repr, unused))} are not features "
                        f"(the label, or left out of data.features); list only feature columns")
    types = dict(zip(schema.names, schema.types))
    arrays = [c for c in features if is_array_type(types[c])]
    if arrays and len(features) > 1:
        raise DataError(f"data.features: the array column {arrays[0]!r} in {where} must be the only feature "
                        f"(it is one of {len(features)}); list it alone in data.features")
    problems = [f"column {c!r} in {where} is {types[c]}, neither numbers, text nor arrays; drop it from data.features"
                for c in features if not _numeric(types[c]) and not _textual(types[c]) and c not in arrays]
    label_is_text = _textual(types[d.label])
    if not _numeric(types[d.label]) and not label_is_text:
        problems.append(f"label column {d.label!r} in {where} is {types[d.label]}, neither numbers nor text")
    elif label_is_text and d.task == "regression":
        problems.append(f"label column {d.label!r} in {where} holds text; regression needs numbers "
                        "(or set data.task: classification)")
    if problems:
        raise DataError(*problems)
    if arrays:
        return Columns(numeric=(), categorical=(), label_is_text=label_is_text, array=arrays[0])
    categorical = [c for c in features if c in listed or _textual(types[c])]
    return Columns(numeric=tuple(c for c in features if c not in categorical), categorical=tuple(categorical),
                   label_is_text=label_is_text)
