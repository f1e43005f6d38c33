"""DCP's storage readers and writers, as this package's storages use them.

* Writers put computed tensors (merged LoRA weights) into bounded files of their own
  and sum every file while writing it (:class:`OwnFiles`, options as arguments), for
  the local file system (:class:`LocalWriter`), fsspec, and any storage
  (:class:`.dcp_store.StoreWriter`).
* Ranged reads fetch exactly the bytes a load needs (:class:`RangedReads`): through
  fsspec's ``cat_ranges`` (:func:`remote_classes`) or any storage's ``read_spans``
  (:class:`.dcp_store.StoreReader`). Local files are read through memory maps
  (:class:`dcp_universal.storage.mapped.MappedReader`).

:mod:`dcp_universal.storage` picks among them; nothing else constructs them.
"""

from __future__ import annotations

import contextlib
import functools
import io
from typing import Any, Callable, Iterator

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future

from dcp_universal import _torch_compat
from dcp_universal.errors import IntegrityError
from dcp_universal.storage.checksums import Checksummed, zip_crc_skipped
from dcp_universal.storage.mapped import (Copies, byte_view, check_record, parse_record,
                                          take_read)
from dcp_universal.format.torch_formats import dcp_metadata, dcp_record, torch_save_layout

__all__ = ["OwnFiles", "LocalWriter", "RangedReads", "remote_classes", "COMPUTED_FILE_BYTES",
           "RANGED_BATCH_BYTES", "PROBE_BYTES", "PART_BYTES", "PART_MIN_SKIP"]

COMPUTED_FILE_BYTES = 32 << 20  # see OwnFiles


