"""Paths as the package spells them: ``str`` (``pathlib.Path`` mangles ``s3://`` into
``s3:/``), local paths and URLs alike, joined with ``/``."""

from __future__ import annotations

import os

__all__ = ["normalize", "join", "parent"]

_FILE_SCHEME = "file://"


def normalize(path: str) -> str:
    """``path`` as the rest of the package expects it: ``file://`` stripped (a local
    path), trailing slashes removed. Called once by every public entry point."""
    path = os.fspath(path)
    if path.startswith(_FILE_SCHEME):
        path = path[len(_FILE_SCHEME):]
    return path.rstrip("/") or "/"


def join(*parts: str) -> str:
    head, *rest = parts
    for p in rest:
        head = head.rstrip("/") + "/" + p.lstrip("/")
    return head


def parent(path: str) -> str:
    """The directory holding ``path`` (``"."`` for a bare relative name)."""
    head, _, _ = path.rstrip("/").rpartition("/")
    return head or "."
