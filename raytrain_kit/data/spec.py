"""What a model needs to know about the prepared data (`DataSpec`), as plain data for Ray tasks
and Train workers, and the line a run prints about constant columns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about the data, and what the worker needs to batch it."""

    num_features: int
    num_classes: int  # 0 for regression
    input_shape: tuple[int, ...]  # per-sample shape the feature vector is viewed as
    num_train_rows: int
    num_val_rows: int
    feature_names: tuple[str, ...] = field(default=())
    constant_features: tuple[str, ...] = field(default=())  # no spread in the training split: left unscaled
    classes: tuple = field(default=())  # classification: each class's label (name or value), in index order
    # What was fitted on the training split (data/encode.py): the transform resume, export and
    # prediction apply. Plain JSON-able data.
    preprocessing: dict = field(default_factory=dict, compare=False)

    @property
    def task(self) -> str:
        return "classification" if self.num_classes else "regression"

    @property
    def num_outputs(self) -> int:
        return self.num_classes or 1


def describe_constant_features(spec: DataSpec, limit: int = 8) -> Optional[str]:
    """The line a run prints when standardization left constant columns unscaled, else None."""
    names = spec.constant_features
    if not names:
        return None
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return (f"data: {len(names)} column(s) constant in the training split, centred but not scaled: {shown} "
            "(they carry no information; drop them from data.features)")


def describe_data(spec: DataSpec) -> list[str]:
    """The lines a run (or a sweep's driver) prints about its data: what the preprocessing did,
    and the constant columns."""
    from raytrain_kit.data.encode import describe_preprocessing

    return [line for line in (describe_preprocessing(spec.preprocessing) if spec.preprocessing else None,
                              describe_constant_features(spec)) if line]


def spec_to_dict(spec: DataSpec) -> dict:
    """The spec as plain data, for a Ray task's or Train worker's config."""
    return {**asdict(spec), "input_shape": list(spec.input_shape), "feature_names": list(spec.feature_names),
            "constant_features": list(spec.constant_features), "classes": list(spec.classes)}


def spec_from_dict(raw: dict) -> DataSpec:
    return DataSpec(**{**raw, "input_shape": tuple(raw["input_shape"]), "feature_names": tuple(raw["feature_names"]),
                       "constant_features": tuple(raw.get("constant_features", ())),
                       "classes": tuple(raw.get("classes", ())), "preprocessing": raw.get("preprocessing") or {}})
