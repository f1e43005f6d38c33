"""Storage: one protocol for every file system the package touches, one implementation
per kind of root, chosen once where a path enters (:func:`storage_for`).

Paths stay ``str`` because ``pathlib.Path`` mangles ``s3://`` into ``s3:/``. A local
path (``file://`` URLs are stripped by :func:`normalize` at every public entry point)
gets :class:`LocalStorage`; any other URL gets :class:`FsspecStorage` with the caller's
``storage_options`` (e.g. ``endpoint_url``), unless a backend was registered for its
scheme (:func:`register_backend`). Nothing outside this folder asks whether a path is
remote: it asks its storage, which knows what it can do (:attr:`Storage.maps_files`).

Atomicity policy (:meth:`Storage.write_atomic`): on a local disk a temp file, fsynced,
then renamed; on an object store, where there is no rename, one PUT, which the store
makes visible whole or not at all.

A new backend is one subclass and one registration. It implements the seven core
methods (:class:`Storage`'s abstract ones: ``exists``, ``size``, ``listdir``,
``open_read``, ``write_atomic``, ``create_new``, ``remove_file``); everything else has a
default on them, DCP's reader and writer included (:mod:`.dcp_store`: files written
locally, then uploaded whole; ranged reads through ``read_spans``), with every file's
size and block checksums recorded as on any other backend::

    >>> class DictStore(Storage):                   # "dict://k" lives in FILES["dict://k"]
    ...     def exists(self, path):
    ...         return path in FILES or any(k.startswith(path + "/") for k in FILES)
    ...     def size(self, path): return len(FILES[path])      # KeyError -> FileNotFoundError
    ...     def listdir(self, path): ...                       # names directly below, sorted
    ...     def open_read(self, path): return io.BytesIO(FILES[path])
    ...     def write_atomic(self, path, data): FILES[path] = data
    ...     def create_new(self, path, data): ...              # False if it exists (atomic)
    ...     def remove_file(self, path): FILES.pop(path, None)
    >>> register_backend("dict", DictStore)

(the whole of it: ``tests/unit/test_storage_backend.py``). A faster way is a capability
it overrides or declares: ``read_spans`` (ranged reads of its own), ``write_atomic_with``
and ``upload`` (a file sent without holding it in memory), ``file_sizes`` (one listing),
``dcp_reader`` / ``dcp_writer``, :attr:`Storage.maps_files` (memory maps: a subclass of
:class:`LocalStorage`, whose ``os_path`` maps a URL to a local path) and
:attr:`Storage.renames`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from dcp_universal._paths import join, normalize, parent
from dcp_universal._registry import Registry
from dcp_universal.storage.base import Storage
from dcp_universal.storage.fsspec import FsspecStorage
from dcp_universal.storage.local import LocalStorage

__all__ = ["Storage", "LocalStorage", "FsspecStorage", "storage_for", "register_backend",
           "unregister_backend", "Backend", "join", "normalize", "parent"]


@dataclasses.dataclass(frozen=True)
class Backend:
    """A registered storage backend: URLs ``<name>://...`` get ``factory(options)``."""

    name: str
    factory: Callable[[dict], Storage]


_BACKENDS: Registry[Backend] = Registry("a storage backend")


def register_backend(scheme: str, factory: Callable[[dict], Storage]) -> None:
    """Serve URLs ``<scheme>://...`` with ``factory(options)`` (a :class:`Storage`
    subclass, say) instead of fsspec. Registering the same factory again is a no-op;
    another one under a taken scheme is refused (ValueError)."""
    if not scheme or "://" in scheme:
        raise ValueError(f"scheme={scheme!r}: expected a URL scheme such as 'mirror'")
    _BACKENDS.add(Backend(scheme, factory))


def unregister_backend(scheme: str) -> None:
    """Serve ``<scheme>://...`` URLs with fsspec again."""
    if scheme in _BACKENDS:
        _BACKENDS.remove(_BACKENDS.named(scheme))


def storage_for(path: str, options: dict | None = None) -> Storage:
    """The storage of ``path`` (a normalized local path or URL): a registered backend for
    its scheme, else fsspec for URLs and the local file system for paths."""
    scheme, sep, _ = path.partition("://")
    if not sep:
        return LocalStorage(options)
    if scheme in _BACKENDS:
        return _BACKENDS.named(scheme).factory(options or {})
    return FsspecStorage(options)
