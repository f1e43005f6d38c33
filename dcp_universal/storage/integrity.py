"""Integrity: every file's size and checksums, computed while it is written and checked
against the manifest's records when it is read.

A file's checksums are CRC-32C (hardware-accelerated through the ``crc32c`` package) of
each :data:`BLOCK_BYTES` block, so a load checks exactly the blocks holding the bytes it
reads (a resharding rank reads part of a file; an S3 read fetches ranges): every
default load verifies every byte it reads (:class:`BlockCheck`), at about 16 GB/s per
core. A small file's sums are in its manifest record; a large file's (more than
:data:`INLINE_BLOCKS`) in a file of their own beside it, ``<name>.sums``, which its
record names and which has a record (and a checksum) of its own: a manifest stays small
(a 10 GB shard has 80,000 blocks), and a rank reads the sums of the files it reads.
``verify=True`` also reads and checks every file whole (``CheckpointManager.verify``,
``dcp-universal verify``); steps written before block checksums carry a CRC-32 of each
whole file, checked only so. Sizes cost one listing and are checked on every load.
"""

from __future__ import annotations

import functools
import zlib
from typing import Callable, Mapping

from dcp_universal.errors import CheckpointError, IntegrityError, NotACheckpointError
from dcp_universal.format.manifest import FileRecord
from dcp_universal.storage import Storage, join
from dcp_universal.storage.checksums import (ALGO, BLOCK_BYTES, INLINE_BLOCKS, SUMS_SUFFIX,
                                             Checksummed, checksum, checksum_fn)

__all__ = ["Checksummed", "BlockCheck", "crc32_of", "check_files", "block_checks", "unchecked",
           "BLOCK_BYTES", "INLINE_BLOCKS", "SUMS_SUFFIX", "ALGO", "checksum"]


