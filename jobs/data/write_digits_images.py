"""Write scikit-learn's 8x8 digits as image files, the way image data usually arrives: one PNG per
image (grayscale, 8-bit) in a folder per class, `OUT/images/<digit>/<index>.png`; and the same
8-bit pixels as a Parquet file whose `image` column holds one [1, 8, 8] array per row (values in
[0, 1], as the image reader scales them) with the class name in `label`, `OUT/digits_arrays.parquet`.

    python jobs/data/write_digits_images.py [OUT]        # OUT defaults to jobs/data/digits

Used by jobs/digits_images.yaml and tests/test_images.py; the files are not committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from raytrain_kit.data import digits_arrays  # noqa: E402  (the same arrays as sklearn's load_digits)


def write(out: Path) -> tuple[Path, Path]:
    pixels, labels = digits_arrays()
    gray = np.rint(pixels.reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8)  # counts 0..16 -> 8-bit gray
    folder = out / "images"
    for i, (image, label) in enumerate(zip(gray, labels)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / str(label) / f"{i:04d}.png")
    arrays = (gray.astype(np.float64) / 255.0).reshape(-1, 1, 8, 8)
    table = pa.table({"image": pa.array([a.tolist() for a in arrays]),
                      "label": pa.array([str(v) for v in labels])})
    parquet = out / "digits_arrays.parquet"
    pq.write_table(table, parquet)
    return folder, parquet


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=Path(__file__).parent / "digits",
                        help="folder to write into (default: jobs/data/digits)")
    folder, parquet = write(parser.parse_args().out)
    print(f"wrote {sum(1 for _ in folder.rglob('*.png'))} PNG files under {folder} and {parquet}")
