"""Mapped reads (dcp_universal.storage.mapped): the bytes located in a torch.save record equal what
torch.load reads, every block lands where DCP would put it, and a load that fails after
the model was prepared leaves the model untouched."""

from __future__ import annotations

import io
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

import tiny
from dcp_universal import CheckpointManager, apply_lora, load_model, save_model
from dcp_universal.storage import mapped
from dcp_universal.format import torch_formats
from dcp_universal.errors import CheckpointIOError, IntegrityError
from train_loop import Data, assert_same, build, snapshot, train

LAYOUTS = {
    "f32": torch.randn(5, 7),
    "transposed": torch.randn(7, 5).t(),
    "permuted-int": torch.arange(24).reshape(2, 3, 4).permute(2, 0, 1),
    "scalar": torch.tensor(3.5),
    "empty": torch.randn(0, 4),
    "bf16": torch.randn(3, 4).to(torch.bfloat16),
    "bool": torch.rand(6) > 0.5,
    "channels-last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
    "f16-odd": torch.randn(3, 3).half(),
}


def _torch_save_tensor(mm, whole, start, length):
    """The tensor torch.save wrote at ``mm[start:start + length]``, viewing the map."""
    layout = torch_formats.torch_save_layout(lambda p, n: mm[p:p + n], start, length)
    return None if layout is None else layout.stored(whole)


def _blocks(shape):
    """The whole tensor, a dim-0 cut, a last-dim cut and an inner block."""
    out = [((0,) * len(shape), tuple(shape))]
    if shape and shape[0] > 1:
        out.append(((1,) + (0,) * (len(shape) - 1), (shape[0] - 1,) + tuple(shape[1:])))
    if len(shape) > 1 and shape[-1] > 1:
        out.append(((0,) * (len(shape) - 1) + (1,), tuple(shape[:-1]) + (shape[-1] - 1,)))
        out.append(((1,) * len(shape), tuple(max(n - 1, 0) for n in shape)))
    return out


@pytest.fixture
def records(tmp_path):
    """Every layout torch.save'd back to back after a 3-byte prefix, so most records
    start at offsets not aligned for their dtype (as in a DCP data file)."""
    buf = io.BytesIO()
    buf.write(b"xyz")
    spans = {}
    for name, t in LAYOUTS.items():
        start = buf.tell()
        torch.save(t, buf)
        spans[name] = (start, buf.tell() - start)
    path = tmp_path / "records.bin"
    path.write_bytes(buf.getvalue())
    return mapped.MappedFiles().get(str(path)), spans


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_located_record_equals_torch_load_in_every_block(records, name):
    (mm, whole), spans = records
    t = LAYOUTS[name]
    stored = _torch_save_tensor(mm, whole, *spans[name])
    assert stored is not None
    assert (stored.dtype, stored.size, stored.stride) == (t.dtype, tuple(t.shape), t.stride())
    for offsets, lengths in _blocks(tuple(t.shape)):
        want = t[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))]
        dst = torch.full(lengths, 7, dtype=t.dtype) if t.dtype != torch.bool else torch.zeros(lengths, dtype=torch.bool)
        d, s = stored.source_for(dst, offsets, lengths)
        d.copy_(s)
        assert torch.equal(dst, want), (name, offsets, lengths)
    # a destination of another dtype gets converted values, as dcp.load gives
    if t.dtype.is_floating_point:
        dst = torch.empty(tuple(t.shape), dtype=torch.float64)
        d, s = stored.source_for(dst, (0,) * t.dim(), tuple(t.shape))
        d.copy_(s)
        assert torch.equal(dst, t.double())


def test_contiguous_blocks_are_copied_as_bytes_of_the_map(records):
    (mm, whole), spans = records
    stored = _torch_save_tensor(mm, whole, *spans["f32"])
    dst = torch.empty(4, 7)
    d, s = stored.source_for(dst, (1, 0), (4, 7))
    assert s.dtype == torch.uint8 and s.numel() == 4 * 7 * 4
    # the source is a view of the file's pages, not a copy
    assert s.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
    with pytest.raises(Exception, match="does not fit"):
        stored.source_for(torch.empty(3, 7), (1, 0), (4, 7))


