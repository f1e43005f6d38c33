"""Integrity: every file's size and CRC-32, computed while it is written and checked
against the manifest's records when it is read.

Sizes cost one listing and are checked on every load; CRC-32 costs a full read and is
checked with ``verify=True`` (``CheckpointManager.verify``, ``dcp-universal verify``).
"""

from __future__ import annotations

import contextlib
import os
import zlib
from typing import Callable, Mapping

from dcp_universal.errors import CheckpointError, IntegrityError, NotACheckpointError
from dcp_universal.format.manifest import FileRecord
from dcp_universal.storage import Storage, join

__all__ = ["Checksummed", "crc32_of", "check_files"]


class _CrcStream:
    """Passes writes through, keeping the size (and, ``crc``, the CRC-32) of everything
    written, and the first ``OSError`` a write raised."""

    def __init__(self, inner, crc: bool) -> None:
        self._inner, self._crc, self.crc, self.size = inner, crc, 0, 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            n = self._inner.write(data)
        except OSError as e:
            self.error = self.error or e
            raise
        if self._crc:
            self.crc = zlib.crc32(data, self.crc)
        self.size += memoryview(data).nbytes
        return n

    def __getattr__(self, name):
        return getattr(self._inner, name)


class Checksummed:
    """Wraps a DCP writer's file system so every file's size and CRC-32 are computed
    while it is written, never by reading it back (``crc=False``: sizes only).

    A write's ``OSError`` (a full disk) surfaces as itself: torch.save's archive writer
    turns it into an opaque ``unexpected pos`` error, which is replaced by the original.

    Attributes:
        files: file name -> :class:`FileRecord` of every file written through it.
    """

    def __init__(self, inner, crc: bool = True) -> None:
        self._inner = inner
        self._crc = crc
        self.files: dict[str, FileRecord] = {}

    def __getattr__(self, name):
        return getattr(self._inner, name)

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with self._inner.create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            crc = _CrcStream(stream, self._crc)
            try:
                yield crc
            except Exception as e:
                if crc.error is not None and crc.error is not e:
                    raise crc.error from e
                raise
        self.files[os.path.basename(os.fspath(path))] = FileRecord(
            size=crc.size, crc32=crc.crc if self._crc else None)

    def rename(self, path, new_path) -> None:
        self._inner.rename(path, new_path)
        old = os.path.basename(os.fspath(path))
        if old in self.files:
            self.files[os.path.basename(os.fspath(new_path))] = self.files.pop(old)


def vanished(doing: str, path: str, e: FileNotFoundError) -> NotACheckpointError:
    """The error for a file that was there when the load found it and is gone when it is
    read (retention or another job removed the step meanwhile)."""
    return NotACheckpointError(
        f"{doing} {path} failed: {e.filename or e} does not exist (removed while it was "
        "read? retention or another job's prune deletes old steps) -> check the path, or "
        "load a step that is still committed")


def crc32_of(store: Storage, path: str, chunk: int = 16 << 20) -> int:
    """CRC-32 of the file ``path``, read in chunks.

    Raises:
        NotACheckpointError: the file vanished while it was read (a prune or another
            job removed the step meanwhile; an object store says so only at a read).
    """
    crc = 0
    try:
        with store.open_read(path) as f:
            while block := f.read(chunk):
                crc = zlib.crc32(block, crc)
    except FileNotFoundError as e:
        if isinstance(e, CheckpointError):
            raise
        raise vanished("checking", path, e) from e
    return crc


def check_files(store: Storage, path: str, files: Mapping[str, FileRecord], *,
                checksums: bool = False, prefixes: tuple[str, ...] = ("",),
                progress: Callable[[int], None] | None = None) -> None:
    """Compare the files under ``path`` whose names start with one of ``prefixes`` with
    their records: sizes always (one listing), CRC-32 when ``checksums`` (a full read).
    ``progress`` is called with each checked file's size.

    Raises:
        IntegrityError: naming the first missing, resized or corrupted file.
    """
    wanted = {rel: rec for rel, rec in files.items() if rel.startswith(prefixes)}
    if not wanted:
        return
    try:
        found = store.file_sizes(path)
    except FileNotFoundError:  # the directory, or the whole bucket, is gone
        found = {}
    for rel, rec in sorted(wanted.items()):
        full = join(path, rel)
        if rel not in found:
            raise IntegrityError(f"{full} is missing (the manifest lists {rec.size} bytes); "
                                 "the checkpoint is damaged: load an earlier step")
        if found[rel] != rec.size:
            raise IntegrityError(
                f"{full} has {found[rel]} bytes, the manifest says {rec.size}: the file "
                "is truncated or was rewritten; load an earlier step")
        if checksums and rec.crc32 is not None:
            crc = crc32_of(store, full)
            if crc != rec.crc32:
                raise IntegrityError(
                    f"{full} fails its checksum (crc32 {crc:08x}, manifest {rec.crc32:08x}): "
                    "its bytes changed after the save; load an earlier step")
        if progress is not None:
            progress(rec.size)
