"""A DCP storage reader for Hugging Face safetensors directories, local or fsspec URLs.

The safetensors format is an 8-byte header length, a JSON header (per tensor: dtype,
shape and byte range) and the raw row-major data. This reader builds DCP metadata from
the headers alone. Each read item is the rows covering it, through the storage's
``read_spans``: views of memory-mapped pages for a local file (one copy each, now or at
the commit), one ranged read per item for a URL. Either way every rank reads only the
bytes of its own shards and no file is read whole.
Reading needs no safetensors package; writing (``export_hf``, ``export_peft``) imports it
through :func:`import_safetensors`.
"""

from __future__ import annotations

import dataclasses
import json
import math

import torch
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, STORAGE_TYPES,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from dcp_universal.format import manifest
from dcp_universal.sources.dcp import dir_source
from dcp_universal.errors import CheckpointError, CheckpointMismatchError, IntegrityError
from dcp_universal.storage.mapped import Copies, Stored, take_read
from dcp_universal.sources import DcpDir, Format, Source, Want, register_format
from dcp_universal.storage import Storage, join

__all__ = ["SafetensorsReader", "HfFormat", "safetensors_files", "import_safetensors"]

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def import_safetensors(who: str):
    """``safetensors.torch`` (the ``hf`` extra), or a CheckpointError saying how to get it."""
    try:
        import numpy  # noqa: F401  (safetensors' writer imports it only when it writes)
        import safetensors.torch
    except ImportError as e:
        raise CheckpointError(f"{who} needs {e.name or 'safetensors'}, which is not installed: "
                              "install the hf extra (from a clone of dcp_universal: "
                              "pip install -e '.[hf]')") from None
    return safetensors.torch


@dataclasses.dataclass(frozen=True)
class _Entry:
    file: str
    start: int  # absolute byte offset of the tensor's data in the file
    shape: tuple[int, ...]
    dtype: torch.dtype


def _entries(header, full: str, data_start: int, size: int) -> dict[str, _Entry]:
    """The tensors a safetensors header describes, each checked as safetensors' own
    loader checks it before anything is read: a known dtype, a shape of naturals, a byte
    range of exactly ``numel * itemsize`` bytes inside the file's data, the ranges in
    order, back to back, none overlapping; else :class:`IntegrityError`."""
    def damaged(found: str):
        raise IntegrityError(f"{full}: {found} -> the file is damaged, truncated or was "
                             "crafted; download it again from the model's source")

    if not isinstance(header, dict):
        damaged(f"its header is a {type(header).__name__}, not an object")
    entries, ranges = {}, []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            damaged(f"the entry of {key!r} is a {type(info).__name__}, not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _DTYPES:
            damaged(f"tensor {key!r} has dtype {dtype!r}, expected one of {sorted(_DTYPES)}")
        if not isinstance(shape, list) or not all(
                type(d) is int and d >= 0 for d in shape):
            damaged(f"tensor {key!r} has shape {shape!r}, expected a list of naturals")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            damaged(f"tensor {key!r} has data_offsets {offsets!r}, expected [begin, end] "
                    "with 0 <= begin <= end")
        need = math.prod(shape) * _DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != need:
            damaged(f"tensor {key!r} ({dtype} of shape {tuple(shape)}: {need} bytes) has "
                    f"data_offsets {offsets} ({offsets[1] - offsets[0]} bytes)")
        if data_start + offsets[1] > size:
            damaged(f"tensor {key!r} ends at byte {data_start + offsets[1]}, but the file holds "
                    f"{size} bytes (truncated)")
        ranges.append((offsets[0], offsets[1], key))
        entries[key] = _Entry(full, data_start + offsets[0], tuple(shape), _DTYPES[dtype])
    ranges.sort()
    for (_, a_end, a), (b0, _, b) in zip(ranges, ranges[1:]):
        if b0 != a_end:
            damaged(f"the byte ranges of {a!r} and {b!r} "
                    f"{'overlap' if b0 < a_end else 'leave a gap'} (data_offsets are back to "
                    "back)")
    return entries


def safetensors_files(store: Storage, path: str) -> list[str]:
    """The data files of an HF directory: the index's files, else ``model.safetensors``."""
    index = join(path, manifest.HF_INDEX)
    if store.exists(index):
        try:
            weight_map = json.loads(store.read_bytes(index)).get("weight_map", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise IntegrityError(f"{index} is not a safetensors index ({e}) -> "
                                 "restore it from the model's source") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str)
                                                       for v in weight_map.values()):
            raise IntegrityError(f"{index}: weight_map is not an object of file names")
        files = sorted(set(weight_map.values()))
        for name in files:
            manifest.inside(name, f"{index} (weight_map)")
        missing = [f for f in files if not store.exists(join(path, f))]
        if missing:
            raise IntegrityError(f"{index} names shard files that are not in {path}: "
                                 f"{missing[:4]} -> copy the whole directory again")
        return files
    return [manifest.HF_SINGLE]


