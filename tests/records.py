"""Readers for what runs leave behind, shared by the tests: TensorBoard events and PNG pictures."""

from __future__ import annotations

from pathlib import Path


def read_tensorboard(folder: Path) -> tuple[dict[str, dict[int, float]], set[str]]:
    """Scalars {tag: {step: value}} and histogram tags of TensorBoard event files (the kit's reader)."""
    from raytrain_kit.tracking import tensorboard_events

    assert list(folder.glob("events.out.tfevents.*")), f"no event file in {folder}"
    scalars: dict[str, dict[int, float]] = {}
    histograms: set[str] = set()
    for event in tensorboard_events(str(folder)):
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
    from raytrain_kit.tracking import tensorboard_events

    points: dict[str, list[int]] = {}
    for event in tensorboard_events(str(folder)):
        for value in event.summary.value:
            if not value.HasField("histo"):
                points.setdefault(value.tag, []).append(event.step)
    return points
