"""Staging buffers live in host memory, whatever device the target is on."""

from __future__ import annotations

import torch

from dcp_universal.model_io import load


def test_host_buffer_is_on_the_host_with_the_targets_layout():
    t = torch.randn(3, 5, dtype=torch.bfloat16, device="meta")  # any non-CPU device
    buf = load._host_buffer(t)
    assert buf.device.type == "cpu" and buf.shape == t.shape and buf.dtype == t.dtype
