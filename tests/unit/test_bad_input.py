"""Bad input gets a specific CheckpointError naming the path, and nothing is touched."""

from __future__ import annotations

import json
import os
import crc32c

import pytest
import torch

import faulty
import tiny
from dcp_universal import CheckpointManager, CheckpointMismatchError, load_model
from dcp_universal.cli import main as cli
from dcp_universal.errors import (CheckpointIOError, FormatVersionError, IntegrityError, ManifestError,
                                  NotACheckpointError)
from train_loop import Data, assert_same, build, snapshot, train


def _job(variant="plain", seed=0):
    torch.manual_seed(seed)
    model, opt, sched = build(variant, "none", 1, seed=seed)
    train(model, opt, sched, Data(0), {"step": 0}, 2)
    return model, opt


@pytest.fixture
def saved(tmp_path):
    model, opt = _job()
    mgr = CheckpointManager(str(tmp_path / "root"))
    mgr.save(1, model, opt)
    target, topt = _job(seed=1)
    return mgr, target, topt, snapshot(target, topt)


def _data_file(step_dir, item="model"):
    return next(os.path.join(step_dir, item, f) for f in sorted(os.listdir(os.path.join(step_dir, item)))
                if f.endswith(".distcp"))


def test_not_a_checkpoint(tmp_path, saved):
    _, target, topt, before = saved
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(NotACheckpointError, match=str(path)):
            load_model(target, str(path))
        assert CheckpointManager(str(path)).load(target, topt) is None  # a first start
    assert_same(target, topt, before)


@pytest.mark.parametrize("content,error,match", [
    (b"\x00\xffgarbage", ManifestError, "not valid JSON"),
    (b'{"format_version": 1, "step"', ManifestError, "not valid JSON"),  # truncated
    (b"[1, 2]", ManifestError, "not a dcp_universal manifest"),
    (None, FormatVersionError, "format_version 99.*upgrade dcp_universal"),
])
def test_bad_manifests(saved, content, error, match):
    mgr, target, topt, before = saved
    path = os.path.join(mgr.step_path(1), "manifest.json")
    if content is None:
        manifest = json.loads(open(path).read())
        manifest["format_version"] = 99
        content = json.dumps(manifest).encode()
    with open(path, "wb") as f:
        f.write(content)
    with pytest.raises(error, match=match):
        mgr.load(target, topt)
    with pytest.raises(error, match=match):
        load_model(target, mgr.step_path(1))
    assert_same(target, topt, before)


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_truncated_or_missing_shard_file(saved, damage):
    mgr, target, topt, before = saved
    victim = _data_file(mgr.step_path(1), "optimizer")
    if damage == "truncate":
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
        match = "is truncated"
    else:
        os.remove(victim)
        match = "is missing"
    with pytest.raises(IntegrityError, match=f"{os.path.basename(victim)}.*{match}"):
        mgr.load(target, topt)  # the optimizer file is checked before the model is read
    assert_same(target, topt, before)


def test_checksum_mismatch_is_found_by_verify_and_every_default_load(saved, capsys):
    mgr, target, topt, before = saved
    manifest = mgr.manifest(1)
    victim = _data_file(mgr.step_path(1))
    rel = os.path.relpath(victim, mgr.step_path(1))
    rec = manifest.files[rel]
    with open(victim, "rb") as f:  # computed while writing: CRC-32C of each block
        data = f.read()
    assert rec.algo == "crc32c" and rec.block == 128 << 10 and rec.sidecar is None
    assert rec.sums == b"".join(crc32c.crc32c(data[i:i + rec.block]).to_bytes(4, "big")
                                for i in range(0, len(data), rec.block))
    assert mgr.verify(1)["files"] == len(manifest.files)
    with open(victim, "r+b") as f:  # same size, other bytes
        f.seek(os.path.getsize(victim) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(IntegrityError, match=f"{os.path.basename(victim)} fails its checksum"):
        mgr.verify(1)
    for kwargs in ({}, {"verify": True}):
        with pytest.raises(IntegrityError, match=f"{os.path.basename(victim)} fails its checksum"):
            mgr.load(target, topt, **kwargs)
        assert_same(target, topt, before)
    with pytest.raises(IntegrityError, match="fails its checksum"):
        load_model(target, mgr.step_path(1))
    assert_same(target, topt, before)
    assert cli(["verify", mgr.step_path(1)]) == 2
    assert "fails its checksum" in capsys.readouterr().err


def test_other_architecture_leaves_model_and_optimizer_untouched(saved):
    mgr, *_ = saved
    small, _, _ = build("lora4", "none", 1, seed=2)
    small.blocks = small.blocks[:1]  # one block fewer than the checkpoint
    sopt = torch.optim.AdamW([p for p in small.parameters() if p.requires_grad])
    train(small, sopt, torch.optim.lr_scheduler.StepLR(sopt, 1), Data(0), {"step": 0}, 1)
    before = snapshot(small, sopt)
    with pytest.raises(CheckpointMismatchError, match=r"in checkpoint but not in model \(9\)"):
        mgr.load(small, sopt)
    assert_same(small, sopt, before)


def test_io_failure_in_the_middle_of_a_load_leaves_everything_untouched(saved, monkeypatch):
    mgr, target, topt, before = saved
    faulty.register()
    root = "faulty://" + mgr.root
    # the model reads fine; the optimizer's data file fails after the model was staged
    monkeypatch.setenv("FAULTY_MODE", "read")
    monkeypatch.setenv("FAULTY_PATTERN", "*/optimizer/__*.distcp")
    with pytest.raises(CheckpointIOError, match="reading .*optimizer failed on rank.*injected read failure"):
        CheckpointManager(root).load(target, topt)
    assert_same(target, topt, before)
    monkeypatch.delenv("FAULTY_PATTERN")
    report = CheckpointManager(root).load(target, topt)  # the same load, storage healthy
    assert report.optimizer_restored


def test_a_directory_whose_metadata_vanishes_while_it_is_read_says_so(tmp_path):
    """A reader racing retention: the step was there when it was found, and its
    ``.metadata`` is gone when DCP reads it. NotACheckpointError (a CheckpointError),
    not a raw FileNotFoundError."""
    from dcp_universal import NotACheckpointError, save_model
    from dcp_universal.storage import dcp_io, storage_for

    path = str(tmp_path / "model")
    save_model(tiny.make("plain", seed=1), path)
    os.remove(os.path.join(path, ".metadata"))
    with pytest.raises(NotACheckpointError, match=r"\.metadata does not exist \(removed while"):
        dcp_io.read_metadata(storage_for(path), path)


def test_a_file_that_vanishes_while_its_checksum_is_read_says_so(tmp_path, monkeypatch):
    """verify=True racing a prune on an object store: the listing saw the file, the read
    finds it gone (found by the S3 concurrency stress). NotACheckpointError, not a raw
    FileNotFoundError."""
    from dcp_universal import CheckpointManager, NotACheckpointError
    from dcp_universal.storage.local import LocalStorage

    mgr = CheckpointManager(str(tmp_path / "run"))
    mgr.save(1, tiny.make("plain", seed=1))
    opened = LocalStorage.open_read

    def gone(self, path):
        if path.endswith(".distcp"):
            raise FileNotFoundError(2, "The specified key does not exist.", path)
        return opened(self, path)

    monkeypatch.setattr(LocalStorage, "open_read", gone)
    target = tiny.make("plain", seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(NotACheckpointError, match="removed while it was read"):
        mgr.load(target, verify=True)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
