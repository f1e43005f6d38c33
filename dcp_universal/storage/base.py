"""The storage protocol: every file operation of the package, on one kind of file
system. Implementations: :mod:`.local` and :mod:`.fsspec`; the choice per root:
:func:`dcp_universal.storage.storage_for`.

A backend implements the core (the abstract methods: seven, as small as DCP's
``FileSystemBase``); everything else has a default built on them, DCP's reader and
writer included (:mod:`.dcp_store`). Faster ways are capabilities a backend declares or
overrides: memory maps (:attr:`Storage.maps_files`), renames (:attr:`Storage.renames`),
its own ranged reads (:meth:`Storage.read_spans`), its own DCP reader and writer.
"""

from __future__ import annotations

import abc
import copy
import os
import shutil
import tempfile
from typing import Callable, Mapping

import torch

from dcp_universal._paths import join
from dcp_universal.errors import IntegrityError
from dcp_universal.storage import dcp_store
from dcp_universal.storage.mapped import Copies, byte_view

__all__ = ["Storage", "short_read"]


class Storage(abc.ABC):
    """Every file operation of the package, on one kind of file system.

    Methods take full paths (``str``) in the root's own spelling; a storage serves the
    root it was chosen for and the paths below it. A directory is whatever has files
    below it (an object store's prefix); a backend with real directories says so by
    overriding :meth:`makedirs`.

    The core a backend implements: :meth:`exists`, :meth:`size`, :meth:`listdir`,
    :meth:`open_read`, :meth:`write_atomic`, :meth:`create_new`, :meth:`remove_file`.

    Args:
        options: backend options (fsspec ``storage_options`` for URLs).
    """

    #: Reads are views of memory-mapped files: a load may locate and check every tensor
    #: first and copy at its commit, at no memory cost (otherwise it stages in memory).
    maps_files: bool = False

    #: Directories are renamed in one step (a local file system): fenced writes and
    #: removals are then conditional on the writer's fence directory (:meth:`fenced_write`).
    renames: bool = False

    #: directory -> the check of every byte a DCP reader of it reads (:meth:`verifying`;
    #: a :class:`~dcp_universal.storage.integrity.BlockCheck` each)
    checks: Mapping[str, object] = {}

    def __init__(self, options: dict | None = None) -> None:
        self.options = dict(options or {})

    def verifying(self, checks: Mapping[str, object]) -> "Storage":
        """A copy of this storage whose DCP readers of the directories in ``checks``
        check every byte they read against the checkpoint's block checksums (the copy
        shares everything else, connections included)."""
        out = copy.copy(self)
        out.checks = {**self.checks, **checks}
        return out

    # -- the core: what a backend implements ------------------------------------------

    @abc.abstractmethod
    def exists(self, path: str) -> bool:
        """True if ``path`` is a file, or a directory (with something below it)."""

    @abc.abstractmethod
    def size(self, path: str) -> int:
        """Bytes in the file ``path``.

        Raises:
            FileNotFoundError: there is no such file.
        """

    @abc.abstractmethod
    def listdir(self, path: str) -> list[str]:
        """Names directly under ``path``, sorted (empty if it does not exist or is a
        file)."""

    @abc.abstractmethod
    def open_read(self, path: str):
        """A binary file object for reading ``path`` (``seek`` and ``read``).

        Raises:
            FileNotFoundError: there is no such file.
        """

    @abc.abstractmethod
    def write_atomic(self, path: str, data: bytes) -> None:
        """Write the file ``path``, replacing any: whole or not at all (a reader never
        sees part of it)."""

    @abc.abstractmethod
    def create_new(self, path: str, data: bytes) -> bool:
        """Write ``path`` whole unless it exists, atomically against every other
        writer (two processes racing: exactly one gets True); False if it existed."""

    @abc.abstractmethod
    def remove_file(self, path: str) -> None:
        """Remove the file ``path``, if it exists."""

    # -- defaults on top of the core ---------------------------------------------------

    def is_file(self, path: str) -> bool:
        """True if ``path`` is a file (here: it exists and has nothing below it)."""
        return self.exists(path) and not self.listdir(path)

    def is_link(self, path: str) -> bool:
        """True if ``path`` is a symbolic link (object stores have none)."""
        return False

    def read_bytes(self, path: str) -> bytes:
        """The whole file ``path``."""
        with self.open_read(path) as f:
            return f.read()

    def read_spans(self, path: str, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        """The bytes of each ``(start, nbytes)`` of ``path`` as ``uint8`` tensors (views
        of a map, or fetched bytes). Here: a seek and a read each.

        Raises:
            IntegrityError: the file is shorter than a span asks for.
        """
        out: list[torch.Tensor] = []
        if not spans:
            return out
        with self.open_read(path) as f:
            for start, n in spans:
                f.seek(start)
                data = f.read(n)
                if len(data) != n:
                    raise short_read(path, start, n, start + len(data))
                out.append(byte_view(data))
        return out

    def makedirs(self, path: str) -> None:
        """Create the directory ``path`` (object stores have none: nothing to do)."""

    def write_atomic_with(self, path: str, write: Callable[[str], object]) -> None:
        """Like :meth:`write_atomic`, for a writer that wants a local file name
        (``write(tmp_path)``). Here: a local temporary file, then :meth:`write_atomic`
        of its bytes; a backend that can send a file without holding it in memory
        overrides this."""
        with tempfile.TemporaryDirectory(prefix="dcpu-write-") as d:
            local = os.path.join(d, "data")
            write(local)
            with open(local, "rb") as f:
                data = f.read()
        self.write_atomic(path, data)

    def upload(self, local_path: str, path: str) -> None:
        """Copy the local file ``local_path`` to ``path``, whole or not at all."""
        self.write_atomic_with(path, lambda tmp: shutil.copyfile(local_path, tmp))

    def fenced_write(self, path: str, data: bytes, fence) -> None:
        """Write ``path`` whole, only while ``fence`` holds (a writer lease: see
        :class:`~dcp_universal.training.lease.Lease`). Here (object stores, no rename):
        ``fence.check()`` right before the write; a backend with an atomic rename
        makes the write itself conditional (:class:`.LocalStorage`). ``fence`` None:
        :meth:`write_atomic`."""
        if fence is not None:
            fence.check(f"writing {path}")
        self.write_atomic(path, data)

    def rename_dir(self, path: str, new_path: str) -> None:
        """Rename the directory ``path`` in one step, if it exists (object stores have no
        directories: nothing to do)."""

    def detach(self, path: str, marker: str | None, fence) -> str | None:
        """Take the directory ``path`` out of its root while ``fence`` holds: from now on
        it is not committed (its ``marker`` file, a step's manifest, is gone) and only
        its data is left, at the returned path, for :meth:`remove_tree` (None: nothing
        is left; a link loses the link only). Here: ``fence.check()``, then the marker
        is removed; a backend with an atomic rename moves the directory instead."""
        if fence is not None:
            fence.check(f"removing {path}")
        if self.is_link(path):
            self.remove_file(path)
            return None
        if marker is not None:
            self.remove_file(f"{path}/{marker}")
        return path

    def remove_tree(self, path: str) -> None:
        """Remove the directory ``path`` and everything below it (or the file ``path``),
        if it exists. Here: every file, one by one."""
        for rel in self.file_sizes(path):
            self.remove_file(join(path, rel))
        self.remove_file(path)

    def file_sizes(self, path: str) -> dict[str, int]:
        """Relative path -> size of every file under ``path``. Here: a walk of
        :meth:`listdir`."""
        out: dict[str, int] = {}
        for name in self.listdir(path):
            full = join(path, name)
            below = self.file_sizes(full)
            if below:
                out.update({f"{name}/{rel}": n for rel, n in below.items()})
                continue
            try:
                out[name] = self.size(full)
            except (FileNotFoundError, IsADirectoryError):  # an empty directory
                pass
        return dict(sorted(out.items()))

    def dcp_writer(self, path: str, *, own_file_keys=frozenset(), checksums: bool = True):
        """A DCP ``StorageWriter`` of the directory ``path``: computed tensors (items in
        ``own_file_keys``) in bounded files of their own
        (:class:`~dcp_universal.storage.dcp_files.OwnFiles`), every file's record
        (size, block checksums unless ``checksums`` is False) kept in ``writer.fs.files``.
        Here: each file written locally, then :meth:`upload`."""
        return dcp_store.StoreWriter(self, path, own_file_keys=own_file_keys,
                                     checksums=checksums)

    def dcp_reader(self, path: str, copies: Copies | None = None, metadata=None, *,
                   trusted: bool = False):
        """A DCP ``StorageReader`` of the directory ``path``. ``copies``: keys whose copy
        waits for the load's commit (only where :attr:`maps_files`); ``metadata``: the
        directory's, when the caller has read it already; ``trusted``: read DCP's
        ``.metadata`` with plain ``pickle`` (default: an allow-list of DCP's records).
        A directory in :attr:`checks` is read with its check of every byte read.
        Here: ranged reads through :meth:`read_spans`."""
        if copies is not None and copies.keys:
            raise ValueError(f"{path}: copies can wait only for memory-mapped files")
        return dcp_store.StoreReader(self, path, trusted=trusted, check=self.checks.get(path))


def short_read(path: str, start: int, n: int, have: int) -> IntegrityError:
    return IntegrityError(
        f"{path}: bytes {start}..{start + n} were asked for, the file holds {have}: it is "
        "shorter than its metadata says (truncated) -> restore it, or load another checkpoint")
