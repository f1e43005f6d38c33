"""Roots that are not roots, and a local tier that is not apart from its root, are
refused (issue 29); a local root uploads; an unreachable remote never holds up a local
commit. Each case failed before its fix."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

import tiny
from dcp_universal import CheckpointIOError, CheckpointManager, load_model
from dcp_universal.cli import main as cli
from dcp_universal.errors import NotARootError


def _refused_both_ways(root: str, match: str) -> None:
    """Save, load (even with init_from) and prune all refuse, naming the fix; the CLI
    exits non-zero; nothing was written."""
    before = sorted(os.listdir(root)) if os.path.isdir(root) else None
    model = tiny.make("plain", seed=4)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotARootError, match=match):
        CheckpointManager(root).save(7, tiny.make("plain"))
    with pytest.raises(NotARootError, match=match):
        CheckpointManager(root).load(model)
    with pytest.raises(NotARootError, match=match):
        CheckpointManager(root).load(model, init_from=root)
    with pytest.raises(NotARootError, match=match):
        CheckpointManager(root, keep_last=1).prune()
    assert cli(["prune", root, "--keep-last", "1"]) != 0
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert (sorted(os.listdir(root)) if os.path.isdir(root) else None) == before


def test_a_file_is_not_a_root(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save(tiny.make("plain").state_dict(), path)
    _refused_both_ways(str(path), "is a file.*init_from")


def test_a_committed_step_is_not_a_root(tmp_path):
    mgr = CheckpointManager(str(tmp_path / "run"))
    mgr.save(40, tiny.make("plain"))
    mgr.close()
    step = mgr.step_path(40)
    _refused_both_ways(step, f"is a committed step directory.*parent '{tmp_path / 'run'}'")
    assert mgr.steps() == [40]


def test_a_folder_of_another_tools_steps_is_not_a_root(tmp_path):
    root = tmp_path / "outputs" / "checkpoint"  # torchtitan's layout: step-<n>/ of DCP
    dcp.save({"model": tiny.make("plain").state_dict()}, checkpoint_id=str(root / "step-1000"))
    _refused_both_ways(str(root), "another tool's checkpoints.*init_from=.*step-1000")
    _refused_both_ways(str(root / "step-1000"), "is a DCP checkpoint directory")
    target = tiny.make("plain", seed=3)  # what the error offers works
    load_model(target, str(root / "step-1000"))
    assert torch.equal(target.head.weight, tiny.make("plain").head.weight)


@pytest.mark.parametrize("how", ["symlink", "inside", "around"])
def test_a_local_dir_that_is_not_apart_from_a_local_root_is_refused(tmp_path, how):
    root = tmp_path / "run"
    mgr = CheckpointManager(str(root))
    mgr.save(1, tiny.make("plain"))
    mgr.close()
    if how == "symlink":
        local = tmp_path / "nvme"
        os.symlink(root, local)
    else:
        local = root / "cache" if how == "inside" else tmp_path
    before = {d: sorted(os.listdir(d)) for d in (root, tmp_path)}
    with pytest.raises(ValueError, match="uploads would copy steps onto themselves"):
        CheckpointManager(str(root), local_dir=str(local))
    assert {d: sorted(os.listdir(d)) for d in (root, tmp_path)} == before
    target = tiny.make("plain", seed=2)
    load_model(target, mgr.step_path(1))
    assert torch.equal(target.head.weight, tiny.make("plain").head.weight)


def test_a_local_root_behind_a_local_tier_uploads(tmp_path):
    root, local = str(tmp_path / "shared" / "run"), str(tmp_path / "nvme")
    model = tiny.make("plain", seed=1)
    with CheckpointManager(root, local_dir=local) as mgr:
        mgr.save(1, model)
        handle = mgr.save(2, tiny.make("plain", seed=2), blocking=False)
        assert handle.result() == os.path.join(root, "step-00000002")
    remote = CheckpointManager(root)
    assert remote.steps() == [1, 2]
    remote.verify(2)
    target = tiny.make("plain", seed=5)
    load_model(target, remote.step_path(2))
    assert torch.equal(target.head.weight, tiny.make("plain", seed=2).head.weight)


def test_an_unreachable_remote_never_holds_up_the_local_commit(tmp_path):
    pytest.importorskip("s3fs")
    dead = {"endpoint_url": "http://127.0.0.1:9", "key": "testing", "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    local = str(tmp_path / "nvme")
    model = tiny.make("plain", seed=1)
    mgr = CheckpointManager("s3://ckpt/run", local_dir=local, storage_options=dead)
    mgr._tier.backoff = 0.01
    handle = mgr.save(2, model, blocking=False)
    with pytest.raises(CheckpointIOError, match="committed locally under.*not remotely"):
        handle.result(timeout=120)
    assert CheckpointManager(local).steps() == [2]  # kept, whatever the remote's state
    target = tiny.make("plain", seed=5)
    load_model(target, os.path.join(local, "step-00000002"))
    assert torch.equal(target.head.weight, model.head.weight)
    mgr._tier.close()


def test_a_manifest_too_large_to_read_back_is_never_committed(tmp_path, monkeypatch):
    from dcp_universal.format import records

    mgr = CheckpointManager(str(tmp_path / "run"))
    mgr.save(1, tiny.make("plain", seed=1))
    monkeypatch.setattr(records, "MAX_MANIFEST_BYTES", 300)  # a step with many files
    with pytest.raises(CheckpointIOError, match="manifest would be .* not committed"):
        mgr.save(2, tiny.make("plain", seed=2))
    monkeypatch.undo()
    assert mgr.steps() == [1]
    target = tiny.make("plain", seed=5)
    mgr.load(target)
    assert torch.equal(target.head.weight, tiny.make("plain", seed=1).head.weight)
    mgr.close()
