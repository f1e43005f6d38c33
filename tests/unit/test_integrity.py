"""Integrity's own contract, on bytes on disk: the records a checksummed write makes,
and what ``check_files`` and ``BlockCheck`` report for a flipped bit, a truncated file,
a missing file, an extra file and a missing or damaged sums file."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import zlib

import crc32c
import pytest

from dcp_universal.errors import IntegrityError, NotACheckpointError
from dcp_universal.format.manifest import FileRecord
from dcp_universal.storage import LocalStorage, checksums, integrity
from dcp_universal.storage.integrity import BlockCheck, Checksummed, check_files

BLOCK = 16


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 bytes, and a sums file for more than 2 blocks."""
    monkeypatch.setattr(checksums, "BLOCK_BYTES", BLOCK)  # where files are summed
    monkeypatch.setattr(checksums, "INLINE_BLOCKS", 2)


class _Dir:
    """A directory as a DCP writer's file system sees it (``create_stream``, ``rename``)."""

    def __init__(self, path: str) -> None:
        self.path = path

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with open(path, mode) as f:
            yield f

    def rename(self, path, new_path) -> None:
        os.rename(path, new_path)


def _write(fs: Checksummed, path: str, *chunks: bytes) -> None:
    with fs.create_stream(path, "wb") as f:
        for c in chunks:
            f.write(c)


def _sums(data: bytes, block: int = BLOCK) -> bytes:
    return b"".join(crc32c.crc32c(data[i:i + block]).to_bytes(4, "big")
                    for i in range(0, len(data), block))


def _flip(path: str, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x01]))


@pytest.fixture
def step(tmp_path, small_blocks):
    """A directory of two files written through Checksummed, and their records."""
    fs = Checksummed(_Dir(str(tmp_path)))
    _write(fs, str(tmp_path / "a.bin"), b"0123456789", b"abcdefghij")  # 20 bytes, 2 blocks
    (tmp_path / "m").mkdir()
    _write(fs, str(tmp_path / "m" / "b.bin"), b"B" * 5)
    files = {"a.bin": fs.files["a.bin"], "m/b.bin": fs.files["b.bin"]}
    return str(tmp_path), files


# ---- what a write records ---------------------------------------------------------------

def test_a_write_records_the_size_and_crc32c_of_every_block_across_write_boundaries(
        tmp_path, small_blocks, monkeypatch):
    monkeypatch.setattr(checksums, "INLINE_BLOCKS", 4)
    fs = Checksummed(_Dir(str(tmp_path)))
    data = bytes(range(50))
    _write(fs, str(tmp_path / "x"), data[:7], data[7:40], data[40:])
    rec = fs.files["x"]
    assert (rec.size, rec.algo, rec.block) == (50, "crc32c", BLOCK)
    assert rec.sums == _sums(data)  # 4 blocks: 16, 16, 16, 2 bytes
    assert rec.sidecar is None


def test_a_write_of_at_most_inline_blocks_keeps_its_sums_in_its_record(tmp_path, small_blocks):
    fs = Checksummed(_Dir(str(tmp_path)))
    _write(fs, str(tmp_path / "x"), b"y" * 32)
    assert fs.files == {"x": FileRecord(size=32, algo="crc32c", block=BLOCK,
                                        sums=_sums(b"y" * 32))}
    assert os.listdir(tmp_path) == ["x"]


def test_a_larger_write_keeps_its_sums_in_a_sums_file_with_a_record_of_its_own(
        tmp_path, small_blocks):
    fs = Checksummed(_Dir(str(tmp_path)))
    data = os.urandom(3 * BLOCK + 1)
    _write(fs, str(tmp_path / "x"), data)
    side = (tmp_path / "x.sums").read_bytes()
    assert side == _sums(data)
    assert fs.files["x"] == FileRecord(size=len(data), algo="crc32c", block=BLOCK,
                                       sidecar="x.sums")
    assert fs.files["x.sums"] == FileRecord(size=16, algo="crc32c", block=16,
                                            sums=crc32c.crc32c(side).to_bytes(4, "big"))


def test_a_rename_moves_the_record_and_the_sums_file_with_it(tmp_path, small_blocks):
    fs = Checksummed(_Dir(str(tmp_path)))
    _write(fs, str(tmp_path / "x.tmp"), b"z" * (3 * BLOCK))
    fs.rename(str(tmp_path / "x.tmp"), str(tmp_path / "x"))
    assert sorted(fs.files) == ["x", "x.sums"]
    assert fs.files["x"].sidecar == "x.sums"
    assert sorted(os.listdir(tmp_path)) == ["x", "x.sums"]


