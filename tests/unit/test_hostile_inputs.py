"""Foreign bytes are checked before they are used (issue 29): DCP ``.metadata``,
safetensors headers and indexes, and ``torch.save`` archives crafted by an attacker with
the library's own API are refused with a ``CheckpointError`` naming what was expected and
found, before anything is allocated from their claims, and the target stays as it was."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import io
import json
import os
import pickle
import shutil
import zipfile

import pytest
import torch
import torch.distributed.checkpoint as dcp

import tiny
from dcp_universal import (CheckpointError, CheckpointManager, IntegrityError,
                           UnsafeCheckpointError, export_hf, load_model, save_model)
from dcp_universal.cli import main
from test_trust import _replace_entry, _trained
from train_loop import build

BOMB_BYTES = 384 << 20  # what a bomb declares; the bound below is far under it
MEMORY_BOUND_MB = 200


# ---- crafting hostile files ------------------------------------------------------------

@contextlib.contextmanager
def _peak_rss_growth_below(mb: int):
    """The process's peak resident memory grows by less than ``mb`` MiB inside the block
    (Linux: writing 5 to clear_refs resets the peak, VmHWM)."""
    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    try:
        yield
    finally:
        grown = (status("VmHWM") - base) >> 10
        assert grown < mb, f"peak memory grew by {grown} MiB"


class _Tensor:
    """Pickled as torch.save pickles a float32 tensor of ``shape`` over storage ``key``."""

    def __init__(self, key: str, shape: tuple, numel: int) -> None:
        self.key, self.shape, self.numel = key, shape, numel


class _Storage:
    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, _Tensor):
            stride = tuple(int(torch.tensor(obj.shape[i + 1:]).prod()) for i in range(len(obj.shape)))
            return torch._utils._rebuild_tensor_v2, (_Storage(obj.key, obj.numel), 0, obj.shape,
                                                     stride, False, collections.OrderedDict())
        return NotImplemented

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def _archive(value, records: dict[str, int], *, compressed: bool, data_pkl: bytes | None = None
             ) -> bytes:
    """A torch.save-like zip: ``value`` pickled (``_Tensor`` placeholders as tensors) and
    each ``records[key]`` zero bytes as ``data/<key>`` (deflated when ``compressed``)."""
    buf = io.BytesIO()
    if data_pkl is None:
        pkl = io.BytesIO()
        _Pickler(pkl, protocol=2).dump(value)
        data_pkl = pkl.getvalue()
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", compresslevel=1) as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", b"little")
        for key, nbytes in records.items():
            info = zipfile.ZipInfo(f"archive/data/{key}")
            info.compress_type = method
            with zf.open(info, "w", force_zip64=True) as w:
                zero = bytes(min(nbytes, 1 << 20))
                for at in range(0, nbytes, len(zero) or 1):
                    w.write(zero[:nbytes - at])
        zf.writestr("archive/version", b"3\n")
    return buf.getvalue()


@functools.cache
def _bomb(what: str = "tensor") -> bytes:
    """A 384 MiB float32 tensor (or the object a blob holds) as a ~1 MiB deflate bomb."""
    n = BOMB_BYTES // 4
    t = _Tensor("0", (n,), n)
    value = {"tensor": t, "ckpt": {"model": {"w": t}}, "blob": {"state": {0: {"m": t}}}}[what]
    return _archive(value, {"0": BOMB_BYTES}, compressed=True)


def _md(path):
    with open(os.path.join(path, ".metadata"), "rb") as f:
        return pickle.loads(f.read())  # the test's own file


def _write_md(path, md) -> None:
    with open(os.path.join(path, ".metadata"), "wb") as f:
        f.write(pickle.dumps(md))


def _foreign_model_dir(path, seed=1) -> tiny.Tiny:
    """A tiny model saved as a plain DCP directory of another tool (no dcp_universal
    records or checksums: an attacker rewrites those anyway)."""
    model = tiny.make("plain", seed=seed)
    save_model(model, str(path))
    os.remove(os.path.join(path, "dcp_universal.json"))
    return model


def _replace_record(path, key: str, data: bytes) -> None:
    """Point ``key``'s storage record at ``data``, appended to its data file."""
    md = _md(path)
    index = next(i for i in md.storage_data if i.fqn == key)
    info = md.storage_data[index]
    with open(os.path.join(path, info.relative_path), "ab") as f:
        at = f.tell()
        f.write(data)
    md.storage_data[index] = dataclasses.replace(info, offset=at, length=len(data))
    _write_md(path, md)


