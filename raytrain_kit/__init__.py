"""raytrain-kit."""

import time as _time

# When the kit was first imported (the console script's first line), and this process's CPU
# seconds by then: where this Python interpreter started, for the start-up timeline
# (`launch._process_started`). First here, before anything heavy is imported.
IMPORTED_AT = (_time.time(), _time.process_time())

# The Python API (raytrain_kit/api.py), imported on first use: the CLI imports this package
# first thing, and must not pay for pandas and the config models before it needs them.
__all__ = ["load_experiment", "train", "tune", "check", "export", "load_model", "predict", "RunResult",
           "SweepResult", "LoadedModel"]


def __getattr__(name: str):
    if name in __all__:
        from raytrain_kit import api

        return getattr(api, name)
    raise AttributeError(f"module 'raytrain_kit' has no attribute {name!r}")
