"""The local tier: CheckpointManager(s3 root, local_dir=...) commits locally, uploads in
the background, resumes from either tier, retries and then raises failed uploads, and
survives being killed in the middle of an upload."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import fsspec
import pytest
import torch

from dcp_universal import CheckpointManager
from dcp_universal.errors import CheckpointIOError, StepAlreadyExistsError
from dcp_universal.storage import FsspecStorage
from s3server import fresh_prefix
from train_loop import Data, assert_same, snapshot, train, trained_job

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _remote_files(fs, url: str, step: int) -> dict[str, bytes]:
    base = f"{url.removeprefix('s3://')}/step-{step:08d}"
    return {p[len(base) + 1:]: fs.cat_file(p) for p in fs.find(base)}


def _local_files(local: str, step: int) -> dict[str, bytes]:
    base = os.path.join(local, f"step-{step:08d}")
    return {os.path.relpath(os.path.join(d, n), base): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(base) for n in names}


def _steps_in(local: str) -> list[str]:
    return sorted(n for n in os.listdir(local) if n.startswith("step-"))


def test_saves_commit_locally_then_upload_and_resume_anywhere(s3, tmp_path):
    url, options = s3
    root = fresh_prefix(url)
    fs = fsspec.filesystem("s3", **options)
    model, opt, sched, counters = trained_job()
    local = str(tmp_path / "nvme")
    mgr = CheckpointManager(root, local_dir=local, storage_options=options)
    path = mgr.save(1, model, opt, extra={"sched": sched, "train": counters})
    assert path == os.path.join(local, "step-00000001")  # committed locally on return
    mgr.wait()  # durable remotely
    assert _remote_files(fs, root, 1) == _local_files(local, 1)  # byte for byte
    train(model, opt, sched, Data(0), counters, 3)
    handle = mgr.save(2, model, opt, extra={"sched": sched, "train": counters}, blocking=False)
    assert handle.result() == f"{root}/step-00000002"
    assert "manifest.json" in _remote_files(fs, root, 2)
    mgr.close()

    # the same node: the local copy is read
    target, topt, tsched, tcounters = trained_job(seed=1, steps=1)
    again = CheckpointManager(root, local_dir=local, storage_options=options)
    report = again.load(target, topt, extra={"sched": tsched, "train": tcounters})
    assert any("from the local tier" in n for n in report.notes), report.notes
    assert_same(target, topt, snapshot(model, opt))
    assert tcounters == counters
    again.close()
    # a new node with an empty local_dir resumes from S3
    target, topt, tsched, tcounters = trained_job(seed=2, steps=1)
    fresh = CheckpointManager(root, local_dir=str(tmp_path / "other"), storage_options=options)
    report = fresh.load(target, topt, extra={"sched": tsched, "train": tcounters})
    assert not any("local tier" in n for n in report.notes), report.notes
    assert_same(target, topt, snapshot(model, opt))
    assert tcounters == counters
    # a step committed remotely is not overwritten by a node that does not have it
    with pytest.raises(StepAlreadyExistsError, match="step 2 is already committed"):
        fresh.save(2, target, topt)
    fresh.close()


def test_retention_per_tier_never_drops_a_step_not_yet_uploaded(s3, tmp_path, monkeypatch):
    url, options = s3
    root = fresh_prefix(url)
    model, opt, *_ = trained_job()
    local = str(tmp_path / "nvme")
    mgr = CheckpointManager(root, local_dir=local, keep_last_local=1, keep_last=3,
                            storage_options=options)
    for step in range(1, 5):
        mgr.save(step, model, opt)
        mgr.wait()
    assert mgr.latest_remote() == 4
    assert _steps_in(local) == ["step-00000004"]
    remote = CheckpointManager(root, storage_options=options)
    assert remote.steps() == [2, 3, 4]  # keep_last=3 at the root

    # uploads fail: each file is retried, then the save's upload raises; the local copy
    # stays (local retention keeps it) and the root keeps its last committed step
    calls = []

    def broken(self, local_path, path):
        calls.append(path)
        raise OSError("the network went away")

    monkeypatch.setattr(FsspecStorage, "upload", broken)
    mgr._tier.backoff = 0.01
    mgr.save(5, model, opt)
    with pytest.raises(CheckpointIOError, match=r"uploading .* failed 4 times .*network went "
                                                 r"away.*step 5 is committed locally"):
        mgr.wait()
    assert len(calls) >= 4
    mgr.save(6, model, opt)  # step 5 is not durable: local retention keeps it
    with pytest.raises(CheckpointIOError):
        mgr.wait()
    assert {"step-00000005", "step-00000006"} <= set(os.listdir(local))
    assert remote.steps() == [2, 3, 4]
    monkeypatch.undo()
    mgr.close()
    # the next job uploads what is missing, oldest first, and resumes the newest step
    again = CheckpointManager(root, local_dir=local, keep_last_local=1, keep_last=3,
                              storage_options=options)
    target, topt, *_ = trained_job(seed=1)
    again.load(target, topt)
    again.wait()
    assert remote.steps() == [4, 5, 6]
    assert _steps_in(local) == ["step-00000005", "step-00000006"]
    again.save(7, target, topt)
    again.close()
    assert _steps_in(local) == ["step-00000007"]


def test_a_damaged_local_copy_is_read_from_the_root_instead(s3, tmp_path):
    url, options = s3
    root = fresh_prefix(url)
    model, opt, *_ = trained_job()
    local = str(tmp_path / "nvme")
    with CheckpointManager(root, local_dir=local, storage_options=options) as mgr:
        mgr.save(1, model, opt)
    data = os.path.join(local, "step-00000001", "model", "__0_0.distcp")
    with open(data, "r+b") as f:
        f.seek(os.path.getsize(data) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 1]))
    target, topt, *_ = trained_job(seed=1)
    report = CheckpointManager(root, local_dir=local, storage_options=options).load(target, topt)
    assert any("its local copy failed its check" in n for n in report.notes), report.notes
    assert_same(target, topt, snapshot(model, opt))


_KILLED = textwrap.dedent("""
    import os, signal, sys, threading, time
    sys.path[:0] = [{here!r}]
    import torch
    from dcp_universal import CheckpointManager
    from dcp_universal.storage import FsspecStorage
    from train_loop import Data, build, train
    torch.manual_seed(0)
    model, opt, sched = build("plain", "none", 1)
    train(model, opt, sched, Data(0), {{"step": 0}}, 2)
    mgr = CheckpointManager({root!r}, local_dir={local!r}, storage_options={options!r})
    mgr.save(1, model, opt)
    mgr.wait()
    train(model, opt, sched, Data(0), {{"step": 2}}, 3)
    real = FsspecStorage.upload
    sent = []
    def slow(self, local_path, path):
        real(self, local_path, path)
        sent.append(path)
        if len(sent) == 2:  # some files of step 2 are up, its manifest is not
            print("KILLING", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    FsspecStorage.upload = slow
    torch.save({{k: v.clone() for k, v in model.state_dict().items()}}, {want!r})
    mgr.save(2, model, opt)
    mgr.wait()
    print("NOT KILLED", flush=True)
""")


def test_a_kill_during_an_upload_leaves_the_last_committed_step_and_the_next_job_uploads(
        s3, tmp_path):
    url, options = s3
    root = fresh_prefix(url)
    local, want = str(tmp_path / "nvme"), str(tmp_path / "want.pt")
    code = _KILLED.format(here=os.path.join(HERE), root=root, local=local, options=options,
                          want=want)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert "KILLING" in proc.stdout
    remote = CheckpointManager(root, storage_options=options)
    assert remote.steps() == [1]  # step 2's files are partly there, uncommitted
    fs = fsspec.filesystem("s3", **options)
    assert fs.find(f"{root.removeprefix('s3://')}/step-00000002")  # debris of the upload
    saved = torch.load(want)
    # a new node (empty local_dir) starts from the root's last committed step
    target, topt, *_ = trained_job(seed=3)
    fresh = CheckpointManager(root, local_dir=str(tmp_path / "other"), storage_options=options)
    assert fresh.load(target, topt) is not None and fresh.latest_remote() == 1
    fresh.close()
    # the same node resumes step 2 from its local tier and uploads it
    again = CheckpointManager(root, local_dir=local, storage_options=options)
    report = again.load(target, topt)
    assert any("from the local tier" in n for n in report.notes), report.notes
    assert all(torch.equal(v, saved[k]) for k, v in target.state_dict().items())
    again.wait()
    again.close()
    assert remote.steps() == [1, 2]
    assert _remote_files(fs, root, 2) == _local_files(local, 2)


def _another_jobs_lease(directory: str) -> None:
    """A live job's writer lease (our parent process, on this host)."""
    import json
    import socket
    import time

    from dcp_universal.training import lease

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, lease.LEASE_FILE), "w") as f:
        json.dump({"owner": "another-job", "host": socket.gethostname(), "pid": os.getppid(),
                   "started": lease._started(os.getppid()), "renewed_unix": time.time(),
                   "ttl_s": 120.0}, f)


