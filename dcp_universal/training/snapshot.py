"""Snapshots for asynchronous saves: host-memory copies of what a step writes, in
buffers reused from save to save.

A snapshot is taken on the caller's thread before ``save(blocking=False)`` returns, so
the caller may change model and optimizer in place at once; the background write reads
only the snapshot. Buffers live in host memory (pinned when CUDA is present, so device
copies run at full speed), keyed by where the tensor sits in the saved state; a buffer
of the same shape and dtype is reused by the next snapshot, and buffers the next one
does not use are dropped. So staging memory is bounded by one snapshot, allocated once.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from dcp_universal.model.buffers import dtensor_like, host_empty

__all__ = ["Snapshotter"]


class Snapshotter:
    """Takes snapshots into reused host buffers. One snapshot at a time: the manager
    waits for the previous save's background write before taking the next."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._used: set[str] = set()
        self._device_copies = False
        self.pin = torch.cuda.is_available()

    def begin(self) -> None:
        self._used = set()
        self._device_copies = False

    def end(self) -> None:
        """Drop the buffers this snapshot did not use; wait for device copies."""
        for key in set(self._buffers) - self._used:
            del self._buffers[key]
        if self._device_copies:
            torch.cuda.synchronize()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def copy(self, obj: Any, slot: str) -> Any:
        """A copy of ``obj`` (nested dicts, lists, tuples, dataclasses) whose tensors are
        staging buffers and whose other leaves are deep copies. A DTensor becomes a
        DTensor over a staged copy of its local shard (same mesh, placements, shape)."""
        if isinstance(obj, DTensor):
            return dtensor_like(self._copy(obj.to_local(), slot), obj)
        if isinstance(obj, torch.Tensor):
            return self._copy(obj, slot)
        if isinstance(obj, dict):
            return {k: self.copy(v, f"{slot}/{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
            return type(obj)(self.copy(v, f"{slot}/{i}") for i, v in enumerate(obj))
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            fields = [f.name for f in dataclasses.fields(obj) if f.init]
            return dataclasses.replace(
                obj, **{n: self.copy(getattr(obj, n), f"{slot}.{n}") for n in fields})
        return copy.deepcopy(obj)

    def _copy(self, t: torch.Tensor, key: str) -> torch.Tensor:
        t = t.detach()
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = host_empty(t.shape, t.dtype)
            self._buffers[key] = buf
        if key in self._used:
            raise ValueError(f"two tensors staged under one key {key!r}")
        self._used.add(key)
        non_blocking = self.pin and t.is_cuda
        self._device_copies |= non_blocking
        buf.copy_(t, non_blocking=non_blocking)
        return buf
