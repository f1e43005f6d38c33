"""torch's private on-disk formats, read in one place, each pinned by a contract test
that writes through torch's public API (``tests/unit/test_torch_formats.py``).

* **torch.save's archive**: a zip of ``data.pkl`` (the pickled tensor, its storage named
  by key) and ``data/<key>`` (the storage's raw bytes, uncompressed).
  :func:`torch_save_layout` finds the storage bytes and the tensor's layout (dtype, size,
  stride, storage offset) from the zip's central directory and an unpickler that knows
  only tensors (it never executes code from the file); anything else returns ``None``
  and the caller reads the record with ``torch.load(weights_only=True)``.
* **DCP's storage records** (``_StorageInfo``, private to DCP): where a chunk lies (file,
  byte range) and whether load transforms apply; read only through :func:`dcp_record`.
* **Pickles a checkpoint carries** (DCP's ``.metadata``, older training-state blobs):
  read by :func:`restricted_loads`, which builds plain data only and refuses anything
  that would run code (:class:`~dcp_universal.errors.UnsafeCheckpointError`).

:class:`Stored` is a tensor over raw bytes (a memory map's or fetched ones), what both
readers hand to the copies.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib
import io
import math
import os
import pickle
import struct
from typing import Any, Mapping, NoReturn

import torch
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import (MetadataIndex, StorageMeta,
                                                   TensorStorageMetadata)

from dcp_universal import _torch_compat
from dcp_universal.errors import IntegrityError, UnsafeCheckpointError
from dcp_universal.format import manifest

__all__ = ["Stored", "Layout", "torch_save_layout", "DcpRecord", "dcp_record",
           "restricted_loads", "dcp_metadata", "numpy_safe_globals", "is_zip",
           "check_torch_archive", "check_torch_archive_bytes", "check_blob", "check_pickle",
           "check_dcp_metadata"]


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
            raise IntegrityError(f"a block of shape {lengths} does not fit its destination "
                                 f"of shape {list(dst.shape)}: the checkpoint's metadata is "
                                 "damaged -> load another checkpoint")
        if len(offsets) != len(self.size) or math.prod(lengths) and any(
                o < 0 or o + n > full for o, n, full in zip(offsets, lengths, self.size)):
            raise IntegrityError(f"a block at {offsets} of {lengths} lies outside the stored "
                                 f"tensor of shape {list(self.size)}: the checkpoint's "
                                 "metadata does not describe its data -> load another "
                                 "checkpoint")
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


def _central_entries(read, start: int, end: int) -> list[tuple] | None:
    """``[(name, method, compressed size, size, local header position)]`` of every entry
    of the zip archive at ``[start, end)``, from its central directory (``torch.save``
    streams its records, so their local headers carry no sizes); ``None`` unless it is
    such an archive with no comment (torch.save writes none: the end record is last).

    ``read(pos, n)``: the ``n`` bytes at ``pos`` (it raises ``IndexError`` for bytes it
    does not have; a short answer fails to unpack)."""
    eocd = end - 22
    if eocd < start:
        return None
    sig, _, _, _, count, _, cd, _ = _END.unpack(read(eocd, 22))
    if sig != 0x06054B50:
        return None
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
    entries, pos = [], 0
    for _ in range(count):
        if pos + 46 > len(central):
            return None
        (sig, _, _, _, method, _, _, _, csize, usize, nlen, xlen, clen, _, _, _,
         local) = _CENTRAL.unpack_from(central, pos)
        if sig != 0x02014B50:
            return None
        name = central[pos + 46:pos + 46 + nlen]
        if _U32 in (csize, usize, local):
            big = _zip64_extra(central, pos + 46 + nlen, xlen, usize, csize, local)
            if big is None:
                return None
            usize, csize, local = big
        entries.append((name, method, csize, usize, start + local))
        pos += 46 + nlen + xlen + clen
    return entries


def _data_start(read, head: int) -> int:
    """Where an entry's bytes begin, after its local header at ``head``."""
    return head + 30 + sum(struct.unpack("<HH", read(head + 26, 4)))


