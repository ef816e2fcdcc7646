"""Config: loading, overrides, error messages, and the README reference staying in sync."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raytrain_kit.config import (SECTIONS, build_experiment, config_reference_markdown, load_experiment,
                                 parse_overrides, with_overrides)
from raytrain_kit.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_jobs_validate_and_runs_are_named_after_their_file():
    for path in sorted((REPO / "jobs").glob("*.yaml")):
        cfg = load_experiment(path)
        assert cfg.run.name == path.stem


def test_overrides_parse_yaml_values_and_revalidate():
    cfg = load_experiment(REPO / "jobs/digits.yaml", ["optim.lr=3e-4", "model.hidden=[64, 32]",
                                                      "optim.name=sgd", "optim.momentum=0.9", "run.name=x"])
    assert cfg.optim.lr == 3e-4 and cfg.model.hidden == [64, 32] and cfg.optim.name == "sgd"
    assert cfg.run.name == "x"
    again = with_overrides(cfg, {"optim.lr": 0.1})
    assert again.optim.lr == 0.1 and cfg.optim.lr == 3e-4  # frozen originals stay as they were
    with pytest.raises(ConfigError, match=r"optim.lr: Input should be greater than 0"):
        with_overrides(cfg, {"optim.lr": -1})


def test_overrides_of_a_search_space_entry_keep_its_dotted_key():
    """`tune.space` is keyed by dotted config paths: `--set tune.space.optim.lr=...` names the
    entry `optim.lr`, not a section `optim` holding `lr`."""
    path = REPO / "jobs/sweep_digits.yaml"
    whole = load_experiment(path, ["tune.space.optim.lr={loguniform: [1.0e-3, 1.0e-2]}"])
    assert whole.tune.space["optim.lr"].loguniform == (1e-3, 1e-2)
    assert set(whole.tune.space) == {"optim.lr", "init.scheme", "regularization.l2"}
    kind = load_experiment(path, ["tune.space.optim.lr.choice=[0.01, 0.02]"])
    assert kind.tune.space["optim.lr"].choice == [0.01, 0.02]
    assert kind.tune.space["optim.lr"].loguniform is None  # the new kind replaces the old one
    added = load_experiment(path, ["tune.space.model.dropout.uniform=[0.0, 0.5]"])
    assert added.tune.space["model.dropout"].uniform == (0.0, 0.5)
    with pytest.raises(ConfigError, match=r"tune\.space\.optim\.lrr: unknown key; did you mean 'optim\.lr'\?"):
        load_experiment(path, ["tune.space.optim.lrr.choice=[0.01]"])


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError) as e:
        build_experiment({"optim": {"learning_rate": 0.1}, "schedul": {}})
    text = str(e.value)
    assert "schedul: unknown key; did you mean 'schedule'?" in text
    assert "optim.learning_rate: unknown key" in text
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key; did you mean 'optim\.lr'\?"):
        with_overrides(build_experiment({}), {"optim.lrr": 1})


def test_derived_metric_and_mode():
    assert (build_experiment({}).metric, build_experiment({}).mode) == ("val_accuracy", "max")
    reg = build_experiment({"data": {"source": "synthetic", "num_classes": 0, "task": "regression"}})
    assert (reg.metric, reg.mode) == ("val_loss", "min")


@pytest.mark.parametrize("raw,expected", [
    ({"optim": {"name": "adam", "nesterov": True}}, "nesterov needs name: sgd"),
    ({"model": {"kind": "cnn"}, "data": {"source": "synthetic"}}, "data.input_shape: cnn needs an image shape"),
    ({"schedule": {"kind": "plateau", "warmup_steps": 5}}, "schedule.warmup_steps: not supported"),
    ({"data": {"source": "synthetic", "num_classes": 0}}, "data.num_classes: 0 makes a regression target"),
    ({"model": {"kind": "custom", "target": "nocolon"}}, "model.target: 'nocolon' is not 'package.module:callable'"),
    ({"scaling": {"strategy": "hsdp", "num_workers": 4}}, "scaling.shard_group_size: required for strategy hsdp"),
    ({"scaling": {"strategy": "hsdp", "num_workers": 4, "shard_group_size": 3}}, "scaling.shard_group_size: 3 does not divide"),
    ({"scaling": {"shard_group_size": 2}}, "scaling.shard_group_size: only used with strategy hsdp (strategy is 'ddp')"),
    ({"scaling": {"fsdp_blocks": ["Linear"]}}, "scaling.fsdp_blocks: only used with strategy fsdp or hsdp"),
    ({"train": {"precision": "fp16"}}, "train.precision: fp16 needs GPUs (scaling.use_gpu: true); on CPU use bf16 or fp32"),
    ({"data": {"source": "csv", "path": "t.csv", "features": ["a", "label"]}},
     "data.features: names the label column 'label'; a model must not read its own label"),
    ({"data": {"source": "csv", "path": "t.csv", "features": ["a", "b", "a"]}}, "data.features: lists 'a' more than once"),
    ({"scaling": {"strategy": "fsdp"}, "train": {"on_nonfinite": "rollback"}}, "train.on_nonfinite: rollback keeps a copy"),
])
def test_cross_field_errors(raw, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        build_experiment(raw)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        parse_overrides(["optim.lr"])


def test_readme_config_reference_matches_models():
    readme = (REPO / "README.md").read_text()
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    assert start in readme and end in readme, "README lost its config reference markers"
    section = readme.split(start, 1)[1].split(end, 1)[0]
    assert section.strip() == config_reference_markdown().strip(), (
        "README config reference is stale: regenerate it with `raytrain-kit reference`")
    for name, model in SECTIONS.items():
        for key in model.model_fields:
            assert f"`{name}.{key}`" in section
