"""Contracts with torch's private formats, pinned through torch's public API.

The package parses two formats torch does not document: the ``torch.save`` archive (a zip
of ``data.pkl`` and raw storages) and DCP's per-chunk storage records (``_StorageInfo``:
file, byte range, load transforms). Both parsers live in ``dcp_universal/torch_formats.py``.
These tests write with the public API (``torch.save``, ``dcp.save``) and read with ours:
a torch release that changes either format fails here, in one file, before a user's load.
"""

from __future__ import annotations

import ast
import io
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

import dcp_universal
from dcp_universal.format import torch_formats
from dcp_universal.storage.mapped import byte_view

PKG_DIR = os.path.dirname(dcp_universal.__file__)

TENSORS = {
    "f32": torch.randn(5, 7),
    "transposed": torch.randn(7, 5).t(),
    "offset-view": torch.randn(40)[3:23].view(4, 5),
    "permuted-int": torch.arange(24).reshape(2, 3, 4).permute(2, 0, 1),
    "scalar": torch.tensor(3.5),
    "empty": torch.randn(0, 4),
    "bf16": torch.randn(3, 4).to(torch.bfloat16),
    "f16": torch.randn(3, 3).half(),
    "int8": torch.randint(-5, 5, (9,), dtype=torch.int8),
    "bool": torch.rand(6) > 0.5,
    "f64": torch.randn(2, 2).double(),
}


def _saved(t) -> bytes:
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def _read_back(stored: torch_formats.Stored, like: torch.Tensor) -> torch.Tensor:
    dst = torch.empty(like.shape, dtype=like.dtype)
    d, s = stored.source_for(dst, (0,) * like.dim(), tuple(like.shape))
    d.copy_(s)
    return dst


@pytest.mark.parametrize("name", sorted(TENSORS))
def test_torch_save_then_our_layout_reader(name):
    t = TENSORS[name]
    record = b"pad" + _saved(t)  # records start unaligned inside a DCP data file
    layout = torch_formats.torch_save_layout(lambda p, n: record[p:p + n], 3, len(record) - 3)
    assert layout is not None, "torch.save's archive layout changed: update torch_formats.py"
    assert (layout.dtype, layout.size, layout.stride) == (t.dtype, tuple(t.shape), t.stride())
    assert layout.offset == t.storage_offset()
    got = _read_back(layout.stored(byte_view(record)), t)
    assert torch.equal(got, t)


def test_anything_but_a_plain_tensor_is_left_to_torch_load_and_runs_no_code():
    ran = []

    class Trap:
        def __reduce__(self):
            return (ran.append, ("unpickled",))

    for obj in ({"a": torch.ones(2)}, [torch.ones(2)], 3, Trap()):
        record = _saved(obj) if not isinstance(obj, Trap) else pickle.dumps(obj)
        assert torch_formats.torch_save_layout(lambda p, n: record[p:p + n], 0, len(record)) is None
    assert ran == []


def test_dcp_save_then_our_record_reader(tmp_path):
    """Every chunk DCP wrote is found through our record accessor, and its bytes are a
    torch.save archive our layout reader turns back into the saved chunk."""
    torch.manual_seed(0)
    state = {"w": torch.randn(6, 5), "b": torch.randn(5), "step": torch.tensor(7),
             "nested.x": torch.randn(3, 2).t()}
    dcp.save(state, checkpoint_id=str(tmp_path), no_dist=True)
    md = FileSystemReader(str(tmp_path)).read_metadata()
    seen = 0
    for key, tmd in md.state_dict_metadata.items():
        assert isinstance(tmd, TensorStorageMetadata)
        for i, chunk in enumerate(tmd.chunks):
            rec = torch_formats.dcp_record(md.storage_data, MetadataIndex(key, chunk.offsets, i))
            assert not rec.transformed
            data = (tmp_path / rec.file).read_bytes()
            assert rec.offset + rec.length <= len(data)
            layout = torch_formats.torch_save_layout(lambda p, n: data[p:p + n], rec.offset,
                                                     rec.length)
            assert layout is not None, "DCP's record format changed: update torch_formats.py"
            got = _read_back(layout.stored(byte_view(data)), state[key])
            assert torch.equal(got, state[key]), key
            seen += 1
    assert seen == len(state)
    assert all(not torch_formats.dcp_record(md.storage_data, k).transformed
               for k in md.storage_data)


def test_the_private_formats_are_read_in_one_module():
    """Only torch_formats.py (and _torch_compat.py, for DCP's own untransform) reads DCP's
    storage records' fields or parses a pickle or zip by hand."""
    private_attrs = {"relative_path", "transform_descriptors"}
    offenders = {}
    for dirpath, _, files in os.walk(PKG_DIR):
        for name in sorted(f for f in files if f.endswith(".py")):
            if name in ("torch_formats.py", "_torch_compat.py"):
                continue
            with open(os.path.join(dirpath, name)) as f:
                tree = ast.parse(f.read())
            hits = [n.lineno for n in ast.walk(tree)
                    if isinstance(n, ast.Attribute) and n.attr in private_attrs
                    or isinstance(n, ast.Attribute) and n.attr == "Unpickler"
                    or isinstance(n, ast.Import) and any(a.name == "struct" for a in n.names)]
            if hits:
                offenders[os.path.relpath(os.path.join(dirpath, name), PKG_DIR)] = hits
    assert not offenders, offenders