class OwnFiles:
    """Writer mixin: items named in ``own_file_keys`` go to files of their own, packed up
    to ``COMPUTED_FILE_BYTES`` per file (an item larger than that gets a file alone).

    DCP keeps every tensor of a file alive until the file is closed. Tensors that are
    views of the model cost nothing, but computed ones (merged LoRA weights) are new, so
    bounded files bound the extra memory to about one local shard or this budget,
    whichever is larger, while keeping the file (and fsync) count low.

    Every file's size and block checksums (``checksums=False``: sizes only) are
    computed while it is written (:class:`~dcp_universal.storage.checksums.Checksummed`
    around the writer's ``fs``): ``writer.fs.files`` is ``{file name: FileRecord}``.
    """

    own_file_keys: frozenset = frozenset()

    def __init__(self, *args, own_file_keys=frozenset(), checksums: bool = True,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._set_up(own_file_keys, checksums)

    def _set_up(self, own_file_keys, checksums: bool) -> None:
        """Take the options, once DCP's writer has its ``fs``: wrap it to sum every file."""
        self.own_file_keys = frozenset(own_file_keys)
        self.checksums = checksums
        _torch_compat.wrap_writer_fs(self, lambda fs: Checksummed(fs, crc=checksums))

    def write_data(self, plan, planner):
        own = [i for i in plan.items if i.index.fqn in self.own_file_keys]
        rest = [i for i in plan.items if i.index.fqn not in self.own_file_keys]
        buckets = [rest] if rest else []
        size = COMPUTED_FILE_BYTES
        for item in own:
            nbytes = _item_bytes(item)
            if not buckets or buckets[-1] is rest or size + nbytes > COMPUTED_FILE_BYTES:
                buckets.append([])
                size = 0
            buckets[-1].append(item)
            size += nbytes
        # our CRC-32C covers every byte: torch's zip CRC-32 would be a second pass
        with zip_crc_skipped() if self.checksums else contextlib.nullcontext():
            return _torch_compat.write_files(self, plan, planner, buckets)


def _item_bytes(item) -> int:
    n = 1
    for d in item.tensor_data.chunk.sizes:
        n *= d
    return n * item.tensor_data.properties.dtype.itemsize


class LocalWriter(OwnFiles, FileSystemWriter):
    pass


# Bytes fetched per batch of ranged reads: a remote read holds at most this much (or one
# record, if larger) before copying it into place.
RANGED_BATCH_BYTES = 64 << 20
# A record's head and tail fetched to find its layout, when a load needs part of it only.
PROBE_BYTES = 4 << 10
# Coalesced ranges are fetched in parts of at most this many bytes, concurrently.
PART_BYTES = 8 << 20
# A part of a record is fetched alone when that skips at least this many of its bytes;
# otherwise the record is fetched whole (no probe, no second round of requests).
PART_MIN_SKIP = 64 << 10


@functools.cache
def remote_classes():
    reader, writer = _torch_compat.fsspec_reader_writer()

    class _RemoteWriter(OwnFiles, writer):
        pass

    class _RangedReader(RangedReads, reader):
        """DCP's fsspec reader, fetching exactly the bytes a load needs, concurrently
        through fsspec's ``cat_ranges``."""

        def _fetch(self, ranges):
            return _fetch(_torch_compat.fsspec_of(self), ranges)

    return _RemoteWriter, _RangedReader


class RangedReads(FileSystemReader):
    """DCP's file-system reader (or, mixed in first, its ``FsspecReader``), fetching with
    ranged reads (batched; concurrent where :meth:`_fetch` is) exactly the bytes a load
    needs. A subclass says how to fetch ``(path, start, end)`` ranges (:meth:`_fetch`).

    A record needed whole is read whole; neighbouring ranges coalesce
    (:func:`_fetch_spans`). DCP's own reader reads through a buffered file whose
    read-ahead fetched 1.8-2.8x the model's bytes from S3 for one process's
    model-only load. A record a resharding load needs part of (a rank's new shard
    overlaps part of a saved one) costs a probe of its head and tail (the zip's
    local headers, ``data.pkl`` and central directory), fetched in a first round
    with the records needed whole (so probes and small records in between coalesce),
    then a read of the rows it needs; a record that is not a plain tensor is read
    whole.
    """

    trusted = False  # unpickle .metadata without the allow-list
    check = None  # BlockCheck of every byte read (widened to whole blocks), or None

    def _fetch(self, ranges: list[tuple[str, int, int]]) -> list:
        """The bytes of each ``(path, start, end)`` (``bytes`` or a buffer)."""
        raise NotImplementedError

    def read_metadata(self, *args, **kwargs) -> Metadata:
        return dcp_metadata(self, rank=kwargs.get("rank"), trusted=self.trusted,
                            check=self.check)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool,
                              *args, **kwargs) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self._tensors = metadata.state_dict_metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        whole: list = []
        parts: dict[tuple[str, int], list] = {}
        for req in plan.items:
            info = dcp_record(self.storage_data, req.storage_index)
            if self._skipped(req, info) >= PART_MIN_SKIP:
                parts.setdefault((info.file, info.offset), []).append(req)
            else:
                whole.append(req)
        # Round 1: the records needed whole, and the probes of the others, together:
        # in a file of records packed back to back, a probed record's tail, the small
        # records after it and the next one's head coalesce into one request.
        probes = {key: dcp_record(self.storage_data, reqs[0].storage_index)
                  for key, reqs in parts.items()}
        pieces: dict = {key: {} for key in probes}
        jobs: list = [(self._range(req, None), (req, None)) for req in whole]  # (req, layout)
        for key, info in probes.items():
            path, end = self._path(info), info.offset + info.length
            jobs += [((path, info.offset, info.offset + PROBE_BYTES), (_PROBE, (key, 0))),
                     ((path, end - PROBE_BYTES, end),
                      (_PROBE, (key, info.length - PROBE_BYTES)))]
        self._fetch_and_take(planner, jobs, pieces)
        # Round 2: the blocks of the probed records (whole records if not plain tensors)
        jobs = []
        for key, reqs in parts.items():
            layout = torch_save_layout(_Pieces(pieces[key]).read, 0, probes[key].length)
            jobs += [(self._range(req, layout), (req, layout)) for req in reqs]
        self._fetch_and_take(planner, jobs, pieces)
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _fetch_and_take(self, planner, jobs: list, pieces: dict) -> None:
        """Fetch every job's ``(path, start, end)`` (sorted by file and offset, so
        neighbours coalesce; in batches of ``RANGED_BATCH_BYTES``) and read it: a
        ``(req, layout)`` job into its destination, a ``(_PROBE, (key, position in
        the record))`` job into ``pieces[key]``."""
        jobs = sorted(jobs, key=lambda j: j[0])
        for batch in _batches(jobs, lambda j: j[0][2] - j[0][1]):
            spans = _fetch_spans(self._fetch, [r for r, _ in batch], self.check)
            for ((path, start, end), (what, how)), (buf, whole, at) in zip(batch, spans):
                if what is _PROBE:  # a small copy, not a view holding the span
                    key, pos = how
                    pieces[key][pos] = bytes(memoryview(buf)[at:at + end - start])
                else:
                    self._take(planner, what, how, buf, whole, at, end - start, path)

    def _path(self, info) -> str:
        return str(self.fs.concat_path(self.path, info.file))

    def _skipped(self, req, info) -> int:
        """Bytes of ``req``'s record it does not need (0: read it whole)."""
        tmd = self._tensors.get(req.storage_index.fqn)
        if (req.type != LoadItemType.TENSOR or info.transformed
                or not isinstance(tmd, TensorStorageMetadata)):
            return 0
        needed = tmd.properties.dtype.itemsize
        for n in req.lengths:
            needed *= int(n)
        return info.length - needed - 2 * PROBE_BYTES

    def _range(self, req, layout) -> tuple[str, int, int]:
        info = dcp_record(self.storage_data, req.storage_index)
        if layout is None:
            return self._path(info), info.offset, info.offset + info.length
        start, n = layout.span(req.storage_offsets, req.lengths)
        return self._path(info), info.offset + start, info.offset + start + n

    def _take(self, planner, req, layout, buf, whole: torch.Tensor, at: int, n: int,
              path: str) -> None:
        """Read ``req`` from the ``n`` bytes at ``at`` of a fetched span (``buf``,
        and ``whole`` viewing it as ``uint8``): its whole record, or (``layout``)
        the block alone."""
        if req.type == LoadItemType.BYTE_IO:
            info = dcp_record(self.storage_data, req.storage_index)
            check_record(buf, info, at, path, req.storage_index.fqn)
            planner.load_bytes(req, io.BytesIO(buf[at:at + n]))
            return
        if layout is not None:
            record = layout.block(whole[at:at + n], req.lengths)
            take_read(planner, req, record, Copies(), offsets=(0,) * len(req.lengths))
            return
        info = dcp_record(self.storage_data, req.storage_index)
        record = parse_record(buf, whole, info, at, path, req.storage_index.fqn,
                              functools.partial(_torch_compat.untransformed, self, req,
                                                info.info))
        take_read(planner, req, record, Copies())  # remote: copied at once, never waits