def test_without_crc_a_write_records_its_size_only(tmp_path):
    fs = Checksummed(_Dir(str(tmp_path)), crc=False)
    _write(fs, str(tmp_path / "x"), b"abc", b"de")
    assert fs.files == {"x": FileRecord(size=5)}


def test_a_failed_write_raises_its_own_oserror_not_the_callers_wrapper(tmp_path):
    class Full(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    class FullDir(_Dir):
        @contextlib.contextmanager
        def create_stream(self, path, mode):
            yield Full()

    fs = Checksummed(FullDir(str(tmp_path)))
    with pytest.raises(OSError) as e:
        with fs.create_stream(str(tmp_path / "x"), "wb") as f:
            try:
                f.write(b"data")
            except OSError:  # torch.save's archive writer says this instead
                raise RuntimeError("unexpected pos 0") from None
    assert e.value.errno == errno.ENOSPC
    assert fs.files == {}


def test_a_read_stream_is_passed_through_unrecorded(tmp_path):
    (tmp_path / "x").write_bytes(b"abc")
    fs = Checksummed(_Dir(str(tmp_path)))
    with fs.create_stream(str(tmp_path / "x"), "rb") as f:
        assert f.read() == b"abc"
    assert fs.files == {}


# ---- check_files: sizes always, checksums when asked -------------------------------------

def test_intact_files_pass_and_report_their_sizes_as_progress(step):
    path, files = step
    seen = []
    check_files(LocalStorage(), path, files, checksums=True, progress=seen.append)
    assert seen == [20, 5]


def test_a_flipped_bit_passes_the_size_check_and_fails_the_checksum_naming_the_block(step):
    path, files = step
    _flip(os.path.join(path, "a.bin"), 17)
    check_files(LocalStorage(), path, files)  # sizes only: same size
    with pytest.raises(IntegrityError) as e:
        check_files(LocalStorage(), path, files, checksums=True)
    got = crc32c.crc32c(open(os.path.join(path, "a.bin"), "rb").read()[16:])
    want = int.from_bytes(files["a.bin"].sums[4:8], "big")
    assert str(e.value).startswith(
        f"{path}/a.bin fails its checksum at bytes 16..20 (block 1, crc32c {got:08x}, "
        f"recorded {want:08x})")


def test_a_truncated_file_is_reported_with_both_sizes(step):
    path, files = step
    os.truncate(os.path.join(path, "m", "b.bin"), 3)
    with pytest.raises(IntegrityError) as e:
        check_files(LocalStorage(), path, files)
    assert str(e.value).startswith(f"{path}/m/b.bin has 3 bytes, the manifest says 5:")


def test_a_missing_file_is_reported_with_its_recorded_size(step):
    path, files = step
    os.remove(os.path.join(path, "a.bin"))
    with pytest.raises(IntegrityError) as e:
        check_files(LocalStorage(), path, files)
    assert str(e.value).startswith(f"{path}/a.bin is missing (the manifest lists 20 bytes)")


def test_a_missing_directory_reports_its_first_file_missing(tmp_path):
    files = {"b": FileRecord(size=1), "a": FileRecord(size=2)}
    with pytest.raises(IntegrityError, match=re.escape(f"{tmp_path}/gone/a is missing")):
        check_files(LocalStorage(), str(tmp_path / "gone"), files)


def test_an_extra_file_is_not_check_files_concern_but_a_block_check_refuses_it(step):
    path, files = step
    with open(os.path.join(path, "m", "extra.bin"), "wb") as f:
        f.write(b"added later")
    check_files(LocalStorage(), path, files, checksums=True)
    check = integrity.block_checks(LocalStorage(), files, {"m/": os.path.join(path, "m")})
    with pytest.raises(IntegrityError) as e:
        check[os.path.join(path, "m")].check("extra.bin", b"added later", 0, 0, 11)
    assert str(e.value).startswith(
        f"{path}/m/extra.bin is not among the files the manifest lists for {path}/m")


def test_prefixes_limit_the_check_to_the_files_under_them(step):
    path, files = step
    os.remove(os.path.join(path, "a.bin"))
    seen = []
    check_files(LocalStorage(), path, files, prefixes=("m/",), progress=seen.append)
    assert seen == [5]


def test_a_whole_file_crc32_of_an_older_step_is_checked_only_with_checksums(tmp_path):
    data = b"legacy bytes"
    (tmp_path / "old").write_bytes(data)
    files = {"old": FileRecord(size=len(data), crc32=zlib.crc32(data))}
    check_files(LocalStorage(), str(tmp_path), files, checksums=True)
    _flip(str(tmp_path / "old"), 0)
    check_files(LocalStorage(), str(tmp_path), files)
    with pytest.raises(IntegrityError) as e:
        check_files(LocalStorage(), str(tmp_path), files, checksums=True)
    bad = zlib.crc32((tmp_path / "old").read_bytes())
    assert str(e.value).startswith(
        f"{tmp_path}/old fails its checksum (crc32 {bad:08x}, manifest {zlib.crc32(data):08x})")


def test_a_record_with_a_size_only_checks_the_size_even_with_checksums(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    check_files(LocalStorage(), str(tmp_path), {"f": FileRecord(size=3)}, checksums=True)
    with pytest.raises(IntegrityError, match="has 3 bytes, the manifest says 4"):
        check_files(LocalStorage(), str(tmp_path), {"f": FileRecord(size=4)}, checksums=True)


def test_a_large_files_sums_file_is_checked_too(tmp_path, small_blocks):
    fs = Checksummed(_Dir(str(tmp_path)))
    data = os.urandom(4 * BLOCK)
    _write(fs, str(tmp_path / "x"), data)
    check_files(LocalStorage(), str(tmp_path), fs.files, checksums=True)
    _flip(str(tmp_path / "x.sums"), 2)
    with pytest.raises(IntegrityError, match=re.escape(f"{tmp_path}/x.sums fails its checksum")):
        check_files(LocalStorage(), str(tmp_path), fs.files, checksums=True)
    os.remove(tmp_path / "x.sums")
    with pytest.raises(IntegrityError, match=re.escape(f"{tmp_path}/x.sums is missing")):
        check_files(LocalStorage(), str(tmp_path), {"x": fs.files["x"]}, checksums=True)


# ---- BlockCheck: the blocks a load reads ---------------------------------------------------

def _check(data: bytes, **kw) -> BlockCheck:
    rec = FileRecord(size=len(data), algo="crc32c", block=BLOCK, sums=_sums(data))
    return BlockCheck("/d", {"f": rec}, **kw)


def test_span_widens_a_read_to_whole_blocks_within_the_file():
    c = _check(bytes(40))
    assert c.span("f", 17, 20) == (16, 32)
    assert c.span("f", 0, 1) == (0, 16)
    assert c.span("f", 33, 40) == (32, 40)  # the last block is short
    assert c.span("f", 5, 5) == (5, 5)


def test_check_finds_a_flipped_bit_only_in_the_blocks_it_reads():
    data = bytearray(os.urandom(40))
    c = _check(bytes(data))
    data[35] ^= 0x80
    c.check("f", bytes(data[:32]), 0, 0, 32)  # blocks 0 and 1: intact
    with pytest.raises(IntegrityError, match=re.escape("/d/f fails its checksum at bytes 32..40 "
                                                       "(block 2")):
        c.check("f", bytes(data[32:]), 32, 33, 40)


def test_check_of_a_buffer_shorter_than_the_record_says_is_a_truncation():
    data = os.urandom(40)
    c = _check(data)
    with pytest.raises(IntegrityError) as e:
        c.check("f", data[:36], 0, 30, 40)
    assert str(e.value).startswith(
        "/d/f: bytes 32..40 are needed to check block 2, 36 bytes from 0 were read: the file "
        "is shorter than its record says (truncated)")


def test_a_remembered_block_is_not_checked_again():
    data = os.urandom(32)
    c = _check(data)
    c.check("f", data, 0, 0, 32)
    c.check("f", bytes(32), 0, 0, 32)  # a map cannot change: checked once
    again = _check(data)
    again.check("f", data, 0, 0, 32, remember=False)
    with pytest.raises(IntegrityError):
        again.check("f", bytes(32), 0, 0, 32)


def test_require_refuses_a_record_without_block_checksums():
    loose = BlockCheck("/d", {"f": FileRecord(size=3, crc32=1)})
    assert loose.record("f") is None
    loose.check("f", b"abc", 0, 0, 3)  # an older format: not checked
    strict = BlockCheck("/d", {"f": FileRecord(size=3, crc32=1)}, require=True)
    with pytest.raises(IntegrityError, match=re.escape("/d/f has no block checksums recorded: "
                                                       "nothing can check")):
        strict.record("f")


def test_a_directory_recording_no_files_is_unchecked_not_an_extra_file():
    with pytest.raises(IntegrityError, match=re.escape("/d records no files, so no checksums")):
        BlockCheck("/d", {}).record("f")


def test_a_sums_file_the_reader_cannot_read_is_named():
    rec = FileRecord(size=64, algo="crc32c", block=BLOCK, sidecar="f.sums")
    with pytest.raises(IntegrityError, match=re.escape("/d/f: its checksums are in f.sums, "
                                                       "which this reader cannot read")):
        BlockCheck("/d", {"f": rec}).check("f", bytes(64), 0, 0, 64)


def test_a_sums_file_with_the_wrong_number_of_sums_is_refused():
    data = os.urandom(64)
    side = _sums(data)[:12]  # 3 sums for 4 blocks, with a correct record of its own
    records = {"f": FileRecord(size=64, algo="crc32c", block=BLOCK, sidecar="f.sums"),
               "f.sums": FileRecord(size=12, algo="crc32c", block=12,
                                    sums=crc32c.crc32c(side).to_bytes(4, "big"))}
    c = BlockCheck("/d", records, {"f.sums": side}.__getitem__)
    with pytest.raises(IntegrityError, match=re.escape("/d/f.sums holds 3 sums, f has 4 blocks")):
        c.check("f", data, 0, 0, 64)


# ---- helpers -------------------------------------------------------------------------------

def test_checksum_continues_and_crc32_of_reads_the_whole_file(tmp_path):
    data = os.urandom(1000)
    assert integrity.checksum("crc32c", data[500:], integrity.checksum("crc32c", data[:500])) \
        == crc32c.crc32c(data)
    assert integrity.checksum("crc32", data) == zlib.crc32(data)
    (tmp_path / "f").write_bytes(data)
    assert integrity.crc32_of(LocalStorage(), str(tmp_path / "f"), chunk=7) == zlib.crc32(data)


def test_an_unknown_algorithm_says_what_to_install():
    with pytest.raises(IntegrityError, match=re.escape("checksum algorithm 'xxh3' is not "
                                                       "available here")):
        integrity.checksum("xxh3", b"")


def test_a_file_that_vanishes_before_its_check_is_not_a_checkpoint(tmp_path):
    with pytest.raises(NotACheckpointError, match="removed while it was read"):
        integrity.crc32_of(LocalStorage(), str(tmp_path / "gone"))


# ---- torch's zip CRC-32, skipped where ours covers every byte ----------------------------

def _zip_crcs(path: str) -> list[int]:
    """The CRC-32 field of every zip entry of the DCP data files under ``path`` (the
    central directory's: torch's local headers leave it to a data descriptor)."""
    out = []
    for name in sorted(os.listdir(path)):
        if name.endswith(".distcp"):
            data = open(os.path.join(path, name), "rb").read()
            # every central directory entry (PK 1 2) holds its file's CRC-32 at byte 16
            out += [int.from_bytes(data[m.start() + 16:m.start() + 20], "little")
                    for m in re.finditer(b"PK\x01\x02", data)]
    return out


@pytest.mark.parametrize("sums", [True, False])
def test_checksummed_writes_skip_torchs_zip_crc_and_still_load(tmp_path, sums):
    import torch
    import torch.distributed.checkpoint as dcp

    store = LocalStorage()
    state = {"w": torch.randn(64, 32), "b": torch.arange(10.0)}
    path = str(tmp_path / "d")
    writer = store.dcp_writer(path, checksums=sums)
    dcp.save(state, storage_writer=writer, no_dist=True)
    crcs = _zip_crcs(path)
    assert crcs and (all(c == 0 for c in crcs) if sums else any(c != 0 for c in crcs))
    assert torch.serialization.get_crc32_options() is True  # the process setting is back
    got = {"w": torch.zeros(64, 32), "b": torch.zeros(10)}
    dcp.load(got, checkpoint_id=path, no_dist=True)  # DCP's own reader: torch.load
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_the_zip_crc_switch_is_shared_and_restores_the_callers_setting():
    import torch
    ser = torch.serialization
    ser.set_crc32_options(False)  # a user who turned it off keeps it off
    try:
        with checksums.zip_crc_skipped():
            assert ser.get_crc32_options() is False
        assert ser.get_crc32_options() is False
    finally:
        ser.set_crc32_options(True)
    with checksums.zip_crc_skipped():
        with checksums.zip_crc_skipped():  # an async save beside a blocking one
            assert ser.get_crc32_options() is False
        assert ser.get_crc32_options() is False
    assert ser.get_crc32_options() is True


def test_a_save_failing_inside_the_zip_crc_switch_restores_torchs_setting(tmp_path, monkeypatch):
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from dcp_universal import _torch_compat

    def full_disk(*args, **kwargs):
        assert torch.serialization.get_crc32_options() is False  # inside the switch
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_torch_compat, "write_files", full_disk)
    writer = LocalStorage().dcp_writer(str(tmp_path / "d"))
    with pytest.raises(CheckpointException) as info:  # DCP's: a BaseException
        dcp.save({"w": torch.randn(4)}, storage_writer=writer, no_dist=True)
    [(_, cause)] = _torch_compat.checkpoint_failures(info.value)
    assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC
    assert torch.serialization.get_crc32_options() is True
