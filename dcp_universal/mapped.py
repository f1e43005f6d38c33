"""Local checkpoint files read through memory maps, with copies that wait for a commit.

A load has two phases here. *Prepare*: every file is mapped, every tensor's bytes are
located and checked, and every destination is resolved; nothing in the model changes,
and any failure raises. *Commit*: one copy per tensor, from the page cache straight into
the model (what ``safetensors`` does). So the default load is safe (validated before
the first byte lands) without staging buffers or a second copy, which is what
made a staged load cost several times a plain one.

What a mapped read cannot turn into an exception: an I/O error of the disk, or a file
truncated by someone else between the two phases, faults the process (``SIGBUS``) while
it copies. The process dies; it never goes on with a half-loaded model. Remote files
(fsspec URLs) are never mapped: they are read into staging buffers as before.

DCP's file format stores each tensor as one ``torch.save`` record (a zip archive with
``data.pkl`` and the raw storage bytes, uncompressed). :func:`torch_save_tensor` finds
the storage bytes and the tensor's layout (dtype, size, stride, storage offset) by
reading the zip's local headers and unpickling ``data.pkl`` with a loader that knows
only tensors; anything else (compression, another pickle, a transform) returns ``None``
and the caller reads the record with ``torch.load``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import math
import mmap
import os
import pickle
import struct
import warnings
from typing import Collection

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (Metadata, MetadataIndex, StorageMeta,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future

from dcp_universal import _torch_compat
from dcp_universal.errors import CheckpointError, IntegrityError

__all__ = ["Copies", "Layout", "MappedFiles", "byte_view", "MappedReader", "Stored", "pair", "parse_record",
           "read_whole", "take_read", "torch_save_layout", "torch_save_tensor"]


class Copies:
    """Copies into live tensors held back until :meth:`run` (the load's commit).

    ``keys``: the state-dict keys (as the reader sees them) whose destination is a live
    tensor, so their copy waits; other keys (staging buffers) are copied at once.
    ``pending`` may be shared by several ``Copies`` (one per directory read).
    """

    def __init__(self, keys: Collection[str] = (), pending: list | None = None) -> None:
        self.keys = frozenset(keys)
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = [] if pending is None else pending

    def take(self, key: str, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy ``src`` into ``dst`` now, or at :meth:`run` when ``key`` waits."""
        if key in self.keys:
            self.pending.append((dst, src))
        else:
            with torch.no_grad():
                dst.copy_(src)

    @torch.no_grad()
    def run(self) -> None:
        pending, self.pending[:] = list(self.pending), []
        for dst, src in pending:
            dst.copy_(src)


def byte_view(buf) -> torch.Tensor:
    """``buf`` (a map or fetched bytes, read-only) as a ``uint8`` tensor sharing its
    memory; an empty ``buf`` gives an empty tensor."""
    if not len(buf):
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():  # read-only buffer: nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buf, dtype=torch.uint8)


class MappedFiles:
    """Read-only maps of local files, one per path, each as a ``uint8`` tensor.

    A map stays alive while any tensor viewing it does (so waiting copies keep their
    source); it is unmapped when the last view goes.
    """

    def __init__(self) -> None:
        self._maps: dict[str, tuple[mmap.mmap, torch.Tensor]] = {}

    def get(self, path: str) -> tuple[mmap.mmap, torch.Tensor]:
        if path not in self._maps:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            self._maps[path] = (mm, byte_view(mm))
        return self._maps[path]


@dataclasses.dataclass(frozen=True)
class Stored:
    """One tensor whose storage bytes lie in a mapped file.

    Attributes:
        raw: the storage's bytes (``uint8``, a view of the map).
        dtype, size, stride: the tensor's layout over that storage.
        offset: storage offset, in elements.
    """

    raw: torch.Tensor
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int = 0

    @classmethod
    def contiguous(cls, raw: torch.Tensor, dtype: torch.dtype, size) -> "Stored":
        size = tuple(int(n) for n in size)
        return cls(raw, dtype, size, _row_major(size))

    def source_for(self, dst: torch.Tensor, offsets, lengths) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dst', src)``: ``dst'.copy_(src)`` fills ``dst`` with the block at ``offsets``
        of ``lengths``. A block that is one byte range of the file, of ``dst``'s dtype, is
        copied as bytes; otherwise as typed elements (from the map where it is aligned
        for the dtype, else from an aligned copy of this tensor's bytes)."""
        offsets = [int(o) for o in offsets]
        lengths = [int(n) for n in lengths]
        if list(dst.shape) != lengths:  # checked now: a failing copy at the commit is too late
            raise CheckpointError(f"a block of shape {lengths} does not fit its destination "
                                  f"of shape {list(dst.shape)}: the checkpoint's metadata is "
                                  "damaged -> load another checkpoint")
        span = self._byte_span(offsets, lengths)
        if span is not None and dst.dtype == self.dtype and dst.is_contiguous():
            start, n = span
            return dst.reshape(-1).view(torch.uint8), self.raw[start:start + n]
        return dst, self._typed()[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))]

    def _byte_span(self, offsets, lengths) -> tuple[int, int] | None:
        """The block's ``(start, nbytes)`` in ``raw`` when it is one contiguous range: the
        layout is row-major, and every dim before the last one cut short has length 1."""
        if math.prod(lengths) == 0:
            return 0, 0
        if any(n > 1 and st != want
               for n, st, want in zip(self.size, self.stride, _row_major(self.size))):
            return None
        cut = [i for i, (n, full) in enumerate(zip(lengths, self.size)) if n != full]
        if cut and any(n != 1 for n in lengths[:cut[-1]]):
            return None
        first = self.offset + sum(o * st for o, st in zip(offsets, self.stride))
        return first * self.dtype.itemsize, math.prod(lengths) * self.dtype.itemsize

    def _typed(self) -> torch.Tensor:
        item = self.dtype.itemsize
        if self.raw.storage_offset() % item == 0 and self.raw.numel() % item == 0:
            flat = self.raw.view(self.dtype)
        else:  # not aligned for the dtype: an aligned copy of this tensor's bytes
            flat = self.raw.clone().view(self.dtype)
        return flat.as_strided(self.size, self.stride, flat.storage_offset() + self.offset)