class BlockCheck:
    """Checks the bytes a load reads from one DCP directory against its file records,
    block by block, before anything is parsed or copied.

    Args:
        path: the directory (for messages).
        records: file name (relative to ``path``) -> :class:`FileRecord`. A file not
            listed is refused.
        read: ``read(name)`` -> the bytes of the file ``name`` of the directory (a
            large file's sums, read once, when a read of that file first needs them).
        require: a file listed without block checksums is refused; without
            ``require`` (a step of a format before them) it is not checked.
    """

    def __init__(self, path: str, records: Mapping[str, FileRecord],
                 read: Callable[[str], bytes] | None = None, *, require: bool = False) -> None:
        self.path = path
        self.records = dict(records)
        self._read = read
        self._require = require
        self._sums: dict[str, bytes] = {}
        self._done: dict[str, set[int]] = {}

    def record(self, name: str) -> FileRecord | None:
        rec = self.records.get(name)
        if rec is None and not self.records:
            raise unchecked(self.path, "records no files, so no checksums")
        if rec is None:
            raise IntegrityError(
                f"{join(self.path, name)} is not among the files the manifest lists for "
                f"{self.path}: it was added after the save -> load an earlier step, or "
                "remove the file")
        if not rec.has_blocks and self._require:
            raise unchecked(join(self.path, name), "has no block checksums recorded")
        return rec if rec.has_blocks else None

    def sums(self, name: str, rec: FileRecord) -> bytes:
        """The block sums of ``name``: its record's, or (checked) its sums file's."""
        if rec.sidecar is None:
            assert rec.sums is not None  # has_blocks: sums or a sidecar
            return rec.sums
        if name not in self._sums:
            if self._read is None:
                raise IntegrityError(f"{join(self.path, name)}: its checksums are in "
                                     f"{rec.sidecar}, which this reader cannot read")
            try:
                data = self._read(rec.sidecar)
            except FileNotFoundError as e:
                if isinstance(e, CheckpointError):
                    raise
                raise IntegrityError(
                    f"{join(self.path, rec.sidecar)} is missing: the checksums of {name} "
                    "are in it -> load an earlier step (verify=False skips the check)") from e
            self.check(rec.sidecar, data, 0, 0, len(data), remember=False)
            if len(data) != 4 * rec.n_blocks:
                raise IntegrityError(f"{join(self.path, rec.sidecar)} holds {len(data) // 4} "
                                     f"sums, {name} has {rec.n_blocks} blocks")
            self._sums[name] = data
        return self._sums[name]

    def span(self, name: str, start: int, end: int) -> tuple[int, int]:
        """``[start, end)`` of ``name`` widened to whole checksum blocks (as is when the
        file has none)."""
        rec = self.record(name)
        if rec is None or end <= start:
            return start, end
        assert rec.block is not None  # has_blocks: FileRecord.from_json requires a block
        return start - start % rec.block, min(rec.size, -(-end // rec.block) * rec.block)

    def unchecked(self, name: str, start: int, end: int) -> list[tuple[int, int]]:
        """``[start, end)`` of ``name`` widened to whole blocks (:meth:`span`), less the
        blocks checked already, as ranges (the whole widened range for a file without
        block checksums)."""
        a, b = self.span(name, start, end)
        rec = self.record(name)
        done = self._done.get(name)
        if rec is None or not done or b <= a:
            return [(a, b)] if b > a else []
        assert rec.block is not None  # has_blocks
        out: list[tuple[int, int]] = []
        for i in range(a // rec.block, (b - 1) // rec.block + 1):
            if i in done:
                continue
            lo, hi = i * rec.block, min(b, (i + 1) * rec.block)
            if out and out[-1][1] == lo:
                out[-1] = (out[-1][0], hi)
            else:
                out.append((lo, hi))
        return out

    def check(self, name: str, buf, at: int, start: int, end: int, *,
              remember: bool = True) -> None:
        """Check the blocks of ``name`` holding ``[start, end)``; ``buf`` holds the
        file's bytes from offset ``at`` (whole blocks around the range: :meth:`span`).
        ``remember``: a block checked once (of a memory map, which cannot change under
        the load) is not checked again.

        Raises:
            IntegrityError: naming the file and the bad block.
        """
        rec = self.record(name)
        if rec is None or end <= start:
            return
        assert rec.block is not None and rec.algo is not None  # has_blocks: both are set
        sums = self.sums(name, rec)
        done = self._done.setdefault(name, set())
        view = memoryview(buf)
        fn = checksum_fn(rec.algo)
        for i in range(start // rec.block, (end - 1) // rec.block + 1):
            if i in done:
                continue
            a, b = i * rec.block, min(rec.size, (i + 1) * rec.block)
            if a < at or b - at > len(view):
                raise IntegrityError(
                    f"{join(self.path, name)}: bytes {a}..{b} are needed to check block {i}, "
                    f"{len(view)} bytes from {at} were read: the file is shorter than its "
                    "record says (truncated) -> restore it, or load another checkpoint")
            got, want = fn(view[a - at:b - at], 0), int.from_bytes(sums[4 * i:4 * i + 4], "big")
            if got != want:
                raise IntegrityError(
                    f"{join(self.path, name)} fails its checksum at bytes {a}..{b} (block {i}, "
                    f"{rec.algo} {got:08x}, recorded {want:08x}): its bytes changed after the "
                    "save -> load an earlier step (CheckpointManager.steps()); verify=False "
                    "skips this check")
            if remember:
                done.add(i)


def unchecked(path: str, what: str) -> IntegrityError:
    """The error for files a checked load cannot check: their checksums are not recorded
    (removed from the records, or a save killed before it recorded them)."""
    return IntegrityError(
        f"{path} {what}: nothing can check what a load reads from it, and its format "
        "records them for every file (they were removed, or the save that wrote it did not "
        "finish) -> load an earlier step, or load it with verify=False if you trust its "
        "files")


def vanished(doing: str, path: str, e: FileNotFoundError) -> NotACheckpointError:
    """The error for a file that was there when the load found it and is gone when it is
    read (retention or another job removed the step meanwhile)."""
    return NotACheckpointError(
        f"{doing} {path} failed: {e.filename or e} does not exist (removed while it was "
        "read? retention or another job's prune deletes old steps) -> check the path, or "
        "load a step that is still committed")


def crc32_of(store: Storage, path: str, chunk: int = 16 << 20) -> int:
    """CRC-32 of the whole file ``path``, read in chunks (steps written before block
    checksums)."""
    crc = 0
    for block in _blocks(store, path, chunk):
        crc = zlib.crc32(block, crc)
    return crc


def _blocks(store: Storage, path: str, size: int):
    """The file ``path`` in reads of ``size`` bytes.

    Raises:
        NotACheckpointError: the file vanished while it was read (a prune or another
            job removed the step meanwhile; an object store says so only at a read).
    """
    try:
        with store.open_read(path) as f:
            while block := f.read(size):
                yield block
    except FileNotFoundError as e:
        if isinstance(e, CheckpointError):
            raise
        raise vanished("checking", path, e) from e


def _check_whole(store: Storage, path: str, full: str, rel: str, rec: FileRecord,
                 files: Mapping[str, FileRecord]) -> None:
    if rec.has_blocks:
        assert rec.block is not None  # has_blocks: FileRecord.from_json requires a block
        # the file's own directory: a sums file is named relative to the file beside it
        folder, _, name = rel.rpartition("/")
        directory = join(path, folder) if folder else path
        check = block_checks(store, files, {f"{folder}/" if folder else "": directory})[directory]
        pos = 0
        for block in _blocks(store, full, rec.block):
            check.check(name, block, pos, pos, pos + len(block), remember=False)
            pos += len(block)
        return
    if rec.crc32 is not None:
        crc = crc32_of(store, full)
        if crc != rec.crc32:
            raise IntegrityError(
                f"{full} fails its checksum (crc32 {crc:08x}, manifest {rec.crc32:08x}): "
                "its bytes changed after the save; load an earlier step")


def check_files(store: Storage, path: str, files: Mapping[str, FileRecord], *,
                checksums: bool | None = False, prefixes: tuple[str, ...] = ("",),
                progress: Callable[[int], None] | None = None) -> None:
    """Compare the files under ``path`` whose names start with one of ``prefixes`` with
    their records: sizes always (one listing), every checksum when ``checksums`` (a
    full read of each file). ``progress`` is called with each checked file's size.

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
        if checksums:
            _check_whole(store, path, full, rel, rec, files)
        if progress is not None:
            progress(rec.size)


def block_checks(store: Storage, records: Mapping[str, FileRecord],
                 dirs: Mapping[str, str], *, require: bool = True) -> dict:
    """``{directory path: BlockCheck}`` for each ``dirs`` entry ``{item prefix: path}``
    (``"model/"`` -> the step's model directory), from records named relative to the
    step (``records``); sums files are read through ``store``. ``require``: every file
    read must have block checksums (:class:`BlockCheck`); model directories have
    recorded them since they record files at all."""
    out = {}
    for prefix, path in dirs.items():
        out[path] = BlockCheck(
            path, {rel[len(prefix):]: rec for rel, rec in records.items()
                   if rel.startswith(prefix)},
            functools.partial(_read_in, store, path), require=require)
    return out


def _read_in(store: Storage, path: str, name: str) -> bytes:
    return store.read_bytes(join(path, name))