class SafetensorsReader(StorageReader):
    """Reads the directory ``path`` (local or an fsspec URL) through ``store``."""

    def __init__(self, store: Storage, path: str, copies: Copies | None = None) -> None:
        super().__init__()
        self.store, self.path = store, path
        self.entries: dict[str, _Entry] = {}
        self.copies = copies if copies is not None else Copies()

    def _read_headers(self) -> None:
        entries: dict[str, _Entry] = {}
        for name in safetensors_files(self.store, self.path):
            full = join(self.path, name)
            size = self.store.size(full)
            with self.store.open_read(full) as f:
                n = int.from_bytes(f.read(8), "little")
                if n > size - 8:
                    raise IntegrityError(
                        f"{full} is not a safetensors file: its header says {n} bytes, the "
                        f"file holds {size} -> it is damaged or of another format")
                try:
                    header = json.loads(f.read(n))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise IntegrityError(f"{full} is not a safetensors file ({e})") from None
            for key, entry in _entries(header, full, 8 + n, size).items():
                if key in entries:
                    raise IntegrityError(
                        f"{key!r} is in both {entries[key].file} and {full}: a tensor "
                        "has one shard -> the directory mixes two exports; copy it again")
                entries[key] = entry
        self.entries = entries

    def read_metadata(self, *args, **kwargs) -> Metadata:
        self._read_headers()
        md: dict[str, STORAGE_TYPES] = {}
        storage: dict[MetadataIndex, str] = {}
        for key, e in self.entries.items():
            zeros = torch.Size([0] * len(e.shape))
            md[key] = TensorStorageMetadata(
                properties=TensorProperties(dtype=e.dtype), size=torch.Size(e.shape),
                chunks=[ChunkStorageMetadata(offsets=zeros, sizes=torch.Size(e.shape))])
            storage[MetadataIndex(fqn=key, offset=zeros)] = key
        return Metadata(state_dict_metadata=md, storage_data=storage)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        if not self.entries:
            self._read_headers()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        items = [(item, item.storage_index.fqn, item.storage_offsets, item.lengths)
                 for item in plan.items]
        for item, stored, offsets in self._located(items):
            take_read(planner, item, stored, self.copies, offsets=offsets)
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def read_whole(self, state: dict[str, torch.Tensor]) -> bool:
        """What ``dcp.load(state, no_dist=True)`` does for whole plain tensors, without
        DCP's planning (one process: nothing to agree on)."""
        if not self.entries:
            self._read_headers()
        for key, dst in state.items():
            if key not in self.entries or self.entries[key].shape != tuple(dst.shape):
                found = self.entries[key].shape if key in self.entries else "missing"
                raise CheckpointMismatchError(f"{self.path}: {key!r} is {found} in the safetensors "
                                              f"files; the load wants shape {tuple(dst.shape)}")
        items = [((key, dst), key, (0,) * dst.dim(), tuple(dst.shape))
                 for key, dst in state.items()]
        for (key, dst), stored, offsets in self._located(items):
            self.copies.take(key, *stored.source_for(dst, offsets, tuple(dst.shape)))
        return True

    def _located(self, items: list[tuple]) -> list[tuple]:
        """``(what, Stored, offsets in it)`` for each ``(what, key, offsets, lengths)``:
        the rows covering the block (a dim-0 slice is one contiguous range; other slices
        read the rows that cover them and cut in memory), from one
        :meth:`~dcp_universal.storage.Storage.read_spans` per file (views of a map for
        local files, fetched bytes for URLs)."""
        by_file: dict[str, list] = {}
        for what, key, offsets, lengths in items:
            e = self.entries[key]
            row = math.prod(e.shape[1:]) * e.dtype.itemsize
            shape: tuple[int, ...]
            at: tuple[int, ...]
            if not e.shape:  # a scalar
                span, shape, at = (e.start, e.dtype.itemsize), (), ()
            else:
                r0, nr = int(offsets[0]), int(lengths[0])
                span = (e.start + r0 * row, nr * row)
                shape, at = (nr, *e.shape[1:]), (0, *offsets[1:])
            by_file.setdefault(e.file, []).append((what, span, e.dtype, shape, at))
        out = []
        for file, wanted in by_file.items():
            raws = self.store.read_spans(file, [span for _, span, _, _, _ in wanted])
            for (what, _, dtype, shape, at), raw in zip(wanted, raws):
                out.append((what, Stored.contiguous(raw, dtype, shape), at))
        return out

    def reset(self, checkpoint_id=None) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True


class HfFormat(Format):
    """A Hugging Face safetensors directory, as ``save_pretrained`` writes it: read like
    a DCP directory of another tool (keys made canonical), through
    :class:`SafetensorsReader`."""

    name = "hf"
    looks_like = (f"a Hugging Face directory ({manifest.HF_SINGLE}, or shards with "
                  f"{manifest.HF_INDEX})")
    takes_prefix = True

    def detect(self, store: Storage, path: str) -> bool:
        return any(store.exists(join(path, f)) for f in (manifest.HF_INDEX, manifest.HF_SINGLE))

    def open(self, store: Storage, path: str, want: Want) -> Source:
        d = DcpDir(store, path, reader_of=lambda p, copies, _: SafetensorsReader(store, p, copies))
        return dir_source(store, d, want, notes=(f"read Hugging Face safetensors {path}",))


register_format(HfFormat())