def _row_major(size: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(size):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


_U16, _U32 = 0xFFFF, 0xFFFFFFFF


_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # a central directory entry's fixed part
_END = struct.Struct("<IHHHHIIH")
_WANTED = (b"data.pkl", b"byteorder")


def _zip_records(read, start: int, end: int) -> dict[str, tuple[int, int]] | None:
    """``{record name: (data start, size)}`` of ``data.pkl``, ``byteorder`` and the
    ``data/*`` records of the zip archive at ``[start, end)``, from its central
    directory (``torch.save`` streams its records, so their local headers carry no
    sizes); ``None`` unless it is a plain archive of uncompressed records.

    ``read(pos, n)``: the ``n`` bytes at ``pos`` (it raises ``IndexError`` for bytes it
    does not have; a short answer fails to unpack)."""
    eocd = end - 22
    if eocd < start:
        return None
    sig, _, _, _, count, _, cd, _ = _END.unpack(read(eocd, 22))
    if sig != 0x06054B50:
        return None  # torch.save writes no archive comment: the end record is last
    if count == _U16 or cd == _U32:  # zip64: the zip64 end record holds them
        if eocd - 20 < start:
            return None
        sig64, _, z64, _ = struct.unpack("<IIQI", read(eocd - 20, 20))
        if sig64 != 0x07064B50 or start + z64 + 56 > end:
            return None
        z64 += start
        if struct.unpack("<I", read(z64, 4))[0] != 0x06064B50:
            return None
        count, _, cd = struct.unpack("<QQQ", read(z64 + 32, 24))
    if start + cd > eocd:
        return None
    central = bytes(read(start + cd, eocd - start - cd))  # a few hundred bytes
    records, pos = {}, 0
    for _ in range(count):
        if pos + 46 > len(central):
            return None
        (sig, _, _, _, method, _, _, _, csize, usize, nlen, xlen, clen, _, _, _,
         local) = _CENTRAL.unpack_from(central, pos)
        sub = central[pos + 46:pos + 46 + nlen].partition(b"/")[2]
        if sig != 0x02014B50:
            return None
        if sub in _WANTED or sub.startswith(b"data/"):
            if _U32 in (csize, usize, local):
                big = _zip64_extra(central, pos + 46 + nlen, xlen, usize, csize, local)
                if big is None:
                    return None
                usize, csize, local = big
            head = start + local
            if method != 0 or csize != usize or head + 30 > end:
                return None
            data = head + 30 + sum(struct.unpack("<HH", read(head + 26, 4)))
            if data + csize > end:
                return None
            records[sub.decode("utf-8", "replace")] = (data, csize)
        pos += 46 + nlen + xlen + clen
    return records


def _zip64_extra(mm, pos: int, length: int, *fields: int) -> tuple[int, ...] | None:
    """The zip64 extra field's values for the central entry ``fields`` that are
    0xFFFFFFFF (they appear in this order: uncompressed size, compressed size, offset)."""
    end = pos + length
    while pos + 4 <= end:
        tag, size = struct.unpack_from("<HH", mm, pos)
        if tag == 0x0001:
            want = sum(f == _U32 for f in fields)
            if size < 8 * want:
                return None
            big = iter(struct.unpack_from(f"<{want}Q", mm, pos + 4))
            return tuple(next(big) if f == _U32 else f for f in fields)
        pos += 4 + size
    return None


class _NotATensor(Exception):
    pass


def _rebuild(storage, storage_offset, size, stride, *args):
    return storage, int(storage_offset), tuple(size), tuple(stride)


class _LayoutUnpickler(pickle.Unpickler):
    """Unpickles a ``torch.save``'d plain tensor into its layout, touching no data; any
    other object raises ``_NotATensor``."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return name
        raise _NotATensor(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _NotATensor(repr(pid))
        return pid[1], str(pid[2]), int(pid[4])


@functools.lru_cache(maxsize=1024)  # the layers of a model repeat the same few pickles
def _layout(pickled: bytes):
    try:
        (type_name, key, numel), offset, size, stride = _LayoutUnpickler(io.BytesIO(pickled)).load()
        return (type_name, key, numel), offset, size, stride
    except (_NotATensor, pickle.UnpicklingError, ValueError, TypeError, EOFError):
        return None


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a ``torch.save``'d tensor's storage bytes lie, and its layout over them.

    Attributes:
        data, nbytes: the storage bytes' position (in the buffer the record was found
            in) and length.
        dtype, size, stride, offset: as in :class:`Stored`.
    """

    data: int
    nbytes: int
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    def stored(self, whole: torch.Tensor) -> Stored:
        """The tensor, viewing ``whole`` (``uint8``, the buffer's bytes)."""
        return Stored(whole[self.data:self.data + self.nbytes], self.dtype, self.size,
                      self.stride, self.offset)

    def span(self, offsets, lengths) -> tuple[int, int]:
        """``(start, nbytes)``: the smallest byte range of the buffer holding the block at
        ``offsets`` of ``lengths`` (exactly the block when it is contiguous); read it and
        :meth:`block` views the block."""
        offsets = [int(o) for o in offsets]
        lengths = [int(n) for n in lengths]
        if len(lengths) == len(self.size) and math.prod(lengths) == 0:
            return self.data, 0
        if len(offsets) != len(self.size) or any(
                o < 0 or o + n > full for o, n, full in zip(offsets, lengths, self.size)):
            raise CheckpointError(f"a block at {offsets} of {lengths} lies outside its saved "
                                  f"chunk of shape {list(self.size)}: the checkpoint's "
                                  "metadata is damaged -> load another checkpoint")
        first = self.offset + sum(o * st for o, st in zip(offsets, self.stride))
        last = first + sum((n - 1) * st for n, st in zip(lengths, self.stride))
        item = self.dtype.itemsize
        return self.data + first * item, (last - first + 1) * item

    def block(self, raw: torch.Tensor, lengths) -> Stored:
        """The block of ``lengths`` whose :meth:`span` is ``raw``; read it at offsets 0."""
        return Stored(raw, self.dtype, tuple(int(n) for n in lengths), self.stride)


def torch_save_layout(read, start: int, length: int) -> Layout | None:
    """The :class:`Layout` of the tensor ``torch.save`` wrote at ``[start, start +
    length)``, through ``read(pos, n)`` (see :func:`_zip_records`); ``None`` when the
    record is anything else (read it with ``torch.load``), or when ``read`` lacks a byte
    it needs."""
    try:
        records = _zip_records(read, start, start + length)
        if not records or "data.pkl" not in records:
            return None
        if "byteorder" in records:
            b0, bn = records["byteorder"]
            if read(b0, bn) != b"little" or struct.pack("=H", 1) != struct.pack("<H", 1):
                return None
        p0, pn = records["data.pkl"]
        layout = _layout(bytes(read(p0, pn)))
    except (IndexError, struct.error):
        return None
    if layout is None:
        return None
    (type_name, key, numel), offset, size, stride = layout
    dtype = _torch_compat.pickled_storage_dtype(type_name)
    if dtype is None or f"data/{key}" not in records:
        return None
    d0, dn = records[f"data/{key}"]
    if dn != numel * dtype.itemsize or len(size) != len(stride):
        return None
    if math.prod(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= numel:
        return None
    return Layout(d0, dn, dtype, size, stride, offset)


def torch_save_tensor(mm, whole: torch.Tensor, start: int, length: int) -> Stored | None:
    """The tensor ``torch.save`` wrote at ``mm[start:start + length]``, as a view of the
    map; ``None`` when the record is anything else (read it with ``torch.load``)."""
    layout = torch_save_layout(lambda pos, n: mm[pos:pos + n], start, length)
    return None if layout is None else layout.stored(whole)


def _record(files: MappedFiles, path: str, info, key: str, untransform=None):
    """The record ``info`` (a DCP ``_StorageInfo``) of the mapped file ``path``: see
    :func:`parse_record`."""
    mm, whole = files.get(path)
    end = info.offset + info.length
    if end > whole.numel():
        raise IntegrityError(
            f"{path} holds {whole.numel()} bytes, but the checkpoint's metadata places "
            f"{key!r} at bytes {info.offset}..{end}: the file is truncated -> restore it, "
            "or load another checkpoint")
    return parse_record(mm, whole, info, info.offset, path, key, untransform)


def parse_record(buf, whole: torch.Tensor, info, start: int, path: str, key: str,
                 untransform=None):
    """The record ``info`` (a DCP ``_StorageInfo``), found at ``buf[start:]`` (a map or
    the bytes fetched for it; ``whole`` views the same bytes as ``uint8``): a
    :class:`Stored` view of them, or (anything but a plain ``torch.save``'d tensor) the
    object ``torch.load`` makes of it, after ``untransform`` (DCP's load transforms)
    when the record has any."""
    end = start + info.length
    if not info.transform_descriptors:
        stored = torch_save_tensor(buf, whole, start, info.length)
        if stored is not None:
            return stored
    try:
        stream = io.BytesIO(buf[start:end])
        if info.transform_descriptors:
            stream = io.BytesIO(untransform(stream).read())
        return torch.load(stream, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever torch.load makes of damaged bytes
        raise IntegrityError(
            f"{path}: the record of {key!r} at bytes {info.offset}..{info.offset + info.length} "
            f"cannot be read ({type(e).__name__}: {e}): the file is damaged -> check it "
            "with `dcp-universal verify`, restore it, or load another checkpoint") from e


def pair(record, dst: torch.Tensor, offsets, lengths) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dst', src)`` whose copy fills ``dst`` with ``record``'s block at ``offsets``
    (``record`` from :func:`parse_record`)."""
    if isinstance(record, Stored):
        return record.source_for(dst, offsets, lengths)
    return dst, record[tuple(slice(int(o), int(o) + int(n)) for o, n in zip(offsets, lengths))]


def take_read(planner: LoadPlanner, req, record, copies: Copies, offsets=None) -> None:
    """DCP's per-item read, from a located ``record`` (:func:`parse_record`): the
    destination block resolved and checked, its copy made now or left waiting in
    ``copies``. A planner whose ``commit_tensor`` does something gets the data at once.
    ``offsets``: the block's in ``record`` when that is not the saved chunk (the
    request's ``storage_offsets``)."""
    dst = planner.resolve_tensor(req).detach()
    if list(dst.shape) != [int(n) for n in req.lengths]:
        raise CheckpointError(f"{req.storage_index.fqn!r}: the destination has shape "
                              f"{list(dst.shape)}, the read {list(req.lengths)}")
    if type(planner).commit_tensor is not DefaultLoadPlanner.commit_tensor:
        copies = Copies()
    at = req.storage_offsets if offsets is None else offsets
    copies.take(req.dest_index.fqn, *pair(record, dst, at, req.lengths))
    planner.commit_tensor(req, dst)


def read_whole(path: str, state: dict[str, torch.Tensor], copies: Copies,
               metadata: Metadata | None = None) -> bool:
    """What ``dcp.load(state, no_dist=True)`` does, for one process reading whole plain
    tensors from the local DCP directory ``path``, without DCP's general planning.

    Each saved chunk (one per rank that wrote the tensor) is one copy into its block of
    the destination, through ``copies``. The chunks must cover every destination
    exactly, or :class:`CheckpointError`. Returns ``False``, having read nothing, for a
    checkpoint this does not handle (records written through DCP's load transforms):
    the caller then uses ``dcp.load``.
    """
    md = metadata if metadata is not None else FileSystemReader(path).read_metadata()
    if any(info.transform_descriptors for info in md.storage_data.values()):
        return False
    files, paths = MappedFiles(), {}
    for key, dst in state.items():
        tmd = md.state_dict_metadata.get(key)
        if not isinstance(tmd, TensorStorageMetadata) or tuple(tmd.size) != tuple(dst.shape):
            found = tuple(tmd.size) if isinstance(tmd, TensorStorageMetadata) else tmd
            raise CheckpointError(f"{path}: {key!r} is {found} in the checkpoint; the load "
                                  f"wants a tensor of shape {tuple(dst.shape)}")
        covered = 0
        for i, chunk in enumerate(tmd.chunks):
            info = md.storage_data[MetadataIndex(key, chunk.offsets, i)]
            if info.relative_path not in paths:
                paths[info.relative_path] = os.path.join(path, info.relative_path)
            record = _record(files, paths[info.relative_path], info, key)
            whole_chunk = tuple(chunk.sizes) == tuple(dst.shape) and not any(chunk.offsets)
            block = dst if whole_chunk else dst[
                tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes))]
            copies.take(key, *pair(record, block, (0,) * len(chunk.sizes), chunk.sizes))
            covered += math.prod(chunk.sizes)
        if covered != dst.numel():
            raise CheckpointError(
                f"{path}: the saved chunks of {key!r} cover {covered} of its {dst.numel()} "
                "elements: the checkpoint's metadata is damaged -> load another checkpoint")
    return True


class MappedReader(FileSystemReader):
    """DCP's file-system reader, reading through :class:`MappedFiles`.

    Each tensor item costs one copy from the page cache into its destination (DCP's
    reader reads the record into a new tensor, then copies it). Items whose key is in
    ``copies.keys`` are not copied at all during ``read_data``: the copy waits in
    ``copies`` for the load's commit, so the whole read is validated first.
    """

    def __init__(self, path: str, copies: Copies | None = None,
                 metadata: Metadata | None = None) -> None:
        super().__init__(path)
        self.copies = copies if copies is not None else Copies()
        self._dir = path
        self._metadata = metadata  # read already while planning: not parsed again

    def read_whole(self, state: dict[str, torch.Tensor]) -> bool:
        """:func:`read_whole` of this directory (one process, whole plain tensors)."""
        return read_whole(self._dir, state, self.copies, self._metadata)

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._metadata is None or kwargs.get("rank") is not None:
            return super().read_metadata(*args, **kwargs)
        md = self._metadata  # as the parent's: tagged with this load's id
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        files, paths = MappedFiles(), {}
        for req in plan.items:
            info = self.storage_data[req.storage_index]
            if info.relative_path not in paths:
                paths[info.relative_path] = str(self.fs.concat_path(self.path, info.relative_path))
            if req.type == LoadItemType.BYTE_IO:
                mm, _ = files.get(paths[info.relative_path])
                planner.load_bytes(req, io.BytesIO(mm[info.offset:info.offset + info.length]))
                continue
            record = _record(files, paths[info.relative_path], info, req.storage_index.fqn,
                             functools.partial(_torch_compat.untransformed, self, req, info))
            take_read(planner, req, record, self.copies)
        fut: Future = Future()
        fut.set_result(None)
        return fut
