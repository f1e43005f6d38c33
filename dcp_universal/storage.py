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

import json
import os
import queue
import re
import shutil
import warnings
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX
from torch.distributed.checkpoint.metadata import Metadata

from dcp_universal.errors import CheckpointError

__all__ = [
    "Storage", "join", "MODEL_DIR", "OPTIMIZER_DIR", "ADAPTERS_DIR", "MANIFEST",
    "METADATA_FILE", "FORMAT_VERSION",
]

MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
ADAPTERS_DIR = "adapters"
MANIFEST = "manifest.json"
METADATA_FILE = ".metadata"  # written by DCP, last, when a DCP directory is complete
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d{8,})$")
_BASE_RE = re.compile(r"^base-[0-9a-f]+$")


def join(*parts: str) -> str:
    head, *rest = parts
    for p in rest:
        head = head.rstrip("/") + "/" + p.lstrip("/")
    return head


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _single_process() -> bool:
    return not (dist.is_available() and dist.is_initialized())


class _OwnFiles:
    """Writer mixin: items named in ``own_file_keys`` each get a file of their own.

    DCP keeps every tensor of a file alive until the file is closed. Tensors that are
    views of the model cost nothing, but computed ones (merged LoRA weights) are new, so
    one file per computed item bounds the extra memory to about one local shard.
    """

    own_file_keys: frozenset = frozenset()

    def write_data(self, plan, planner):
        own = [i for i in plan.items if i.index.fqn in self.own_file_keys]
        rest = [i for i in plan.items if i.index.fqn not in self.own_file_keys]
        buckets = ([rest] if rest else []) + [[i] for i in own]
        files: queue.Queue = queue.Queue()
        for n, bucket in enumerate(buckets):
            name = f"{plan.storage_data.prefix}{n}{DEFAULT_SUFFIX}"
            files.put((self.fs.concat_path(self.path, name), name, bucket))
        return self._write_data(planner, files)


class _LocalWriter(_OwnFiles, FileSystemWriter):
    pass


def _fsspec_classes():
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    class _RemoteWriter(_OwnFiles, FsspecWriter):
        pass

    return _RemoteWriter, FsspecReader


class Storage:
    """Every storage operation, for local paths and fsspec URLs alike.

    Args:
        options: fsspec ``storage_options`` for URLs (ignored for local paths).
    """

    def __init__(self, options: dict | None = None) -> None:
        self.options = dict(options or {})

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
        return w

    def reader(self, path: str):
        if is_remote(path):
            return _fsspec_classes()[1](path, **self.options)
        return FileSystemReader(path)

    def save_state(self, state: dict, path: str, *, planner=None, own_file_keys=frozenset(),
                   single_process: bool = False) -> None:
        """``dcp.save`` of ``state`` to the DCP directory ``path``; collective unless no
        process group exists or ``single_process`` (rank 0 writing alone)."""
        with warnings.catch_warnings():
            # DCP warns on every save without a process group; ours are deliberate
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, storage_writer=self.writer(path, own_file_keys=own_file_keys),
                     planner=planner, no_dist=single_process or _single_process())

    def load_state(self, state: dict, path: str) -> None:
        """``dcp.load`` into ``state`` (in place) from the DCP directory ``path``; collective."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=self.reader(path), no_dist=_single_process())

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
            raise CheckpointError(f"{step_path} has no {MANIFEST}: it is not a committed step") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not valid JSON ({e}); the step is damaged") from None
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{path} has format_version {version!r}; this dcp_universal reads versions up "
                f"to {FORMAT_VERSION}: upgrade dcp_universal to read it")
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
            raise CheckpointError(f"checkpoint path {path} does not exist")
        raise CheckpointError(
            f"{path} is not a model checkpoint: expected a DCP directory (with {METADATA_FILE}) "
            f"or a step directory with {MODEL_DIR}/{METADATA_FILE}; pass the directory that "
            "save_model() or CheckpointManager.save() wrote")


def step_dir(root: str, step: int) -> str:
    return join(root, f"step-{step:08d}")


def base_dir(root: str, fingerprint: str) -> str:
    return join(root, f"base-{fingerprint}")