def test_two_jobs_on_one_local_dir_or_one_root_are_refused(s3, tmp_path):
    """The local tier's directory has a writer lease of its own: a second job there
    (even one uploading to another root) would remove the first one's unfinished steps
    as debris. The root keeps its own lease."""
    from dcp_universal import RootBusyError
    from dcp_universal.training import lease

    url, options = s3
    root = fresh_prefix(url)
    local = str(tmp_path / "nvme")
    model, opt, *_ = trained_job()
    mgr = CheckpointManager(root, local_dir=local, storage_options=options)
    mgr.save(1, model, opt)
    mgr.wait()
    _another_jobs_lease(local)
    with pytest.raises(RootBusyError, match="being written by another job"):
        mgr.save(2, model, opt)
    assert _steps_in(local) == ["step-00000001"] and mgr.remote_steps() == [1]
    os.remove(os.path.join(local, lease.LEASE_FILE))
    fs = fsspec.filesystem("s3", **options)
    fs.rm(f"{root.removeprefix('s3://')}/{lease.LEASE_FILE}")
    _another_jobs_lease(str(tmp_path / "lease"))
    fs.put_file(str(tmp_path / "lease" / lease.LEASE_FILE),
                f"{root.removeprefix('s3://')}/{lease.LEASE_FILE}")
    # the save commits locally (it takes only the local tier's lease); its upload is
    # refused by the root's lease, and nothing is committed there
    mgr.save(2, model, opt)
    with pytest.raises(RootBusyError, match="being written by another job"):
        mgr.wait()
    assert _steps_in(local) == ["step-00000001", "step-00000002"]
    assert mgr.remote_steps() == [1]
    mgr.close()
    fs.rm(f"{root.removeprefix('s3://')}/{lease.LEASE_FILE}")
    again = CheckpointManager(root, local_dir=local, storage_options=options)
    again.save(3, model, opt)  # uploads step 2, which the last job could not, first
    again.close()
    assert again.remote_steps() == [1, 2, 3]
