"""No silent downgrade (issue 29, parts 3 and 5b/5c), one process: a step or model
directory that records no checksums for its files loads only with ``verify=False``;
damaged manifests raise DamagedManifestError and never block retention nor become the
latest step; a step is one directory, named as the library writes it, whose manifest
agrees with its name. Each case failed before its fix."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from dcp_universal import CheckpointManager, load_model, save_model
from dcp_universal.cli import main
from dcp_universal.errors import DamagedManifestError, IntegrityError, ManifestError
from dcp_universal.format import manifest as manifest_mod
from dcp_universal.format import records
from train_loop import assert_same, snapshot, trained_job


def _rewrite(path, edit) -> None:
    """Edit a manifest as an attacker would, with a correct content checksum."""
    d = json.loads(open(path).read())
    edit(d)
    if "content_crc32" in d:
        d["content_crc32"] = manifest_mod._content_crc32(d)
    with open(path, "w") as f:
        json.dump(d, f)


def _flip_weight(directory: str) -> None:
    """Flip one bit inside the largest tensor's bytes of the DCP directory."""
    md = FileSystemReader(directory).read_metadata()
    item = max(md.storage_data.values(), key=lambda i: i.length)
    with open(os.path.join(directory, item.relative_path), "r+b") as f:
        f.seek(item.offset + item.length // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A root with steps 1, 2, 3 of one trained job (copied per test: see ``root``)."""
    model, opt, *_ = trained_job()
    path = str(tmp_path_factory.mktemp("saved") / "root")
    mgr = CheckpointManager(path)
    for step in (1, 2, 3):
        mgr.save(step, model, opt)
    mgr.close()
    return path, snapshot(model, opt)


@pytest.fixture
def root(saved, tmp_path):
    path = str(tmp_path / "root")
    shutil.copytree(saved[0], path)
    return path


@pytest.fixture
def target():
    model, opt, *_ = trained_job(seed=1)
    return model, opt, snapshot(model, opt)


def _manifest_path(root: str, step: int) -> str:
    return os.path.join(manifest_mod.step_path(root, step), "manifest.json")


# ---- part 3: no silent downgrade ------------------------------------------------------

def _strip(d):
    for rec in d["files"].values():
        rec.pop("checksum", None)


def _drop_data_record(d):  # a file of model/ present on disk, absent from the records
    del d["files"][next(k for k in d["files"] if k.startswith("model/") and k.endswith(".distcp"))]


DOWNGRADES = {
    "stripped": (_strip, "no block checksums"),
    "files-empty": (lambda d: d.update(files={}), "records no files"),
    "files-missing": (lambda d: d.pop("files"), "records no files"),
    "item-unrecorded": (lambda d: d.update(files={k: v for k, v in d["files"].items()
                                                  if not k.startswith("model/")}),
                        "not recorded"),
    "file-unrecorded": (_drop_data_record, "not recorded"),
    # re-sealed as the format before checksums: every format recorded every file
    "v1-files-empty": (lambda d: d.update(files={}, format_version=1), "records no files"),
    "v1-item-unrecorded": (lambda d: d.update(
        format_version=1, files={k: v for k, v in d["files"].items()
                                 if not k.startswith("model/")}), "not recorded"),
}


@pytest.mark.parametrize("case", list(DOWNGRADES))
def test_a_step_without_checksums_loads_only_with_verify_false(root, target, case):
    edit, message = DOWNGRADES[case]
    model, opt, before = target
    _rewrite(_manifest_path(root, 3), edit)
    step_dir = manifest_mod.step_path(root, 3)
    _flip_weight(os.path.join(step_dir, "model"))
    mgr = CheckpointManager(root)
    for load in (lambda: mgr.load(model, opt, step=3), lambda: mgr.load(model, opt, step=3,
                                                                        verify=True),
                 lambda: load_model(model, step_dir), lambda: mgr.verify(3)):
        with pytest.raises(IntegrityError, match=message) as e:
            load()
        assert "verify=False" in str(e.value)
        assert_same(model, opt, before)
    assert main(["verify", step_dir, "--quiet"]) != 0
    mgr.load(model, opt, step=3, verify=False)  # trusted by the caller: loads, flip and all


def test_a_step_without_its_manifest_does_not_load_as_a_plain_dcp_directory(root, target):
    model, opt, before = target
    step_dir = manifest_mod.step_path(root, 3)
    os.remove(os.path.join(step_dir, "manifest.json"))
    _flip_weight(os.path.join(step_dir, "model"))
    with pytest.raises(IntegrityError, match="verify=False"):
        load_model(model, step_dir)
    assert_same(model, opt, before)
    load_model(model, step_dir, verify=False)


def test_steps_of_the_format_before_checksums_still_load_with_their_note(root, target):
    model, opt, _ = target

    def old(d):
        _strip(d)
        d["format_version"] = 1

    _rewrite(_manifest_path(root, 3), old)
    report = CheckpointManager(root).load(model, opt)
    assert any("before block checksums" in n for n in report.notes), report.notes


SAVE_MODEL_DOWNGRADES = {
    "files-missing": lambda d: d.pop("files"),
    "files-empty": lambda d: d.update(files={}),
    "stripped": lambda d: [r.pop("checksum") for r in d["files"].values()],
}


@pytest.mark.parametrize("case", list(SAVE_MODEL_DOWNGRADES))
def test_a_model_directory_without_checksums_loads_only_with_verify_false(tmp_path, target,
                                                                         case):
    model, opt, before = target
    saved_model, *_ = trained_job()
    path = str(tmp_path / "model")
    save_model(saved_model, path)
    _rewrite(os.path.join(path, manifest_mod.MODEL_INFO), SAVE_MODEL_DOWNGRADES[case])
    _flip_weight(path)
    for verify in (None, True):
        with pytest.raises(IntegrityError, match="verify=False"):
            load_model(model, path, verify=verify)
        assert_same(model, opt, before)
    load_model(model, path, verify=False)
    assert sum(not torch.equal(v, saved_model.state_dict()[k])
               for k, v in model.state_dict().items()) == 1  # the flip, unchecked


def test_cli_verify_of_a_step_recording_no_files_fails(root, capsys):
    _rewrite(_manifest_path(root, 2), lambda d: d.update(files={}))
    assert main(["verify", manifest_mod.step_path(root, 2), "--quiet"]) == 2
    assert "records no files" in capsys.readouterr().err
    assert main(["verify", root, "--quiet"]) == 2
    assert main(["export", manifest_mod.step_path(root, 2), os.path.join(root, "..", "hf")]) == 2


# ---- part 5b: damaged manifests -------------------------------------------------------

def _nested(depth: int) -> list:
    out: list = []
    for _ in range(depth):
        out = [out]
    return out


DAMAGED = {
    "deep": b"[" * 200000,
    "nested": json.dumps({"format_version": 1, "legacy": {"x": _nested(100)}}).encode(),
    "digits": b'{"format_version": 2, "step": ' + b"9" * 5000 + b"}",
    "list": b"[1, 2]",
    "binary": b"\x00\xffgarbage",
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_manifest_raises_is_kept_and_is_never_latest(root, target, case, caplog):
    model, opt, _ = target
    with open(_manifest_path(root, 3), "wb") as f:
        f.write(DAMAGED[case])
    mgr = CheckpointManager(root, keep_last=1)
    with pytest.raises(DamagedManifestError):
        mgr.manifest(3)
    with pytest.raises(DamagedManifestError):
        mgr.load(model, opt, step=3)
    with pytest.raises(DamagedManifestError):
        load_model(model, manifest_mod.step_path(root, 3))
    with caplog.at_level(logging.WARNING, logger="dcp_universal"):
        assert mgr.latest_step() == 2
        mgr.load(model, opt)  # the newest step whose manifest reads: 2
    assert "step 3" in caplog.text
    decision = mgr.prune()
    assert list(decision.unreadable) == [3] and decision.delete == [1]
    assert mgr.steps() == [2, 3]
    mgr.close()
    assert main(["inspect", manifest_mod.step_path(root, 3)]) == 2
    assert main(["verify", manifest_mod.step_path(root, 3), "--quiet"]) == 2


def test_an_oversized_manifest_is_damaged_before_it_is_read(root, monkeypatch):
    monkeypatch.setattr(records, "MAX_MANIFEST_BYTES", 1000)
    with pytest.raises(DamagedManifestError, match="bytes"):
        CheckpointManager(root).manifest(3)


def test_cli_prune_removes_the_others_beside_a_deep_manifest(root, capsys):
    with open(_manifest_path(root, 2), "wb") as f:
        f.write(b"[" * 200000)
    assert main(["prune", root, "--keep-last", "1"]) == 1
    out = capsys.readouterr().out
    assert "kept step 2" in out and "DamagedManifestError" in out
    assert CheckpointManager(root).steps() == [2, 3]


def test_every_step_damaged_is_an_error_not_a_first_start(root, target):
    model, opt, before = target
    for step in (1, 2, 3):
        with open(_manifest_path(root, step), "wb") as f:
            f.write(b"{")
    with pytest.raises(DamagedManifestError):
        CheckpointManager(root).load(model, opt)
    assert_same(model, opt, before)


# ---- part 5c: one step, one directory, named as the library writes it ----------------

@pytest.mark.parametrize("name", ["step-000000002", "step-+0000002",
                                  "step-" + "\uff10" * 7 + "\uff12",
                                  "step-0000002"])
def test_only_the_canonical_name_is_a_step(root, name):
    shutil.copytree(manifest_mod.step_path(root, 2), os.path.join(root, name))
    mgr = CheckpointManager(root, keep_last=1)
    assert mgr.steps() == [1, 2, 3]
    mgr.prune()
    assert mgr.steps() == [3] and os.path.isdir(os.path.join(root, name))


def test_a_step_beyond_the_library_width_is_not_a_step(root, target):
    model, opt, before = target
    big = 10 ** 28
    path = os.path.join(root, f"step-{big}")
    shutil.copytree(manifest_mod.step_path(root, 1), path)
    _rewrite(os.path.join(path, "manifest.json"), lambda d: d.update(step=big))
    mgr = CheckpointManager(root)
    assert mgr.latest_step() == 3 and mgr.steps() == [1, 2, 3]
    with pytest.raises(ValueError, match="step="):
        mgr.load(model, opt, step=big)
    assert_same(model, opt, before)


def test_a_manifest_whose_step_disagrees_with_its_directory_is_refused(root, target, caplog):
    model, opt, before = target
    _rewrite(_manifest_path(root, 3), lambda d: d.update(step=9))
    mgr = CheckpointManager(root)
    with pytest.raises(ManifestError, match=r"step 9.*step-00000003|step-00000003.*step 9"):
        mgr.load(model, opt, step=3)
    with pytest.raises(ManifestError, match="step 9"):
        load_model(model, manifest_mod.step_path(root, 3))
    assert_same(model, opt, before)
    with caplog.at_level(logging.WARNING, logger="dcp_universal"):
        assert mgr.latest_step() == 2
    assert "step 3" in caplog.text
    assert main(["verify", manifest_mod.step_path(root, 3), "--quiet"]) == 2
