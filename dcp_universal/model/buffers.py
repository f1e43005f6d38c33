"""Host buffers for staged loads and snapshots: in host memory (pinned when CUDA is
present, so device copies run at full speed), never a second copy on the device."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

__all__ = ["host_empty", "dtensor_like"]


def host_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised host tensor, pinned when CUDA is present (so copies to and from
    the device run at full speed)."""
    return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=torch.cuda.is_available())


def dtensor_like(local: torch.Tensor, t: DTensor) -> DTensor:
    """A DTensor with ``t``'s mesh, placements and global shape over ``local`` (a copy
    of ``t``'s local shard, e.g. in host memory)."""
    return DTensor.from_local(local, t.device_mesh, t.placements, run_check=False,
                              shape=t.shape, stride=t.stride())