def test_anything_but_a_plain_saved_tensor_is_left_to_torch_load(tmp_path):
    for obj in (torch.nn.Parameter(torch.randn(3)), {"a": torch.randn(2)}, [1, 2]):
        buf = io.BytesIO()
        torch.save(obj, buf)
        path = tmp_path / "one.bin"
        path.write_bytes(buf.getvalue())
        mm, whole = mapped.MappedFiles().get(str(path))
        assert _torch_save_tensor(mm, whole, 0, len(buf.getvalue())) is None
    buf = io.BytesIO()
    torch.save(torch.randn(3), buf, _use_new_zipfile_serialization=False)  # not a zip
    path.write_bytes(buf.getvalue())
    mm, whole = mapped.MappedFiles().get(str(path))
    assert _torch_save_tensor(mm, whole, 0, len(buf.getvalue())) is None


def test_mapped_reads_equal_dcp_load_for_a_whole_model(tmp_path):
    model = tiny.make("plain", seed=3)
    path = str(tmp_path / "m")
    save_model(model, path)
    want = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    dcp.load(want, storage_reader=FileSystemReader(path), no_dist=True)
    got = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    copies = mapped.Copies(got)
    assert mapped.read_whole(path, got, copies)
    assert all(not v.any() for v in got.values())  # every copy waits for run()
    copies.run()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def _damage(path):
    """Zero the end record of the file's last zip archive: same size, unreadable."""
    data = bytearray(open(path, "rb").read())
    data[-22:] = bytes(22)
    open(path, "wb").write(data)


def _data_files(directory):
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".distcp"))


def test_damaged_or_truncated_model_file_raises_and_leaves_the_model_untouched(tmp_path):
    for how in ("damaged", "truncated"):
        path = str(tmp_path / how)
        save_model(tiny.make("plain", seed=3), path)
        (data,) = _data_files(path)
        if how == "damaged":
            _damage(data)
        else:
            os.truncate(data, os.path.getsize(data) - 100)
        target = tiny.make("plain", seed=4)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(IntegrityError, match="cannot be read" if how == "damaged" else "truncated"):
            load_model(target, path, verify=False)  # unchecked: the parse finds it
        with pytest.raises(IntegrityError, match="fails its checksum" if how == "damaged" else
                           "has .* bytes, the manifest says"):
            load_model(target, path)  # checked: the sizes and checksums find it first
        assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items()), how


def _job(variant, seed):
    torch.manual_seed(seed)
    model, opt, sched = build(variant, "none", 1, seed=seed)
    train(model, opt, sched, Data(0), {"step": 0}, 2)
    return model, opt


@pytest.mark.parametrize("variant, damaged", [
    ("plain", "optimizer"),   # the model is prepared in full, then the optimizer fails
    ("lora4", "adapters"),    # base read, then the adapters' directory fails
])
def test_local_load_failing_after_the_model_was_prepared_leaves_everything_untouched(
        tmp_path, variant, damaged):
    model, opt = _job(variant, 0)
    mgr = CheckpointManager(str(tmp_path / "root"))
    mgr.save(1, model, opt)
    target, topt = _job(variant, 1)
    before = snapshot(target, topt)
    for f in _data_files(os.path.join(mgr.step_path(1), damaged)):
        _damage(f)
    with pytest.raises((IntegrityError, CheckpointIOError), match="fails its checksum"):
        mgr.load(target, topt)  # the block checksums find it before it is parsed
    assert_same(target, topt, before)
    with pytest.raises((IntegrityError, CheckpointIOError), match="cannot be read"):
        mgr.load(target, topt, verify=False)  # unchecked: the parse fails, as safely
    assert_same(target, topt, before)


def test_merging_load_of_a_lora_step_into_a_plain_model_matches_the_merged_function(tmp_path):
    """Adapted weights are staged (the delta is added to them), the rest waits: the
    result is the merged model, exactly as before mapped reads."""
    lora = tiny.make("lora4", seed=5)
    tiny.randomize_adapters(lora, seed=6)
    mgr = CheckpointManager(str(tmp_path / "root"))
    mgr.save(1, lora)
    plain = tiny.make("plain", seed=7)
    load_model(plain, mgr.step_path(1))
    x = tiny.fixed_input()
    assert torch.allclose(plain(x), lora(x), atol=1e-5)
    again = tiny.make("lora2", seed=8)  # other targets and rank: merged, then fresh adapters
    load_model(again, mgr.step_path(1))
    assert torch.allclose(again(x), lora(x), atol=1e-5)
