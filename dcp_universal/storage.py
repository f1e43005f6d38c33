"""Paths: where a checkpoint's pieces live. Every path is a ``str`` (local or fsspec URL);
``pathlib.Path`` is avoided on purpose because it mangles ``s3://`` into ``s3:/``."""

from __future__ import annotations

import os

from dcp_universal.errors import CheckpointError

__all__ = ["join", "exists", "resolve_model_dir", "MODEL_DIR", "METADATA_FILE"]

MODEL_DIR = "model"
METADATA_FILE = ".metadata"  # written by DCP, last, when a DCP directory is complete


def join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts[:-1]) + "/" + parts[-1] if len(parts) > 1 else parts[0]


def exists(path: str) -> bool:
    return os.path.exists(path)


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