def _target(seed=7):
    model = tiny.make("plain", seed=seed)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _refused_by_cli(argv, out) -> None:
    """The CLI exits non-zero and writes no output."""
    assert main(argv) != 0
    assert not os.path.exists(out) or not [f for f in os.listdir(out)
                                           if f.endswith((".safetensors", ".json"))
                                           or f.startswith("step-")]


# ---- DCP .metadata -----------------------------------------------------------------------

@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_a_dcp_record_outside_its_directory_is_refused(tmp_path, where):
    _foreign_model_dir(tmp_path / "m", seed=1)
    _foreign_model_dir(tmp_path / "other", seed=2)  # were it followed, its weights load
    md = _md(tmp_path / "m")
    for index, info in md.storage_data.items():
        name = ("../other/" if where == "relative" else f"{tmp_path}/other/") + info.relative_path
        md.storage_data[index] = dataclasses.replace(info, relative_path=name)
    _write_md(tmp_path / "m", md)
    target, before = _target()
    with pytest.raises(UnsafeCheckpointError, match="not a file inside"):
        load_model(target, str(tmp_path / "m"))
    assert _unchanged(target, before)
    with pytest.raises(UnsafeCheckpointError, match="other"):
        export_hf(str(tmp_path / "m"), str(tmp_path / "hf"))
    _refused_by_cli(["export", str(tmp_path / "m"), str(tmp_path / "hf2")], tmp_path / "hf2")


def test_dcp_chunks_sharing_one_record_are_refused(tmp_path):
    path = str(tmp_path / "d")
    dcp.save({"w": torch.randn(64, 256)}, checkpoint_id=path, no_dist=True)  # 64 KiB
    md = _md(path)
    tmd = md.state_dict_metadata["w"]
    (index, info), = md.storage_data.items()
    chunks, storage = [], {}
    for i in range(64):  # 64 chunks of the one record: a 4 MiB tensor from 64 KiB
        offsets = torch.Size([64 * i, 0])
        chunks.append(dataclasses.replace(tmd.chunks[0], offsets=offsets))
        storage[dataclasses.replace(index, offset=offsets, index=i)] = info
    md.state_dict_metadata["w"] = dataclasses.replace(tmd, size=torch.Size([64 * 64, 256]),
                                                      chunks=chunks)
    md.storage_data = storage
    _write_md(path, md)
    with pytest.raises(IntegrityError, match="overlap"):
        export_hf(path, str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf" / "model.safetensors")
    _refused_by_cli(["export", path, str(tmp_path / "hf2")], tmp_path / "hf2")


def test_a_4_tib_shape_is_refused_before_anything_is_allocated(tmp_path):
    path = str(tmp_path / "d")
    dcp.save({"w": torch.randn(4, 4)}, checkpoint_id=path, no_dist=True)
    md = _md(path)
    tmd = md.state_dict_metadata["w"]
    huge = torch.Size([1 << 20, 1 << 20])
    md.state_dict_metadata["w"] = dataclasses.replace(
        tmd, size=huge, chunks=[dataclasses.replace(tmd.chunks[0], sizes=huge)])
    _write_md(path, md)
    with _peak_rss_growth_below(MEMORY_BOUND_MB):
        with pytest.raises(IntegrityError, match=r"'w'.*1048576, 1048576.*bytes"):
            export_hf(path, str(tmp_path / "hf"))
    _refused_by_cli(["export", path, str(tmp_path / "hf2")], tmp_path / "hf2")
    assert main(["inspect", path]) != 0


def test_a_chunk_outside_its_tensor_is_refused(tmp_path):
    path = str(tmp_path / "d")
    dcp.save({"w": torch.randn(4, 4)}, checkpoint_id=path, no_dist=True)
    md = _md(path)
    tmd = md.state_dict_metadata["w"]
    (index, info), = md.storage_data.items()
    moved = torch.Size([2, 0])
    md.state_dict_metadata["w"] = dataclasses.replace(
        tmd, chunks=[dataclasses.replace(tmd.chunks[0], offsets=moved)])
    md.storage_data = {dataclasses.replace(index, offset=moved): info}
    _write_md(path, md)
    with pytest.raises(IntegrityError, match="outside"):
        export_hf(path, str(tmp_path / "hf"))


def test_a_model_record_that_is_a_deflate_bomb_is_refused(tmp_path):
    _foreign_model_dir(tmp_path / "m")
    _replace_record(tmp_path / "m", "head.weight", _bomb())
    target, before = _target()
    with _peak_rss_growth_below(MEMORY_BOUND_MB):
        with pytest.raises(IntegrityError, match="compressed"):
            load_model(target, str(tmp_path / "m"))
    assert _unchanged(target, before)
    _refused_by_cli(["export", str(tmp_path / "m"), str(tmp_path / "hf")], tmp_path / "hf")


def test_a_bytearray_bomb_in_dcp_metadata_is_refused(tmp_path):
    _foreign_model_dir(tmp_path / "m")
    # what pickle.dumps(bytearray(n)) would be, without the n bytes
    (tmp_path / "m" / ".metadata").write_bytes(
        b"\x80\x02cbuiltins\nbytearray\nJ" + (BOMB_BYTES).to_bytes(4, "little") + b"\x85R.")
    target, before = _target()
    with _peak_rss_growth_below(MEMORY_BOUND_MB):
        with pytest.raises(IntegrityError, match="bytearray"):
            load_model(target, str(tmp_path / "m"))
    assert _unchanged(target, before)


# ---- the library's own torch.save'd records inside a step -----------------------------

def _replace_sealed(mgr, step: int, key: str, value) -> None:
    """``_replace_entry``, and the new optimizer/ files' block checksums recorded in the
    manifest (with its own checksum), as an attacker with write access would."""
    from dcp_universal.storage import checksums, integrity

    _replace_entry(mgr, step, key, value)
    m = mgr.manifest(step)
    for name in m.files:
        if name.startswith("optimizer/"):
            sink = checksums._CrcStream(io.BytesIO(), integrity.ALGO)
            with open(os.path.join(mgr.step_path(step), name), "rb") as f:
                sink.write(f.read())
            m.files[name] = sink.record()
    with open(os.path.join(mgr.step_path(step), "manifest.json"), "w") as f:
        f.write(m.to_json())


@pytest.mark.parametrize("key", ["optim/meta", "train/rank-0/rng"])
def test_a_deflate_bomb_in_a_steps_blob_is_refused(tmp_path, key):
    model, opt = _trained("plain")
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, model, opt)
    _replace_sealed(mgr, 1, key, _bomb("blob"))
    target, topt = build("plain", "none", 1, seed=7)[:2]
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with _peak_rss_growth_below(MEMORY_BOUND_MB):
        with pytest.raises(IntegrityError, match="compressed"):
            CheckpointManager(str(tmp_path)).load(target, topt)
    assert _unchanged(target, before) and not topt.state


