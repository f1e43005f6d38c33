"""The read-ahead of local loads (dcp_universal.storage.read_ahead: read_ahead, ReadAhead and
storage.steps.read_ahead_own): pages come in in file order, every block is checked as
it arrives (partial ranges widened to whole blocks, nothing else), a damaged or short
file is refused with the error a mapped read gives, and a cold load through it equals
one through the maps alone."""

from __future__ import annotations

import os

import crc32c
import pytest

from dcp_universal import CheckpointManager
from dcp_universal.errors import IntegrityError
from dcp_universal.format.manifest import FileRecord
from dcp_universal.storage import LocalStorage, steps
from dcp_universal.storage import read_ahead as ra
from dcp_universal.storage.integrity import BlockCheck
from train_loop import Data, assert_same, build, snapshot, train

BLOCK = 1000  # not a power of two, and READ_AHEAD_BYTES below is not a multiple of it


@pytest.fixture(autouse=True)
def small_reads(monkeypatch):
    monkeypatch.setattr(ra, "READ_AHEAD_BYTES", 2500)
    monkeypatch.setattr(ra, "READ_AHEAD_GAP", 0)


def _file(tmp_path, n_bytes: int = 10 * BLOCK + 300, name: str = "__0_0.distcp"):
    """A file of random bytes and the BlockCheck of its directory (its true sums)."""
    data = os.urandom(n_bytes)
    path = tmp_path / name
    path.write_bytes(data)
    sums = b"".join(crc32c.crc32c(data[a:a + BLOCK]).to_bytes(4, "big")
                    for a in range(0, n_bytes, BLOCK))
    rec = FileRecord(size=n_bytes, algo="crc32c", block=BLOCK, sums=sums)
    return str(path), data, BlockCheck(str(tmp_path), {name: rec}, require=True)


