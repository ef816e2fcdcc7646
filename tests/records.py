"""Readers for what runs leave behind, shared by the tests: TensorBoard events and PNG pictures."""

from __future__ import annotations

import struct
from pathlib import Path


def read_tensorboard(folder: Path) -> tuple[dict[str, dict[int, float]], set[str]]:
    """Scalars {tag: {step: value}} and histogram tags of TensorBoard event files, read with
    tensorboardX's own protobuf from TFRecord framing (length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, dict[int, float]] = {}
    histograms: set[str] = set()
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no event file in {folder}"
    for path in files:
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("histo"):
                    histograms.add(value.tag)
                else:
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars, histograms


def assert_picture(path: Path) -> None:
    """A PNG that decodes and is not blank: its pixels vary."""
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert float(pixels[..., :3].var()) > 0.005, f"{path.name} looks blank"


def tensorboard_points(folder: Path) -> dict[str, list[int]]:
    """Every scalar point's step, {tag: [step, ...]} in the order written, duplicates included
    (`read_tensorboard` keeps one value per step and would hide an epoch written twice)."""
    from tensorboardX.proto.event_pb2 import Event

    points: dict[str, list[int]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            if offset + 16 + length > len(data):  # cut short by a killed writer
                break
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if not value.HasField("histo"):
                    points.setdefault(value.tag, []).append(event.step)
    return points
