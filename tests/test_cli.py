"""The command line: bad input gives one clear line and exit 2; validate; the main job end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from raytrain_kit.cli import main

REPO = Path(__file__).resolve().parents[1]
GOOD = {"data": {"source": "digits"}, "model": {"kind": "mlp", "hidden": [8]}, "train": {"epochs": 1}}


def _write_csv(directory: Path, name: str, frame: pd.DataFrame) -> str:
    path = directory / name
    frame.to_csv(path, index=False)
    return str(path)


def _table(n=40, **extra):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n), "label": rng.integers(0, 2, n)})
    for k, v in extra.items():
        frame[k] = v
    return frame


def _bad_cases(tmp: Path):
    """(name, config dict or raw YAML text, extra argv, text the error must contain)."""
    nan = _table()
    nan.loc[3, "b"] = np.nan
    inf = _table()
    inf.loc[5, "a"] = np.inf
    csv = lambda name, frame, **data: {"data": {"source": "csv", "path": _write_csv(tmp, name, frame), **data},
                                        "model": {"kind": "mlp", "hidden": [4]}}
    return [
        ("unknown key", {"optim": {"lrr": 0.1}}, [], "optim.lrr: unknown key; did you mean 'optim.lr'?"),
        ("unknown section", {"schedul": {"kind": "cosine"}}, [], "schedul: unknown key; did you mean 'schedule'?"),
        ("wrong type", {"train": {"epochs": "ten"}}, [], "train.epochs: Input should be a valid integer"),
        ("negative lr", {"optim": {"lr": -0.1}}, [], "optim.lr: Input should be greater than 0"),
        ("unknown model kind", {"model": {"kind": "transformer"}}, [], "model.kind: Input should be 'mlp', 'cnn', 'rnn' or 'custom'"),
        ("unknown init", {"init": {"scheme": "he"}}, [], "init.scheme: Input should be"),
        ("val fraction", {"data": {"val_fraction": 1.5}}, [], "data.val_fraction: Input should be less than 1"),
        ("yaml syntax", "optim: {lr: [1, 2\n", [], "not valid YAML"),
        ("not a mapping", "- a\n- b\n", [], "top level must be a mapping"),
        ("bad --set", GOOD, ["--set", "optim.lr"], "--set 'optim.lr': expected dotted.key=value"),
        ("--set unknown key", GOOD, ["--set", "train.epoch=3"], "train.epoch: unknown key; did you mean 'train.epochs'?"),
        ("csv without path", {"data": {"source": "csv"}}, [], "data.path: required for source 'csv'"),
        ("custom without target", {"model": {"kind": "custom"}}, [], "model.target: required for kind 'custom'"),
        ("custom import fails", {"model": {"kind": "custom", "target": "nope_pkg.models:build"}}, [],
         "model.target: cannot import 'nope_pkg.models:build'"),
        ("too many workers", {**GOOD, "scaling": {"num_workers": 8}}, [], "scaling: 8 workers x 1.0 CPUs = 8 CPUs"),
        ("streaming without a free CPU", {**GOOD, "data": {"source": "digits", "in_memory": False},
                                          "scaling": {"num_workers": 2}}, [],
         "data.in_memory: false streams every epoch through Ray Data tasks, which need a CPU the workers leave free"),
        ("fsdp block typo", {**GOOD, "scaling": {"strategy": "fsdp", "fsdp_blocks": ["Linr"]}}, [],
         "scaling.fsdp_blocks: no module of class Linr in the model; its module classes are Flatten, Linear, ReLU, Sequential"),
        ("missing data file", {"data": {"source": "csv", "path": str(tmp / "absent.csv")}}, [],
         f"data.path: {tmp / 'absent.csv'}: no such file or folder"),
        ("missing label column", csv("nolabel.csv", _table().drop(columns="label")), [],
         "data.label: column 'label' not found in"),
        ("missing feature column", csv("feat.csv", _table(), features=["a", "zzz"]), [],
         "data.features: column(s) 'zzz' not found in"),
        ("label out of range", csv("range.csv", _table(label=[0, 1, 5, 1] * 10), num_classes=2), [],
         "label column 'label' in"),
        ("negative label with num_classes", csv("neg.csv", _table(label=[0, -1] * 20), num_classes=2), [],
         "has value -1 outside [0, 2)"),
        ("non-integer label", csv("frac.csv", _table(label=[0.5, 1.0] * 20)), [], "non-integer value(s)"),
        ("NaN feature", csv("nan.csv", nan), [], "column 'b' in"),
        ("inf feature", csv("inf.csv", inf), [], "column 'a' in"),
        ("categorical column over the limit", csv("cities.csv", _table(city=[f"town{i % 7}" for i in range(40)]),
                                                   max_categories=5, other_category=False), [],
         "data.max_categories: column 'city' in"),
        ("text label for regression", csv("textlabel.csv", _table(label=["yes", "no"] * 20), task="regression"), [],
         "label column 'label' in"),
        ("missing text cell", csv("gap.csv", _table(city=["paris", None] * 20)), [],
         "column 'city' in"),
        ("empty table", csv("empty.csv", _table().iloc[:0]), [], "empty.csv: holds no rows"),
        ("input shape mismatch", {**csv("shape.csv", _table()), "data": {**csv("shape2.csv", _table())["data"],
                                                                          "input_shape": [1, 3, 3]},
                                  "model": {"kind": "cnn", "channels": [2]}}, [],
         "data.input_shape: [1, 3, 3] holds 9 values, but"),
    ]


def test_bad_input_table_exits_2_naming_the_field(ray_session, tmp_path, capsys):
    storage = tmp_path / "runs"
    cases = _bad_cases(tmp_path)
    assert len(cases) >= 15
    for name, content, extra, expected in cases:
        config = tmp_path / f"{name.replace(' ', '_')}.yaml"
        config.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
        code = main(["train", str(config), "--set", f"run.storage_path={storage}", *extra])
        out = capsys.readouterr()
        assert code == 2, (name, out.err)
        assert expected in out.err, (name, out.err)
        assert "Traceback" not in out.err + out.out, name
        assert all(line.startswith("error: ") for line in out.err.strip().splitlines()), (name, out.err)
        # Bad input leaves nothing behind: no half-made run directory.
        assert not (storage / config.stem).exists(), name
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: config file not found" in capsys.readouterr().err


def _run_cli(*args, cwd=REPO, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "raytrain_kit", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_run_name_taken_or_missing_is_refused_before_any_ray(tmp_path):
    """`train` refuses to overwrite a run, or to resume one that is not there, before it starts or
    joins a Ray: with RAY_ADDRESS pointing at no cluster, the error is still the run's own."""
    storage = tmp_path / "runs"
    (storage / "digits").mkdir(parents=True)
    (storage / "digits" / "summary.json").write_text("{}")
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    for extra, expected in [([], "error: run.name: run 'digits' already exists at "),
                            (["--resume", "--set", "run.name=never-ran"], "error: --resume: no run 'never-ran' at ")]:
        done = subprocess.run([sys.executable, "-m", "raytrain_kit", "train", "jobs/digits.yaml",
                               "--set", f"run.storage_path={storage}", *extra],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith(expected), line
        assert done.stdout == ""
    assert sorted(p.name for p in storage.iterdir()) == ["digits"] and (storage / "digits" / "summary.json").read_text() == "{}"


def test_a_cluster_address_nothing_answers_is_refused_in_seconds_not_minutes(tmp_path):
    """RAY_ADDRESS (or --address) naming a host:port where no Ray listens: Ray's own `ray.init`
    retried it for minutes (the old code outlasted a 120 s timeout); the kit says so in one line."""
    from raytrain_kit.cluster import _free_port

    storage = tmp_path / "runs"
    port = _free_port()  # bound and closed again: nothing listens there
    cases = [({"RAY_ADDRESS": f"127.0.0.1:{port}"}, [], f"error: RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster answers there"),
             ({}, ["--address", f"127.0.0.1:{port}"], f"error: --address 127.0.0.1:{port}: no Ray cluster answers there")]
    for env_extra, extra, expected in cases:
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **env_extra}
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "raytrain_kit", "train", "jobs/digits.yaml",
                               "--set", f"run.storage_path={storage}", *extra],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith(expected) and "ray start --head" in line, line
        assert time.monotonic() - started < 30
    assert not storage.exists()  # no run was begun


