"""Paths or filesystem URIs (local by default, s3:// or gs:// in a cluster) through pyarrow.fs.

Writes are atomic: a local file is written beside its target and renamed into place;
an object-store PUT is atomic by itself. A crash never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


def resolve_root(path: str) -> str:
    """Make a local path absolute (Ray workers run elsewhere); leave URIs as they are."""
    if is_uri(path):
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def exists(path: str) -> bool:
    fs, p = _fs(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def makedirs(path: str) -> None:
    fs, p = _fs(path)
    fs.create_dir(p, recursive=True)


def read_bytes(path: str) -> bytes:
    fs, p = _fs(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def write_bytes(path: str, data: bytes) -> None:
    fs, p = _fs(path)
    parent = posixpath.dirname(p) if is_uri(path) else os.path.dirname(p)
    fs.create_dir(parent, recursive=True)
    if is_uri(path):
        with fs.open_output_stream(p) as f:
            f.write(data)
        return
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@dataclass(frozen=True)
class FileEntry:
    path: str  # full path or URI, usable with read_bytes
    rel: str  # relative to the listed root, "/"-separated
    size: int
    mtime: float  # seconds since the epoch (UTC)


def list_files(root: str) -> Iterator[FileEntry]:
    """Every file below `root`, recursively, sorted by relative path."""
    fs, p = _fs(root)
    selector = pafs.FileSelector(p, recursive=True)
    infos = [i for i in fs.get_file_info(selector) if i.type == pafs.FileType.File]
    prefix = root.split("://", 1)[0] + "://" if is_uri(root) else ""
    base = p.rstrip("/") + "/"
    for info in sorted(infos, key=lambda i: i.path):
        rel = info.path[len(base):] if info.path.startswith(base) else info.path
        mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
        yield FileEntry(path=prefix + info.path if prefix else info.path, rel=rel.replace(os.sep, "/"),
                        size=info.size or 0, mtime=mtime)


def list_dirs(root: str) -> list[str]:
    """The names of the folders directly below `root`, sorted."""
    fs, p = _fs(root)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def delete(path: str) -> None:
    """Remove a file if it exists."""
    fs, p = _fs(path)
    if fs.get_file_info(p).type == pafs.FileType.File:
        fs.delete_file(p)
