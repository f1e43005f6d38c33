"""DCP reads and writes: every ``dcp.save`` / ``dcp.load`` of the package goes through
:func:`save_state` / :func:`load_state`, with DCP's file-system writer for local paths
and its fsspec writer for URLs.

Failures: DCP gathers a failure on any rank and raises one ``CheckpointException`` on
every rank; here it becomes a :class:`~dcp_universal.errors.CheckpointIOError` naming the
path and the first failing rank's cause, so every rank raises and none waits.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from typing import Callable, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future
from torch.distributed.tensor import DTensor

from dcp_universal import _comm, _torch_compat
from dcp_universal.errors import CheckpointIOError
from dcp_universal.integrity import Checksummed
from dcp_universal.manifest import FileRecord
from dcp_universal.mapped import Copies, MappedReader, parse_record, read_whole, take_read
from dcp_universal.storage import Storage, is_remote

__all__ = ["save_state", "load_state", "read_metadata", "COMPUTED_FILE_BYTES"]

COMPUTED_FILE_BYTES = 32 << 20  # see _OwnFiles


@contextlib.contextmanager
def _io_errors(doing: str, path: str):
    try:
        yield
    except CheckpointException as e:
        failures = _torch_compat.checkpoint_failures(e)
        rank, cause = failures[0] if failures else (None, e)
        raise CheckpointIOError(
            f"{doing} {path} failed on rank(s) {[r for r, _ in failures] or '?'}: rank {rank}: "
            f"{type(cause).__name__}: {cause}") from e


class _OwnFiles:
    """Writer mixin: items named in ``own_file_keys`` go to files of their own, packed up
    to ``COMPUTED_FILE_BYTES`` per file (an item larger than that gets a file alone).

    DCP keeps every tensor of a file alive until the file is closed. Tensors that are
    views of the model cost nothing, but computed ones (merged LoRA weights) are new, so
    bounded files bound the extra memory to about one local shard or this budget,
    whichever is larger, while keeping the file (and fsync) count low.
    """

    own_file_keys: frozenset = frozenset()

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
        return _torch_compat.write_files(self, plan, planner, buckets)


def _item_bytes(item) -> int:
    n = 1
    for d in item.tensor_data.chunk.sizes:
        n *= d
    return n * item.tensor_data.properties.dtype.itemsize


class _LocalWriter(_OwnFiles, FileSystemWriter):
    pass


# Bytes fetched per batch of ranged reads: a remote read holds at most this much (or one
# record, if larger) before copying it into place.
RANGED_BATCH_BYTES = 64 << 20


@functools.cache
def _remote_classes():
    reader, writer = _torch_compat.fsspec_reader_writer()

    class _RemoteWriter(_OwnFiles, writer):
        pass

    class _RangedReader(reader):
        """DCP's fsspec reader, fetching each record with one ranged read of exactly its
        bytes (batched, concurrent through ``cat_ranges``). DCP's own reader reads through
        a buffered file whose read-ahead fetched 2.8x the model's bytes from S3 for one
        process's model-only load."""

        def read_data(self, plan, planner):
            fs = _torch_compat.fsspec_of(self)
            by_file: dict[str, list] = {}
            for req in plan.items:
                rel = self.storage_data[req.storage_index].relative_path
                by_file.setdefault(rel, []).append(req)
            for rel, reqs in by_file.items():
                path = str(self.fs.concat_path(self.path, rel))
                for batch in _batches(reqs, lambda r: self.storage_data[r.storage_index].length):
                    infos = [self.storage_data[r.storage_index] for r in batch]
                    datas = fs.cat_ranges([path] * len(batch), [i.offset for i in infos],
                                          [i.offset + i.length for i in infos])
                    for req, info, data in zip(batch, infos, datas):
                        if isinstance(data, Exception):
                            raise data
                        self._take(planner, req, info, data, path)
            fut: Future = Future()
            fut.set_result(None)
            return fut

        def _take(self, planner, req, info, data: bytes, path: str) -> None:
            if req.type == LoadItemType.BYTE_IO:
                planner.load_bytes(req, io.BytesIO(data))
                return
            with warnings.catch_warnings():  # read-only bytes: nothing writes to them
                warnings.simplefilter("ignore", UserWarning)
                whole = (torch.frombuffer(data, dtype=torch.uint8) if data
                         else torch.empty(0, dtype=torch.uint8))
            record = parse_record(data, whole, info, 0, path, req.storage_index.fqn,
                                  functools.partial(_torch_compat.untransformed, self, req, info))
            take_read(planner, req, record, Copies())  # remote: copied at once, never waits

    return _RemoteWriter, _RangedReader


