"""The library's own non-tensor state (training state, optimizer metadata) as bytes,
readable without running code from the checkpoint.

Written as ``torch.save`` archives and read with ``torch.load(weights_only=True)``:
torch's own allow-listed unpickler (tensors, containers, numbers, strings), plus numpy's
array types (a numpy RNG state). Blobs written before this format (plain pickles) are
read with the restricted unpickler of :mod:`.torch_formats`. Anything else (a user's
class in an ``extra`` object's state) raises
:class:`~dcp_universal.errors.UnsafeCheckpointError` unless the caller passes
``trusted=True``.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch

from dcp_universal.errors import UnsafeCheckpointError
from dcp_universal.format.torch_formats import check_blob, numpy_safe_globals, restricted_loads

__all__ = ["dumps", "loads"]

_ZIP = b"PK\x03\x04"


def dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def loads(blob: bytes, what: str, *, trusted: bool = False) -> Any:
    """The object :func:`dumps` wrote (or an older plain pickle), built from plain data
    only unless ``trusted``. Bounded first, trusted or not: a blob whose reading would
    cost more memory than its bytes (a compressed entry, a storage larger than its
    record, a pickle asking for a huge allocation) raises
    :class:`~dcp_universal.errors.IntegrityError`."""
    blob = bytes(blob)
    check_blob(blob, what)
    if not blob.startswith(_ZIP):  # a plain pickle, as written before this format
        return pickle.loads(blob) if trusted else restricted_loads(
            blob, what, tensors=True, numpy=True)
    if trusted:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()):
            return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = next((line.strip() for line in str(e).splitlines()
                      if "GLOBAL" in line or "Unsupported" in line), str(e).splitlines()[0])
        raise UnsafeCheckpointError(
            f"{what} holds an object that is not plain data ({found}): reading it would run "
            "code from the checkpoint -> load with trusted=True (CLI: --trusted) only if you "
            "trust whoever wrote it") from None
