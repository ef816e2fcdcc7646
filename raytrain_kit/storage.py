"""Run files on local disks or at URIs (s3://, gs://, anything pyarrow reaches): the one writer of
run-level files, atomic, and the readers. Everything another node may read (summaries, records,
a worker's failure log) goes through here into the run's storage_path, never to node-local
paths. Exercised by every `raytrain-kit train`.
"""

from __future__ import annotations

import pyarrow.fs as pafs


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)


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
