"""Preflight on the shared Ray: a buggy custom model stops `train` with exit 3 before any
training worker starts; `check` prints the report as a table or JSON."""

from __future__ import annotations

import json

import yaml

from raytrain_kit.cli import main


def _train_workers() -> int:
    from ray.util.state import list_actors

    return len(list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=10_000))


def _config(tmp_path, **model) -> str:
    path = tmp_path / "buggy.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"source": "digits"}, "train": {"epochs": 1}, "scaling": {"num_workers": 2},
        "model": {"kind": "custom", "target": "gradcheck_models:buggy_custom_model", **model},
        "run": {"storage_path": str(tmp_path / "runs")}}))
    return str(path)


def test_train_with_buggy_model_exits_3_before_any_worker(ray_session, tmp_path, capsys):
    workers_before = _train_workers()
    code = main(["train", _config(tmp_path, kwargs={"bug": "sign"})])
    out = capsys.readouterr()
    assert code == 3, out.err
    assert out.err.startswith("error: preflight: gradients disagree with finite differences")
    assert "gradient check: FAIL" in out.err
    faulty = [line for line in out.err.splitlines() if line.strip().startswith("1.2.weight")]
    assert faulty and "CustomLinear" in faulty[-1] and "sign error" in faulty[-1]
    assert "Traceback" not in out.err
    assert _train_workers() == workers_before  # no training worker was started
    assert not (tmp_path / "runs" / "buggy").exists()


def test_check_prints_table_and_json(ray_session, tmp_path, capsys):
    assert main(["check", _config(tmp_path, kwargs={"bug": "zero_bias"})]) == 3
    err = capsys.readouterr().err
    assert "1.2.bias" in err and "gradient dropped" in err

    assert main(["check", "jobs/digits.yaml", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "pass" and report["num_parameters"] > 50_000
    assert [p["status"] for p in report["probes"]] == ["pass"] * 4

    assert main(["check", "jobs/digits.yaml", "--set", "preflight.num_directions=2"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("gradient check: PASS") and table.count("  pass") == 2


def test_check_says_in_one_line_that_the_model_cannot_be_built(ray_session, tmp_path, capsys):
    """Newcomer finding: `train` said it in one line (exit 2), `check` printed the preflight
    task's 30-line traceback (exit 1)."""
    config = _config(tmp_path, kwargs={"no_such_option": 1})
    for command in ("check", "train"):
        assert main([command, config]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: model: cannot build 'custom' for input shape [1, 8, 8] (TypeError: "), err
        assert "no_such_option" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_the_check_in_this_process_reports_what_the_task_reports(ray_session, tmp_path):
    """On a Ray that is this machine alone the check runs in the driver (no process to start);
    elsewhere it is a Ray task. Both must give the same verdict, down to each probe's figures
    (float64; the task's process runs torch on 1 thread, the driver on all cores)."""
    from raytrain_kit.config import load_experiment
    from raytrain_kit.data import build_datasets
    from raytrain_kit.preflight import ray_is_this_machine, run_preflight

    assert ray_is_this_machine()  # the suite's Ray: one node, this one
    for overrides in ([], ["model.kind=mlp", "model.hidden=[32]", "model.dropout=0.2"]):
        cfg = load_experiment("jobs/digits.yaml", overrides)
        datasets, spec = build_datasets(cfg)
        here = run_preflight(cfg, datasets["train"], spec).to_dict()
        task = run_preflight(cfg, datasets["train"], spec, in_process=False).to_dict()
        assert here["status"] == task["status"] == "pass"
        assert [p["target"] for p in here["probes"]] == [p["target"] for p in task["probes"]]
        assert len(here["probes"]) >= 4
        for mine, theirs in zip(here["probes"], task["probes"]):
            assert mine["status"] == theirs["status"]
            assert abs(mine["analytic"] - theirs["analytic"]) <= 1e-9 * max(1.0, abs(theirs["analytic"])), (mine, theirs)
            assert abs(mine["numeric"] - theirs["numeric"]) <= 1e-6 * max(1.0, abs(theirs["numeric"])), (mine, theirs)
        assert (here["num_parameters"], here["num_passes"]) == (task["num_parameters"], task["num_passes"])
