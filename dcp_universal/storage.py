"""Storage: one protocol for every file system the package touches, one implementation
per kind of root, chosen once where a path enters (:func:`storage_for`).

Paths stay ``str`` because ``pathlib.Path`` mangles ``s3://`` into ``s3:/``. A local
path (``file://`` URLs are stripped by :func:`normalize` at every public entry point)
gets :class:`LocalStorage`; any other URL gets :class:`FsspecStorage` with the caller's
``storage_options`` (e.g. ``endpoint_url``), unless a backend was registered for its
scheme (:func:`register_backend`). Nothing outside this module asks whether a path is
remote: it asks its storage, which knows what it can do (:attr:`Storage.maps_files`).

Atomicity policy (:meth:`Storage.write_atomic`): on a local disk a temp file, fsynced,
then renamed; on an object store, where there is no rename, one PUT, which the store
makes visible whole or not at all.

A new backend is one subclass and one registration::

    >>> class Mirror(LocalStorage):                 # "mirror://x" lives in options["base"]/x
    ...     def os_path(self, path):
    ...         return os.path.join(self.options["base"], path.removeprefix("mirror://"))
    >>> register_backend("mirror", Mirror)
"""

from __future__ import annotations

import abc
import os
import shutil
import tempfile
from typing import Callable

import torch

from dcp_universal import dcp_files
from dcp_universal._paths import join, normalize, parent  # noqa: F401  (re-exported)
from dcp_universal.errors import IntegrityError
from dcp_universal.mapped import Copies, MappedFiles, MappedReader, byte_view

__all__ = ["Storage", "LocalStorage", "FsspecStorage", "storage_for", "register_backend",
           "join", "normalize", "parent"]

