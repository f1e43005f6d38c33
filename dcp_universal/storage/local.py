"""The local file system, through ``os``: atomic writes by temp file, fsync and rename;
data files read through memory maps (:mod:`.mapped`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from typing import Callable

import torch

from dcp_universal.storage import dcp_files
from dcp_universal.storage.base import Storage, short_read
from dcp_universal.storage.mapped import Copies, MappedFiles, MappedReader

__all__ = ["LocalStorage"]


def _replace_synced(tmp: str, path: str) -> None:
    """fsync ``tmp``, rename it to ``path``, fsync the directory: the file appears whole."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _sync_dir(os.path.dirname(path))


def _sync_dir(path: str) -> None:
    dir_fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class LocalStorage(Storage):
    """A local file system, through ``os``; data files are read through memory maps."""

    maps_files = True
    renames = True

    def os_path(self, path: str) -> str:
        """The operating system's path of ``path`` (itself here; a subclass may map)."""
        return path

    def exists(self, path: str) -> bool:
        return os.path.exists(self.os_path(path))

    def is_file(self, path: str) -> bool:
        return os.path.isfile(self.os_path(path))

    def is_link(self, path: str) -> bool:
        return os.path.islink(self.os_path(path))

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(self.os_path(path)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def size(self, path: str) -> int:
        return os.path.getsize(self.os_path(path))

    def open_read(self, path: str):
        return open(self.os_path(path), "rb")

    def read_bytes(self, path: str) -> bytes:
        with open(self.os_path(path), "rb") as f:
            return f.read()

    def read_spans(self, path: str, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        _, whole = MappedFiles().get(self.os_path(path))
        out = []
        for start, n in spans:
            if start + n > whole.numel():
                raise short_read(path, start, n, whole.numel())
            out.append(whole[start:start + n])
        return out

    def makedirs(self, path: str) -> None:
        os.makedirs(self.os_path(path), exist_ok=True)

    def write_atomic(self, path: str, data: bytes) -> None:
        self.write_atomic_with(path, lambda tmp: _write_file(tmp, data))

    def write_atomic_with(self, path: str, write: Callable[[str], object]) -> None:
        local = self.os_path(path)
        tmp = f"{local}.{uuid.uuid4().hex[:12]}.tmp"  # two processes writing one file
        try:
            write(tmp)
            _replace_synced(tmp, local)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise

    def upload(self, local_path: str, path: str) -> None:
        os.makedirs(os.path.dirname(self.os_path(path)), exist_ok=True)  # a new step's tree
        super().upload(local_path, path)

    def create_new(self, path: str, data: bytes) -> bool:
        local = self.os_path(path)
        tmp = f"{local}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            _write_file(tmp, data)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.link(tmp, local)  # atomic, and refuses an existing name
        except FileExistsError:
            return False
        except FileNotFoundError:
            if os.path.exists(os.path.dirname(local)):
                return False  # the winner cleared this loser's temporary file
            raise
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        _sync_dir(os.path.dirname(local))
        return True

    def fenced_write(self, path: str, data: bytes, fence) -> None:
        # The temporary file lives in the fence's directory and is renamed out of it:
        # a job that took the lease over renamed that directory away first, so the
        # rename fails however long this process was paused since its check.
        if fence is None:
            return self.write_atomic(path, data)
        fence.check(f"writing {path}")
        tmp = os.path.join(self.os_path(fence.fence_dir), f"w-{uuid.uuid4().hex[:12]}.tmp")
        try:
            _write_file(tmp, data)
            _replace_synced(tmp, self.os_path(path))
        except FileNotFoundError:
            if not os.path.isdir(self.os_path(fence.fence_dir)):
                fence.lost(f"writing {path}")
            raise
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)

    def rename_dir(self, path: str, new_path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.os_path(path), self.os_path(new_path))

    def detach(self, path: str, marker: str | None, fence) -> str | None:
        if fence is None:
            return super().detach(path, marker, None)
        fence.check(f"removing {path}")
        local = self.os_path(path)
        if not os.path.lexists(local):
            return None
        moved = f"{fence.fence_dir}/d-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(local, self.os_path(moved))  # one step: in place, or neither
        except FileNotFoundError:
            if not os.path.isdir(self.os_path(fence.fence_dir)):
                fence.lost(f"removing {path}")
            if not os.path.lexists(local):
                return None
            raise
        if os.path.islink(self.os_path(moved)):
            os.remove(self.os_path(moved))
            return None
        return moved

    def remove_file(self, path: str) -> None:
        try:
            os.remove(self.os_path(path))
        except FileNotFoundError:
            pass

    def remove_tree(self, path: str) -> None:
        shutil.rmtree(self.os_path(path), ignore_errors=True)

    def file_sizes(self, path: str) -> dict[str, int]:
        top, out = self.os_path(path), {}
        for dirpath, _, files in os.walk(top):
            for name in files:
                full = os.path.join(dirpath, name)
                out[os.path.relpath(full, top)] = os.path.getsize(full)
        return dict(sorted(out.items()))

    def dcp_writer(self, path: str, *, own_file_keys=frozenset(), checksums: bool = True):
        return dcp_files.LocalWriter(self.os_path(path), own_file_keys=own_file_keys,
                                     checksums=checksums)

    def dcp_reader(self, path: str, copies: Copies | None = None, metadata=None, *,
                   trusted: bool = False):
        return MappedReader(self.os_path(path), copies, metadata, trusted=trusted,
                            check=self.checks.get(path))


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
