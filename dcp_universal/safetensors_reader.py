"""A DCP storage reader for Hugging Face safetensors directories, local or fsspec URLs.

The safetensors format is an 8-byte header length, a JSON header (per tensor: dtype,
shape and byte range) and the raw row-major data. This reader builds DCP metadata from
the headers alone. A local file is memory-mapped and each read item is one copy from
the mapped pages (:mod:`dcp_universal.mapped`); a remote one (fsspec URL) is served
with one ranged read per item: the item's rows (a dim-0 slice is one contiguous range;
other slices read the rows that cover them and cut in memory). Either way every rank
reads only the bytes of its own shards and no file is read whole.
Reading needs no safetensors package; writing (``export_hf``, ``export_peft``) imports it
through :func:`safetensors_torch`.
"""

from __future__ import annotations

import dataclasses
import json
import math

import torch
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from dcp_universal import manifest
from dcp_universal.errors import CheckpointError, IntegrityError
from dcp_universal.mapped import Copies, MappedFiles, Stored, take_read
from dcp_universal.storage import Storage, is_remote, join

__all__ = ["SafetensorsReader", "safetensors_files", "safetensors_torch"]

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def safetensors_torch(who: str):
    """``safetensors.torch`` (the ``hf`` extra), or a CheckpointError saying how to get it."""
    try:
        import safetensors.torch
    except ImportError:
        raise CheckpointError(f"{who} needs safetensors, which is not installed: "
                              "pip install 'dcp-universal[hf]'") from None
    return safetensors.torch


@dataclasses.dataclass(frozen=True)
class _Entry:
    file: str
    start: int  # absolute byte offset of the tensor's data in the file
    shape: tuple[int, ...]
    dtype: torch.dtype


def safetensors_files(store: Storage, path: str) -> list[str]:
    """The data files of an HF directory: the index's files, else ``model.safetensors``."""
    index = join(path, manifest.HF_INDEX)
    if store.exists(index):
        weight_map = json.loads(store.read_bytes(index)).get("weight_map", {})
        return sorted(set(weight_map.values()))
    return [manifest.HF_SINGLE]


class SafetensorsReader(StorageReader):
    """Reads the directory ``path`` (local or an fsspec URL) through ``store``."""

    def __init__(self, store: Storage, path: str, copies: Copies | None = None) -> None:
        super().__init__()
        self.store, self.path = store, path
        self.entries: dict[str, _Entry] = {}
        self.copies = copies if copies is not None else Copies()

    def _read_headers(self) -> None:
        for name in safetensors_files(self.store, self.path):
            full = join(self.path, name)
            with self.store.open_read(full) as f:
                n = int.from_bytes(f.read(8), "little")
                try:
                    header = json.loads(f.read(n))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise CheckpointError(f"{full} is not a safetensors file ({e})") from None
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise CheckpointError(f"{full}: tensor {key!r} has dtype {info['dtype']}, "
                                          f"which this reader does not know ({sorted(_DTYPES)})")
                self.entries[key] = _Entry(full, 8 + n + info["data_offsets"][0],
                                           tuple(info["shape"]), _DTYPES[info["dtype"]])

    def read_metadata(self, *args, **kwargs) -> Metadata:
        self._read_headers()
        md, storage = {}, {}
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
        if is_remote(self.path):
            self._read_ranges(plan, planner)
        else:
            self._read_mapped(plan, planner)
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _read_mapped(self, plan: LoadPlan, planner: LoadPlanner) -> None:
        """Local files: views of memory maps, one copy each (now or at the commit)."""
        files = MappedFiles()
        for item in plan.items:
            take_read(planner, item, self._stored(files, item.storage_index.fqn), self.copies)

    def read_whole(self, state: dict[str, torch.Tensor]) -> None:
        """What ``dcp.load(state, no_dist=True)`` does for whole plain tensors of a local
        directory, without DCP's planning (one process: nothing to agree on)."""
        if not self.entries:
            self._read_headers()
        files = MappedFiles()
        for key, dst in state.items():
            if key not in self.entries or self.entries[key].shape != tuple(dst.shape):
                found = self.entries[key].shape if key in self.entries else "missing"
                raise CheckpointError(f"{self.path}: {key!r} is {found} in the safetensors "
                                      f"files; the load wants shape {tuple(dst.shape)}")
            stored = self._stored(files, key)
            self.copies.take(key, *stored.source_for(dst, (0,) * dst.dim(), tuple(dst.shape)))

    def _stored(self, files: MappedFiles, key: str) -> Stored:
        e = self.entries[key]
        _, whole = files.get(e.file)
        nbytes = math.prod(e.shape) * e.dtype.itemsize
        if e.start + nbytes > whole.numel():
            raise IntegrityError(
                f"{e.file} holds {whole.numel()} bytes, but its header places {key!r} at "
                f"bytes {e.start}..{e.start + nbytes}: the file is truncated -> copy it again")
        return Stored.contiguous(whole[e.start:e.start + nbytes], e.dtype, e.shape)

    def _read_ranges(self, plan: LoadPlan, planner: LoadPlanner) -> None:
        """Remote files: one ranged read per item."""
        by_file: dict[str, list] = {}
        for item in plan.items:
            by_file.setdefault(self.entries[item.storage_index.fqn].file, []).append(item)
        for file, items in by_file.items():
            with self.store.open_read(file) as f:
                for item in items:
                    e = self.entries[item.storage_index.fqn]
                    value = self._read_item(f, e, item.storage_offsets, item.lengths)
                    target = planner.resolve_tensor(item).detach()
                    target.copy_(value)
                    planner.commit_tensor(item, target)

    @staticmethod
    def _read_item(f, e: _Entry, offsets, lengths) -> torch.Tensor:
        if not e.shape:  # a scalar
            f.seek(e.start)
            return torch.frombuffer(bytearray(f.read(e.dtype.itemsize)), dtype=e.dtype).reshape(())
        row = math.prod(e.shape[1:]) * e.dtype.itemsize
        r0, nr = int(offsets[0]), int(lengths[0])
        if nr == 0 or row == 0:
            return torch.empty([int(n) for n in lengths], dtype=e.dtype)
        f.seek(e.start + r0 * row)
        rows = torch.frombuffer(bytearray(f.read(nr * row)), dtype=e.dtype).reshape(nr, *e.shape[1:])
        cut = (slice(None),) + tuple(slice(int(o), int(o) + int(n))
                                     for o, n in zip(offsets[1:], lengths[1:]))
        return rows[cut]

    def reset(self, checkpoint_id=None) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True
