"""Ranged reads of part of a record (what a resharding load from S3 does): a record's
layout is found from its head and tail alone, and only the bytes of the needed block are
fetched. The reader runs here over fsspec's in-memory filesystem, so every fetch is
counted exactly."""

from __future__ import annotations

import io

import fsspec
import pytest
import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from dcp_universal.storage import dcp_files, dcp_io
from dcp_universal.format import torch_formats
from dcp_universal.storage import storage_for

from test_mapped import LAYOUTS, _blocks


def _without_data(record: bytes, layout: torch_formats.Layout):
    """A read that has the record's bytes except its tensor data."""
    end = layout.data + layout.nbytes
    return dcp_files._Pieces({0: record[:layout.data], end: record[end:]}).read


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_a_block_read_from_its_span_alone_equals_the_block(name):
    t = LAYOUTS[name]
    buf = io.BytesIO()
    torch.save(t, buf)
    record = buf.getvalue()
    full = torch_formats.torch_save_layout(lambda p, n: record[p:p + n], 0, len(record))
    layout = torch_formats.torch_save_layout(_without_data(record, full), 0, len(record))
    assert layout == full  # found without a byte of the data
    for offsets, lengths in _blocks(tuple(t.shape)):
        start, n = layout.span(offsets, lengths)
        raw = torch.frombuffer(bytearray(record[start:start + n]), dtype=torch.uint8) if n \
            else torch.empty(0, dtype=torch.uint8)
        block = layout.block(raw, lengths)
        dst = torch.zeros(lengths, dtype=t.dtype)
        d, s = block.source_for(dst, (0,) * len(lengths), lengths)
        d.copy_(s)
        want = t[tuple(slice(o, o + k) for o, k in zip(offsets, lengths))]
        assert torch.equal(dst, want), (name, offsets, lengths)
    if t.dim() == 2 and t.is_contiguous() and t.shape[0] >= 3:  # a run of rows: its bytes
        assert layout.span((1, 0), (2, t.shape[1]))[1] == 2 * t.shape[1] * t.element_size()
    if t.dim():
        with pytest.raises(Exception, match="outside its saved chunk"):
            layout.span((0,) * t.dim(), tuple(n + 1 for n in t.shape))


def test_a_missing_byte_of_the_layout_gives_none_not_garbage():
    buf = io.BytesIO()
    torch.save(torch.randn(64, 64), buf)
    record = buf.getvalue()
    head_only = dcp_files._Pieces({0: record[:4096]}).read
    assert torch_formats.torch_save_layout(head_only, 0, len(record)) is None


class _CountingFS:
    """The in-memory filesystem, counting the bytes ``cat_ranges`` returns."""

    def __init__(self, fs) -> None:
        self.fs, self.fetched = fs, 0

    def cat_ranges(self, paths, starts, ends, **kw):
        out = self.fs.cat_ranges(paths, starts, ends, **kw)
        self.fetched += sum(len(d) for d in out)
        return out


def _read(path, key, chunk_offsets, chunk_index, offsets, lengths, dtype):
    """One ranged read of the block at ``offsets`` of ``lengths`` of ``key``'s saved chunk
    ``chunk_index``, as a resharding load plans it; returns (block, bytes fetched)."""
    reader = storage_for(path).dcp_reader(path)
    md = reader.read_metadata()
    reader.set_up_storage_reader(md, True)
    state = {key: torch.full(lengths, -1.0, dtype=dtype)}
    planner = DefaultLoadPlanner()
    planner.set_up_planner(state, md, True)
    item = ReadItem(LoadItemType.TENSOR, MetadataIndex(key, (0,) * len(lengths)),
                    (0,) * len(lengths), MetadataIndex(key, chunk_offsets, chunk_index),
                    offsets, lengths)
    counting = _CountingFS(fsspec.filesystem("memory"))
    reader.fs.fs = counting
    reader.read_data(LoadPlan([item]), planner).wait()
    return state[key], counting.fetched


def test_resharding_reads_fetch_the_needed_rows_and_a_probe_only():
    torch.manual_seed(0)
    big = torch.randn(1024, 256)            # 1 MiB, row-major
    wide = torch.randn(256, 1024).t()       # saved transposed: a column layout
    small = torch.randn(64, 64)             # 16 KiB: fetched whole
    path = "memory://ranged/ckpt"
    dcp_io.save_state(storage_for(path), {"big": big, "wide": wide, "small": small}, path)
    try:
        block, fetched = _read(path, "big", (0, 0), 0, (300, 0), (200, 256), torch.float32)
        assert torch.equal(block, big[300:500])
        need = 200 * 256 * 4
        assert need <= fetched <= need + 2 * dcp_files.PROBE_BYTES, fetched

        block, fetched = _read(path, "wide", (0, 0), 0, (0, 10), (1024, 20), torch.float32)
        assert torch.equal(block, wide[:, 10:30])  # columns of the stored rows: a span

        block, fetched = _read(path, "small", (0, 0), 0, (10, 0), (5, 64), torch.float32)
        assert torch.equal(block, small[10:15])
        assert fetched >= small.numel() * 4  # the whole record: a probe would not pay
    finally:
        fsspec.filesystem("memory").rm("/ranged", recursive=True)


