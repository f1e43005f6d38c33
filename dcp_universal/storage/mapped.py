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
``data.pkl`` and the raw storage bytes, uncompressed). The record's bytes and layout are
found by :mod:`dcp_universal.format.torch_formats` (torch's private formats, in one place);
anything but a plain tensor is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import io
import math
import mmap
import os
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
from dcp_universal.errors import CheckpointMismatchError, IntegrityError
from dcp_universal.storage.read_ahead import ReadAhead
from dcp_universal.format.torch_formats import (DcpRecord, Stored, check_torch_archive,
                                                dcp_metadata, dcp_record, is_zip,
                                                torch_save_layout)

__all__ = ["Copies", "MappedFiles", "byte_view", "MappedReader", "pair", "parse_record",
           "check_record", "read_whole", "take_read"]


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
    source); it is unmapped when the last view goes. ``check``: the directory's
    :class:`~dcp_universal.storage.integrity.BlockCheck`, run on every record before it
    is parsed.
    """

    def __init__(self, check=None) -> None:
        self._maps: dict[str, tuple[mmap.mmap | bytes, torch.Tensor]] = {}
        self.check = check

    def checked(self, path: str, rec: DcpRecord) -> tuple[mmap.mmap | bytes, torch.Tensor]:
        """:meth:`get`, with the blocks holding ``rec`` checked."""
        mm, whole = self.get(path)
        if self.check is not None and rec.offset + rec.length <= whole.numel():
            self.check.check(rec.file, mm, 0, rec.offset, rec.offset + rec.length)
        return mm, whole

    def get(self, path: str) -> tuple[mmap.mmap | bytes, torch.Tensor]:
        if path not in self._maps:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            self._maps[path] = (mm, byte_view(mm))
        return self._maps[path]


def _mapped(files: MappedFiles, path: str, rec: DcpRecord, key: str):
    """``files.checked(path, rec)``, the record inside the file."""
    mm, whole = files.checked(path, rec)
    end = rec.offset + rec.length
    if end > whole.numel():
        raise IntegrityError(
            f"{path} holds {whole.numel()} bytes, but the checkpoint's metadata places "
            f"{key!r} at bytes {rec.offset}..{end}: the file is truncated -> restore it, "
            "or load another checkpoint")
    return mm, whole


def _record(files: MappedFiles, path: str, rec: DcpRecord, key: str, untransform=None):
    """The chunk ``rec`` of the mapped file ``path`` (checked): see :func:`parse_record`."""
    mm, whole = _mapped(files, path, rec, key)
    return parse_record(mm, whole, rec, rec.offset, path, key, untransform)


def parse_record(buf, whole: torch.Tensor, rec: DcpRecord, start: int, path: str, key: str,
                 untransform=None):
    """The chunk ``rec``, found at ``buf[start:]`` (a map or the bytes fetched for it;
    ``whole`` views the same bytes as ``uint8``): a :class:`Stored` view of them, or
    (anything but a plain ``torch.save``'d tensor) the object ``torch.load`` makes of it
    (``weights_only``: no code runs), after ``untransform`` (DCP's load transforms) when
    the record has any."""
    end = start + rec.length
    if not rec.transformed:
        layout = torch_save_layout(lambda pos, n: buf[pos:pos + n], start, rec.length)
        if layout is not None:
            return layout.stored(whole)
    if not rec.transformed:  # torch.load inflates and allocates what the archive declares
        check_record(buf, rec, start, path, key)
    try:
        stream = io.BytesIO(buf[start:end])
        if rec.transformed:
            stream = io.BytesIO(untransform(stream).read())
        return torch.load(stream, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever torch.load makes of damaged bytes
        raise IntegrityError(
            f"{path}: the record of {key!r} at bytes {rec.offset}..{rec.offset + rec.length} "
            f"cannot be read ({type(e).__name__}: {e}): the file is damaged -> check it "
            "with `dcp-universal verify`, restore it, or load another checkpoint") from e


def check_record(buf, rec: DcpRecord, start: int, path: str, key: str) -> None:
    """Refuse the record ``rec`` (at ``buf[start:]``) unless it is a ``torch.save``
    archive that ``torch.load`` reads within its own bytes (:func:`check_torch_archive`)."""
    what = f"{path}: the record of {key!r} at bytes {rec.offset}..{rec.offset + rec.length}"
    if not is_zip(buf[start:start + 4]):
        raise IntegrityError(f"{what} cannot be read: it is not a torch.save archive (DCP "
                             "writes one per record) "
                             "-> the file was damaged or crafted; load another checkpoint")
    check_torch_archive(lambda pos, n: buf[pos:pos + n], start, rec.length, what)


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
        raise CheckpointMismatchError(f"{req.storage_index.fqn!r}: the destination has shape "
                                      f"{list(dst.shape)}, the read {list(req.lengths)}")
    if type(planner).commit_tensor is not DefaultLoadPlanner.commit_tensor:
        copies = Copies()
    at = req.storage_offsets if offsets is None else offsets
    copies.take(req.dest_index.fqn, *pair(record, dst, at, req.lengths))
    planner.commit_tensor(req, dst)


def read_whole(path: str, state: dict[str, torch.Tensor], copies: Copies,
               metadata: Metadata | None = None, check=None) -> bool:
    """What ``dcp.load(state, no_dist=True)`` does, for one process reading whole plain
    tensors from the local DCP directory ``path``, without DCP's general planning.

    Each saved chunk (one per rank that wrote the tensor) is one copy into its block of
    the destination, through ``copies``. The chunks must cover every destination
    exactly, or :class:`CheckpointError`. ``check``: the directory's block check, run
    on every record before it is used. Returns ``False``, having read nothing, for a
    checkpoint this does not handle (records written through DCP's load transforms):
    the caller then uses ``dcp.load``.
    """
    md = metadata if metadata is not None else dcp_metadata(FileSystemReader(path))
    if any(dcp_record(md.storage_data, index).transformed for index in md.storage_data):
        return False
    wanted = []  # (key, destination, saved chunk, its record), in file order below
    for key, dst in state.items():
        tmd = md.state_dict_metadata.get(key)
        if not isinstance(tmd, TensorStorageMetadata) or tuple(tmd.size) != tuple(dst.shape):
            found = tuple(tmd.size) if isinstance(tmd, TensorStorageMetadata) else tmd
            raise CheckpointMismatchError(f"{path}: {key!r} is {found} in the checkpoint; the load "
                                          f"wants a tensor of shape {tuple(dst.shape)}")
        covered = 0
        for i, chunk in enumerate(tmd.chunks):
            wanted.append((key, dst, chunk, dcp_record(md.storage_data,
                                                       MetadataIndex(key, chunk.offsets, i))))
            covered += math.prod(chunk.sizes)
        if covered != dst.numel():
            raise IntegrityError(
                f"{path}: the saved chunks of {key!r} cover {covered} of its {dst.numel()} "
                "elements: the checkpoint's metadata is damaged -> load another checkpoint")
    wanted.sort(key=lambda w: (w[3].file, w[3].offset))
    files = MappedFiles(check)
    with _read_ahead_of([rec for *_, rec in wanted], functools.partial(os.path.join, path),
                        check, files) as ahead:
        for key, dst, chunk, rec in wanted:
            ahead.wait(rec.file, rec.offset + rec.length)
            record = _record(files, os.path.join(path, rec.file), rec, key)
            whole_chunk = tuple(chunk.sizes) == tuple(dst.shape) and not any(chunk.offsets)
            block = dst if whole_chunk else dst[
                tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes))]
            copies.take(key, *pair(record, block, (0,) * len(chunk.sizes), chunk.sizes))
    return True


def _read_ahead_of(records, path_of, check, maps: MappedFiles) -> ReadAhead:
    """A :class:`ReadAhead` of the DCP records ``records``, whole (``path_of(file
    name)``: the file's path; ``check``: the directory's block check)."""
    files: dict[str, tuple[str, str, list[tuple[int, int]], object]] = {}
    for rec in records:
        if rec.file not in files:
            files[rec.file] = (path_of(rec.file), rec.file, [], check)
        files[rec.file][2].append((rec.offset, rec.offset + rec.length))
    return ReadAhead(files, maps)


class MappedReader(FileSystemReader):
    """DCP's file-system reader, reading through :class:`MappedFiles`.

    Each tensor item costs one copy from the page cache into its destination (DCP's
    reader reads the record into a new tensor, then copies it). Items whose key is in
    ``copies.keys`` are not copied at all during ``read_data``: the copy waits in
    ``copies`` for the load's commit, so the whole read is validated first.
    """

    def __init__(self, path: str, copies: Copies | None = None,
                 metadata: Metadata | None = None, *, trusted: bool = False,
                 check=None) -> None:
        super().__init__(path)
        self.trusted = trusted  # unpickle .metadata without the allow-list
        self.check = check  # BlockCheck of every byte read, or None
        self.copies = copies if copies is not None else Copies()
        self._dir = path
        self._metadata = metadata  # read already while planning: not parsed again
        self._ahead: ReadAhead | None = None  # started by prepare_local_plan
        self._maps = MappedFiles(check)

    def read_whole(self, state: dict[str, torch.Tensor]) -> bool:
        """:func:`read_whole` of this directory (one process, whole plain tensors)."""
        return read_whole(self._dir, state, self.copies, self._metadata or self.read_metadata(),
                          self.check)

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._metadata is None or kwargs.get("rank") is not None:
            return dcp_metadata(self, rank=kwargs.get("rank"), trusted=self.trusted,
                                check=self.check)
        md = self._metadata  # as the parent's: tagged with this load's id
        meta = getattr(md, "storage_meta", None)
        if meta is None:
            meta = md.storage_meta = StorageMeta()
        meta.load_id = self.load_id
        return md

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        # this rank's reads are known: their bytes are read ahead from now on, while
        # the ranks agree on the global plan
        self._ahead = self._read_ahead(plan)
        return super().prepare_local_plan(plan)

    def _read_ahead(self, plan: LoadPlan) -> ReadAhead:
        self._maps = MappedFiles(self.check)
        return _read_ahead_of([dcp_record(self.storage_data, req.storage_index)
                               for req in plan.items], self._path_of, self.check, self._maps)

    def _path_of(self, name: str) -> str:
        return str(self.fs.concat_path(self.path, name))

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        ahead, self._ahead = self._ahead or self._read_ahead(plan), None
        with ahead:
            self._read_items(plan, planner, ahead)
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _read_items(self, plan: LoadPlan, planner: LoadPlanner, ahead: ReadAhead) -> None:
        files, paths = self._maps, {}
        place = {id(req): dcp_record(self.storage_data, req.storage_index) for req in plan.items}
        # in file order, behind the read-ahead
        for req in sorted(plan.items, key=lambda r: (place[id(r)].file, place[id(r)].offset)):
            rec = place[id(req)]
            ahead.wait(rec.file, rec.offset + rec.length)
            if rec.file not in paths:
                paths[rec.file] = self._path_of(rec.file)
            if req.type == LoadItemType.BYTE_IO:
                mm, _ = _mapped(files, paths[rec.file], rec, req.storage_index.fqn)
                check_record(mm, rec, rec.offset, paths[rec.file], req.storage_index.fqn)
                planner.load_bytes(req, io.BytesIO(mm[rec.offset:rec.offset + rec.length]))
                continue
            record = _record(files, paths[rec.file], rec, req.storage_index.fqn,
                             functools.partial(_torch_compat.untransformed, self, req, rec.info))
            take_read(planner, req, record, self.copies)
