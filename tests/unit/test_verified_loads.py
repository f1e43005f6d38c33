"""Every default load checks every byte it reads against the step's block checksums
(CRC-32C, computed while writing); a damaged file raises IntegrityError naming it, and
nothing is installed. verify=False skips the check; steps written with a whole-file
CRC-32 still load."""

from __future__ import annotations

import json
import os
import zlib

import crc32c
import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from dcp_universal import CheckpointManager, load_model, save_model
from dcp_universal.errors import IntegrityError
from dcp_universal.format.manifest import FileRecord
from dcp_universal.storage import checksums, steps
from dcp_universal.storage.integrity import BlockCheck
from train_loop import assert_same, snapshot, trained_job


def _flip(path: str, at: float = 0.5) -> None:
    """Flip one bit of the byte at fraction ``at`` of the file."""
    with open(path, "r+b") as f:
        f.seek(int(os.path.getsize(path) * at))
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))


def _files(root: str) -> list[str]:
    return sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names
                  if n != "writer.lease")


@pytest.mark.parametrize("variant, block", [("plain", None), ("lora4", None), ("plain", 1024),
                                            ("lora4", 1024)])
def test_a_flipped_bit_in_any_file_of_a_step_fails_the_default_load(tmp_path, monkeypatch,
                                                                    variant, block):
    """Every file the step consists of (data, DCP metadata, the manifest, a LoRA run's
    shared base, the sums files of large files: ``block`` makes these small files
    large), one at a time: the load raises IntegrityError naming that file, and model,
    optimizer and extra state are untouched."""
    if block:
        monkeypatch.setattr(checksums, "BLOCK_BYTES", block)
        monkeypatch.setattr(checksums, "INLINE_BLOCKS", 8)
    model, opt, sched, counters = trained_job(variant)
    mgr = CheckpointManager(str(tmp_path / "root"))
    mgr.save(2, model, opt, extra={"sched": sched, "train": counters})
    m = mgr.manifest(2)
    step_dir = mgr.step_path(2)
    victims = [os.path.join(step_dir, rel) for rel in m.files] + [
        os.path.join(step_dir, "manifest.json")]
    if variant == "lora4":
        base = os.path.join(mgr.root, m.base)
        victims += [os.path.join(base, rel) for rel in m.base_files]
    on_disk = [p for p in _files(mgr.root) if not p.endswith("files.json")
               and not os.path.basename(p).startswith("dcp_universal")]
    assert sorted(victims) == on_disk  # every file of the step, and only those
    assert any(p.endswith(".sums") for p in victims) == bool(block)
    target, topt, tsched, tcounters = trained_job(variant, seed=1, steps=1)
    before = snapshot(target, topt)
    sched_before, counters_before = tsched.state_dict(), dict(tcounters)
    for victim in victims:
        with open(victim, "rb") as f:
            good = f.read()
        _flip(victim)
        with pytest.raises(IntegrityError, match=os.path.basename(victim)) as e:
            mgr.load(target, topt, extra={"sched": tsched, "train": tcounters})
        assert victim in str(e.value) or os.path.basename(victim) == "manifest.json", e.value
        assert_same(target, topt, before)
        assert tsched.state_dict() == sched_before and tcounters == counters_before
        with open(victim, "wb") as f:
            f.write(good)
    report = mgr.load(target, topt, extra={"sched": tsched, "train": tcounters})
    assert report.optimizer_restored and tcounters == counters


def test_verify_false_is_the_unchecked_fast_path(tmp_path):
    model, opt, *_ = trained_job()
    mgr = CheckpointManager(str(tmp_path / "root"))
    mgr.save(1, model, opt)
    model_dir = os.path.join(mgr.step_path(1), "model")
    md = FileSystemReader(model_dir).read_metadata()
    largest = max(md.storage_data.values(), key=lambda info: info.length)
    with open(os.path.join(model_dir, largest.relative_path), "r+b") as f:
        f.seek(largest.offset + largest.length // 2)  # inside the largest tensor's bytes
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))
    target, topt, *_ = trained_job(seed=1)
    with pytest.raises(IntegrityError, match="fails its checksum"):
        mgr.load(target, topt)
    mgr.load(target, topt, verify=False)  # loads the damaged bytes: nothing is checked
    diffs = [k for k, v in model.state_dict().items() if not torch.equal(v, target.state_dict()[k])]
    assert len(diffs) == 1, diffs


