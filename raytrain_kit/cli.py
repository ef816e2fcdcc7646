"""Command line: `raytrain-kit validate | check | train | tune | report | export | submit | reference`;
maps errors to exit codes.

A `KitError` is printed as one line per problem (`error: ...`) with exit code 2 (bad input),
3 (failed preflight) or 1 (failed run), and no traceback: a failed run's first line is the
worker's own exception, and Ray's traceback follows only with --verbose. Exercised by every test
in `tests/test_cli.py` and by the README's commands.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Iterator, Optional, Sequence

from raytrain_kit.errors import KitError, short_message


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (dotted key, YAML value); repeatable")


def _add_verbosity(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="print only the result (and errors)")
    group.add_argument("-v", "--verbose", action="store_true",
                       help="also show Ray's own logs, and its traceback when a run fails")


def _verbosity(args) -> int:
    from raytrain_kit.progress import NORMAL, QUIET, VERBOSE

    return VERBOSE if getattr(args, "verbose", False) else QUIET if getattr(args, "quiet", False) else NORMAL


class _OneLineParser(argparse.ArgumentParser):
    """argparse's errors as every other bad input: one `error:` line naming the remedy, exit 2
    (argparse's own prints the whole usage block first)."""

    def error(self, message: str):
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="raytrain-kit", description="Validated, data-parallel PyTorch training on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    p = sub.add_parser("validate", help="check a config (and a local data file's header) and print it fully resolved, as YAML")
    _add_config_args(p)
    p = sub.add_parser("train", help="train an experiment on an embedded Ray or a cluster")
    _add_config_args(p)
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--resume", action="store_true", help="continue the run named by the config from its latest checkpoint")
    _add_verbosity(p)
    p = sub.add_parser("tune", help="sweep the config's tune.space with Ray Tune; writes trials.csv, best.yaml, sweep.png")
    _add_config_args(p)
    p.add_argument("--address", default=None, help="Ray cluster to join (as for train)")
    p.add_argument("--resume", action="store_true", help="continue the sweep named by the config; finished trials are kept")
    _add_verbosity(p)
    p = sub.add_parser("report", help="draw a run's or a sweep's pictures and report.md (train and tune do it at the end)")
    p.add_argument("directory", help="a run or sweep directory (as train or tune printed it)")
    p = sub.add_parser("check", help="run only the preflight gradient check and print its report")
    _add_config_args(p)
    p.add_argument("--address", default=None, help="Ray cluster to join (as for train)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_advise_parser(sub)
    p = sub.add_parser("submit", help="validate locally, then run `train` on a cluster as a Ray job and follow it")
    _add_config_args(p)
    p.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://127.0.0.1:8265")
    p.add_argument("--working-dir", default=".", help="folder sent with the job (default: .)")
    p.add_argument("--requirements", default=None, help="pip requirements file installed for the job")
    p.add_argument("--no-follow", action="store_true", help="print the job id and return")
    p = sub.add_parser("export", help="write a run's model as a plain state_dict file (whole tensors, also from "
                                      "sharded checkpoints), for torch.load(..., weights_only=True)")
    p.add_argument("directory", help="a run directory (as train printed it)")
    p.add_argument("out", help="file to write, e.g. model.pt")
    p.add_argument("--epoch", type=int, default=None, help="that epoch's checkpoint (default: the summary's best, else the latest)")
    _add_predict_parser(sub)
    sub.add_parser("reference", help="print the config reference (Markdown) generated from the config models")
    return parser


def _add_advise_parser(sub) -> None:
    p = sub.add_parser("advise", help="measure before training, on real rows where the workers would run: which "
                                      "learning rate (a range test on the run's workers), which init "
                                      "scheme keeps the gradients alive, which strategy and micro-batch fit each "
                                      "worker's memory; writes advice.yaml (--set keys) and advice.png")
    _add_config_args(p)
    p.add_argument("--only", choices=["lr", "init", "memory"], action="append", default=None,
                   help="one part (repeatable; default: all three)")
    # The defaults are advisor.LR_RANGE and LR_STEPS (tests/test_advise.py checks), written out
    # here so that a bad value is refused before the kit's heavy imports.
    p.add_argument("--lr-range", nargs=2, type=float, metavar=("MIN", "MAX"), default=[1e-6, 10.0],
                   help="the range test's first and last learning rates (default: 1e-6 10)")
    p.add_argument("--lr-steps", type=int, default=200, help="the range test's steps (default: 200; it stops "
                                                              "early once the loss diverges)")
    p.add_argument("--out", default=None, help="folder for advice.yaml and advice.png "
                                               "(default: <run.storage_path>/<run.name>_advice)")
    p.add_argument("--json", action="store_true", help="print the measurements as JSON")
    p.add_argument("--address", default=None, help="Ray cluster to join (as for train)")


def _add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="predict rows with a run's model, as Ray Data batch inference over a pool of "
                                       "actors; scores a label column when there is one")
    p.add_argument("directory", help="a run directory (as train printed it)")
    p.add_argument("data", nargs="?", default=None,
                   help="rows to predict: a CSV or Parquet file or folder, or for an image run an image folder or "
                        "manifest; local or a URI (default: the run's own data, --split of it)")
    p.add_argument("--out", required=True, help="folder to write (Parquet files; CSV when it ends in .csv)")
    p.add_argument("--split", choices=["val", "train", "all"], default="val",
                   help="without DATA: which of the run's own rows (default: val, the validation split)")
    p.add_argument("--epoch", type=int, default=None, help="that epoch's checkpoint (default: the summary's best, else the latest)")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per forward pass (default 1024)")
    p.add_argument("--num-workers", type=int, default=2, help="actors, each loading the model once (default 2)")
    p.add_argument("--gpu", action="store_true", help="one GPU per actor (the forward passes run there)")
    p.add_argument("--address", default=None, help="Ray cluster to join (as for train)")
    _add_verbosity(p)


def _report(directory: str, progress) -> None:
    """The pictures at the end of train and tune; a run that trained is not failed by its plots."""
    from raytrain_kit.errors import short_message
    from raytrain_kit.report import write_report

    try:
        written = write_report(directory)
    except Exception as e:
        print(f"warning: report not written: {type(e).__name__}: {short_message(e)}", file=sys.stderr)
        return
    progress.line(f"report:        {written[-1]}")


def _load(args):
    """The command's experiment, with a local data file and a custom model's module checked
    before any Ray starts (a typo is one line in a moment, not after Ray's 10-15 s start)."""
    from raytrain_kit.api import load_experiment

    cfg = load_experiment(args.config, args.overrides)
    _check_model_module(cfg)
    return cfg


def _check_model_module(cfg) -> None:
    """model.kind: custom: its module can be found (found, not imported: importing it would
    import torch before Ray's start, which the happy path overlaps with it). The driver builds
    the model itself later, so the module must be importable here in any case."""
    import importlib.util

    from raytrain_kit.errors import ConfigError

    if cfg.model.kind != "custom" or not cfg.model.target:
        return
    module = cfg.model.target.partition(":")[0]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is not there
        found = False
    if not found:
        raise ConfigError(f"model.target: cannot import {cfg.model.target!r} (ModuleNotFoundError: No module named "
                          f"{module!r}); is its package on PYTHONPATH or installed?")


def _finish(directory: str, progress, *, started_ray: bool) -> None:
    """The report, and the end of an embedded Ray this command started, side by side.

    Ray's shutdown is mostly waiting for its processes to exit (1.5 s on 2 cores), the report's
    pictures mostly one core's work (a sweep's: 2.4 s, matplotlib's import included): a thread
    draws them meanwhile. Nothing in it touches Ray, and Python's cyclic collector is off until
    both are done (its garbage collected first, while Ray is up), so no Ray object is freed in
    the middle of the shutdown, which would call into a core worker that is gone."""
    import gc
    import threading

    from raytrain_kit.cluster import disconnect

    if not started_ray:
        _report(directory, progress)
        return
    gc.collect()
    gc.disable()
    drawing = threading.Thread(target=_report, args=(directory, progress), name="report", daemon=True)
    try:
        drawing.start()
        disconnect()
        drawing.join()
    finally:
        gc.enable()


def _train(args) -> int:
    from raytrain_kit.cluster import connect
    from raytrain_kit.progress import VERBOSE, Progress, format_startup
    from raytrain_kit.storage import check_run_name

    cfg = _load(args)
    check_run_name(cfg, resume=args.resume)  # refused in a moment, not after Ray's start
    progress = Progress(total_epochs=cfg.train.epochs, verbosity=_verbosity(args))
    # Before the kit's heavy imports. One run, whose embedded Ray ends with this process: no
    # State API (cluster.needs_placement_group_cleaner).
    started_ray = connect(args.address, verbose=progress.verbosity >= VERBOSE, state_api=False)
    from raytrain_kit.api import train
    from raytrain_kit.launch import run_dir

    try:
        summary = train(cfg, resume=args.resume, log=progress.line, on_epoch=progress.epoch,
                        on_progress=progress.bar if progress.wants_bar else None).summary
    finally:
        progress.close()
    best = summary["best_value"]
    print(f"done: {summary['epochs_completed']} epochs, best {summary['metric']} "
          f"{best:.4f} (epoch {summary['best_epoch']})" if best is not None else "done")
    print(f"run directory: {summary['run_dir']}")
    print(f"checkpoint:    {summary['checkpoint']}{_checkpoint_note(summary, cfg)}")
    startup = format_startup(summary.get("startup") or {})
    if startup:
        progress.line(startup)
    _finish(run_dir(cfg), progress, started_ray=started_ray)
    return 0


def _predict(args) -> int:
    from raytrain_kit.cluster import connect, disconnect, ray_notices_hidden
    from raytrain_kit.errors import ConfigError
    from raytrain_kit.progress import QUIET, VERBOSE

    if args.num_workers < 1 or args.batch_size < 1:
        raise ConfigError("--num-workers and --batch-size: give 1 or more")
    if os.path.exists(args.out) and os.listdir(args.out):
        raise ConfigError(f"--out: {args.out} already holds files; give a new folder (predictions are never mixed)")
    from raytrain_kit.inference import check_inputs

    check_inputs(args.directory, args.data, epoch=args.epoch)  # before Ray's start: bad input is one line at once
    verbose = _verbosity(args) >= VERBOSE
    started_ray = connect(args.address, verbose=verbose)
    from raytrain_kit.api import predict

    with contextlib.nullcontext() if verbose else ray_notices_hidden():  # Ray's actor pools log a notice as an error
        result = predict(args.directory, args.data, args.out, split=args.split, epoch=args.epoch,
                         batch_size=args.batch_size, num_workers=args.num_workers, use_gpu=args.gpu,
                         log=print if _verbosity(args) > QUIET else lambda line: None)
    scores = []
    if result.accuracy is not None:
        scores.append(f"accuracy {result.accuracy:.4f}")
    if result.loss is not None:
        scores.append(f"loss {result.loss:.4f}")
    scored = f"; {', '.join(scores)} over {result.scored_rows:,} labelled rows" if scores else ""
    print(f"predicted {result.rows:,} rows on {result.num_actors} actor(s){scored}")
    if result.unseen_labels:
        print(f"not scored: {result.unseen_labels:,} row(s) whose label is none of the run's classes")
    print(f"wrote {args.out} (a folder: one {'CSV' if args.out.lower().endswith('.csv') else 'Parquet'} file per block)")
    if started_ray:
        disconnect()
    return 0


def _checkpoint_note(summary: dict, cfg) -> str:
    """Why the checkpoint printed is not the best epoch's, when it is not."""
    checkpoint, best = summary.get("checkpoint"), summary.get("best_epoch")
    if not checkpoint or best is None or checkpoint.endswith(f"_{best:04d}"):
        return ""
    return (f" (the best saved epoch's; epoch {best} was not saved: checkpoint.every_epochs is "
            f"{cfg.checkpoint.every_epochs})")


def _tune(args) -> int:
    from raytrain_kit.errors import ConfigError
    from raytrain_kit.cluster import connect
    from raytrain_kit.progress import VERBOSE, Progress

    cfg = _load(args)
    if cfg.tune is None:
        raise ConfigError(f"{args.config}: no tune section; add tune.space (see the README's sweep section), "
                          "or use `raytrain-kit train` for a single run")
    progress = Progress(total_epochs=cfg.train.epochs, verbosity=_verbosity(args))
    # Trials that train in their own processes start no Ray Train run (launch.runs_in_process).
    started_ray = connect(args.address, verbose=progress.verbosity >= VERBOSE, state_api=not cfg.scaling.single_process)
    from raytrain_kit.api import tune

    result = tune(cfg, resume=args.resume, log=progress.line)
    summary, table = result.summary, result.trials
    shown = [c for c in ("trial_id", *cfg.tune.space, "best_value", "best_epoch", "epochs_run", "status") if c in table]
    print(f"top trials by {summary['metric']} ({summary['mode']}):")
    print(table[shown].head(5).to_string(index=False))
    print(f"sweep directory: {summary['run_dir']}")
    print(f"best config:     {summary['best_yaml']}  (raytrain-kit train {summary['best_yaml']})")
    _finish(summary["run_dir"], progress, started_ray=started_ray)
    return 0


def _check(args) -> int:
    import json

    from raytrain_kit.api import check
    from raytrain_kit.cluster import connect
    from raytrain_kit.errors import PreflightError

    cfg = _load(args)
    connect(args.address)
    try:
        report = check(cfg)
    except PreflightError as e:
        if not args.json:
            raise
        print(json.dumps(e.report, indent=1))
        return e.exit_code
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.format_table())
    return 0


def _advise(args) -> int:
    from raytrain_kit.cluster import connect, disconnect
    from raytrain_kit.errors import ConfigError

    cfg = _load(args)
    lr_range, lr_steps = args.lr_range, args.lr_steps
    if not 0 < lr_range[0] < lr_range[1] or lr_steps < 2:
        raise ConfigError(f"--lr-range/--lr-steps: a range test needs 0 < MIN < MAX and 2 or more steps "
                          f"(got --lr-range {lr_range[0]:g} {lr_range[1]:g} --lr-steps {lr_steps})")
    started_ray = connect(args.address)  # before the kit's heavy imports, as train does
    from raytrain_kit.advisor import PARTS, advice_json, format_advice, run_advise
    from raytrain_kit.launch import _process_started

    result = run_advise(cfg, parts=args.only or PARTS, out_dir=args.out, lr_range=tuple(lr_range), lr_steps=lr_steps,
                        started=_process_started())
    print(advice_json(result) if args.json else format_advice(result))
    if started_ray:
        disconnect()
    return 0


@contextlib.contextmanager
def _quiet_thread_errors(args) -> Iterator[None]:
    """A background thread's exception (TensorBoard's writer on a full disk, say) as one warning
    line, not a traceback, while the command runs; with --verbose as Python prints it.

    A full disk's warnings are held to the command's end and printed once each: the same disk
    fills under the run's checkpoint too, and the command's own error, which names the disk
    and the remedy, is then its first line whichever writer found the disk full first."""
    import errno
    import threading

    from raytrain_kit.progress import VERBOSE

    held: dict[str, None] = {}  # an ordered set

    def hook(info) -> None:
        if info.exc_type is SystemExit:
            return
        line = f"warning: {info.exc_type.__name__}: {short_message(info.exc_value)} (in a background thread)"
        if isinstance(info.exc_value, OSError) and info.exc_value.errno == errno.ENOSPC:
            held[line] = None
        else:
            print(line, file=sys.stderr)

    previous = threading.excepthook
    if _verbosity(args) < VERBOSE:
        threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous
        for line in held:
            print(line, file=sys.stderr)


def run() -> None:
    """The `raytrain-kit` command: `main`, then the process's end without Python's teardown.

    Once a command has written everything and its atexit handlers (Ray's, logging's, MLflow's)
    have run, the interpreter's own teardown (freeing torch's, Ray's and pandas' modules one by
    one, their C++ destructors) took 2.5 s after a sweep and 0.7 s after a bare `import torch`
    on 2 cores: time in every command that does nothing for the user. An embedded Ray the
    command started is ended first (`cluster.disconnect`, which waits for every process it
    started), so nothing of the command runs on after it returns. `main` itself returns
    normally, for callers in Python (the tests)."""
    import atexit

    code = main()
    cluster = sys.modules.get("raytrain_kit.cluster")  # not imported: this command started no Ray
    if cluster is not None and cluster.started_embedded_ray() and cluster.ray.is_initialized():
        cluster.disconnect()  # a command that failed after starting Ray: its processes end before it does
    atexit._run_exitfuncs()  # CPython's own exit step (private, stable since Python 2): each handler runs once
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a bad argument already printed as one line (2)
        return e.code if isinstance(e.code, int) else 0
    with _quiet_thread_errors(args):
        return _run(args)


def _run(args) -> int:
    try:
        if args.command == "validate":
            from raytrain_kit.config import to_yaml

            print(to_yaml(_load(args)), end="")
            return 0
        if args.command == "reference":
            from raytrain_kit.config import config_reference_markdown

            print(config_reference_markdown(), end="")
            return 0
        if args.command == "report":
            from raytrain_kit.report import write_report

            for path in write_report(args.directory):
                print(path)
            return 0
        if args.command == "export":
            from raytrain_kit.launch import export_run, exported_data_path

            used, num_parameters = export_run(args.directory, args.out, epoch=args.epoch)
            print(f"wrote {args.out}: {num_parameters:,} parameters from {used}")
            if os.path.exists(exported_data_path(os.path.abspath(args.out))):
                print(f"wrote {exported_data_path(args.out)}: its data spec and the preprocessing fitted on the training split")
            return 0
        if args.command == "check":
            return _check(args)
        if args.command == "advise":
            return _advise(args)
        if args.command == "predict":
            return _predict(args)
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
        from raytrain_kit.progress import VERBOSE

        if getattr(e, "traceback", "") and _verbosity(args) >= VERBOSE:
            print(f"\nRay's account of the failure:\n{e.traceback}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130

