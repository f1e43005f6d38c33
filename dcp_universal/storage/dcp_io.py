"""DCP reads and writes: every ``dcp.save`` / ``dcp.load`` of the package goes through
:func:`save_state` / :func:`load_state`, with the reader and writer the path's storage
gives (:meth:`~dcp_universal.storage.Storage.dcp_reader`), or a reader of another
format (a Hugging Face safetensors directory).

Failures: DCP gathers a failure on any rank and raises one ``CheckpointException`` on
every rank; here it becomes a :class:`~dcp_universal.errors.CheckpointIOError` naming the
path and the first failing rank's cause, so every rank raises and none waits.
"""

from __future__ import annotations

import contextlib
import errno
import io
import pickle
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.storage import StorageReader
from torch.distributed.tensor import DTensor

from dcp_universal import _comm, _torch_compat
from dcp_universal.errors import (CheckpointError, CheckpointIOError, IntegrityError,
                                  UnsafeCheckpointError)
from dcp_universal.format.torch_formats import numpy_safe_globals
from dcp_universal.storage.integrity import vanished
from dcp_universal.format.manifest import FileRecord
from dcp_universal.storage.mapped import Copies
from dcp_universal.storage import Storage

__all__ = ["save_state", "gather_records", "load_state", "read_metadata"]


@contextlib.contextmanager
def _io_errors(doing: str, path: str):
    try:
        yield
    except CheckpointException as e:
        failures = _torch_compat.checkpoint_failures(e)
        rank, cause = failures[0] if failures else (None, e)
        if isinstance(cause, UnsafeCheckpointError):  # refused, not failed: say so as such
            raise UnsafeCheckpointError(f"{path} (rank {rank}): {cause}") from e
        if isinstance(cause, IntegrityError):  # damaged, not failed: every rank says so
            raise IntegrityError(f"{cause} [found by rank {rank}]") from e
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            raise CheckpointIOError(
                f"{doing} {path} failed on rank(s) {[r for r, _ in failures]}: the disk is "
                f"full (rank {rank}: {cause}) -> free space there, or save to another "
                "root; nothing was committed") from e
        raise CheckpointIOError(
            f"{doing} {path} failed on rank(s) {[r for r, _ in failures] or '?'}: rank {rank}: "
            f"{type(cause).__name__}: {cause}") from e
    except FileNotFoundError as e:
        if isinstance(e, CheckpointError):
            raise
        raise vanished(doing, path, e) from e


def _post_when_done(obj, method: str, label: str) -> None:
    """Post ``label`` as this rank's progress once ``obj.method`` (DCP's write or read of
    this rank's part, before DCP's next collective) has finished: a rank that stalls
    inside it is then the one behind (``_comm``'s board)."""
    run = getattr(obj, method)

    def posted(*args, **kwargs):
        future = run(*args, **kwargs)
        future.wait()
        _comm.progress(label)
        return future

    setattr(obj, method, posted)


def save_state(store: Storage, state: dict, path: str, *, planner=None,
               own_file_keys=frozenset(), checksums: bool = True,
               single_process: bool = False, group=None) -> dict[str, FileRecord]:
    """``dcp.save`` of ``state`` to the DCP directory ``path``.

    Collective on ``group`` (every rank, same ``path``) unless there is no process group
    or ``single_process`` is set (rank 0 writing alone; the other ranks do not call it).

    Args:
        own_file_keys: keys whose (computed) tensors go to bounded files of their own.
        checksums: compute each written file's size and CRC-32 while writing it.

    Returns:
        ``{file name: FileRecord}`` of the files this rank wrote (empty without
        ``checksums``).
    """
    alone = single_process or not _comm.is_distributed()
    group = _comm.resolve_group(group)
    if not alone:
        _comm.check_group(group, f"dcp.save of {path}")
    writer = store.dcp_writer(path, own_file_keys=own_file_keys, checksums=checksums)
    if not alone:
        _comm.progress(f"writing its part of {path}")
        _post_when_done(writer, "write_data", f"wrote its part of {path}, waiting for the others")
    with _torch_compat.quiet_single_process_warning(), _io_errors("writing", path):
        dcp.save(state, storage_writer=writer, planner=planner, process_group=group,
                 no_dist=alone)
    return dict(writer.fs.files) if checksums else {}