def _zip_records(read, start: int, end: int) -> dict[str, tuple[int, int]] | None:
    """``{record name: (data start, size)}`` of ``data.pkl``, ``byteorder`` and the
    ``data/*`` records of the zip archive at ``[start, end)`` (see
    :func:`_central_entries`); ``None`` unless it is a plain archive of uncompressed
    records."""
    entries = _central_entries(read, start, end)
    if entries is None:
        return None
    records = {}
    for name, method, csize, usize, head in entries:
        sub = name.partition(b"/")[2]
        if sub in _WANTED or sub.startswith(b"data/"):
            if method != 0 or csize != usize or head + 30 > end:
                return None
            data = _data_start(read, head)
            if data + csize > end:
                return None
            records[sub.decode("utf-8", "replace")] = (data, csize)
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
        if len(offsets) != len(self.size) or math.prod(lengths) and any(
                o < 0 or o + n > full for o, n, full in zip(offsets, lengths, self.size)):
            raise IntegrityError(f"a block at {offsets} of {lengths} lies outside its saved "
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


# ---- archives and pickles, bounded before torch.load reads them ---------------------
#
# torch.load trusts an archive's sizes: a deflated record is inflated whole (a 1 MiB
# bomb becomes GBs), and its pickle may call a constructor with a size (bytearray(n),
# numpy's _reconstruct) that allocates before anything is read. torch.save writes
# neither, so an archive is read only once its records are stored plainly, inside it,
# apart, each of its storage's size, and its pickle asks for nothing larger than itself.

_ZIP_MAGIC = b"PK\x03\x04"


def is_zip(head: bytes) -> bool:
    """Whether ``head`` (a file's first bytes) starts a zip archive (torch.save's)."""
    return bytes(head[:4]) == _ZIP_MAGIC


def check_torch_archive(read, start: int, length: int, what: str) -> None:
    """Refuse, with :class:`~dcp_universal.errors.IntegrityError`, the ``torch.save``
    archive at ``[start, start + length)`` (``read(pos, n)``: its bytes) unless reading
    it with ``torch.load`` costs no more memory than its bytes: every entry stored
    uncompressed, inside the archive, apart from the others; every storage its pickle
    names as large as its record says; its pickle building nothing larger than itself
    (:func:`check_pickle`)."""
    end = start + length

    def refuse(found: str) -> NoReturn:
        raise IntegrityError(
            f"{what} cannot be read as a torch.save archive: {found}. It is truncated or "
            "damaged, or was crafted (torch.save writes uncompressed records of exactly "
            "their storage's size) -> restore it from its source, or load another "
            "checkpoint")

    try:
        entries = _central_entries(read, start, end)
        if entries is None:
            refuse("no zip central directory at its end")
        records, spans = {}, []
        for name, method, csize, usize, head in entries:
            shown = name.decode("utf-8", "replace")
            if method != 0 or csize != usize:
                refuse(f"record {shown!r} is compressed (method {method}, {csize} bytes "
                       f"declaring {usize})")
            if head < start or head + 30 > end or struct.unpack(
                    "<I", read(head, 4))[0] != 0x04034B50:
                refuse(f"record {shown!r} has no local header inside the archive")
            if struct.unpack("<H", read(head + 8, 2))[0] != 0:
                refuse(f"record {shown!r} is compressed (its local header)")
            data = _data_start(read, head)
            if data + csize > end:
                refuse(f"record {shown!r} ({csize} bytes at {data - start}) ends past the "
                       f"archive's {length} bytes")
            spans.append((head, data + csize, shown))
            records[name.partition(b"/")[2].decode("utf-8", "replace")] = (data, csize)
        spans.sort()
        for (_, a_end, a), (b_start, _, b) in zip(spans, spans[1:]):
            if b_start < a_end:
                refuse(f"records {a!r} and {b!r} overlap")
        if "data.pkl" not in records:
            refuse("it has no data.pkl")
        p0, pn = records["data.pkl"]
        pickled = bytes(read(p0, pn))
    except (IndexError, struct.error):
        refuse("its directory points outside it")
    for key, type_name, numel in check_pickle(pickled, f"{what} (data.pkl)", storages=True):
        size = records.get(f"data/{key}", (0, None))[1]
        item = 1 if type_name == "UntypedStorage" else getattr(
            _torch_compat.pickled_storage_dtype(type_name), "itemsize", None)
        if size is None or item is None or size != numel * item:
            refuse(f"storage data/{key} ({type_name} of {numel} elements) has "
                   f"{'no record' if size is None else f'a record of {size} bytes'}")


def check_torch_archive_bytes(data, what: str) -> None:
    """:func:`check_torch_archive` of ``data`` (a zip's bytes, whole)."""
    check_torch_archive(lambda pos, n: data[pos:pos + n], 0, len(data), what)


def check_blob(blob, what: str) -> None:
    """Refuse a blob of the library's state (a ``torch.save`` archive, or an older
    plain pickle) whose reading would cost more memory than its bytes, whether or not
    it is trusted: :func:`check_torch_archive` or :func:`check_pickle`."""
    if is_zip(blob):
        check_torch_archive_bytes(blob, what)
    else:
        check_pickle(bytes(blob), what)


class _Opaque:
    """What :class:`_Scan` builds for anything a pickle names: nothing."""

    def __new__(cls, *args, **kwargs):
        cls.check(args)
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        pass

    @classmethod
    def check(cls, args) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:
        pass

    def append(self, value) -> None:
        pass

    def extend(self, values) -> None:
        pass


def _sized(module: str, name: str, args, limit: int) -> int | None:
    """The bytes a call of ``module.name(*args)`` that a checkpoint's pickle may make
    allocates from its arguments alone, when larger than ``limit``; else ``None``."""
    def count(shape) -> int | None:
        if isinstance(shape, int):
            return shape
        if isinstance(shape, (tuple, list)) and all(isinstance(n, int) for n in shape):
            return math.prod(shape)
        return None  # unknown: refused below when it matters

    if (module, name) == ("builtins", "bytearray") and args and isinstance(args[0], int):
        n = args[0]
    elif (module, name) == ("builtins", "range") and all(isinstance(a, int) for a in args):
        n = len(range(*args)) if args else 0
    elif module.startswith("numpy") and name in ("_reconstruct", "ndarray", "empty", "zeros"):
        shape = args[1] if name == "_reconstruct" and len(args) > 1 else (args[0] if args else 0)
        counted = count(shape)
        n = limit + 1 if counted is None else counted
    elif module.startswith("torch") and name.endswith("Tensor") and args:
        n = limit + 1  # a legacy constructor: torch.save never calls one
    else:
        return None
    return n if n > limit else None


def check_pickle(data: bytes, what: str, *, storages: bool = False) -> list[tuple]:
    """Walk the pickle ``data`` without calling anything it names, and refuse
    (:class:`~dcp_universal.errors.IntegrityError`) a call that would allocate more
    bytes than the pickle holds (``bytearray(n)``, ``range(n)`` under a ``set``, a
    numpy array of a given shape). Returns the ``(key, storage type name, numel)`` of
    each torch.save storage it names (``storages``; others are refused by the caller's
    unpickler)."""
    return _scan(io.BytesIO(data), len(data), what, storages)


def _check_legacy_torch_bytes(data: bytes, what: str) -> None:
    """Refuse ``torch.save``'s pre-zip format (its four pickles, then the storages'
    bytes) when its storages declare more bytes than it holds: ``torch.load``
    allocates each as declared before reading it."""
    stream = io.BytesIO(data)
    for _ in range(3):  # magic number, protocol version, system info
        _scan(stream, len(data), what, False)
    declared = sum(numel * (1 if name == "UntypedStorage" else getattr(
        _torch_compat.pickled_storage_dtype(name), "itemsize", 1))
        for _, name, numel in _scan(stream, len(data), what, True))
    if declared > len(data):
        raise IntegrityError(f"{what} declares storages of {declared} bytes in {len(data)} "
                             "bytes -> it was crafted or damaged; do not load it")


def _scan(stream, size: int, what: str, storages: bool) -> list[tuple]:
    found: list[tuple] = []
    classes: dict = {}
    limit = max(size, 1 << 16)

    class _Scan(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) not in classes:
                def check(args, module=module, name=name) -> None:
                    n = _sized(module, name, args, limit)
                    if n is not None:
                        raise IntegrityError(
                            f"{what} asks {module}.{name} for {n} elements from a pickle of "
                            f"{size} bytes: a checkpoint's pickle holds its data "
                            "itself -> it was crafted or damaged; do not load it")
                classes[module, name] = type(name, (_Opaque,), {"check": staticmethod(check)})
            return classes[module, name]

        def persistent_load(self, pid):
            if storages and isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage":
                type_name = getattr(pid[1], "__name__", str(pid[1]))
                found.append((str(pid[2]), type_name, int(pid[4])))
            return _Opaque()

    try:
        _Scan(stream).load()
    except IntegrityError:
        raise
    except Exception:  # damaged: the real unpickler says how
        pass
    return found


@dataclasses.dataclass(frozen=True)
class DcpRecord:
    """Where DCP stored one chunk (its private ``_StorageInfo``, read in one place).

    Attributes:
        file: the data file, relative to the checkpoint directory.
        offset / length: the chunk's byte range in it: one ``torch.save`` archive, unless
            ``transformed``.
        transformed: DCP's load transforms apply (its experimental extensions, e.g.
            compression): the bytes are not a plain archive; DCP undoes them
            (:func:`dcp_universal._torch_compat.untransformed`, given ``info``).
        info: DCP's own record.
    """

    file: str
    offset: int
    length: int
    transformed: bool
    info: Any


def dcp_record(storage_data: Mapping, index) -> DcpRecord:
    """The record of the chunk ``index`` (a ``MetadataIndex``) in DCP's ``storage_data``
    (a checkpoint's ``Metadata.storage_data``, or a reader's)."""
    info = storage_data[index]
    return DcpRecord(str(info.relative_path), int(info.offset), int(info.length),
                     bool(info.transform_descriptors), info)


# ---- pickles a checkpoint carries, read without running code ---------------------------
#
# DCP's ``.metadata`` is a pickle of its own classes, and this library's training state
# used to be plain pickles. A pickle names the callables it calls; these unpicklers call
# only the ones listed here (constructors of plain data: containers, DCP's metadata
# records, torch sizes and dtypes, numpy arrays) and refuse anything else with
# UnsafeCheckpointError before it runs.

_CONTAINERS = {("builtins", n) for n in ("set", "frozenset", "slice", "complex", "bytearray",
                                         "range")} | {("collections", "OrderedDict")}
_DCP_METADATA = {("torch.distributed.checkpoint.metadata", n) for n in (
    "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
    "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"), ("torch", "Size"), ("torch.serialization", "_get_layout")}
_NUMPY = {(m, n) for m in ("numpy._core.multiarray", "numpy.core.multiarray")
          for n in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype")}
# a tensor in a plain pickle: its storage is a torch.save archive, read here with
# torch.load(weights_only=True) instead of torch's own (unrestricted) helper
_TENSOR = {("torch._utils", "_rebuild_tensor_v2")}


def _storage_from_bytes(data: bytes):
    if is_zip(data):
        check_torch_archive_bytes(data, "a tensor in a pickle")
    else:  # torch.save's older format, which a pickled tensor's storage still uses
        _check_legacy_torch_bytes(data, "a tensor in a pickle")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class _Restricted(pickle.Unpickler):
    def __init__(self, data: bytes, allowed: set, what: str) -> None:
        super().__init__(io.BytesIO(data))
        self._allowed, self._what = allowed, what

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch.storage", "_load_from_bytes") and _TENSOR <= self._allowed:
            return _storage_from_bytes
        if ((module, name) in self._allowed or _torch_constant(module, name)
                or module == "numpy.dtypes" and name.endswith("DType")
                and _NUMPY <= self._allowed):
            return getattr(importlib.import_module(module), name)
        raise UnsafeCheckpointError(
            f"{self._what} holds a {module}.{name}, which is not plain data: reading it would "
            "run code from the checkpoint -> load it with trusted=True (CLI: --trusted) only "
            "if you trust whoever wrote it")

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"{self._what} is not a plain pickle (persistent id "
                                    f"{pid!r}) -> load it with trusted=True only if you "
                                    "trust whoever wrote it")


def _torch_constant(module: str, name: str) -> bool:
    return module == "torch" and isinstance(
        getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))


