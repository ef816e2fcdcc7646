"""Images and array columns: rows whose one feature is an array (`[C, H, W]`, `[T, F]`).

`data.source: images` reads a folder with one sub-folder per class (the class is the folder's
name) or a CSV/Parquet manifest with a path column (`data.image_column`) and a label column.
The files are read and decoded in Ray Data tasks (Pillow, as `ray.data.read_images` does),
converted to `data.channels`, resized to `data.image_size` and scaled to [0, 1]; a file that
cannot be decoded becomes a row marked bad (its path and reason), so the driver reports it in
one line, or skips it (`data.on_bad_file`), instead of a Ray task failing with a traceback.
A Parquet list or tensor column is packed the same way: one row's array is one feature of that
shape, and a row of another shape is marked bad.
Packed rows have `stats._pack`'s columns plus `bad` (empty, or why the row cannot be used).
Exercised by `raytrain-kit train jobs/digits_images.yaml` and `tests/test_images.py`.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from raytrain_kit.config import Experiment
from raytrain_kit.data.stats import _as_text
from raytrain_kit.errors import DataError, short_message

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
FILES_PER_BLOCK = 256  # the fewest files a decoding task gets: smaller tasks cost more to run than to decode
TASKS_PER_CPU = 4  # decoding tasks per CPU of the cluster: enough to balance the CPUs, few enough that Ray
                   # Data's cost per task stays small (64 tasks of 313 files took 1.7x as long as 8 of 2,500)


# ---------------------------------------------------------------------------------------------
# Listing (the driver: file names only, never their bytes)


def list_images(cfg: Experiment) -> tuple[list[str], list[str], str]:
    """(paths, labels, where) of every image: a class-folder tree, or a manifest's rows.
    Raises DataError for a missing path, a tree with no class folder or an empty class folder,
    or a manifest without its columns."""
    d = cfg.data
    path = os.path.abspath(d.path.removeprefix("file://")) if "://" not in d.path or d.path.startswith("file://") else d.path
    fs, root = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"data.path: {path}: no such file or folder")
    if info.type == pafs.FileType.File:
        return _manifest(cfg, path)
    classes = sorted((i for i in fs.get_file_info(pafs.FileSelector(root)) if i.type == pafs.FileType.Directory
                      and not i.base_name.startswith(".")), key=lambda i: i.base_name)
    if not classes:
        raise DataError(f"data.path: {path} has no class folders; put each class's images in a folder named after it")
    paths, labels = [], []
    for folder in classes:
        files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(folder.path, recursive=True))
                       if i.type == pafs.FileType.File and i.base_name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DataError(f"data.path: class folder {folder.path} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                            "add its images or remove the folder")
        paths += [f if "://" not in path else f"{path.split('://', 1)[0]}://{f}" for f in files]
        labels += [folder.base_name] * len(files)
    return paths, labels, path


def _manifest(cfg: Experiment, path: str) -> tuple[list[str], list[str], str]:
    d = cfg.data
    try:
        frame = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)
    except Exception as e:  # pandas raises many types for unreadable input
        raise DataError(f"data.path: {path}: cannot read the manifest ({type(e).__name__}: {short_message(e)})") from None
    for field, column in (("data.image_column", d.image_column), ("data.label", d.label)):
        if column not in frame:
            raise DataError(f"{field}: column {column!r} not found in {path} (columns: {', '.join(map(str, frame.columns))})")
    base = os.path.dirname(path)
    paths = [p if "://" in p or os.path.isabs(p) else os.path.join(base, p) for p in frame[d.image_column].astype(str)]
    return paths, frame[d.label].tolist(), path


# ---------------------------------------------------------------------------------------------
# Decoding (Ray Data tasks)


def read_images(cfg: Experiment) -> tuple[ray.data.Dataset, str, tuple[int, ...], bool]:
    """The images as a packed Ray Dataset (`x`: pixels in [0, 1], float64 (N, C*H*W); `y`: the
    label; `bad`), where they came from, their shape [C, H, W] and whether labels are text."""
    d = cfg.data
    paths, labels, where = list_images(cfg)
    size = tuple(d.image_size) if d.image_size else _first_size(paths, where)
    shape = (d.channels, *size)
    items = pd.DataFrame({"path": paths, "label": labels})
    label_is_text = not pd.api.types.is_numeric_dtype(items["label"])  # class folders' names, or a manifest's text
    if label_is_text:
        items["label"] = items["label"].astype(str)
    num_tasks = TASKS_PER_CPU * max(1, int(ray.cluster_resources().get("CPU", 1)))
    step = max(FILES_PER_BLOCK, -(-len(items) // num_tasks))  # blocks of paths, each decoded by one task
    ds = ray.data.from_pandas([items.iloc[i:i + step] for i in range(0, len(items), step)])
    packed = ds.map_batches(decode_images, batch_format="pandas", fn_kwargs={"shape": shape, "label_is_text": label_is_text})
    return packed, where, shape, label_is_text


def _first_size(paths: list[str], where: str) -> tuple[int, int]:
    """data.image_size unset: the first readable image's [H, W] (the others are resized to it)."""
    for path in paths[:20]:
        try:
            image = _open(path)
            return image.height, image.width
        except Exception:  # a bad first file is reported with the others, in order
            continue
    raise DataError(f"data.path: {where}: none of the first 20 images can be read; check the files or data.path")


def _open(path: str):
    from PIL import Image

    if "://" in path:
        fs, inner = pafs.FileSystem.from_uri(path)
        with fs.open_input_stream(inner) as f:
            data = f.read()
        import io

        image = Image.open(io.BytesIO(data))
    else:
        image = Image.open(path)
    image.load()  # decode now: a truncated file fails here, not later (Pillow then closes the file it opened)
    return image