def gather_records(files: dict[str, FileRecord], *, group=None) -> dict[str, FileRecord]:
    """Collective on ``group``: every rank's file records (what :func:`save_state`
    returned), merged (names are unique per rank)."""
    return {name: rec for part in _comm.all_gather_object(files, group=group)
            for name, rec in part.items()}


#: ``reader_of(path, copies, metadata)``: a DCP ``StorageReader`` of a directory
ReaderOf = Callable[[str, "Copies | None", "Metadata | None"], StorageReader]


class _PlainBytesPlanner(DefaultLoadPlanner):
    """DCP's load planner, except that a byte item (a non-tensor entry, which DCP reads
    with ``torch.load(weights_only=False)``) must first load as plain data with
    ``torch.load(weights_only=True)``; otherwise UnsafeCheckpointError, before it runs."""

    def load_bytes(self, read_item, value) -> None:
        data = value.read()
        what = f"entry {read_item.dest_index.fqn!r}"
        try:
            with torch.serialization.safe_globals(numpy_safe_globals()):
                torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"{what} is not plain data ({str(e).splitlines()[0][:120]}): reading it would "
                "run code from the checkpoint -> load with trusted=True (CLI: --trusted) "
                "only if you trust whoever wrote it") from None
        super().load_bytes(read_item, io.BytesIO(data))


def load_state(store: Storage, state: dict, path: str, *, single_process: bool = False,
               copies: Copies | None = None, metadata: Metadata | None = None,
               reader_of: ReaderOf | None = None, group=None, trusted: bool = False) -> None:
    """``dcp.load`` into ``state`` (in place) from the directory ``path``.

    Collective on ``group``: every rank calls it with the same ``path``, in the same
    order as its other loads (each rank may ask for different keys); unless there is no
    process group or ``single_process`` is set (this rank reads alone).

    The reader is the storage's (:meth:`~dcp_universal.storage.Storage.dcp_reader`:
    memory maps for local files, ranged reads for URLs), or ``reader_of``'s (another
    format's directory). ``copies``: the keys in ``copies.keys`` are not written during
    the load; their copies wait in ``copies`` for its ``run()`` (memory-mapped files
    only). ``metadata``: ``path``'s, when the caller has read it already.

    Nothing in the directory runs as code unless ``trusted``: DCP's ``.metadata`` is
    read with an allow-list of DCP's records, byte items must be plain data
    (:class:`~dcp_universal.errors.UnsafeCheckpointError` otherwise).
    """
    alone = single_process or not _comm.is_distributed()
    group = _comm.resolve_group(group)
    if not alone:
        _comm.check_group(group, f"dcp.load of {path}")
    reader = (reader_of(path, copies, metadata) if reader_of is not None
              else store.dcp_reader(path, copies, metadata, trusted=trusted))
    if not alone:
        _comm.progress(f"reading its part of {path}")
        _post_when_done(reader, "read_data", f"read its part of {path}, waiting for the others")
    if alone and hasattr(reader, "read_whole") and all(
            isinstance(v, torch.Tensor) and not isinstance(v, DTensor) for v in state.values()):
        # one process, whole tensors: no plan to agree on, so DCP's planning is skipped
        try:
            if reader.read_whole(state):
                return
        except OSError as e:
            raise CheckpointIOError(f"reading {path} failed: {type(e).__name__}: {e}") from e
    with _torch_compat.quiet_single_process_warning(), _io_errors("reading", path):
        dcp.load(state, storage_reader=reader, process_group=group, no_dist=alone,
                 planner=None if trusted else _PlainBytesPlanner())


def read_metadata(store: Storage, path: str, *, reader_of: ReaderOf | None = None,
                  trusted: bool = False) -> Metadata:
    """DCP's metadata of the directory ``path`` (not collective: every caller reads
    it), through its storage's reader (an allow-list of DCP's records unless
    ``trusted``) or ``reader_of``'s."""
    reader = (reader_of(path, None, None) if reader_of is not None
              else store.dcp_reader(path, trusted=trusted))
    with _io_errors("reading", path):
        return reader.read_metadata()