class _CountingRanges:
    """Every range the in-memory filesystem's ``cat_ranges`` is asked for (patched)."""

    def __init__(self, monkeypatch) -> None:
        self.ranges: list[tuple[str, int, int]] = []
        cls = type(fsspec.filesystem("memory"))
        original = cls.cat_ranges

        def counted(fs, paths, starts, ends, **kw):
            self.ranges += list(zip(paths, starts, ends))
            return original(fs, paths, starts, ends, **kw)

        monkeypatch.setattr(cls, "cat_ranges", counted)


def test_a_file_read_whole_costs_a_request_per_part_not_per_record(monkeypatch):
    torch.manual_seed(0)
    state = {f"w{i}": torch.randn(64, 64) for i in range(20)}  # 20 records of 16 KiB
    path = "memory://parts/ckpt"
    dcp_io.save_state(storage_for(path), state, path)
    try:
        monkeypatch.setattr(dcp_files, "PART_BYTES", 100_000)
        counting = _CountingRanges(monkeypatch)
        got = {k: torch.zeros_like(v) for k, v in state.items()}
        dcp_io.load_state(storage_for(path), got, path)
        for k in state:
            assert torch.equal(got[k], state[k]), k
        data = [r for r in counting.ranges if r[0].endswith(".distcp")]
        size = fsspec.filesystem("memory").size(data[0][0])
        # the records are adjacent: one span, cut in 100 kB parts that tile it
        assert len({p for p, _, _ in data}) == 1
        assert len(data) == -(-sum(e - s for _, s, e in data) // 100_000) <= -(-size // 100_000)
        assert all(e - s <= 100_000 for _, s, e in data)
        starts = sorted(s for _, s, _ in data)
        assert starts == [starts[0] + i * 100_000 for i in range(len(starts))]
    finally:
        fsspec.filesystem("memory").rm("/parts", recursive=True)


def test_a_truncated_remote_object_fails_the_load_and_leaves_the_model_untouched():
    from dcp_universal import CheckpointError, load_model, save_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    path = "memory://truncated/ckpt"
    save_model(model, path)
    try:
        fs = fsspec.filesystem("memory")
        data = [p for p in fs.find("/truncated") if p.endswith(".distcp")]
        for p in data:
            fs.pipe(p, fs.cat(p)[:-100])
        target = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(CheckpointError, match="shorter|truncated|damaged"):
            load_model(target, path)
        for k, v in target.state_dict().items():
            assert torch.equal(v, before[k]), k
    finally:
        fsspec.filesystem("memory").rm("/truncated", recursive=True)


def test_probes_coalesce_with_the_small_records_between_them(monkeypatch):
    """A resharding read of layers (a big weight read in part, a small bias read whole,
    back to back in the file): a weight's tail probe, the next bias and the next
    weight's head are one request, so n layers cost n + 1 requests of probes and small
    records, plus n of rows (16 before coalescing: 3 per weight, 1 per bias)."""
    torch.manual_seed(0)
    n = 4
    state = {}
    for i in range(n):
        state[f"l{i}.b"] = torch.randn(256)
        state[f"l{i}.w"] = torch.randn(512, 256)  # 512 KiB
    path = "memory://coalesce/ckpt"
    dcp_io.save_state(storage_for(path), state, path)
    try:
        reader = storage_for(path).dcp_reader(path)
        md = reader.read_metadata()
        order = sorted(md.storage_data.items(), key=lambda kv: kv[1].offset)
        assert [k.fqn for k, _ in order] == list(state), "the records are not in key order"
        assert all(a[1].offset + a[1].length == b[1].offset for a, b in zip(order, order[1:]))
        reader.set_up_storage_reader(md, True)
        want = {k: v[100:300] if k.endswith(".w") else v for k, v in state.items()}
        got = {k: torch.zeros_like(v) for k, v in want.items()}
        planner = DefaultLoadPlanner()
        planner.set_up_planner(got, md, True)
        items = []
        for key, v in want.items():
            offsets = (100, 0) if key.endswith(".w") else (0,)
            items.append(ReadItem(LoadItemType.TENSOR, MetadataIndex(key, (0,) * v.dim()),
                                  (0,) * v.dim(), MetadataIndex(key, (0,) * v.dim(), 0),
                                  offsets, tuple(v.shape)))
        counting = _CountingRanges(monkeypatch)
        reader.read_data(LoadPlan(items), planner).wait()
        for key in want:
            assert torch.equal(got[key], want[key]), key
        assert len(counting.ranges) == 2 * n + 1, counting.ranges
        fetched = sum(e - s for _, s, e in counting.ranges)
        needed = sum(v.numel() * 4 for v in want.values())
        assert fetched <= needed + 2 * n * dcp_files.PROBE_BYTES + n * 2048  # + the bias zips
    finally:
        fsspec.filesystem("memory").rm("/coalesce", recursive=True)