def restricted_loads(data: bytes, what: str, *, tensors: bool = False,
                     numpy: bool = False, dcp_metadata: bool = False):
    """``pickle.loads(data)`` that builds only plain data (containers, and what the flags
    add: tensors, numpy arrays, DCP's metadata records), else
    :class:`~dcp_universal.errors.UnsafeCheckpointError` naming the object."""
    allowed = set(_CONTAINERS)
    allowed |= _TENSOR if tensors else set()
    allowed |= _NUMPY if numpy else set()
    allowed |= _DCP_METADATA if dcp_metadata else set()
    check_pickle(data, what)
    try:
        return _Restricted(data, allowed, what).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # whatever a damaged pickle makes the unpickler raise
        raise IntegrityError(f"{what} cannot be read ({type(e).__name__}: {e}): it is "
                             "damaged -> load an earlier checkpoint") from e


def dcp_metadata(reader, *, rank=None, trusted: bool = False, check=None):
    """What DCP's ``FileSystemReader.read_metadata`` returns, from a pickle read with
    :func:`restricted_loads` (DCP's records only) unless ``trusted``; its bytes checked
    first by ``check`` (a :class:`~dcp_universal.storage.integrity.BlockCheck`)."""
    path = _torch_compat.metadata_path(reader, rank)
    with reader.fs.create_stream(path, "rb") as f:
        data = f.read()
    if check is not None:
        name = str(path).replace("\\", "/").rsplit("/", 1)[-1]
        check.check(name, data, 0, 0, len(data), remember=False)
    md = (pickle.loads(data) if trusted
          else restricted_loads(data, f"DCP metadata {path}", dcp_metadata=True))
    check_dcp_metadata(md, functools.partial(_file_size, reader), f"DCP metadata {path}")
    if getattr(md, "storage_meta", None) is None:
        md.storage_meta = StorageMeta()
    md.storage_meta.load_id = reader.load_id
    return md


