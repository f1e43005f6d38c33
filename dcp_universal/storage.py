"""Paths, listing, manifests and commits: the one module that touches storage directly.

Every path is a ``str`` (local or, later, an fsspec URL); ``pathlib.Path`` is avoided on
purpose because it mangles ``s3://`` into ``s3:/``.

On-disk layout (see docs/format.md)::

    <root>/step-00000100/{model,optimizer,adapters}/ + manifest.json (written last)
    <root>/base-<fingerprint>/     frozen base weights shared by LoRA steps
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata

from dcp_universal.errors import CheckpointError

__all__ = [
    "save_state", "load_state", "read_metadata", "join", "exists", "resolve_model_dir", "step_dir", "list_steps", "read_manifest",
    "write_manifest", "remove_step", "remove_tree", "file_sizes", "list_bases",
    "MODEL_DIR", "OPTIMIZER_DIR", "ADAPTERS_DIR", "MANIFEST", "METADATA_FILE",
    "FORMAT_VERSION",
]

MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
ADAPTERS_DIR = "adapters"
MANIFEST = "manifest.json"
METADATA_FILE = ".metadata"  # written by DCP, last, when a DCP directory is complete
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d{8,})$")
_BASE_RE = re.compile(r"^base-[0-9a-f]+$")


def _single_process() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def save_state(state: dict, path: str, *, planner=None, writer=None, single_process: bool = False) -> None:
    """``dcp.save`` of ``state`` to the DCP directory ``path``; collective unless no
    process group exists or ``single_process`` (rank 0 writing alone)."""
    no_dist = single_process or _single_process()
    with warnings.catch_warnings():
        # DCP warns on every save without a process group; ours are deliberate
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=writer or FileSystemWriter(path), planner=planner,
                 no_dist=no_dist)


def load_state(state: dict, path: str) -> None:
    """``dcp.load`` into ``state`` (in place) from the DCP directory ``path``; collective."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=FileSystemReader(path), no_dist=_single_process())


def read_metadata(path: str) -> Metadata:
    return FileSystemReader(path).read_metadata()


def join(*parts: str) -> str:
    head, *rest = parts
    for p in rest:
        head = head.rstrip("/") + "/" + p.lstrip("/")
    return head


def exists(path: str) -> bool:
    return os.path.exists(path)


def step_dir(root: str, step: int) -> str:
    return join(root, f"step-{step:08d}")


def base_dir(root: str, fingerprint: str) -> str:
    return join(root, f"base-{fingerprint}")


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def list_steps(root: str, *, committed: bool = True) -> list[int]:
    """Step numbers under ``root``, ascending; only those with a manifest when ``committed``."""
    out = []
    for name in _listdir(root):
        m = _STEP_RE.match(name)
        if m and exists(join(root, name, MANIFEST)) == committed:
            out.append(int(m.group(1)))
    return sorted(out)


def list_bases(root: str) -> list[str]:
    return [n for n in _listdir(root) if _BASE_RE.match(n)]


def read_manifest(step_path: str) -> dict[str, Any]:
    path = join(step_path, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{step_path} has no {MANIFEST}: it is not a committed step") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the step is damaged") from None
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version!r}; this dcp_universal reads versions up to "
            f"{FORMAT_VERSION}: upgrade dcp_universal to read it")
    return manifest


def write_manifest(step_path: str, manifest: dict[str, Any]) -> None:
    """Commit a step: write the manifest atomically (temp file, fsync, rename)."""
    path = join(step_path, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(step_path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def remove_step(step_path: str) -> None:
    """Uncommit first (manifest), then delete: a kill halfway leaves only debris."""
    try:
        os.remove(join(step_path, MANIFEST))
    except FileNotFoundError:
        pass
    remove_tree(step_path)


def file_sizes(path: str) -> dict[str, int]:
    """Relative path -> size of every file under ``path``."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, path)] = os.path.getsize(full)
    return dict(sorted(out.items()))


def resolve_model_dir(path: str) -> str:
    """``path`` itself if it is a model DCP directory, else its ``model/`` child.

    Raises:
        CheckpointError: neither holds a DCP ``.metadata`` file.
    """
    if exists(join(path, METADATA_FILE)):
        return path
    inner = join(path, MODEL_DIR)
    if exists(join(inner, METADATA_FILE)):
        return inner
    if not exists(path):
        raise CheckpointError(f"checkpoint path {path} does not exist")
    raise CheckpointError(
        f"{path} is not a model checkpoint: expected a DCP directory (with {METADATA_FILE}) "
        f"or a step directory with {MODEL_DIR}/{METADATA_FILE}; pass the directory that "
        "save_model() or CheckpointManager.save() wrote"
    )