_PROBE = object()  # marks a probe among the reader's fetch jobs


class _Pieces:
    """Fetched byte ranges of a record: ``read(pos, n)`` answers from the one holding
    ``[pos, pos + n)``, or raises ``IndexError``."""

    def __init__(self, pieces: dict[int, bytes | memoryview]) -> None:
        self.pieces = pieces

    def read(self, pos: int, n: int) -> bytes | memoryview:
        for start, data in self.pieces.items():
            if start <= pos and pos + n <= start + len(data):
                return data[pos - start:pos - start + n]
        raise IndexError(f"bytes {pos}..{pos + n} were not fetched")


def _fetch_spans(fetch: Callable[[list], list], ranges: list[tuple[str, int, int]],
                 check=None) -> list[tuple]:
    """The bytes of each ``(path, start, end)`` (fetched by ``fetch``), as ``(buf, whole, at)``: they lie at
    ``at`` in ``buf``, a fetched span, which ``whole`` views as ``uint8`` (its storage
    starts at the span's first byte, so a tensor's storage offset in it tells its
    alignment).

    Ranges of a file that touch or overlap are coalesced into one span, and each span is
    fetched in parts of at most ``PART_BYTES``, all concurrently. So a file read whole
    costs a request per part, not per record, and a large record is fetched by several
    requests at once. With ``check`` (the directory's block check) every range is
    widened to whole checksum blocks and every fetched span checked before use.

    Raises:
        IntegrityError: an object holds fewer bytes than a range asks for.
    """
    spans: list[list] = []  # [path, start, end, [indices of ranges]]
    wide = [(p, *check.span(_name(p), s, e)) if check is not None else (p, s, e)
            for p, s, e in ranges]
    for i in sorted(range(len(ranges)), key=lambda i: wide[i]):
        path, start, end = wide[i]
        if spans and spans[-1][0] == path and start <= spans[-1][2]:
            spans[-1][2] = max(spans[-1][2], end)
            spans[-1][3].append(i)
        else:
            spans.append([path, start, end, [i]])
    parts = [(path, a, min(a + PART_BYTES, end))
             for path, start, end, _ in spans for a in range(start, end, PART_BYTES)]
    fetched = iter(fetch(parts))
    out: list = [None] * len(ranges)
    for path, start, end, members in spans:
        pieces = [next(fetched) for _ in range(start, end, PART_BYTES)]
        data = b"".join(pieces) if len(pieces) != 1 else pieces[0]
        if len(data) != end - start:
            raise IntegrityError(
                f"{path}: bytes {start}..{end} were asked for, {len(data)} came back: the "
                "object is shorter than the checkpoint's metadata says (truncated) -> "
                "restore it, or load another checkpoint")
        if check is not None:
            check.check(_name(path), data, start, start, end, remember=False)
        whole = byte_view(data)
        for i in members:
            out[i] = (data, whole, ranges[i][1] - start)
    return out


def _name(path: str) -> str:
    """A DCP file's name (its directory's files are flat)."""
    return path.rsplit("/", 1)[-1]


def _fetch(fs, ranges: list[tuple[str, int, int]]) -> list[bytes]:
    """The bytes of each ``(path, start, end)``, fetched concurrently."""
    if not ranges:
        return []
    datas = fs.cat_ranges([p for p, _, _ in ranges], [s for _, s, _ in ranges],
                          [e for _, _, e in ranges])
    for data in datas:
        if isinstance(data, Exception):
            raise data
    return datas


def _batches(items: list, size: Callable[[Any], int]) -> Iterator[list]:
    """``items`` in runs of at most ``RANGED_BATCH_BYTES`` (an item larger alone)."""
    batch: list = []
    total = 0
    for item in items:
        if batch and total + size(item) > RANGED_BATCH_BYTES:
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += size(item)
    if batch:
        yield batch