# ---- torch.save files (nanoGPT ckpt.pt, NAME-model.pt) -------------------------------

def test_a_legacy_file_that_is_a_deflate_bomb_is_refused(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(_bomb("ckpt"))
    target, before = _target()
    with _peak_rss_growth_below(MEMORY_BOUND_MB):
        with pytest.raises(IntegrityError, match="compressed"):
            load_model(target, str(tmp_path / "ckpt.pt"))
    assert _unchanged(target, before)
    _refused_by_cli(["convert", str(tmp_path / "ckpt.pt"), str(tmp_path / "root")],
                    tmp_path / "root")


def test_a_legacy_storage_larger_than_its_bytes_is_refused(tmp_path):
    n = BOMB_BYTES // 4
    blob = _archive({"model": {"w": _Tensor("0", (n,), n)}}, {"0": 64}, compressed=False)
    (tmp_path / "x-model.pt").write_bytes(blob)
    target, before = _target()
    with _peak_rss_growth_below(MEMORY_BOUND_MB):
        with pytest.raises(IntegrityError, match=r"data/0.*64 bytes"):
            load_model(target, str(tmp_path / "x-model.pt"))
    assert _unchanged(target, before)


def test_a_bytearray_bomb_in_a_legacy_file_is_refused(tmp_path):
    pkl = b"\x80\x02}X\x05\x00\x00\x00modelcbuiltins\nbytearray\nJ" + \
        BOMB_BYTES.to_bytes(4, "little") + b"\x85Rs."
    (tmp_path / "ckpt.pt").write_bytes(_archive(None, {}, compressed=False, data_pkl=pkl))
    target, before = _target()
    with _peak_rss_growth_below(MEMORY_BOUND_MB):
        with pytest.raises(IntegrityError, match="bytearray"):
            load_model(target, str(tmp_path / "ckpt.pt"))
    assert _unchanged(target, before)


# ---- safetensors ------------------------------------------------------------------------

def _hf_dir(tmp_path) -> str:
    save_model(tiny.make("plain", seed=1), str(tmp_path / "m"))
    return export_hf(str(tmp_path / "m"), str(tmp_path / "hf"))


def _edit_header(path, edit) -> None:
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    with open(path, "wb") as f:
        f.write(len(new).to_bytes(8, "little") + new + data[8 + n:])


def _overlap(h):
    h["blocks.1.q.weight"]["data_offsets"] = h["blocks.0.q.weight"]["data_offsets"]


def _negative(h):
    begin, end = h["blocks.0.q.weight"]["data_offsets"]
    h["blocks.0.q.weight"]["data_offsets"] = [-(end - begin), 0]  # the header's bytes


def _dtype(h):
    h["blocks.0.q.weight"]["dtype"] = "F16"  # 2 bytes an element over a range of 4


def _no_dtype(h):
    del h["blocks.0.q.weight"]["dtype"]


def _bad_shape(h):
    h["blocks.0.q.weight"]["shape"] = "13x13"


def _bad_offsets(h):
    h["blocks.0.q.weight"]["data_offsets"] = {"begin": 0}


def _huge(h):
    h["blocks.0.q.weight"]["shape"] = [1 << 20, 1 << 20]


@pytest.mark.parametrize("edit, found", [
    (_overlap, "overlap"), (_negative, "data_offsets"), (_dtype, "F16"),
    (_no_dtype, "dtype"), (_bad_shape, "shape"), (_bad_offsets, "data_offsets"),
    (_huge, "1048576")])
def test_an_inconsistent_safetensors_header_is_refused(tmp_path, edit, found):
    out = _hf_dir(tmp_path)
    _edit_header(os.path.join(out, "model.safetensors"), edit)
    target, before = _target()
    with _peak_rss_growth_below(MEMORY_BOUND_MB):
        with pytest.raises(IntegrityError, match=found):
            load_model(target, out)
    assert _unchanged(target, before)
    _refused_by_cli(["convert", out, str(tmp_path / "root")], tmp_path / "root")


def test_a_truncated_safetensors_file_is_refused(tmp_path):
    out = _hf_dir(tmp_path)
    path = os.path.join(out, "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 100)  # a download cut short
    target, before = _target()
    with pytest.raises(IntegrityError, match="truncated"):
        load_model(target, out)
    assert _unchanged(target, before)
    _refused_by_cli(["convert", out, str(tmp_path / "root")], tmp_path / "root")


def test_an_hf_index_naming_an_absolute_path_is_refused(tmp_path):
    save_model(tiny.make("plain", seed=1), str(tmp_path / "m"))
    out = export_hf(str(tmp_path / "m"), str(tmp_path / "hf"), max_shard_size=2000)
    index = os.path.join(out, "model.safetensors.index.json")
    d = json.loads(open(index).read())
    key, name = next(iter(d["weight_map"].items()))
    d["weight_map"][key] = os.path.join(out, name)  # absolute, though it exists
    with open(index, "w") as f:
        json.dump(d, f)
    with pytest.raises(UnsafeCheckpointError, match="not a file inside"):
        load_model(tiny.make("plain"), out)


def test_a_key_in_two_shards_is_refused(tmp_path):
    save_model(tiny.make("plain", seed=1), str(tmp_path / "m"))
    out = export_hf(str(tmp_path / "m"), str(tmp_path / "hf"), max_shard_size=2000)
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    shutil.copy(os.path.join(out, shards[0]), os.path.join(out, shards[1]))
    with pytest.raises(IntegrityError, match="both"):
        load_model(tiny.make("plain"), out)


def test_a_hugging_face_cache_layout_of_symlinks_loads(tmp_path):
    src = tiny.make("plain", seed=1)
    save_model(src, str(tmp_path / "m"))
    export_hf(str(tmp_path / "m"), str(tmp_path / "hf"))
    cache = tmp_path / "models--tiny"
    snap = cache / "snapshots" / "abc123"
    os.makedirs(cache / "blobs")
    os.makedirs(snap)
    for name in os.listdir(tmp_path / "hf"):  # blobs by content, linked from the snapshot
        blob = f"sha-{name}"
        shutil.copy(tmp_path / "hf" / name, cache / "blobs" / blob)
        os.symlink(f"../../blobs/{blob}", snap / name)
    target = tiny.make("plain", seed=2)
    load_model(target, str(snap))
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in target.state_dict().items())