def test_process_exit_code_and_no_traceback(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("optim:\n  lr: -1\nmodel:\n  kind: transformer\n")
    done = _run_cli("train", str(config))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: model.kind: Input should be 'mlp', 'cnn', 'rnn' or 'custom' (got 'transformer')",
        "error: optim.lr: Input should be greater than 0 (got -1)"]


def test_validate_prints_resolved_yaml():
    done = _run_cli("validate", "jobs/digits.yaml", "--set", "optim.lr=0.5", "--set", "model.hidden=[7]")
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert resolved["optim"]["lr"] == 0.5 and resolved["model"]["hidden"] == [7]
    assert resolved["run"]["name"] == "digits" and resolved["scaling"]["num_workers"] == 2
    assert resolved["schedule"]["decay_rate"] == 0.96  # defaults are filled in


def _orphaned_ray_processes() -> set[int]:
    """Running Ray processes whose parent is gone (reparented to init): what a command that
    started and ended its own Ray would leave running past its return."""
    found = set()
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                state, parent = f.read().rsplit(")", 1)[1].split()[:2]
            with open(f"/proc/{name}/cmdline") as f:
                command = f.read()
        except (OSError, ValueError):
            continue
        if parent == "1" and state != "Z" and command.startswith("ray::"):
            found.add(int(name))
    return found