def _evict(path: str) -> None:
    """Drop the file's pages from the page cache (clean pages: written back first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_partial_ranges_check_their_whole_blocks_and_nothing_else(tmp_path):
    path, _, check = _file(tmp_path)
    seen = []
    ra.read_ahead(path, "__0_0.distcp", [(1500, 2200), (7100, 7200)], check,
                      progress=seen.append)
    assert check._done["__0_0.distcp"] == {1, 2, 7}
    assert seen == sorted(seen) and seen[-1] == 8000  # in file order, whole blocks
    # a second pass finds nothing left to check, and reads nothing
    assert check.unchecked("__0_0.distcp", 1000, 3000) == []
    assert check.unchecked("__0_0.distcp", 900, 8100) == [(0, 1000), (3000, 7000), (8000, 9000)]


def test_reads_cut_at_block_boundaries_cover_the_whole_file_and_its_short_last_block(tmp_path):
    path, _, check = _file(tmp_path)
    seen = []
    ra.read_ahead(path, "__0_0.distcp", [(0, 10 * BLOCK + 300)], check,
                      progress=seen.append)
    assert check._done["__0_0.distcp"] == set(range(11))
    assert all(p % BLOCK == 0 for p in seen[:-1]) and seen[-1] == 10 * BLOCK + 300
    assert all(b - a <= 2500 for a, b in zip([0, *seen], seen))  # reads of bounded size


def test_a_flipped_bit_is_refused_naming_the_file_and_the_block(tmp_path):
    path, data, check = _file(tmp_path)
    damaged = bytearray(data)
    damaged[5 * BLOCK + 17] ^= 0x04
    open(path, "wb").write(damaged)
    with pytest.raises(IntegrityError, match=r"__0_0\.distcp fails its checksum .*block 5"):
        ra.read_ahead(path, "__0_0.distcp", [(0, len(data))], check)
    assert 5 not in check._done["__0_0.distcp"]  # never remembered as good
    assert {0, 1, 2, 3, 4} <= check._done["__0_0.distcp"]


def test_a_file_shorter_than_its_records_is_refused_as_truncated(tmp_path):
    path, data, check = _file(tmp_path)
    open(path, "wb").write(data[:7 * BLOCK + 500])
    with pytest.raises(IntegrityError, match="truncated"):
        ra.read_ahead(path, "__0_0.distcp", [(6 * BLOCK, 9 * BLOCK)], check)
    # without checksums the pass stops quietly: the mapped read refuses the record
    ra.read_ahead(path, "__0_0.distcp", [(6 * BLOCK, 9 * BLOCK)], None)


def test_a_crafted_block_size_larger_than_a_read_is_left_to_the_mapped_reads(tmp_path):
    path, data, _ = _file(tmp_path)
    rec = FileRecord(size=len(data), algo="crc32c", block=1 << 30,
                     sums=crc32c.crc32c(data).to_bytes(4, "big"))
    check = BlockCheck(str(tmp_path), {"__0_0.distcp": rec}, require=True)
    ra.read_ahead(path, "__0_0.distcp", [(0, len(data))], check)  # no pass, no error
    assert not check._done.get("__0_0.distcp")


def test_the_thread_raises_its_error_at_the_loads_next_wait(tmp_path):
    path, data, check = _file(tmp_path)
    _, _, other_check = _file(tmp_path, name="__1_0.distcp")
    damaged = bytearray(data)
    damaged[2 * BLOCK] ^= 1
    open(path, "wb").write(damaged)
    _evict(path)
    ahead = ra.ReadAhead({"__0_0.distcp": (path, "__0_0.distcp", [(0, len(data))], check)})
    ahead.wait("not read ahead", 10)  # a file it was not given: at once
    with pytest.raises(IntegrityError, match="block 2"):
        ahead.wait("__0_0.distcp", len(data))
    with pytest.raises(IntegrityError):
        ahead.finish()


def test_a_file_in_memory_already_is_left_to_the_load(tmp_path):
    path, data, check = _file(tmp_path)
    assert ra.in_memory(path, [(0, len(data))])  # just written
    _evict(path)
    assert not ra.in_memory(path, [(0, len(data))])
    _evict(path)  # (a probe that misses may start the kernel's own read-ahead)
    ahead = ra.ReadAhead({"f": (path, "__0_0.distcp", [(0, len(data))], check)})
    ahead.finish()
    assert check._done["__0_0.distcp"] == set(range(11))  # cold: read and checked
    _, _, fresh = _file(tmp_path, name="__2_0.distcp")
    warm = str(tmp_path / "__2_0.distcp")
    ahead = ra.ReadAhead({"g": (warm, "__2_0.distcp", [(0, len(data))], fresh)})
    ahead.finish()
    assert not fresh._done.get("__2_0.distcp")  # warm: nothing repeated ahead of the load


def _evict_tree(root: str) -> None:
    for folder, _, names in os.walk(root):
        for name in names:
            _evict(os.path.join(folder, name))


@pytest.mark.parametrize("ahead", [True, False])
def test_a_cold_load_read_ahead_equals_one_through_the_maps_alone(tmp_path, monkeypatch, ahead):
    monkeypatch.setattr(ra, "READ_AHEAD", ahead)
    passes = []
    real = ra.read_ahead
    monkeypatch.setattr(ra, "read_ahead",
                        lambda path, *a, **k: passes.append(os.path.basename(path))
                        or real(path, *a, **k))
    model, opt, sched = build("plain", "single", 1)
    data, counters = Data(0), {"step": 0}
    train(model, opt, sched, data, counters, until=2)
    mgr = CheckpointManager(str(tmp_path / "run"))
    mgr.save(2, model, opt, extra={"sched": sched})
    saved = snapshot(model, opt)
    train(model, opt, sched, data, counters, until=4)  # move away from step 2
    _evict_tree(str(tmp_path / "run"))
    mgr.load(model, opt, extra={"sched": sched})
    assert_same(model, opt, saved)
    assert bool(passes) == ahead


def test_a_damaged_cold_file_fails_the_load_and_leaves_the_job_untouched(tmp_path):
    model, opt, sched = build("plain", "single", 1)
    data, counters = Data(0), {"step": 0}
    train(model, opt, sched, data, counters, until=2)
    mgr = CheckpointManager(str(tmp_path / "run"))
    mgr.save(2, model, opt, extra={"sched": sched})
    train(model, opt, sched, data, counters, until=3)
    before = snapshot(model, opt)
    opt_file = tmp_path / "run" / "step-00000002" / "optimizer" / "__0_0.distcp"
    raw = bytearray(opt_file.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    opt_file.write_bytes(raw)
    _evict_tree(str(tmp_path / "run"))
    with pytest.raises(IntegrityError, match="fails its checksum"):
        mgr.load(model, opt, extra={"sched": sched})
    assert_same(model, opt, before)


class _Manifest:
    def __init__(self, world_size: int, files: dict) -> None:
        self.world_size, self.files = world_size, files


def test_the_early_read_ahead_takes_this_ranks_files_at_the_saved_world_size(tmp_path):
    step = tmp_path / "step-00000001"
    files = {}
    for folder in ("model", "optimizer", "adapters"):
        (step / folder).mkdir(parents=True)
        for rank in (0, 1):
            name = f"{folder}/__{rank}_0.distcp"
            (step / name).write_bytes(b"x" * 100)
            files[name] = FileRecord(size=100)
    files["model/.metadata"] = FileRecord(size=10)
    _evict_tree(str(step))
    store = LocalStorage()
    m = _Manifest(2, files)
    ahead = steps.read_ahead_own(store, str(step), m, ["model", "optimizer"], 1, 2)
    assert ahead is not None
    assert sorted(ahead._files) == ["model/__1_0.distcp", "optimizer/__1_0.distcp"]
    ahead.finish()
    assert steps.read_ahead_own(store, str(step), m, ["model"], 1, 3) is None  # resharding
    monkeypatch_free = ra.READ_AHEAD
    assert monkeypatch_free is True
