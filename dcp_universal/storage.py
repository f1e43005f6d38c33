"""Paths, DCP readers and writers, listing, manifests and commits: the one module that
touches storage. A root is a local path or any fsspec URL (``s3://bucket/prefix``).

Paths stay ``str`` because ``pathlib.Path`` mangles ``s3://`` into ``s3:/``. Local paths
go through ``os`` and DCP's ``FileSystemWriter`` (fsync, rename); URLs through fsspec
and DCP's ``FsspecWriter``, with the caller's ``storage_options`` (e.g. ``endpoint_url``).

Atomicity policy: a step is committed by its ``manifest.json``, written last. On a local
disk it is a temp file, fsynced, then renamed; on an object store, where there is no
rename, it is one PUT, which the store makes visible whole or not at all.

On-disk layout: see docs/format.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import warnings
import zlib
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata

from dcp_universal import _comm
from dcp_universal.errors import (CheckpointIOError, FormatVersionError, IntegrityError,
                                  ManifestError, NotACheckpointError)

__all__ = [
    "Storage", "join", "MODEL_DIR", "OPTIMIZER_DIR", "ADAPTERS_DIR", "MANIFEST",
    "METADATA_FILE", "FORMAT_VERSION", "BASE_FILES",
]

MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
ADAPTERS_DIR = "adapters"
MANIFEST = "manifest.json"
BASE_FILES = "files.json"  # a base's file records, written last: its presence completes the base
METADATA_FILE = ".metadata"  # written by DCP, last, when a DCP directory is complete
FORMAT_VERSION = 1
COMPUTED_FILE_BYTES = 32 << 20  # see _OwnFiles
_STEP_RE = re.compile(r"^step-(\d{8,})$")
_BASE_RE = re.compile(r"^base-[0-9a-f]+$")


def join(*parts: str) -> str:
    head, *rest = parts
    for p in rest:
        head = head.rstrip("/") + "/" + p.lstrip("/")
    return head


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


@contextlib.contextmanager
def _io_errors(doing: str, path: str):
    """DCP reports a failure on any rank to every rank as one CheckpointException; turn
    it into a CheckpointIOError that names the path and the first failing rank's cause."""
    try:
        yield
    except CheckpointException as e:
        failures = getattr(e, "failures", {}) or {}
        rank, cause = next(iter(sorted(failures.items(), key=lambda kv: kv[0])), (None, e))
        cause = cause[0] if isinstance(cause, tuple) else cause  # (exception, traceback)
        raise CheckpointIOError(
            f"{doing} {path} failed on rank(s) {sorted(failures) or '?'}: rank {rank}: "
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
        files: queue.Queue = queue.Queue()
        for n, bucket in enumerate(buckets):
            name = f"{plan.storage_data.prefix}{n}{DEFAULT_SUFFIX}"
            files.put((self.fs.concat_path(self.path, name), name, bucket))
        return self._write_data(planner, files)


def _item_bytes(item) -> int:
    props = item.tensor_data.properties
    n = 1
    for d in item.tensor_data.chunk.sizes:
        n *= d
    return n * props.dtype.itemsize


class _LocalWriter(_OwnFiles, FileSystemWriter):
    pass


class _CrcStream:
    """Passes writes through, keeping the CRC-32 and size of everything written."""

    def __init__(self, inner) -> None:
        self._inner, self.crc, self.size = inner, 0, 0

    def write(self, data) -> int:
        n = self._inner.write(data)
        self.crc = zlib.crc32(data, self.crc)
        self.size += memoryview(data).nbytes
        return n

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _Checksummed:
    """Wraps a DCP writer's file system so every file's size and CRC-32 are computed
    while it is written, never by reading it back. ``files``: name -> (size, crc32)."""

    def __init__(self, inner) -> None:
        self._inner, self.files = inner, {}

    def __getattr__(self, name):
        return getattr(self._inner, name)

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with self._inner.create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            crc = _CrcStream(stream)
            yield crc
        self.files[os.path.basename(os.fspath(path))] = (crc.size, crc.crc)

    def rename(self, path, new_path) -> None:
        self._inner.rename(path, new_path)
        old = os.path.basename(os.fspath(path))
        if old in self.files:
            self.files[os.path.basename(os.fspath(new_path))] = self.files.pop(old)


def _fsspec_classes():
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    class _RemoteWriter(_OwnFiles, FsspecWriter):
        pass

    return _RemoteWriter, FsspecReader


class Storage:
    """Every storage operation, for local paths and fsspec URLs alike.

    Args:
        options: fsspec ``storage_options`` for URLs (ignored for local paths).
        checksums: compute every written file's CRC-32 while writing it (for manifests;
            a bare model directory has nowhere to record them, so ``save_model`` skips it).
    """

    def __init__(self, options: dict | None = None, *, checksums: bool = True) -> None:
        self.options = dict(options or {})
        self.checksums = checksums

    # ---- filesystem primitives --------------------------------------------------------

    def _fs(self, path: str):
        from fsspec.core import url_to_fs

        return url_to_fs(path, **self.options)

    def exists(self, path: str) -> bool:
        if not is_remote(path):
            return os.path.exists(path)
        fs, p = self._fs(path)
        fs.invalidate_cache(p.rsplit("/", 1)[0])
        return fs.exists(p)

    def listdir(self, path: str) -> list[str]:
        """Names directly under ``path`` (empty if it does not exist)."""
        if not is_remote(path):
            try:
                return sorted(os.listdir(path))
            except FileNotFoundError:
                return []
        fs, p = self._fs(path)
        fs.invalidate_cache(p)
        try:
            return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=False))
        except FileNotFoundError:
            return []

    def read_bytes(self, path: str) -> bytes:
        if not is_remote(path):
            with open(path, "rb") as f:
                return f.read()
        fs, p = self._fs(path)
        return fs.cat_file(p)

    def write_atomic(self, path: str, data: bytes) -> None:
        """Whole or not at all: temp + fsync + rename locally, one PUT remotely."""
        if is_remote(path):
            fs, p = self._fs(path)
            fs.pipe_file(p, data)
            return
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def remove_file(self, path: str) -> None:
        if not is_remote(path):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            return
        fs, p = self._fs(path)
        if fs.exists(p):
            fs.rm_file(p)

    def remove_tree(self, path: str) -> None:
        if not is_remote(path):
            shutil.rmtree(path, ignore_errors=True)
            return
        fs, p = self._fs(path)
        fs.invalidate_cache(p)
        if fs.exists(p):
            fs.rm(p, recursive=True)

    def file_sizes(self, path: str) -> dict[str, int]:
        """Relative path -> size of every file under ``path``."""
        out = {}
        if not is_remote(path):
            for dirpath, _, files in os.walk(path):
                for name in files:
                    full = os.path.join(dirpath, name)
                    out[os.path.relpath(full, path)] = os.path.getsize(full)
        else:
            fs, p = self._fs(path)
            fs.invalidate_cache(p)
            for full, info in fs.find(p, detail=True).items():
                out[full[len(p.rstrip("/")) + 1:]] = int(info["size"])
        return dict(sorted(out.items()))

    # ---- DCP --------------------------------------------------------------------------

    def writer(self, path: str, *, own_file_keys=frozenset()):
        if is_remote(path):
            cls = _fsspec_classes()[0]
            w = cls(path, **self.options)
        else:
            w = _LocalWriter(path)
        w.own_file_keys = frozenset(own_file_keys)
        if self.checksums:
            w.fs = _Checksummed(w.fs)
        return w

    def reader(self, path: str):
        if is_remote(path):
            return _fsspec_classes()[1](path, **self.options)
        return FileSystemReader(path)

    def save_state(self, state: dict, path: str, *, planner=None, own_file_keys=frozenset(),
                   single_process: bool = False) -> dict[str, tuple[int, int]]:
        """``dcp.save`` of ``state`` to the DCP directory ``path``; collective unless no
        process group exists or ``single_process`` (rank 0 writing alone).

        Returns:
            ``{file name: (size, crc32)}`` of the files this rank wrote (empty without
            ``checksums``).
        """
        writer = self.writer(path, own_file_keys=own_file_keys)
        with warnings.catch_warnings(), _io_errors("writing", path):
            # DCP warns on every save without a process group; ours are deliberate
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, storage_writer=writer, planner=planner,
                     no_dist=single_process or not _comm.is_distributed())
        return dict(getattr(writer.fs, "files", {}))

    def load_state(self, state: dict, path: str) -> None:
        """``dcp.load`` into ``state`` (in place) from the DCP directory ``path``; collective."""
        with warnings.catch_warnings(), _io_errors("reading", path):
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=self.reader(path), no_dist=not _comm.is_distributed())

    def read_metadata(self, path: str) -> Metadata:
        return self.reader(path).read_metadata()

    # ---- steps ------------------------------------------------------------------------

    def list_steps(self, root: str, *, committed: bool = True) -> list[int]:
        """Step numbers under ``root``, ascending; only those with a manifest when ``committed``."""
        out = []
        for name in self.listdir(root):
            m = _STEP_RE.match(name)
            if m and (MANIFEST in self.listdir(join(root, name))) == committed:
                out.append(int(m.group(1)))
        return sorted(out)

    def list_bases(self, root: str) -> list[str]:
        return [n for n in self.listdir(root) if _BASE_RE.match(n)]

    def read_manifest(self, step_path: str) -> dict[str, Any]:
        path = join(step_path, MANIFEST)
        try:
            manifest = json.loads(self.read_bytes(path))
        except FileNotFoundError:
            raise NotACheckpointError(
                f"{step_path} has no {MANIFEST}: it is not a committed step (a save that "
                "did not finish leaves such a directory; the next save removes it)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{path} is not valid JSON ({e}): the step is damaged; load "
                                "an earlier step (CheckpointManager.steps())") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("format_version"), int):
            raise ManifestError(f"{path} is not a dcp_universal manifest (no integer "
                                "format_version): the step is damaged; load an earlier step")
        if manifest["format_version"] > FORMAT_VERSION:
            raise FormatVersionError(
                f"{path} has format_version {manifest['format_version']}; this dcp_universal "
                f"reads versions up to {FORMAT_VERSION}: upgrade dcp_universal to read it")
        return manifest

    def write_manifest(self, step_path: str, manifest: dict[str, Any]) -> None:
        """Commit a step."""
        self.write_atomic(join(step_path, MANIFEST),
                          json.dumps(manifest, indent=1, sort_keys=True).encode())

    def remove_step(self, step_path: str) -> None:
        """Uncommit first (manifest), then delete: a kill halfway leaves only debris."""
        self.remove_file(join(step_path, MANIFEST))
        self.remove_tree(step_path)

    def resolve_model_dir(self, path: str) -> str:
        """``path`` itself if it is a model DCP directory, else its ``model/`` child.

        Raises:
            CheckpointError: neither holds a DCP ``.metadata`` file.
        """
        if self.exists(join(path, METADATA_FILE)):
            return path
        inner = join(path, MODEL_DIR)
        if self.exists(join(inner, METADATA_FILE)):
            return inner
        if not self.exists(path):
            raise NotACheckpointError(f"checkpoint path {path} does not exist")
        raise NotACheckpointError(
            f"{path} is not a model checkpoint: expected a DCP directory (with {METADATA_FILE}) "
            f"or a step directory with {MODEL_DIR}/{METADATA_FILE}; pass the directory that "
            "save_model() or CheckpointManager.save() wrote")


    # ---- integrity --------------------------------------------------------------------

    def _crc32(self, path: str, chunk: int = 16 << 20) -> int:
        crc = 0
        opener = open if not is_remote(path) else (lambda p, m: self._fs(p)[0].open(self._fs(p)[1], m))
        with opener(path, "rb") as f:
            while block := f.read(chunk):
                crc = zlib.crc32(block, crc)
        return crc

    def check_files(self, path: str, files: dict[str, dict], *, checksums: bool = False,
                    prefixes: tuple[str, ...] = ("",)) -> None:
        """Compare the files under ``path`` whose names start with one of ``prefixes``
        with the manifest's record: sizes always (one listing), CRC-32 when asked (a full
        read). Raises :class:`IntegrityError` naming the first bad file."""
        wanted = {rel: rec for rel, rec in files.items() if rel.startswith(prefixes)}
        if not wanted:
            return
        found = self.file_sizes(path)
        for rel, rec in sorted(wanted.items()):
            full = join(path, rel)
            if rel not in found:
                raise IntegrityError(f"{full} is missing (the manifest lists {rec['size']} bytes); "
                                     "the checkpoint is damaged: load an earlier step")
            if found[rel] != rec["size"]:
                raise IntegrityError(
                    f"{full} has {found[rel]} bytes, the manifest says {rec['size']}: the file "
                    "is truncated or was rewritten; load an earlier step")
            if checksums and "crc32" in rec:
                crc = self._crc32(full)
                if crc != rec["crc32"]:
                    raise IntegrityError(
                        f"{full} fails its checksum (crc32 {crc:08x}, manifest {rec['crc32']:08x}): "
                        "its bytes changed after the save; load an earlier step")


def step_dir(root: str, step: int) -> str:
    return join(root, f"step-{step:08d}")
