"""Filesystem operations on local paths and fsspec URLs alike: the one module that
touches a file system by path. (DCP reading and writing: :mod:`dcp_universal.dcp_io`;
checksums and size checks: :mod:`dcp_universal.integrity`; the manifest and the step
layout: :mod:`dcp_universal.manifest`.)

Paths stay ``str`` because ``pathlib.Path`` mangles ``s3://`` into ``s3:/``. Local paths
(and ``file://`` URLs, whose scheme :func:`normalize` strips at every public entry
point) go through ``os``; other URLs through fsspec with the caller's
``storage_options`` (e.g. ``endpoint_url``).

Atomicity policy (:meth:`Storage.write_atomic`): on a local disk a temp file, fsynced,
then renamed; on an object store, where there is no rename, one PUT, which the store
makes visible whole or not at all.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

__all__ = ["Storage", "join", "is_remote", "normalize", "parent"]

_FILE_SCHEME = "file://"


def normalize(path: str) -> str:
    """``path`` as the rest of the package expects it: ``file://`` stripped (a local
    path), trailing slashes removed. Called once by every public entry point."""
    path = os.fspath(path)
    if path.startswith(_FILE_SCHEME):
        path = path[len(_FILE_SCHEME):]
    return path.rstrip("/") or "/"


def is_remote(path: str) -> bool:
    return "://" in path


def join(*parts: str) -> str:
    head, *rest = parts
    for p in rest:
        head = head.rstrip("/") + "/" + p.lstrip("/")
    return head


def parent(path: str) -> str:
    """The directory holding ``path`` (``"."`` for a bare relative name)."""
    head, _, _ = path.rstrip("/").rpartition("/")
    return head or "."


def _replace_synced(tmp: str, path: str) -> None:
    """fsync ``tmp``, rename it to ``path``, fsync the directory: the file appears whole."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Storage:
    """Every filesystem operation, for local paths and fsspec URLs alike.

    Args:
        options: fsspec ``storage_options`` for URLs (ignored for local paths).
    """

    def __init__(self, options: dict | None = None) -> None:
        self.options = dict(options or {})

    def fs(self, path: str):
        """``(fsspec filesystem, path inside it)`` for a URL."""
        from fsspec.core import url_to_fs

        return url_to_fs(path, **self.options)

    def exists(self, path: str) -> bool:
        if not is_remote(path):
            return os.path.exists(path)
        fs, p = self.fs(path)
        fs.invalidate_cache(p.rsplit("/", 1)[0])
        return fs.exists(p)

    def listdir(self, path: str) -> list[str]:
        """Names directly under ``path`` (empty if it does not exist)."""
        if not is_remote(path):
            try:
                return sorted(os.listdir(path))
            except FileNotFoundError:
                return []
        fs, p = self.fs(path)
        fs.invalidate_cache(p)
        try:
            return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=False))
        except FileNotFoundError:
            return []

    def open_read(self, path: str):
        """A binary file object for reading ``path``."""
        if not is_remote(path):
            return open(path, "rb")
        fs, p = self.fs(path)
        return fs.open(p, "rb")

    def read_bytes(self, path: str) -> bytes:
        if not is_remote(path):
            with open(path, "rb") as f:
                return f.read()
        fs, p = self.fs(path)
        return fs.cat_file(p)

    def makedirs(self, path: str) -> None:
        """Create the directory ``path`` locally (object stores have no directories)."""
        if not is_remote(path):
            os.makedirs(path, exist_ok=True)

    def write_atomic(self, path: str, data: bytes) -> None:
        """Whole or not at all: temp + fsync + rename locally, one PUT remotely."""
        if is_remote(path):
            fs, p = self.fs(path)
            fs.pipe_file(p, data)
            return
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        _replace_synced(tmp, path)

    def write_atomic_with(self, path: str, write: Callable[[str], None]) -> None:
        """Like :meth:`write_atomic`, for a writer that wants a local file name
        (``write(tmp_path)``): no copy of the data in memory. Remotely the file is
        written to a local temporary file and uploaded in one ``put``."""
        if is_remote(path):
            fs, p = self.fs(path)
            with tempfile.TemporaryDirectory(prefix="dcpu-upload-") as d:
                local = os.path.join(d, "data")
                write(local)
                fs.put_file(local, p)
            return
        tmp = path + ".tmp"
        write(tmp)
        _replace_synced(tmp, path)

    def remove_file(self, path: str) -> None:
        if not is_remote(path):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            return
        fs, p = self.fs(path)
        if fs.exists(p):
            fs.rm_file(p)

    def remove_tree(self, path: str) -> None:
        if not is_remote(path):
            shutil.rmtree(path, ignore_errors=True)
            return
        fs, p = self.fs(path)
        fs.invalidate_cache(p)
        if fs.exists(p):
            fs.rm(p, recursive=True)

    def file_sizes(self, path: str) -> dict[str, int]:
        """Relative path -> size of every file under ``path``."""
        out = {}
        if not is_remote(path):
            for dirpath, _, files in os.walk(path):
                for name in files:
                    full = os.path.join(dirpath, name)
                    out[os.path.relpath(full, path)] = os.path.getsize(full)
        else:
            fs, p = self.fs(path)
            fs.invalidate_cache(p)
            for full, info in fs.find(p, detail=True).items():
                out[full[len(p.rstrip("/")) + 1:]] = int(info["size"])
        return dict(sorted(out.items()))
