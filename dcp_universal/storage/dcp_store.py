"""DCP's reader and writer over any :class:`~dcp_universal.storage.Storage`, through its
core methods alone: the default :meth:`~dcp_universal.storage.Storage.dcp_writer` and
:meth:`~dcp_universal.storage.Storage.dcp_reader` of a backend that declares nothing
faster.

* :class:`StoreWriter` is DCP's ``FileSystemWriter`` (its file-writing loop, bounded
  files for computed tensors, the checksums of every file: :class:`.dcp_files.OwnFiles`)
  whose files are written locally and sent whole with ``store.upload``.
* :class:`StoreReader` is the ranged reader of the fsspec backend
  (:class:`.dcp_files.RangedReads`), fetching through ``store.read_spans``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystemBase

from dcp_universal._paths import join
from dcp_universal.storage.dcp_files import OwnFiles, RangedReads

__all__ = ["StoreWriter", "StoreReader"]


class _StoreFiles(FileSystemBase):
    """DCP's file-system interface over a :class:`Storage`: a file written is a local
    temporary file until its stream closes, then ``store.upload``-ed whole (so it
    appears whole or not at all, and a failed write leaves nothing)."""

    def __init__(self, store) -> None:  # a Storage (not imported: it imports this)
        self.store = store

    @contextlib.contextmanager
    def create_stream(self, path, mode: str) -> Iterator:
        path = os.fspath(path)
        if "w" not in mode:
            with self.store.open_read(path) as f:
                yield f
            return
        with tempfile.TemporaryDirectory(prefix="dcpu-dcp-") as d:
            local = os.path.join(d, "data")
            with open(local, mode) as f:
                yield f
            self.store.upload(local, path)

    def concat_path(self, path, suffix: str) -> str:
        return join(os.fspath(path), suffix)

    def init_path(self, path, **kwargs) -> str:
        return os.fspath(path)

    def rename(self, path, new_path) -> None:
        # DCP renames only its small ``.metadata.tmp``: a copy, then the old one removed
        path, new_path = os.fspath(path), os.fspath(new_path)
        self.store.write_atomic(new_path, self.store.read_bytes(path))
        self.store.remove_file(path)

    def mkdir(self, path) -> None:
        self.store.makedirs(os.fspath(path))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True

    def exists(self, path) -> bool:
        return self.store.exists(os.fspath(path))

    def rm_file(self, path) -> None:
        self.store.remove_file(os.fspath(path))

    def size(self, path) -> int:
        """A file's size (what a reader checks DCP's metadata against)."""
        return self.store.size(os.fspath(path))


class StoreWriter(OwnFiles, FileSystemWriter):
    """DCP's file-system writer over ``store``: see :class:`.dcp_files.OwnFiles` for
    ``own_file_keys`` and ``checksums``; ``thread_count``: files written at once."""

    def __init__(self, store, path: str, *, own_file_keys=frozenset(),
                 checksums: bool = True, thread_count: int = 1) -> None:
        # sync_files=False: a file is durable when its upload returns (the store's
        # atomic write), so an fsync of the local temporary file buys nothing
        FileSystemWriter.__init__(self, path, sync_files=False, thread_count=thread_count)
        # DCP annotates ``fs`` as its local FileSystem; any FileSystemBase serves it
        self.fs = _StoreFiles(store)  # type: ignore[assignment]
        self.path = path
        self._set_up(own_file_keys, checksums)


class StoreReader(RangedReads, FileSystemReader):
    """DCP's file-system reader over ``store``, reading exactly the bytes a load needs
    through ``store.read_spans`` (:class:`.dcp_files.RangedReads`)."""

    def __init__(self, store, path: str, *, trusted: bool = False,
                 check=None) -> None:
        super().__init__(path)
        self.fs = _StoreFiles(store)  # type: ignore[assignment]  # as in StoreWriter
        self.path = path
        self.store = store
        self.trusted = trusted
        self.check = check

    def _fetch(self, ranges: list[tuple[str, int, int]]) -> list:
        by_path: dict[str, list[int]] = {}
        for i, (p, _, _) in enumerate(ranges):
            by_path.setdefault(p, []).append(i)
        out: list = [None] * len(ranges)
        for p, members in by_path.items():
            views = self.store.read_spans(p, [(ranges[i][1], ranges[i][2] - ranges[i][1])
                                              for i in members])
            for i, view in zip(members, views):
                out[i] = view.numpy().data  # the fetched bytes, not a copy
        return out