def _batches(items: list, size: Callable[[object], int]) -> Iterator[list]:
    """``items`` in runs of at most ``RANGED_BATCH_BYTES`` (an item larger alone)."""
    batch, total = [], 0
    for item in items:
        if batch and total + size(item) > RANGED_BATCH_BYTES:
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += size(item)
    if batch:
        yield batch


def _writer(store: Storage, path: str, own_file_keys, checksums: bool):
    if is_remote(path):
        w = _remote_classes()[0](path, **store.options)
    else:
        w = _LocalWriter(path)
    w.own_file_keys = frozenset(own_file_keys)
    if checksums:
        _torch_compat.wrap_writer_fs(w, Checksummed)
    return w


def _reader(store: Storage, path: str, hf: bool = False, copies: Copies | None = None,
            metadata: Metadata | None = None):
    if copies is not None and copies.keys and is_remote(path):
        raise ValueError(f"{path}: copies can wait only for local (memory-mapped) files")
    if hf:
        from dcp_universal.safetensors_reader import SafetensorsReader
        return SafetensorsReader(store, path, copies)
    if is_remote(path):
        return _remote_classes()[1](path, **store.options)
    return MappedReader(path, copies, metadata)


def save_state(store: Storage, state: dict, path: str, *, planner=None,
               own_file_keys=frozenset(), checksums: bool = True,
               single_process: bool = False) -> dict[str, FileRecord]:
    """``dcp.save`` of ``state`` to the DCP directory ``path``.

    Collective (every rank, same ``path``) unless there is no process group or
    ``single_process`` is set (rank 0 writing alone; the other ranks do not call it).

    Args:
        own_file_keys: keys whose (computed) tensors go to bounded files of their own.
        checksums: compute each written file's size and CRC-32 while writing it.

    Returns:
        ``{file name: FileRecord}`` of the files this rank wrote (empty without
        ``checksums``).
    """
    writer = _writer(store, path, own_file_keys, checksums)
    with _torch_compat.quiet_single_process_warning(), _io_errors("writing", path):
        dcp.save(state, storage_writer=writer, planner=planner, process_group=_comm.group(),
                 no_dist=single_process or not _comm.is_distributed())
    return dict(getattr(writer.fs, "files", {}))


def load_state(store: Storage, state: dict, path: str, *, single_process: bool = False,
               hf: bool = False, copies: Copies | None = None,
               metadata: Metadata | None = None) -> None:
    """``dcp.load`` into ``state`` (in place) from the DCP directory ``path``.

    Collective: every rank calls it with the same ``path``, in the same order as its
    other loads (each rank may ask for different keys); unless there is no process group
    or ``single_process`` is set (this rank reads alone). ``hf``: ``path`` is a Hugging
    Face safetensors directory (:mod:`dcp_universal.safetensors_reader`: each rank reads
    only the byte ranges of the slices it asks for).

    A local ``path`` is read through memory maps (:mod:`dcp_universal.mapped`): one copy
    per tensor from the page cache. ``copies``: the keys in ``copies.keys`` are not
    written during the load; their copies wait in ``copies`` for its ``run()`` (local
    paths only). ``metadata``: ``path``'s, when the caller has read it already.
    """
    alone = single_process or not _comm.is_distributed()
    if alone and not is_remote(path) and all(
            isinstance(v, torch.Tensor) and not isinstance(v, DTensor) for v in state.values()):
        # one process, whole tensors: no plan to agree on, so DCP's planning is skipped
        copies = copies if copies is not None else Copies()
        try:
            if hf:
                return _reader(store, path, hf, copies).read_whole(state)
            if read_whole(path, state, copies, metadata):
                return
        except OSError as e:
            raise CheckpointIOError(f"reading {path} failed: {type(e).__name__}: {e}") from e
    with _torch_compat.quiet_single_process_warning(), _io_errors("reading", path):
        dcp.load(state, storage_reader=_reader(store, path, hf, copies, metadata),
                 process_group=_comm.group(),
                 no_dist=single_process or not _comm.is_distributed())


def read_metadata(store: Storage, path: str, *, hf: bool = False) -> Metadata:
    """DCP's metadata of ``path`` (not collective: every caller reads it); for a Hugging
    Face directory (``hf``), built from the safetensors headers."""
    with _io_errors("reading", path):
        return _reader(store, path, hf).read_metadata()