def test_small_blocks_name_the_bad_block_and_check_only_what_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(checksums, "BLOCK_BYTES", 1024)
    monkeypatch.setattr(checksums, "INLINE_BLOCKS", 8)
    model, opt, *_ = trained_job()
    mgr = CheckpointManager(str(tmp_path / "root"))
    mgr.save(1, model, opt)
    m = mgr.manifest(1)
    rel = max((r for r in m.files if r.startswith("optimizer/") and r.endswith(".distcp")),
              key=lambda r: m.files[r].size)
    rec = m.files[rel]
    assert rec.block == 1024 and rec.sidecar == os.path.basename(rel) + ".sums"
    path = os.path.join(mgr.step_path(1), rel)
    with open(path + ".sums", "rb") as f:  # the sums file: CRC-32C of each block
        sums = f.read()
    with open(path, "rb") as f:
        data = f.read()
    assert sums == b"".join(crc32c.crc32c(data[i:i + 1024]).to_bytes(4, "big")
                            for i in range(0, len(data), 1024))
    assert m.files[rel + ".sums"].size == len(sums)
    assert mgr.verify(1)["files"] == len(m.files)  # whole files, sums read beside them
    _flip(path, 0.5)
    bad = int(rec.size * 0.5) // 1024
    target, topt, *_ = trained_job(seed=1)
    before = snapshot(target, topt)
    load_model(target, mgr.step_path(1))  # the model alone: optimizer/ is not read
    assert_same(target, topt, (model_state(model), before[1]))
    with pytest.raises(IntegrityError, match=rf"{rel.split('/')[1]} fails its checksum at bytes "
                                             rf"{bad * 1024}\.\.{(bad + 1) * 1024} \(block {bad}"):
        mgr.load(target, topt)
    with pytest.raises(IntegrityError, match=rf"{rel.split('/')[1]} fails its checksum"):
        mgr.verify(1)


def model_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_crc32_blocks_and_old_whole_file_crc32_steps_still_load(tmp_path, monkeypatch):
    """A file written with another algorithm (recorded per file) verifies with it; a step
    written before block checksums (a whole-file CRC-32) loads, and verify=True checks it."""
    model, opt, *_ = trained_job()
    monkeypatch.setattr(checksums, "ALGO", "crc32")
    mgr = CheckpointManager(str(tmp_path / "a"))
    mgr.save(1, model, opt)
    assert {r.algo for r in mgr.manifest(1).files.values()} == {"crc32"}
    monkeypatch.undo()
    target, topt, *_ = trained_job(seed=1)
    mgr.load(target, topt)
    assert_same(target, topt, snapshot(model, opt))
    data = next(p for p in _files(os.path.join(mgr.step_path(1), "model")) if p.endswith(".distcp"))
    _flip(data, 0.4)
    with pytest.raises(IntegrityError, match="crc32 "):
        mgr.load(target, topt)

    old = CheckpointManager(str(tmp_path / "old"))
    old.save(1, model, opt)
    step_dir = old.step_path(1)
    m = old.manifest(1)
    for rel in list(m.files):
        with open(os.path.join(step_dir, rel), "rb") as f:
            m.files[rel] = FileRecord(size=m.files[rel].size, crc32=zlib.crc32(f.read()))
    m.format_version = 1  # the format such steps were written in
    steps.write_manifest(old._store, step_dir, m)
    raw = json.loads(open(os.path.join(step_dir, "manifest.json")).read())
    assert all(set(r) == {"size", "crc32"} for r in raw["files"].values())  # the old layout
    target, topt, *_ = trained_job(seed=2)
    report = old.load(target, topt)
    assert_same(target, topt, snapshot(model, opt))
    assert any("before block checksums" in n for n in report.notes), report.notes
    old.verify(1)
    data = next(p for p in _files(os.path.join(step_dir, "model")) if p.endswith(".distcp"))
    _flip(data, 0.4)
    with pytest.raises(IntegrityError, match="fails its checksum"):
        old.load(target, topt, verify=True)
    with pytest.raises(IntegrityError, match="fails its checksum"):
        old.verify(1)


def test_a_file_the_manifest_does_not_list_is_refused():
    check = BlockCheck("/ckpt/step-1/model", {"__0_0.distcp": FileRecord(size=3)})
    with pytest.raises(IntegrityError, match=r"__1_0.distcp is not among the files"):
        check.check("__1_0.distcp", b"abc", 0, 0, 3)
    check.check("__0_0.distcp", b"abc", 0, 0, 3)  # listed without block sums: not checked


def test_a_save_model_directory_records_its_files_and_loads_check_them(tmp_path):
    model, *_ = trained_job()
    path = str(tmp_path / "model")
    save_model(model, path)
    info = json.loads(open(os.path.join(path, "dcp_universal.json")).read())
    data = next(p for p in _files(path) if p.endswith(".distcp"))
    assert info["files"][os.path.basename(data)]["checksum"]["algo"] == "crc32c"
    md = FileSystemReader(path).read_metadata()
    largest = max(md.storage_data.values(), key=lambda i: i.length)
    with open(data, "r+b") as f:  # inside the largest tensor's bytes
        f.seek(largest.offset + largest.length // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))
    target, *_ = trained_job(seed=1)
    before = model_state(target)
    with pytest.raises(IntegrityError, match=f"{os.path.basename(data)} fails its checksum"):
        load_model(target, path)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    load_model(target, path, verify=False)  # unchecked: one tensor differs by the flip
    assert sum(not torch.equal(v, model.state_dict()[k])
               for k, v in target.state_dict().items()) == 1