def _file_size(reader, name: str) -> int | None:
    """The size of the file ``name`` of a DCP reader's directory; ``None`` when missing
    (its read fails later, saying so)."""
    path = str(reader.fs.concat_path(reader.path, name))
    try:
        if isinstance(reader.fs, FileSystem):  # local: a symlink its owner placed is followed
            return os.path.getsize(path)
        if hasattr(reader.fs, "size"):  # a reader over any Storage (storage.dcp_store)
            return int(reader.fs.size(path))
        return int(_torch_compat.fsspec_of(reader).size(path))
    except (FileNotFoundError, NotADirectoryError):
        return None


def check_dcp_metadata(md, size_of, what: str) -> None:
    """Refuse DCP metadata whose records cannot be what it says, before anything is
    allocated from it: every record a file inside the directory
    (:class:`~dcp_universal.errors.UnsafeCheckpointError`), its byte range inside that
    file and apart from the others; every tensor's chunks inside its shape, covering
    exactly its elements, each in a record at least as long as its bytes (so a tensor is
    never larger than the files it is read from), else
    :class:`~dcp_universal.errors.IntegrityError`. ``size_of(name)``: a file's size, or
    ``None`` when it is missing."""
    def damaged(found: str) -> NoReturn:
        raise IntegrityError(f"{what}: {found} -> the checkpoint was damaged or crafted; "
                             "load another checkpoint")

    storage = getattr(md, "storage_data", None)
    tensors = getattr(md, "state_dict_metadata", None)
    if not isinstance(storage, dict) or not isinstance(tensors, dict):
        damaged("it is not DCP's Metadata (no storage_data / state_dict_metadata)")
    by_file: dict[str, list] = {}
    try:
        for index, info in storage.items():
            rec = dcp_record(storage, index)
            manifest.inside(rec.file, f"{what} (the record of {index.fqn!r})")
            if rec.offset < 0 or rec.length < 0:
                damaged(f"the record of {index.fqn!r} is at bytes {rec.offset}..+{rec.length}")
            by_file.setdefault(rec.file, []).append((rec.offset, rec.length, index.fqn))
    except (AttributeError, TypeError, ValueError) as e:
        damaged(f"a storage record is not DCP's ({type(e).__name__}: {e})")
    sizes = {name: size_of(name) for name in by_file}
    for name, recs in by_file.items():
        recs.sort()
        if sizes[name] is not None and recs[-1][0] + recs[-1][1] > sizes[name]:
            last = max(recs, key=lambda r: r[0] + r[1])
            damaged(f"{name} holds {sizes[name]} bytes, but the record of {last[2]!r} ends at "
                    f"byte {last[0] + last[1]} (the file is truncated, or the record is "
                    "not its)")
        for (a0, an, a), (b0, bn, b) in zip(recs, recs[1:]):
            if b0 < a0 + an and an and bn:
                damaged(f"the records of {a!r} (bytes {a0}..{a0 + an}) and {b!r} (bytes "
                        f"{b0}..{b0 + bn}) of {name} overlap: every chunk has bytes of its own")
    for key, tmd in tensors.items():
        if not isinstance(tmd, TensorStorageMetadata):
            continue
        try:
            _check_chunks(key, tmd, storage, sizes, damaged)
        except (AttributeError, TypeError, ValueError) as e:
            damaged(f"the entry of {key!r} is not DCP's ({type(e).__name__}: {e})")


