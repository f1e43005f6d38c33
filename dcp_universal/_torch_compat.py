"""Every use of a private torch API, in one place.

Each of these can change in any torch release. Keeping them here means a torch upgrade
is checked against one file, and each use says what the public alternative is, or why
there is none. No other module of the package imports a ``torch`` name that starts
with ``_`` or reads a private attribute of a torch object; they call this module.

The installed torch is the one CI tests (see ``pyproject.toml``); the uses below were
read against its source.
"""

from __future__ import annotations

import contextlib
import queue
import warnings
from typing import Any, Callable, Iterator

import torch

__all__ = ["metadata_path", "fsspec_reader_writer", "write_files", "wrap_writer_fs", "DATA_SUFFIX",
           "version_counter", "checkpoint_failures", "quiet_single_process_warning",
           "WRAPPER_CLASSES", "pickled_storage_dtype", "untransformed", "fsspec_of",
           "local_block"]

# DCP's data files end in ``filesystem.DEFAULT_SUFFIX``. Readers find files through the
# metadata, never by suffix, so our own constant (equal today) is enough; we keep the
# same suffix so the directory looks like any other DCP checkpoint.
DATA_SUFFIX = ".distcp"


def fsspec_reader_writer() -> tuple[type, type]:
    """DCP's ``(FsspecReader, FsspecWriter)``.

    Private: they live in ``torch.distributed.checkpoint._fsspec_filesystem`` and are not
    re-exported by ``torch.distributed.checkpoint``. There is no public fsspec writer;
    writing one of our own would copy DCP's file-writing loop.
    """
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    return FsspecReader, FsspecWriter


def metadata_path(reader, rank=None):
    """Where DCP's ``FileSystemReader`` (or ``FsspecReader``) reads ``.metadata`` from
    (``rank``: a per-rank metadata file).

    Private: ``_get_metadata_path``; the public ``read_metadata`` also unpickles the
    file with ``pickle.load``, which runs whatever code the file names, so the library
    reads the bytes itself (:func:`dcp_universal.format.torch_formats.dcp_metadata`).
    """
    return reader._get_metadata_path(rank)


def pickled_storage_dtype(name: str) -> torch.dtype | None:
    """The dtype of a storage class named in a ``torch.save`` pickle (``"FloatStorage"``),
    or ``None`` when unknown (the caller then reads the record with ``torch.load``).

    Private: ``torch.storage._get_dtype_from_pickle_storage_type`` is the table
    ``torch.load`` itself uses; the public route (``getattr(torch, name).dtype``) goes
    through the deprecated ``TypedStorage`` and warns.
    """
    lookup = getattr(torch.storage, "_get_dtype_from_pickle_storage_type", None)
    try:
        return lookup(name) if lookup is not None else None
    except (KeyError, TypeError):
        return None


def fsspec_of(reader):
    """The fsspec filesystem of DCP's ``FsspecReader`` (or writer).

    Private: the reader keeps it as ``reader.fs.fs`` (its ``FileSystem`` wrapper's
    attribute, set by ``init_path``); the wrapper offers streams, not ranged reads.
    """
    return reader.fs.fs


def untransformed(reader, req, info, stream):
    """A DCP record's stream with the reader's load transforms (the experimental
    extensions that saved it, e.g. compression) undone.

    Private: ``FileSystemReader.transforms`` is a ``_StorageReaderTransforms``; its
    ``transform_load_stream`` is what DCP's own ``read_data`` calls.
    """
    return reader.transforms.transform_load_stream(req, info.transform_descriptors or (), stream)


def write_files(writer, plan, planner, buckets: list[list]) -> Any:
    """Write ``plan``'s items in the given buckets, one file per bucket, with DCP's own
    file-writing loop (``_FileSystemWriter._write_data``); returns its future.

    Private: ``_write_data`` and the ``_StoragePrefix`` in ``plan.storage_data``. The
    public knob, ``single_file_per_rank``, offers one file per rank or one per tensor;
    we need bounded files (see ``dcp_files.OwnFiles``), and DCP has no public hook for
    choosing the grouping.
    """
    files: queue.Queue = queue.Queue()
    for n, bucket in enumerate(buckets):
        name = f"{plan.storage_data.prefix}{n}{DATA_SUFFIX}"
        files.put((writer.fs.concat_path(writer.path, name), name, bucket))
    return writer._write_data(planner, files)


def wrap_writer_fs(writer, wrap: Callable[[Any], Any]) -> None:
    """Replace a DCP writer's file-system object by ``wrap(fs)``.

    Private: ``writer.fs`` is an implementation attribute of DCP's file-system writers.
    The public-looking alternative, ``_extensions`` (stream transforms), is itself
    private and experimental, and cannot see file names or renames.
    """
    writer.fs = wrap(writer.fs)


def version_counter(t: torch.Tensor) -> int | None:
    """The autograd version counter of ``t`` (bumped by every in-place write), or None
    if this torch no longer exposes it (callers then treat the contents as unknown).

    Private: ``Tensor._version`` has no public equivalent. A content signature would be
    public but means reading every byte: for the frozen-base cache that is a full hash
    of the base on every save, which is the cost the cache exists to avoid.
    """
    return getattr(t, "_version", None)


def checkpoint_failures(exc: BaseException) -> list[tuple[int, BaseException]]:
    """``(rank, exception)`` of every failure a DCP ``CheckpointException`` carries, by rank.

    ``CheckpointException.failures`` is public; the value's ``(exception, traceback)``
    pairing is DCP's private ``_wrap_exception`` format, hence this helper.
    """
    failures = getattr(exc, "failures", None) or {}
    out = []
    for rank, cause in sorted(failures.items(), key=lambda kv: kv[0]):
        out.append((rank, cause[0] if isinstance(cause, tuple) else cause))
    return out


@contextlib.contextmanager
def quiet_single_process_warning() -> Iterator[None]:
    """Silence DCP's "torch.distributed is disabled" warning for a deliberate
    single-process save or load (an inference node, rank 0 writing alone).

    Private in effect: the warning is a plain ``UserWarning`` with no category of its
    own, so the only way to filter it is by its message text, which may change.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# Wrapper modules torch itself puts around a model, by qualified class name, and the
# private attribute holding the wrapped module. Private: none of these classes is
# public API under this name, and the attributes are implementation details, but they
# appear in every state-dict key the wrappers produce; there is no public way to ask a
# module "what do you wrap?". Matched by name so that importing this module never
# imports dynamo or FSDP1.
WRAPPER_CLASSES: list[tuple[tuple[str, ...], str]] = [
    (("torch._dynamo.eval_frame.OptimizedModule",), "_orig_mod"),  # torch.compile
    (("CheckpointWrapper", "ActivationWrapper"), "_checkpoint_wrapped_module"),
    (("torch.distributed.fsdp.fully_sharded_data_parallel.FullyShardedDataParallel",),
     "_fsdp_wrapped_module"),
]


def default_store():
    """The default process group's key-value store (torch keeps it private), or
    ``None`` when there is none."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # no default group, or a torch without the helper
        return None


def local_block(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The part of ``t`` this rank holds, and its offsets in the global tensor.

    ``__create_chunk_list__`` is DTensor's protocol for DCP (public in spirit, named
    like a private hook): this rank's chunk, uneven shards included. Kept here so the
    layers below ``model`` (the adapter merge) can use it too.
    """
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        chunks = t.__create_chunk_list__()
        if len(chunks) != 1:
            raise NotImplementedError(f"a DTensor with {len(chunks)} local chunks")
        return t.to_local(), tuple(chunks[0].offsets)
    return t, (0,) * t.dim()
