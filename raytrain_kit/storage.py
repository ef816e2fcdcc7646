"""Run files on local disks or at URIs (s3://, gs://, anything pyarrow reaches): the one writer of
run-level files, atomic, and the readers. Everything another node may read (summaries, records,
a worker's failure log) goes through here into the run's storage_path, never to node-local
paths. Exercised by every `raytrain-kit train`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from raytrain_kit.errors import ConfigError

if TYPE_CHECKING:
    from raytrain_kit.config import Experiment


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)


def storage_root(cfg: "Experiment") -> str:
    """`run.storage_path` as Ray Train wants it: absolute for local paths, URIs unchanged."""
    path = cfg.run.storage_path
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def run_dir(cfg: "Experiment") -> str:
    assert cfg.run.name, "load_experiment names every run"
    return f"{storage_root(cfg).rstrip('/')}/{cfg.run.name}"


def check_run_name(cfg: "Experiment", *, resume: bool) -> None:
    """The resume-or-refuse decision, made before anything starts (Ray included): a run that
    exists is continued only with `resume`, and one that does not cannot be. Raises ConfigError."""
    directory = run_dir(cfg)
    exists = path_exists(directory)
    if exists and not resume:
        raise ConfigError(f"run.name: run {cfg.run.name!r} already exists at {directory}; pass --resume "
                          "(Python: resume=True) to continue it, or --set run.name=<new name> (Python: an "
                          "override {'run.name': ...}) to start another")
    if resume and not exists:
        raise ConfigError(f"--resume: no run {cfg.run.name!r} at {directory} to continue; drop --resume to start it")


def path_exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return False
    if info.type == pafs.FileType.Directory:
        return bool(fs.get_file_info(pafs.FileSelector(path)))
    return True


def write_run_file(uri: str, name: str, content: str | bytes) -> str:
    """The one writer of run-level files (driver side): temp name + rename on local disks;
    object stores make a single put atomic on their own."""
    fs, path = filesystem(uri)
    folder, _, base = f"{path}/{name}".rpartition("/")
    fs.create_dir(folder, recursive=True)
    tmp = f"{folder}/.{base}.tmp"
    with fs.open_output_stream(tmp) as out:
        out.write(content.encode() if isinstance(content, str) else content)
    fs.move(tmp, f"{folder}/{base}")
    return f"{uri}/{name}"


def read_run_file(uri: str, name: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(f"{path}/{name}") as f:
        return f.read()
