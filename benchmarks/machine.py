"""The machine a benchmark ran on, as every results JSON records it (`machine`)."""

from __future__ import annotations

import os
import platform


def machine() -> dict:
    import ray
    import torch

    return {"platform": platform.platform(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__}
