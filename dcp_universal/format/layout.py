"""The step layout: the one module that spells a step, base or item directory name
and the files a checkpoint directory holds.

Layout under a root (local path or fsspec URL)::

    <root>/step-00000100/{model,optimizer,adapters}/ + manifest.json
    <root>/base-<fingerprint>/ + files.json
"""

from __future__ import annotations

import re
from typing import Protocol

from dcp_universal.errors import UnsafeCheckpointError
from dcp_universal._paths import join, parent

__all__ = ["MAX_STEP", "MODEL_DIR", "OPTIMIZER_DIR", "ADAPTERS_DIR", "ITEMS", "MANIFEST",
           "BASE_FILES", "METADATA_FILE", "HF_SINGLE", "HF_INDEX", "MODEL_INFO", "inside",
           "step_name", "step_path", "split_step_path", "base_name", "base_fingerprint",
           "base_path", "step_of_name", "is_base_name"]


class _NamesBase(Protocol):  # a Manifest
    base: str | None


#: the largest step number: a signed 64-bit integer, as a training loop's counter and a
#: tensor hold it; a step directory's name has 8 to 19 digits
MAX_STEP = 2 ** 63 - 1

MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
ADAPTERS_DIR = "adapters"
ITEMS = (MODEL_DIR, ADAPTERS_DIR, OPTIMIZER_DIR)
MANIFEST = "manifest.json"
BASE_FILES = "files.json"  # a base's file records, written last: its presence completes it
METADATA_FILE = ".metadata"  # written by DCP, last, when a DCP directory is complete
# Hugging Face safetensors, as transformers' save_pretrained names them
HF_SINGLE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
# beside a save_model directory's DCP files: what DCP's metadata cannot say (tie groups);
# written before DCP's .metadata, so every complete model directory has it
MODEL_INFO = "dcp_universal.json"

# ASCII digits only (``\d`` also matches other scripts' digits, which int() accepts)
_STEP_RE = re.compile(r"step-([0-9]{8,19})")
_BASE_RE = re.compile(r"^base-[0-9a-f]+$")


def inside(relative: str, where: str) -> str:
    """``relative`` itself, if it names a file below its directory (a relative path
    with no ``..`` part, no backslash, no drive), else :class:`UnsafeCheckpointError`:
    a name read from a checkpoint never leads outside it."""
    parts = relative.split("/")
    if (not relative or relative.startswith("/") or "\\" in relative or ":" in parts[0]
            or any(p in ("", ".", "..") for p in parts)):
        raise UnsafeCheckpointError(
            f"{where} names {relative!r}, which is not a file inside the checkpoint: a "
            "checkpoint never refers outside its directory -> the file was written by "
            "another tool or edited; do not load it")
    return relative


def step_name(step: int) -> str:
    """The one name of step ``step``'s directory: ``step-`` and at least 8 digits.

    Raises:
        ValueError: ``step`` is not an integer from 0 to :data:`MAX_STEP`.
    """
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise ValueError(f"step={step!r}: expected an integer from 0 to {MAX_STEP}")
    return f"step-{step:08d}"


def step_path(root: str, step: int) -> str:
    return join(root, step_name(step))


def split_step_path(path: str) -> tuple[str, int] | None:
    """``(root, step)`` of a step directory's path, or None if it does not name one."""
    step = step_of_name(path.rstrip("/").rpartition("/")[2])
    return None if step is None else (parent(path), step)


def base_name(fingerprint: str) -> str:
    return f"base-{fingerprint}"


def base_fingerprint(name: str) -> str:
    return name.removeprefix("base-")


def base_path(step_dir: str, manifest: _NamesBase) -> str | None:
    """Where the base named by ``manifest`` (a step of ``step_dir``) lives: beside it."""
    return join(parent(step_dir), manifest.base) if manifest.base else None


def step_of_name(name: str) -> int | None:
    """The step number of a step directory's name, else None. Only the name
    :func:`step_name` spells is a step: ``step-000000100`` (an extra zero),
    ``step-+0000100``, other scripts' digits and steps over :data:`MAX_STEP` are not,
    so one step is one directory (never listed twice, loaded from a look-alike, or
    removed by retention)."""
    m = _STEP_RE.fullmatch(name)
    if m is None:
        return None
    step = int(m.group(1))
    return step if step <= MAX_STEP and step_name(step) == name else None


def is_base_name(name: str) -> bool:
    return bool(_BASE_RE.match(name))
