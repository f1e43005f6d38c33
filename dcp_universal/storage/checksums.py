"""Checksums computed while a file is written: its size and the CRC-32C (hardware-
accelerated through the ``crc32c`` package) of each :data:`BLOCK_BYTES` block
(:class:`Checksummed`, around a DCP writer's file system). Their check on reads and
their format: :mod:`.integrity`. No storage here: every writer, of any backend, wraps
its files with it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import zlib
from types import ModuleType
from typing import Callable

import torch

from dcp_universal._held import Held
from dcp_universal.errors import IntegrityError
from dcp_universal.format.manifest import FileRecord

__all__ = ["Checksummed", "BLOCK_BYTES", "INLINE_BLOCKS", "SUMS_SUFFIX", "ALGO", "checksum",
           "checksum_fn", "zip_crc_skipped"]

_crc32c: ModuleType | None
try:
    import crc32c as _crc32c
except ImportError:  # pragma: no cover - a core dependency; zlib keeps saves working
    _crc32c = None

#: block size of new files' checksums (a load checks whole blocks: at most one block
#: more than it needs at each end of a read)
BLOCK_BYTES = 128 << 10
#: a file with more blocks keeps its sums in a file beside it (``SUMS_SUFFIX``)
INLINE_BLOCKS = 4096
SUMS_SUFFIX = ".sums"

# algorithm -> fn(data, prev): both take any contiguous buffer, without a copy
_ALGOS: dict[str, Callable] = {"crc32": zlib.crc32}
if _crc32c is not None:
    _ALGOS["crc32c"] = _crc32c.crc32c

#: the algorithm new files are written with: CRC-32C where its package is installed
ALGO = "crc32c" if _crc32c is not None else "crc32"


def checksum_fn(name: str) -> Callable:
    """The checksum function ``fn(data, prev)`` of the algorithm ``name``."""
    try:
        return _ALGOS[name]
    except KeyError:
        raise IntegrityError(f"checksum algorithm {name!r} is not available here (install "
                             "the crc32c package: pip install crc32c)") from None


def checksum(algo: str, data, prev: int = 0) -> int:
    """``algo``'s checksum of ``data`` (any contiguous buffer), continuing ``prev``."""
    return checksum_fn(algo)(data, prev)


_ZIP_CRC = Held(torch.serialization.get_crc32_options, torch.serialization.set_crc32_options,
                False)


def zip_crc_skipped() -> contextlib.AbstractContextManager[None]:
    """``torch.save`` writes its archives without the zip format's CRC-32 while inside.

    A checksummed writer's files already carry a CRC-32C of every byte, computed while
    they are written (:class:`Checksummed`); torch's own zip CRC-32 is a second pass in
    software over the same bytes, about a sixth of a save's CPU time. ``torch.load`` (and
    so ``dcp.load``) reads such archives as any other (``torch.serialization
    .set_crc32_options``); a zip tool's integrity test would call them damaged.

    The switch is torch's, process-wide: nested and concurrent users (an asynchronous save
    beside a blocking one) share it, and the setting found by the first is restored by
    the last. A ``torch.save`` of the user's own running meanwhile on another thread is
    written without the zip CRC too, and loads the same.
    """
    return _ZIP_CRC.held()


class _CrcStream:
    """Passes writes through, keeping the size and the block checksums (``algo``, or
    none) of everything written, and the first ``OSError`` a write raised."""

    def __init__(self, inner, algo: str | None) -> None:
        self._inner, self._algo, self.size = inner, algo, 0
        self._fn = _ALGOS[algo] if algo is not None else None
        self._sums: list[int] = []
        self._cur = self._fill = 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            n = self._inner.write(data)
        except OSError as e:
            self.error = self.error or e
            raise
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        n_bytes = len(view)
        self.size += n_bytes
        if self._fn is None:  # no algo: sizes only
            return n
        if self._fill + n_bytes < BLOCK_BYTES:  # most writes: within the block
            self._cur = self._fn(view, self._cur)
            self._fill += n_bytes
        else:
            fn, pos = self._fn, 0
            while pos < len(view):
                take = min(len(view) - pos, BLOCK_BYTES - self._fill)
                self._cur = fn(view[pos:pos + take], self._cur)
                self._fill += take
                pos += take
                if self._fill == BLOCK_BYTES:
                    self._sums.append(self._cur)
                    self._cur = self._fill = 0
        return n

    def record(self) -> FileRecord:
        if self._algo is None:
            return FileRecord(size=self.size)
        sums = self._sums + ([self._cur] if self._fill else [])
        return FileRecord(size=self.size, algo=self._algo, block=BLOCK_BYTES,
                          sums=b"".join(c.to_bytes(4, "big") for c in sums))

    def __getattr__(self, name):
        return getattr(self._inner, name)


class Checksummed:
    """Wraps a DCP writer's file system so every file's size and block checksums are
    computed while it is written, never by reading it back (``crc=False``: sizes only).

    A write's ``OSError`` (a full disk) surfaces as itself: torch.save's archive writer
    turns it into an opaque ``unexpected pos`` error, which is replaced by the original.

    Attributes:
        files: file name -> :class:`FileRecord` of every file written through it.
    """

    def __init__(self, inner, crc: bool = True) -> None:
        self._inner = inner
        self._algo = ALGO if crc else None
        self.files: dict[str, FileRecord] = {}

    def __getattr__(self, name):
        return getattr(self._inner, name)

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with self._inner.create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            crc = _CrcStream(stream, self._algo)
            try:
                yield crc
            except Exception as e:
                if crc.error is not None and crc.error is not e:
                    raise crc.error from e
                raise
        name, rec = os.path.basename(os.fspath(path)), crc.record()
        if rec.sums is not None and len(rec.sums) > 4 * INLINE_BLOCKS:
            rec = self._sidecar(os.fspath(path), name, rec)
        self.files[name] = rec

    def _sidecar(self, path: str, name: str, rec: FileRecord) -> FileRecord:
        """Write ``rec``'s sums beside the file (synced, as DCP syncs its files);
        returns the record naming it."""
        sums, side = rec.sums, name + SUMS_SUFFIX
        assert sums is not None and rec.algo is not None  # the caller's record has sums
        with self._inner.create_stream(path + SUMS_SUFFIX, "wb") as f:
            f.write(sums)
            f.flush()
            try:
                fd = f.fileno()  # a local file; an object store's is durable at close
            except (AttributeError, OSError, ValueError):
                fd = None
            if fd is not None:
                os.fsync(fd)
        self.files[side] = FileRecord(size=len(sums), algo=rec.algo, block=len(sums),
                                      sums=checksum(rec.algo, sums).to_bytes(4, "big"))
        return FileRecord(size=rec.size, algo=rec.algo, block=rec.block, sidecar=side)

    def rename(self, path, new_path) -> None:
        self._inner.rename(path, new_path)
        old = os.path.basename(os.fspath(path))
        if old in self.files:
            rec = self.files.pop(old)
            new = os.path.basename(os.fspath(new_path))
            if rec.sidecar is not None:  # its sums follow it
                self._inner.rename(os.fspath(path) + SUMS_SUFFIX,
                                   os.fspath(new_path) + SUMS_SUFFIX)
                self.files[new + SUMS_SUFFIX] = self.files.pop(rec.sidecar)
                rec = dataclasses.replace(rec, sidecar=new + SUMS_SUFFIX)
            self.files[new] = rec