def decode_images(frame: pd.DataFrame, *, shape: tuple[int, int, int], label_is_text: bool) -> dict:
    """Decode, convert (`L` for 1 channel, `RGB` for 3), resize (bilinear) and scale each image;
    a file that fails is a row of zeros marked bad with its path and the reason."""
    from PIL import Image

    channels, height, width = shape
    mode = "L" if channels == 1 else "RGB"
    # 8-bit pixels first, scaled in one pass at the end (the same values as per image, faster).
    pixels = np.zeros((len(frame), height, width, channels), dtype=np.uint8)
    bad = []
    for i, path in enumerate(frame["path"]):
        try:
            image = _open(path)
            if image.mode != mode:
                image = image.convert(mode)
            if image.size != (width, height):
                image = image.resize((width, height), Image.BILINEAR)
            pixels[i] = np.asarray(image).reshape(height, width, channels)
            bad.append("")
        except Exception as e:  # Pillow raises several types for a corrupt or foreign file
            bad.append(f"{path}: cannot read as an image ({type(e).__name__}: {short_message(e)})")
    x = pixels.transpose(0, 3, 1, 2).reshape(len(frame), -1) / 255.0  # [C, H, W], as torch's conv layers read it
    y = frame["label"].to_numpy(dtype=object) if label_is_text else frame["label"].to_numpy(dtype=np.float64)
    return {"x": x, "y": y, "bad": np.array(bad, dtype=object)}


# ---------------------------------------------------------------------------------------------
# Array columns (Parquet list or tensor columns)


def is_array_type(t) -> bool:
    from ray.data.extensions import ArrowTensorType, ArrowVariableShapedTensorType

    tensor_types = (ArrowTensorType, ArrowVariableShapedTensorType)
    try:
        from ray.data.extensions import ArrowTensorTypeV2

        tensor_types += (ArrowTensorTypeV2,)
    except ImportError:  # older Ray: one tensor type
        pass
    if isinstance(t, tensor_types):
        return True
    return isinstance(t, pa.DataType) and (pa.types.is_list(t) or pa.types.is_large_list(t)
                                           or pa.types.is_fixed_size_list(t))


def array_shape(ds: ray.data.Dataset, column: str, where: str) -> tuple[int, ...]:
    """The shape of the first row's array in `column` (the shape every row must have)."""
    rows = ds.select_columns([column]).take(1)
    if not rows:
        raise DataError(f"data.path: {where} holds no rows")
    value = np.asarray(_nested(rows[0][column]), dtype=np.float64)
    if value.ndim == 0 or value.size == 0:
        raise DataError(f"column {column!r} in {where}: the first row's array is empty")
    return tuple(value.shape)


def _nested(value):
    # A list column's row arrives as an array of arrays (one per inner list): stack it.
    if isinstance(value, np.ndarray) and value.dtype == object:
        return np.stack([_nested(v) for v in value])
    if isinstance(value, (list, tuple)):
        return np.asarray([_nested(v) for v in value])
    return value


def pack_arrays(frame: pd.DataFrame, *, column: str, shape: tuple[int, ...], label: Optional[str], label_is_text: bool) -> dict:
    """Rows of one array column as `x` (float64 (N, prod(shape))) and `y`; a row of another shape
    (or with a missing array) is zeros marked bad."""
    size = int(np.prod(shape))
    x = np.zeros((len(frame), size), dtype=np.float64)
    bad = []
    for i, value in enumerate(frame[column]):
        array = None if value is None else np.asarray(_nested(value), dtype=np.float64)
        if array is None or array.shape != tuple(shape):
            bad.append("a missing array" if array is None else f"shape {list(array.shape)}")
        else:
            x[i] = array.ravel()
            bad.append("")
    if label is None:  # rows to predict: no label
        y = np.zeros(len(frame))
    else:
        y = _as_text(frame[label]) if label_is_text else frame[label].to_numpy(dtype=np.float64, na_value=np.nan)
    return {"x": x, "y": y, "bad": np.array(bad, dtype=object)}


# ---------------------------------------------------------------------------------------------
# Bad rows


def _block_bad(batch: dict) -> dict:
    reasons = [r for r in batch["bad"] if r]
    return {"num_bad": np.array([len(reasons)]), "first": np.array([reasons[0] if reasons else ""], dtype=object)}


def drop_bad_rows(cfg: Experiment, packed: ray.data.Dataset, *, column: Optional[str], shape: tuple, where: str
                  ) -> tuple[ray.data.Dataset, int, Optional[str]]:
    """Count the rows marked bad; raise DataError (one line: the first, and how many) unless they
    are image files and data.on_bad_file is skip. Returns (rows kept, number skipped, first reason)."""
    counts = packed.map_batches(_block_bad, batch_format="numpy", batch_size=None).take_all()
    num_bad = int(sum(r["num_bad"] for r in counts))
    first = next((r["first"] for r in counts if r["first"]), None)
    if not num_bad:
        return packed.drop_columns(["bad"]), 0, None
    more = f" (and {num_bad - 1} more)" if num_bad > 1 else ""
    if column is not None:  # an array column: rows of another shape are never skipped
        raise DataError(f"column {column!r} in {where}: {num_bad} row(s) hold arrays of another shape than the first "
                        f"row's {list(shape)} (the first of them: {first}); every row's array must have one shape")
    if cfg.data.on_bad_file == "error":
        raise DataError(f"data.path: {first}{more}; fix or remove the file(s), or set data.on_bad_file: skip")
    return packed.map_batches(_keep_good, batch_format="numpy"), num_bad, first


def _keep_good(batch: dict) -> dict:
    keep = np.array([not r for r in batch["bad"]], dtype=bool)
    return {name: values[keep] for name, values in batch.items() if name != "bad"}
