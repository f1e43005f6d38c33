"""Any fsspec URL (``s3://``, ``gs://``, ``memory://``, ...): one PUT per atomic write,
ranged reads of exactly the bytes wanted (:mod:`.dcp_files`)."""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Callable

import torch

from dcp_universal.errors import CheckpointError, CheckpointIOError
from dcp_universal.storage import dcp_files
from dcp_universal.storage.base import Storage, short_read
from dcp_universal.storage.mapped import Copies, byte_view

__all__ = ["FsspecStorage"]

# what a caller handles itself: a missing file, the package's own errors, bad arguments
_PASSED_ON = (FileNotFoundError, CheckpointError, TypeError, ValueError, AttributeError)


def _store_errors_named(doing: str):
    """``method(self, path, ...)``'s failures of the store (a refused connection, a 5xx
    after the retries, denied access: botocore's errors are not even ``OSError``) become
    :class:`~dcp_universal.CheckpointIOError` naming the operation, the path and the fix."""

    def wrap(method):
        @functools.wraps(method)
        def run(self, path, *args, **kwargs):
            try:
                return method(self, path, *args, **kwargs)
            except _PASSED_ON:
                raise
            except Exception as e:
                err = CheckpointIOError(
                    f"{doing} {path} failed: {type(e).__name__}: {e} -> check that the store "
                    "is reachable and the job may use it (storage_options: endpoint_url, "
                    "credentials; the network), then retry")
                err.errno = getattr(e, "errno", None)
                raise err from e
        return run
    return wrap


class FsspecStorage(Storage):
    """Any fsspec URL (``s3://``, ``gs://``, ``memory://``, ...), with ``options`` as
    fsspec's ``storage_options``. Reads are ranged reads of exactly the bytes wanted."""

    def fs(self, path: str):
        """``(fsspec filesystem, path inside it)``."""
        from fsspec.core import url_to_fs

        try:
            return url_to_fs(path, **self.options)
        except ImportError as e:  # fsspec knows the scheme, its backend is not installed
            extra = " -> install the s3 extra (from a clone: pip install -e '.[s3]')" \
                if path.startswith(("s3://", "s3a://")) else ""
            raise CheckpointError(f"{path}: {e}{extra}") from None

    @_store_errors_named("looking for")
    def exists(self, path: str) -> bool:
        fs, p = self.fs(path)
        fs.invalidate_cache(p.rsplit("/", 1)[0])
        return fs.exists(p)

    @_store_errors_named("looking at")
    def is_file(self, path: str) -> bool:
        fs, p = self.fs(path)
        fs.invalidate_cache(p.rsplit("/", 1)[0])
        return fs.isfile(p)

    @_store_errors_named("listing")
    def listdir(self, path: str) -> list[str]:
        fs, p = self.fs(path)
        fs.invalidate_cache(p)
        try:
            return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=False))
        except FileNotFoundError:
            return []

    @_store_errors_named("asking the size of")
    def size(self, path: str) -> int:
        fs, p = self.fs(path)
        return int(fs.size(p))

    @_store_errors_named("opening")
    def open_read(self, path: str):
        fs, p = self.fs(path)
        return fs.open(p, "rb")

    @_store_errors_named("reading")
    def read_bytes(self, path: str) -> bytes:
        fs, p = self.fs(path)
        return fs.cat_file(p)

    @_store_errors_named("reading")
    def read_spans(self, path: str, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        if not spans:
            return []
        fs, p = self.fs(path)
        datas = fs.cat_ranges([p] * len(spans), [s for s, _ in spans],
                              [s + n for s, n in spans])
        out = []
        for (start, n), data in zip(spans, datas):
            if isinstance(data, Exception):
                raise data
            if len(data) != n:
                raise short_read(path, start, n, start + len(data))
            out.append(byte_view(data))
        return out

    @_store_errors_named("making")
    def makedirs(self, path: str) -> None:
        # Only a file system with real directories needs them made. Never on an object
        # store: s3fs's makedirs creates a missing bucket, which would hide a bucket
        # deleted under a running job.
        from fsspec.implementations.local import LocalFileSystem

        fs, p = self.fs(path)
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(p, exist_ok=True)

    @_store_errors_named("writing")
    def write_atomic(self, path: str, data: bytes) -> None:
        fs, p = self.fs(path)
        fs.pipe_file(p, data)

    def write_atomic_with(self, path: str, write: Callable[[str], object]) -> None:
        # a local temporary file, uploaded in one put
        with tempfile.TemporaryDirectory(prefix="dcpu-upload-") as d:
            local = os.path.join(d, "data")
            write(local)  # its own errors are its own, not the store's
            self._upload(path, local)

    @_store_errors_named("uploading")
    def _upload(self, path: str, local: str) -> None:
        fs, p = self.fs(path)
        fs.put_file(local, p)

    def upload(self, local_path: str, path: str) -> None:
        self._upload(path, local_path)  # one put (multipart for large files)

    @_store_errors_named("creating")
    def create_new(self, path: str, data: bytes) -> bool:
        fs, p = self.fs(path)
        try:  # S3: a conditional PUT (If-None-Match: *)
            fs.pipe_file(p, data, mode="create")
        except FileExistsError:
            return False
        return True

    @_store_errors_named("removing")
    def remove_file(self, path: str) -> None:
        fs, p = self.fs(path)
        if fs.exists(p):
            fs.rm_file(p)

    @_store_errors_named("removing")
    def remove_tree(self, path: str) -> None:
        fs, p = self.fs(path)
        fs.invalidate_cache(p)
        if fs.exists(p):
            fs.rm(p, recursive=True)

    @_store_errors_named("listing")
    def file_sizes(self, path: str) -> dict[str, int]:
        fs, p = self.fs(path)
        fs.invalidate_cache(p)
        out = {full[len(p.rstrip("/")) + 1:]: int(info["size"])
               for full, info in fs.find(p, detail=True).items()}
        return dict(sorted(out.items()))

    def dcp_writer(self, path: str, *, own_file_keys=frozenset(), checksums: bool = True):
        return dcp_files.remote_classes()[0](path, own_file_keys=own_file_keys,
                                             checksums=checksums, **self.options)

    def dcp_reader(self, path: str, copies: Copies | None = None, metadata=None, *,
                   trusted: bool = False):
        if copies is not None and copies.keys:
            raise ValueError(f"{path}: copies can wait only for memory-mapped files")
        reader = dcp_files.remote_classes()[1](path, **self.options)
        reader.trusted = trusted
        reader.check = self.checks.get(path)
        return reader