def test_main_job_reaches_95_percent(tmp_path):
    """The README's main command, in its own process with its own embedded Ray, every process of
    which has ended when the command returns."""
    before = _orphaned_ray_processes()
    done = _run_cli("train", "jobs/digits.yaml", "--set", f"run.storage_path={tmp_path}", timeout=600)
    assert not _orphaned_ray_processes() - before  # Train's controller and workers ended with the command
    assert done.returncode == 0, done.stderr[-3000:]
    epochs = [line for line in done.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 15 and "samples/s" in epochs[0] and "val_accuracy" in epochs[0]
    summary = json.loads((tmp_path / "digits" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_completed"] == 15
    assert summary["final_metrics"]["val_accuracy"] >= 0.95
    assert summary["best_value"] == max(h["val_accuracy"] for h in summary["history"])
    assert Path(summary["checkpoint"]).is_dir() and summary["config"]["model"]["kind"] == "cnn"
    assert f"run directory: {tmp_path / 'digits'}" in done.stdout
    # The preflight gradient check ran, passed, and came before the first epoch.
    assert "preflight: gradient check pass (" in done.stdout
    assert done.stdout.index("preflight:") < done.stdout.index("epoch   1/15")


def test_fsdp_job_in_bf16_then_export(tmp_path):
    """jobs/fsdp_mlp.yaml, shrunk, under bf16 (FSDP2's mixed-precision policy), then `export`:
    a plain state_dict that loads strictly into the model build_model returns."""
    import torch

    from raytrain_kit.config import load_experiment
    from raytrain_kit.data import DataSpec
    from raytrain_kit.models import build_model

    overrides = [f"run.storage_path={tmp_path}", "data.num_rows=3000", "model.hidden=[256, 256]", "train.epochs=2",
                 "schedule.warmup_steps=5", "optim.lr=0.002",
                 "train.precision=bf16"]
    done = _run_cli("train", "jobs/fsdp_mlp.yaml", *[a for o in overrides for a in ("--set", o)], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("training:      2 workers, fsdp built on the meta device, bf16; global batch 256 = 64 x 2 micro-batches x 2 workers "
            "per optimizer step") in done.stdout
    summary = json.loads((tmp_path / "fsdp_mlp" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["final_metrics"]["step"] == 2 * 10  # per worker 1200 rows: 19 micro-batches, 10 steps
    assert summary["best_value"] > 0.3  # 10 classes: well above chance after two epochs
    assert sorted(p.name for p in Path(summary["checkpoint"], "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    out = tmp_path / "model.pt"
    done = _run_cli("export", str(tmp_path / "fsdp_mlp"), str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = load_experiment(REPO / "jobs/fsdp_mlp.yaml", overrides)
    model = build_model(cfg, DataSpec(num_features=128, num_classes=10, input_shape=(128,), num_train_rows=2400,
                                      num_val_rows=600))
    num_parameters = sum(p.numel() for p in model.parameters())
    assert done.stdout.strip().splitlines() == [
        f"wrote {out}: {num_parameters:,} parameters from {summary['checkpoint']}",
        f"wrote {tmp_path / 'model.data.json'}: its data spec and the preprocessing fitted on the training split"]
    model.load_state_dict(torch.load(out, weights_only=True))  # strict
    data = json.loads((tmp_path / "model.data.json").read_text())
    assert (data["num_features"], data["num_classes"], data["input_shape"]) == (128, 10, [128])
    assert len(data["preprocessing"]["scale"]) == 128  # the training split's standardization travels with it
    done = _run_cli("export", str(tmp_path / "fsdp_mlp"), str(out), "--epoch", "7")
    assert done.returncode == 2 and done.stderr.startswith("error: --epoch: no checkpoint of epoch 7")
    _predict_equals_the_exported_model(tmp_path, model, data, cfg)


def _predict_equals_the_exported_model(tmp_path, model, data: dict, cfg) -> None:
    """`predict` over raw rows on 2 actors, each loading the sharded checkpoint, against the
    exported state_dict with its data.json's standardization and a plain torch forward."""
    import numpy as np
    import pandas as pd
    import torch

    from raytrain_kit.data.sources import _synthetic_block

    d = cfg.data
    block = _synthetic_block({"id": np.arange(3000, 3500)}, seed=cfg.train.seed, num_features=d.num_features,
                             num_classes=d.num_classes, noise=d.noise)  # the same teacher; rows the run never saw
    rows = pd.DataFrame(block).assign(row_id=np.arange(500))
    rows.to_parquet(tmp_path / "new.parquet")
    done = _run_cli("predict", str(tmp_path / "fsdp_mlp"), str(tmp_path / "new.parquet"), "--out",
                    str(tmp_path / "predicted"), "--batch-size", "64", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "predicted 500 rows on 2 actor(s)" in done.stdout, done.stdout
    assert done.stderr == "", done.stderr  # not a line of Ray's own (its actor pools log a notice as an error)
    predicted = pd.read_parquet(tmp_path / "predicted").sort_values("row_id").reset_index(drop=True)

    prep = data["preprocessing"]
    x = (rows[prep["numeric"]].to_numpy(np.float64) - np.array(prep["pivot"]) - np.array(prep["offset"])) / np.array(prep["scale"])
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(x.astype(np.float32))).double(), dim=1).numpy()
    assert predicted["row_id"].tolist() == list(range(500))
    assert predicted["prediction"].tolist() == probs.argmax(axis=1).tolist()
    np.testing.assert_allclose(predicted[[f"prob_{j}" for j in range(10)]].to_numpy(np.float64), probs, rtol=1e-5, atol=1e-7)
    accuracy = (probs.argmax(axis=1) == rows["label"].to_numpy()).mean()
    assert f"accuracy {accuracy:.4f}" in done.stdout and accuracy > 0.3  # a trained model, scored on its label


def test_bad_local_files_are_one_line_before_ray_starts(tmp_path):
    """Duplicate column names, a missing file and a missing column: exit 2, one `error:` line
    naming the column and the file, no Ray log lines or colour codes, and no Ray started (-v would
    show its start)."""
    (tmp_path / "dup.csv").write_text("a,a,b,label\n1,2,3,0\n4,5,6,1\n")
    (tmp_path / "ok.csv").write_text("a,b,label\n1,2,0\n4,5,1\n")
    cases = [("dup.csv", "label", f"error: data.path: {tmp_path / 'dup.csv'} has the column name(s) 'a' more than once; "
                                  "rename them so each column has its own name"),
             ("missing.csv", "label", f"error: data.path: {tmp_path / 'missing.csv'}: no such file or folder"),
             ("ok.csv", "target", f"error: data.label: column 'target' not found in {tmp_path / 'ok.csv'} "
                                  "(columns: label, a, b)")]
    for name, label, expected in cases:
        config = tmp_path / "bad.yaml"
        config.write_text(yaml.safe_dump({"data": {"source": "csv", "path": str(tmp_path / name), "label": label},
                                          "run": {"storage_path": str(tmp_path / "runs")}}))
        for command in ("validate", "train"):
            done = _run_cli(command, str(config), *(["-v"] if command == "train" else []), timeout=120)
            assert done.returncode == 2, (name, command, done.stderr)
            assert done.stderr.strip().splitlines() == [expected], (name, command)
            assert "\x1b[" not in done.stderr and "Started a local Ray instance" not in done.stdout + done.stderr
    assert not (tmp_path / "runs").exists()


def test_ray_that_cannot_start_is_one_line_and_exit_1(tmp_path):
    """A real start failure (Ray's temp dir is a file, so its session folder cannot be made):
    one `error:` line with the cause and the remedy, exit 1, no traceback."""
    (tmp_path / "not_a_dir").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(tmp_path / "not_a_dir")}
    done = subprocess.run([sys.executable, "-m", "raytrain_kit", "train", "jobs/digits.yaml",
                           "--set", f"run.storage_path={tmp_path / 'runs'}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Ray did not start on this machine (NotADirectoryError"), lines
    assert lines[0].endswith("start Ray once with `ray start --head` and pass --address auto")


def test_predicts_bad_run_directory_is_one_line_before_ray_starts(tmp_path):
    """No run there, and a run without a checkpoint: exit 2, one `error:` line, and no Ray started
    (-v would show its start)."""
    (tmp_path / "no_checkpoint").mkdir()
    (tmp_path / "no_checkpoint" / "config.yaml").write_text((REPO / "jobs" / "digits.yaml").read_text())
    cases = [(tmp_path / "absent", f"error: {tmp_path / 'absent'}: not a run directory (no config.yaml)"),
             (tmp_path / "no_checkpoint", f"error: {tmp_path / 'no_checkpoint'}: no checkpoint there")]
    for directory, expected in cases:
        done = _run_cli("predict", str(directory), "--out", str(tmp_path / "out"), "-v", timeout=120)
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith(expected), done.stderr
        assert "Started a local Ray instance" not in done.stdout + done.stderr
    assert not (tmp_path / "out").exists()


def test_a_full_disk_in_a_background_thread_warns_once_after_the_commands_own_error(capsys):
    """TensorBoard's writer thread may find the run's disk full before the checkpoint does: the
    command's error (naming the disk and the remedy) stays its first line, the writer's warning
    comes after it, once; other background errors are warned as they happen."""
    import argparse
    import errno
    import threading

    from raytrain_kit.cli import _quiet_thread_errors

    def fill():
        raise OSError(errno.ENOSPC, "No space left on device")

    def other():
        raise ValueError("bad value")

    with _quiet_thread_errors(argparse.Namespace(verbose=False, quiet=False)):
        for target in (fill, other, fill):
            thread = threading.Thread(target=target)
            thread.start()
            thread.join()
        print("error: run.storage_path: no space left on the disk", file=sys.stderr)
    assert capsys.readouterr().err.splitlines() == [
        "warning: ValueError: bad value (in a background thread)",
        "error: run.storage_path: no space left on the disk",
        "warning: OSError: [Errno 28] No space left on device (in a background thread)"]
