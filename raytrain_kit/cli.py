"""Command line: `raytrain-kit validate | check | train | tune | submit | reference`; maps errors to exit codes.

A `KitError` is printed as one line per problem (`error: ...`) with exit code 2 (bad input),
3 (failed preflight) or 1 (failed run), and no traceback. Exercised by every test in
`tests/test_cli.py` and by the README's commands.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from raytrain_kit.errors import KitError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (dotted key, YAML value); repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raytrain-kit", description="Validated, data-parallel PyTorch training on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check a config and print it fully resolved, as YAML")
    _add_config_args(p)
    p = sub.add_parser("train", help="train an experiment on an embedded Ray or a cluster")
    _add_config_args(p)
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--resume", action="store_true", help="continue the run named by the config from its latest checkpoint")
    p = sub.add_parser("tune", help="sweep the config's tune.space with Ray Tune; writes trials.csv, best.yaml, sweep.png")
    _add_config_args(p)
    p.add_argument("--address", default=None, help="Ray cluster to join (as for train)")
    p.add_argument("--resume", action="store_true", help="continue the sweep named by the config; finished trials are kept")
    p = sub.add_parser("check", help="run only the preflight gradient check and print its report")
    _add_config_args(p)
    p.add_argument("--address", default=None, help="Ray cluster to join (as for train)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p = sub.add_parser("submit", help="validate locally, then run `train` on a cluster as a Ray job and follow it")
    _add_config_args(p)
    p.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://127.0.0.1:8265")
    p.add_argument("--working-dir", default=".", help="folder sent with the job (default: .)")
    p.add_argument("--requirements", default=None, help="pip requirements file installed for the job")
    p.add_argument("--no-follow", action="store_true", help="print the job id and return")
    sub.add_parser("reference", help="print the config reference (Markdown) generated from the config models")
    return parser


def format_epoch(m: dict, *, total_epochs: int) -> str:
    parts = [f"epoch {m['epoch']:>3}/{total_epochs}", f"train_loss {m['train_loss']:.4f}"]
    if "val_loss" in m:
        parts.append(f"val_loss {m['val_loss']:.4f}")
    if "val_accuracy" in m:
        parts.append(f"val_accuracy {m['val_accuracy']:.4f}")
    parts += [f"lr {m['lr']:.2e}", f"{m['samples_per_s']:,.0f} samples/s"]
    if m.get("checkpoint"):
        parts.append("[checkpoint]")
    if m.get("nonfinite_steps"):
        parts.append(f"[{m['nonfinite_steps']} non-finite step(s) skipped]")
    return "  ".join(parts)


def _train(args) -> int:
    from raytrain_kit.config import load_experiment
    from raytrain_kit.launch import connect, fit

    cfg = load_experiment(args.config, args.overrides)
    connect(args.address)
    summary = fit(cfg, resume=args.resume, log=lambda line: print(line, flush=True),
                  on_epoch=lambda m: print(format_epoch(m, total_epochs=cfg.train.epochs), flush=True))
    best = summary["best_value"]
    print(f"done: {summary['epochs_completed']} epochs, best {summary['metric']} "
          f"{best:.4f} (epoch {summary['best_epoch']})" if best is not None else "done")
    print(f"run directory: {summary['run_dir']}")
    print(f"checkpoint:    {summary['checkpoint']}")
    return 0


def _tune(args) -> int:
    from raytrain_kit.config import load_experiment
    from raytrain_kit.errors import ConfigError
    from raytrain_kit.launch import connect
    from raytrain_kit.report import plot_sweep
    from raytrain_kit.sweep import run_sweep

    cfg = load_experiment(args.config, args.overrides)
    if cfg.tune is None:
        raise ConfigError(f"{args.config}: no tune section; add tune.space (see the README's sweep section), "
                          "or use `raytrain-kit train` for a single run")
    connect(args.address)
    summary = run_sweep(cfg, resume=args.resume, log=lambda line: print(line, flush=True))
    table = summary["table"]
    shown = [c for c in ("trial_id", *cfg.tune.space, "best_value", "best_epoch", "epochs_run", "status") if c in table]
    print(f"top trials by {summary['metric']} ({summary['mode']}):")
    print(table[shown].head(5).to_string(index=False))
    plot = plot_sweep(summary["run_dir"])
    print(f"sweep directory: {summary['run_dir']}")
    print(f"best config:     {summary['best_yaml']}  (raytrain-kit train {summary['best_yaml']})")
    print(f"plot:            {plot}")
    return 0


def _check(args) -> int:
    import json

    from raytrain_kit.config import load_experiment
    from raytrain_kit.data import build_datasets
    from raytrain_kit.errors import PreflightError
    from raytrain_kit.launch import connect
    from raytrain_kit.preflight import run_preflight

    cfg = load_experiment(args.config, args.overrides)
    connect(args.address)
    datasets, spec = build_datasets(cfg)
    try:
        report = run_preflight(cfg, datasets["train"], spec)
    except PreflightError as e:
        if not args.json:
            raise
        print(json.dumps(e.report, indent=1))
        return e.exit_code
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.format_table())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "validate":
            from raytrain_kit.config import load_experiment, to_yaml

            print(to_yaml(load_experiment(args.config, args.overrides)), end="")
            return 0
        if args.command == "reference":
            from raytrain_kit.config import config_reference_markdown

            print(config_reference_markdown(), end="")
            return 0
        if args.command == "check":
            return _check(args)
        if args.command == "tune":
            return _tune(args)
        if args.command == "submit":
            from raytrain_kit.submit import submit_job

            submit_job(args.config, address=args.address, overrides=args.overrides, working_dir=args.working_dir,
                       requirements=args.requirements, follow=not args.no_follow)
            return 0
        return _train(args)
    except KitError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        if getattr(e, "details", ""):
            print(e.details, file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130