def _check_chunks(key: str, tmd, storage, sizes, damaged) -> None:
    shape = [int(n) for n in tmd.size]
    item = tmd.properties.dtype.itemsize
    covered = 0
    for chunk in tmd.chunks:
        offsets, lengths = [int(o) for o in chunk.offsets], [int(n) for n in chunk.sizes]
        if len(offsets) != len(shape) or len(lengths) != len(shape) or any(
                o < 0 or n < 0 or o + n > full for o, n, full in zip(offsets, lengths, shape)):
            damaged(f"a chunk of {key!r} at {offsets} of {lengths} lies outside its shape "
                    f"{tuple(shape)}")
        index = MetadataIndex(key, chunk.offsets)
        if index not in storage:
            damaged(f"the chunk of {key!r} at {offsets} has no storage record")
        rec = dcp_record(storage, index)
        need = math.prod(lengths) * item
        if not rec.transformed and rec.length < need:
            size = sizes.get(rec.file)
            damaged(f"{key!r} has a chunk of shape {tuple(lengths)} ({tmd.properties.dtype}: "
                    f"{need} bytes) in a record of {rec.length} bytes of {rec.file} (a file "
                    f"of {size} bytes); the tensor's shape is {tuple(shape)}")
        covered += math.prod(lengths)
    if covered != math.prod(shape):
        damaged(f"the chunks of {key!r} cover {covered} of the {math.prod(shape)} elements "
                f"of its shape {tuple(shape)}")


def numpy_safe_globals() -> list:
    """numpy's array types for ``torch.load(weights_only=True)`` (numpy RNG states),
    or nothing without numpy."""
    try:
        import numpy as np
    except ImportError:
        return []
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype,
            *{type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"}]
