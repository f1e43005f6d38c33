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
import pickle
import struct
from typing import Any, Mapping

import torch
from torch.distributed.checkpoint.metadata import StorageMeta

from dcp_universal import _torch_compat
from dcp_universal.errors import CheckpointError, IntegrityError, UnsafeCheckpointError

__all__ = ["Stored", "Layout", "torch_save_layout", "DcpRecord", "dcp_record",
           "restricted_loads", "dcp_metadata", "numpy_safe_globals"]


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
    if getattr(md, "storage_meta", None) is None:
        md.storage_meta = StorageMeta()
    md.storage_meta.load_id = reader.load_id
    return md


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