class Storage(abc.ABC):
    """Every file operation of the package, on one kind of file system.

    Methods take full paths (``str``) in the root's own spelling; a storage serves the
    root it was chosen for and the paths below it.

    Args:
        options: backend options (fsspec ``storage_options`` for URLs).
    """

    #: Reads are views of memory-mapped files: a load may locate and check every tensor
    #: first and copy at its commit, at no memory cost (otherwise it stages in memory).
    maps_files: bool = False

    def __init__(self, options: dict | None = None) -> None:
        self.options = dict(options or {})

    @abc.abstractmethod
    def exists(self, path: str) -> bool: ...

    @abc.abstractmethod
    def is_file(self, path: str) -> bool: ...

    @abc.abstractmethod
    def listdir(self, path: str) -> list[str]:
        """Names directly under ``path`` (empty if it does not exist)."""

    @abc.abstractmethod
    def size(self, path: str) -> int:
        """Bytes in the file ``path``."""

    @abc.abstractmethod
    def open_read(self, path: str):
        """A binary file object for reading ``path``."""

    @abc.abstractmethod
    def read_bytes(self, path: str) -> bytes: ...

    @abc.abstractmethod
    def read_spans(self, path: str, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        """The bytes of each ``(start, nbytes)`` of ``path`` as ``uint8`` tensors (views
        of a map, or fetched bytes).

        Raises:
            IntegrityError: the file is shorter than a span asks for.
        """

    @abc.abstractmethod
    def makedirs(self, path: str) -> None:
        """Create the directory ``path`` (object stores have none: nothing to do)."""

    @abc.abstractmethod
    def write_atomic(self, path: str, data: bytes) -> None:
        """Whole or not at all."""

    @abc.abstractmethod
    def write_atomic_with(self, path: str, write: Callable[[str], None]) -> None:
        """Like :meth:`write_atomic`, for a writer that wants a local file name
        (``write(tmp_path)``): no copy of the data in memory."""

    @abc.abstractmethod
    def remove_file(self, path: str) -> None: ...

    @abc.abstractmethod
    def remove_tree(self, path: str) -> None: ...

    @abc.abstractmethod
    def file_sizes(self, path: str) -> dict[str, int]:
        """Relative path -> size of every file under ``path``."""

    @abc.abstractmethod
    def dcp_writer(self, path: str):
        """A DCP ``StorageWriter`` of the directory ``path``, with bounded files for
        computed tensors (:class:`~dcp_universal.dcp_files.OwnFiles`)."""

    @abc.abstractmethod
    def dcp_reader(self, path: str, copies: Copies | None = None, metadata=None):
        """A DCP ``StorageReader`` of the directory ``path``. ``copies``: keys whose copy
        waits for the load's commit (only where :attr:`maps_files`); ``metadata``: the
        directory's, when the caller has read it already."""


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


def _short(path: str, start: int, n: int, have: int) -> IntegrityError:
    return IntegrityError(
        f"{path}: bytes {start}..{start + n} were asked for, the file holds {have}: it is "
        "shorter than its metadata says (truncated) -> restore it, or load another checkpoint")


class LocalStorage(Storage):
    """A local file system, through ``os``; data files are read through memory maps."""

    maps_files = True

    def os_path(self, path: str) -> str:
        """The operating system's path of ``path`` (itself here; a subclass may map)."""
        return path

    def exists(self, path: str) -> bool:
        return os.path.exists(self.os_path(path))

    def is_file(self, path: str) -> bool:
        return os.path.isfile(self.os_path(path))

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(self.os_path(path)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def size(self, path: str) -> int:
        return os.path.getsize(self.os_path(path))

    def open_read(self, path: str):
        return open(self.os_path(path), "rb")

    def read_bytes(self, path: str) -> bytes:
        with open(self.os_path(path), "rb") as f:
            return f.read()

    def read_spans(self, path: str, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        _, whole = MappedFiles().get(self.os_path(path))
        out = []
        for start, n in spans:
            if start + n > whole.numel():
                raise _short(path, start, n, whole.numel())
            out.append(whole[start:start + n])
        return out

    def makedirs(self, path: str) -> None:
        os.makedirs(self.os_path(path), exist_ok=True)

    def write_atomic(self, path: str, data: bytes) -> None:
        self.write_atomic_with(path, lambda tmp: _write_file(tmp, data))

    def write_atomic_with(self, path: str, write: Callable[[str], None]) -> None:
        local = self.os_path(path)
        tmp = local + ".tmp"
        write(tmp)
        _replace_synced(tmp, local)

    def remove_file(self, path: str) -> None:
        try:
            os.remove(self.os_path(path))
        except FileNotFoundError:
            pass

    def remove_tree(self, path: str) -> None:
        shutil.rmtree(self.os_path(path), ignore_errors=True)

    def file_sizes(self, path: str) -> dict[str, int]:
        top, out = self.os_path(path), {}
        for dirpath, _, files in os.walk(top):
            for name in files:
                full = os.path.join(dirpath, name)
                out[os.path.relpath(full, top)] = os.path.getsize(full)
        return dict(sorted(out.items()))

    def dcp_writer(self, path: str):
        return dcp_files.LocalWriter(self.os_path(path))

    def dcp_reader(self, path: str, copies: Copies | None = None, metadata=None):
        return MappedReader(self.os_path(path), copies, metadata)


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


class FsspecStorage(Storage):
    """Any fsspec URL (``s3://``, ``gs://``, ``memory://``, ...), with ``options`` as
    fsspec's ``storage_options``. Reads are ranged reads of exactly the bytes wanted."""

    def fs(self, path: str):
        """``(fsspec filesystem, path inside it)``."""
        from fsspec.core import url_to_fs

        return url_to_fs(path, **self.options)

    def exists(self, path: str) -> bool:
        fs, p = self.fs(path)
        fs.invalidate_cache(p.rsplit("/", 1)[0])
        return fs.exists(p)

    def is_file(self, path: str) -> bool:
        fs, p = self.fs(path)
        fs.invalidate_cache(p.rsplit("/", 1)[0])
        return fs.isfile(p)

    def listdir(self, path: str) -> list[str]:
        fs, p = self.fs(path)
        fs.invalidate_cache(p)
        try:
            return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=False))
        except FileNotFoundError:
            return []

    def size(self, path: str) -> int:
        fs, p = self.fs(path)
        return int(fs.size(p))

    def open_read(self, path: str):
        fs, p = self.fs(path)
        return fs.open(p, "rb")

    def read_bytes(self, path: str) -> bytes:
        fs, p = self.fs(path)
        return fs.cat_file(p)

    def read_spans(self, path: str, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        if not spans:
            return []
        fs, p = self.fs(path)
        datas = fs.cat_ranges([p] * len(spans), [s for s, _ in spans],
                              [s + n for s, n in spans])
        out = []
        for (start, n), data in zip(spans, datas):
            if isinstance(data, Exception):
                raise data
            if len(data) != n:
                raise _short(path, start, n, start + len(data))
            out.append(byte_view(data))
        return out

    def makedirs(self, path: str) -> None:
        pass

    def write_atomic(self, path: str, data: bytes) -> None:
        fs, p = self.fs(path)
        fs.pipe_file(p, data)

    def write_atomic_with(self, path: str, write: Callable[[str], None]) -> None:
        # a local temporary file, uploaded in one put
        fs, p = self.fs(path)
        with tempfile.TemporaryDirectory(prefix="dcpu-upload-") as d:
            local = os.path.join(d, "data")
            write(local)
            fs.put_file(local, p)

    def remove_file(self, path: str) -> None:
        fs, p = self.fs(path)
        if fs.exists(p):
            fs.rm_file(p)

    def remove_tree(self, path: str) -> None:
        fs, p = self.fs(path)
        fs.invalidate_cache(p)
        if fs.exists(p):
            fs.rm(p, recursive=True)

    def file_sizes(self, path: str) -> dict[str, int]:
        fs, p = self.fs(path)
        fs.invalidate_cache(p)
        out = {full[len(p.rstrip("/")) + 1:]: int(info["size"])
               for full, info in fs.find(p, detail=True).items()}
        return dict(sorted(out.items()))

    def dcp_writer(self, path: str):
        return dcp_files.remote_classes()[0](path, **self.options)

    def dcp_reader(self, path: str, copies: Copies | None = None, metadata=None):
        if copies is not None and copies.keys:
            raise ValueError(f"{path}: copies can wait only for memory-mapped files")
        return dcp_files.remote_classes()[1](path, **self.options)


_BACKENDS: dict[str, Callable[[dict], Storage]] = {}


def register_backend(scheme: str, factory: Callable[[dict], Storage]) -> None:
    """Serve URLs ``<scheme>://...`` with ``factory(options)`` (a :class:`Storage`
    subclass, say) instead of fsspec."""
    if not scheme or "://" in scheme:
        raise ValueError(f"scheme={scheme!r}: expected a URL scheme such as 'mirror'")
    _BACKENDS[scheme] = factory


def storage_for(path: str, options: dict | None = None) -> Storage:
    """The storage of ``path`` (a normalized local path or URL): a registered backend for
    its scheme, else fsspec for URLs and the local file system for paths."""
    scheme, sep, _ = path.partition("://")
    if not sep:
        return LocalStorage(options)
    factory = _BACKENDS.get(scheme)
    return factory(options or {}) if factory is not None else FsspecStorage(options)
