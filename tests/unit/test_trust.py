"""Trust, one process: nothing read or removed outside the root, no broken step
committed, retention that cannot be fooled or blocked by one bad manifest, and
arguments checked (issue "Trust"). Each case failed before its fix."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

import tiny
from dcp_universal import (CheckpointIOError, CheckpointManager, IntegrityError,
                           UnsafeCheckpointError, export_hf, load_model)
from dcp_universal.format import manifest as manifest_mod
from dcp_universal.training.commit import StepWriter
from train_loop import Data, build, train


def _trained(variant="lora4"):
    torch.manual_seed(0)
    model, opt, sched = build(variant, "none", 1)
    tiny.randomize_adapters(model, seed=3)
    train(model, opt, sched, Data(0), {"step": 0}, 1)
    return model, opt


def _rewrite(path, edit) -> None:
    """Edit a manifest as an attacker would, with a correct content checksum."""
    d = json.loads(open(path).read())
    edit(d)
    d["content_crc32"] = manifest_mod._content_crc32(d)
    with open(path, "w") as f:
        json.dump(d, f)


def test_a_manifest_naming_a_base_outside_the_root_is_refused(tmp_path):
    model, opt = _trained()
    for root in ("a", "b"):
        CheckpointManager(str(tmp_path / root)).save(1, model, opt)
    other = next(n for n in os.listdir(tmp_path / "b") if n.startswith("base-"))
    _rewrite(tmp_path / "a" / "step-00000001" / "manifest.json",
             lambda d: d.update(base=f"../b/{other}"))
    shutil.rmtree(tmp_path / "a" / other)  # were it followed, b's base would load
    target, topt = build("lora4", "none", 1, seed=5)[:2]
    with pytest.raises(UnsafeCheckpointError, match="base-<hex>"):
        CheckpointManager(str(tmp_path / "a")).load(target, topt)
    with pytest.raises(UnsafeCheckpointError):
        CheckpointManager(str(tmp_path / "a")).verify(1)


def test_a_manifest_file_name_outside_the_step_is_refused(tmp_path):
    model, opt = _trained("plain")
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, model, opt)
    _rewrite(tmp_path / "step-00000001" / "manifest.json",
             lambda d: d["files"].update({"../../x": {"size": 1, "crc32": 0}}))
    with pytest.raises(UnsafeCheckpointError, match="not a file inside the checkpoint"):
        mgr.load(tiny.make("plain"))


def test_an_edited_manifest_fails_its_own_checksum(tmp_path):
    model, opt = _trained()
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, model, opt)
    path = tmp_path / "step-00000001" / "manifest.json"
    d = json.loads(path.read_text())
    d["adapters"]["sites"]["blocks.0.q"][0]["scale"] *= 10  # loads different weights
    path.write_text(json.dumps(d))
    target = tiny.make("plain", seed=4)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(IntegrityError, match="fails its own checksum"):
        load_model(target, str(tmp_path / "step-00000001"))
    with pytest.raises(IntegrityError, match="fails its own checksum"):
        mgr.verify(1)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_an_hf_index_cannot_lead_outside_its_directory(tmp_path):
    src = tiny.make("plain", seed=1)
    from dcp_universal import save_model

    save_model(src, str(tmp_path / "m"))
    out = export_hf(str(tmp_path / "m"), str(tmp_path / "hf"), max_shard_size=2000)
    index = tmp_path / "hf" / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    first = sorted(set(d["weight_map"].values()))[0]
    os.makedirs(tmp_path / "elsewhere")
    shutil.copy(tmp_path / "hf" / first, tmp_path / "elsewhere" / "x.safetensors")
    key = next(k for k, v in d["weight_map"].items() if v == first)
    d["weight_map"][key] = "../elsewhere/x.safetensors"
    index.write_text(json.dumps(d))
    with pytest.raises(UnsafeCheckpointError, match="elsewhere"):
        load_model(tiny.make("plain"), out)
    d["weight_map"][key] = "model-99999-of-99999.safetensors"
    index.write_text(json.dumps(d))
    with pytest.raises(Exception, match="names shard files that are not in"):
        load_model(tiny.make("plain"), out)


def test_a_safetensors_header_longer_than_its_file_is_a_clear_error(tmp_path):
    from dcp_universal import CheckpointError

    os.makedirs(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").write_bytes(int(1e15).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="its header says 1000000000000000 bytes"):
        load_model(tiny.make("plain"), str(tmp_path / "hf"))


def test_retention_never_follows_a_symlinked_step_out_of_the_root(tmp_path):
    model, opt = _trained("plain")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "manifest.json").write_text("precious")
    root = tmp_path / "root"
    mgr = CheckpointManager(str(root), keep_last=1)
    mgr.save(1, model, opt)
    os.symlink(outside, root / "step-00000000")  # looks like an old step
    mgr.save(2, model, opt)
    mgr.prune()
    assert (outside / "manifest.json").read_text() == "precious"
    assert mgr.steps() == [2]
    with pytest.raises(Exception):  # and an overwrite of that step number removes the link only
        mgr.save(0, model, opt)
    mgr.save(0, model, opt, overwrite=True)
    assert (outside / "manifest.json").read_text() == "precious"


def test_keep_best_is_not_fooled_by_nan_and_one_bad_manifest_does_not_block_retention(tmp_path):
    model, opt = _trained("plain")
    mgr = CheckpointManager(str(tmp_path), keep_best=1, best_metric="loss")
    for step, loss in enumerate([math.nan, 0.5, 0.3, 0.9], start=1):
        mgr.save(step, model, opt, metrics={"loss": loss})
    assert mgr.steps() == [3, 4]  # the best (0.3) and the newest; NaN ranks nowhere
    _rewrite(tmp_path / "step-00000004" / "manifest.json",
             lambda d: d["metrics"].update(loss="low"))
    mgr.save(5, model, opt, metrics={"loss": 0.2})  # not "retention failed"
    mgr.save(6, model, opt, metrics={"loss": 0.8})
    assert mgr.steps() == [4, 5, 6]  # step 4 cannot be read: kept and reported
    decision = mgr.prune(dry_run=True)
    assert list(decision.unreadable) == [4] and "metrics.loss" in decision.unreadable[4]


@pytest.mark.parametrize("kwargs", [dict(keep_last="3"), dict(keep_last=2.5),
                                    dict(keep_last=True), dict(keep_every=0),
                                    dict(merged_every=False), dict(storage_options="x")])
def test_options_of_the_wrong_type_are_refused(tmp_path, kwargs):
    with pytest.raises(ValueError, match=list(kwargs)[0]):
        CheckpointManager(str(tmp_path), **kwargs)


def test_a_step_that_lost_a_file_before_its_commit_is_not_committed(tmp_path, monkeypatch):
    """Another job's cleanup (or a bucket deleted and recreated) removes a file after it
    was written: the commit checks every listed file first and refuses."""
    model, opt = _trained("plain")
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, model, opt)
    real = StepWriter.commit

    def commit(self, m, group=None):
        shutil.rmtree(os.path.join(self.path, "model"))
        return real(self, m, group)

    monkeypatch.setattr(StepWriter, "commit", commit)
    with pytest.raises(CheckpointIOError, match="before its commit a file it wrote was gone"):
        mgr.save(2, model, opt)
    monkeypatch.undo()
    assert mgr.steps() == [1]
    plain = tiny.make("plain", seed=3)
    mgr.load(plain)  # the last good step is intact



def test_a_bucket_deleted_during_a_save_on_s3_commits_nothing_and_is_not_recreated(
        s3, monkeypatch):
    """The bucket is deleted after the step's files were written: the save raises, no
    step is committed, and the library never recreated the bucket (s3fs's makedirs
    would, leaving a 'committed' step without its files)."""
    import uuid

    import boto3

    _, options = s3
    bucket = f"doomed-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=options["endpoint_url"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=bucket)
    model, opt = _trained("plain")
    mgr = CheckpointManager(f"s3://{bucket}/run", storage_options=options)
    mgr.save(1, model, opt)
    real = StepWriter.commit

    def commit(self, m, group=None):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=obj["Key"])
        client.delete_bucket(Bucket=bucket)
        return real(self, m, group)

    monkeypatch.setattr(StepWriter, "commit", commit)
    with pytest.raises(CheckpointIOError):
        mgr.save(2, model, opt)
    monkeypatch.undo()
    buckets = [b["Name"] for b in client.list_buckets()["Buckets"]]
    assert bucket not in buckets, "the library recreated the deleted bucket"
    mgr.close()


# ---- no code from a checkpoint -------------------------------------------------------

class Payload:
    """What an attacker pickles: unpickling it creates the marker file."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_payload_in_dcp_metadata_never_runs(tmp_path):
    import pickle

    from dcp_universal import CheckpointError, save_model
    from dcp_universal.cli import main

    save_model(tiny.make("plain", seed=1), str(tmp_path / "m"))
    meta_path = tmp_path / "m" / ".metadata"
    md = pickle.loads(meta_path.read_bytes())
    marker = tmp_path / "pwned"
    md.storage_meta = Payload(marker)
    meta_path.write_bytes(pickle.dumps(md))
    target = tiny.make("plain", seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(IntegrityError, match=r"\.metadata has \d+ bytes, the manifest says"):
        load_model(target, str(tmp_path / "m"))  # the directory's own records refuse it
    # an attacker rewrites (or removes) those records too: the allow-list still refuses
    (tmp_path / "m" / "dcp_universal.json").unlink()
    with pytest.raises(UnsafeCheckpointError, match="io.open, which is not plain data.*trusted=True"):
        load_model(target, str(tmp_path / "m"))
    with pytest.raises(UnsafeCheckpointError):
        export_hf(str(tmp_path / "m"), str(tmp_path / "hf"))
    assert main(["inspect", str(tmp_path / "m")]) == 2
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "hf2")]) == 2
    assert not marker.exists()
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    try:  # trusted: the file's code runs, as the caller asked
        load_model(target, str(tmp_path / "m"), trusted=True)
    except (CheckpointError, AttributeError, TypeError):
        pass
    assert marker.exists()


def _replace_entry(mgr, step, key, value):
    """Rewrite a step's optimizer/ with ``key`` set to ``value`` and the manifest's
    records (and checksum) updated, as an attacker with write access would."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from dcp_universal.format.manifest import FileRecord
    from dcp_universal.storage import integrity

    opt_dir = os.path.join(mgr.step_path(step), "optimizer")
    md = FileSystemReader(opt_dir).read_metadata()
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
             if isinstance(m, TensorStorageMetadata) else b"" for k, m in
             md.state_dict_metadata.items()}
    dcp.load(state, checkpoint_id=opt_dir, no_dist=True)
    state[key] = value
    shutil.rmtree(opt_dir)
    dcp.save(state, checkpoint_id=opt_dir, no_dist=True)
    m = mgr.manifest(step)
    m.files = {k: v for k, v in m.files.items() if not k.startswith("optimizer/")}
    for name in os.listdir(opt_dir):  # block checksums, as this format requires
        with open(os.path.join(opt_dir, name), "rb") as f:
            data = f.read()
        block = integrity.BLOCK_BYTES
        m.files[f"optimizer/{name}"] = FileRecord(
            size=len(data), algo=integrity.ALGO, block=block,
            sums=b"".join(integrity.checksum(integrity.ALGO, data[i:i + block]).to_bytes(4, "big")
                          for i in range(0, len(data), block)))
    with open(os.path.join(mgr.step_path(step), "manifest.json"), "w") as f:
        f.write(m.to_json())


@pytest.mark.parametrize("key, as_bytes", [("train/extra/train", False),
                                           ("optim/meta", True), ("train/rank-0/rng", True)])
def test_a_payload_in_optimizer_state_never_runs(tmp_path, key, as_bytes):
    import pickle

    model, opt = _trained("plain")
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, model, opt, extra={"train": {"step": 1}})
    marker = tmp_path / "pwned"
    # a byte item DCP would unpickle itself, or a blob (bytes) the library decodes
    _replace_entry(mgr, 1, key, pickle.dumps(Payload(marker)) if as_bytes else Payload(marker))
    target, topt = build("plain", "none", 1, seed=7)[:2]
    before = {k: v.clone() for k, v in target.state_dict().items()}
    counters = {"step": 0}
    with pytest.raises(UnsafeCheckpointError, match="trusted=True"):
        CheckpointManager(str(tmp_path)).load(target, topt, extra={"train": counters})
    assert not marker.exists()
    assert counters == {"step": 0} and not topt.state
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


class NumpyRng:
    """A data loader's numpy RNG, as training loops keep one."""

    def __init__(self, seed) -> None:
        import numpy as np

        self.rng = np.random.RandomState(seed)

    def state_dict(self):
        return {"numpy": self.rng.get_state(), "epoch": 3}

    def load_state_dict(self, state):
        self.rng.set_state(state["numpy"])


@pytest.mark.parametrize("old_blobs", [False, True])
def test_ordinary_training_state_loads_without_trusted(tmp_path, monkeypatch, old_blobs):
    """LR scheduler, counters, torch / python / numpy RNG: plain data, no trusted=True
    needed; blobs written before this format (plain pickles) still load."""
    import pickle
    import random

    from dcp_universal.format import state as state_blobs

    if old_blobs:
        monkeypatch.setattr(state_blobs, "dumps", pickle.dumps)
    model, opt, sched = build("plain", "none", 1)
    train(model, opt, sched, Data(0), {"step": 0}, 2)
    data = NumpyRng(5)
    data.rng.rand(7)
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(2, model, opt, extra={"sched": sched, "train": {"step": 2}, "data": data})
    want_np, want_py, want_torch = data.rng.rand(3), random.random(), torch.rand(3)
    monkeypatch.undo()

    target, topt, tsched = build("plain", "none", 1, seed=9)
    tdata, counters = NumpyRng(0), {}
    CheckpointManager(str(tmp_path)).load(target, topt, extra={
        "sched": tsched, "train": counters, "data": tdata})
    assert counters == {"step": 2} and tsched.state_dict() == sched.state_dict()
    assert (tdata.rng.rand(3) == want_np).all()
    assert random.random() == want_py and torch.equal(torch.rand(3), want_torch)


def test_an_export_never_mixes_with_an_earlier_one_and_a_killed_one_never_looks_complete(
        tmp_path, monkeypatch):
    from dcp_universal import ExportExistsError, NotACheckpointError, save_model
    from dcp_universal.interop import hf

    src, other = tiny.make("plain", seed=1), tiny.make("plain", seed=2)
    save_model(src, str(tmp_path / "a"))
    save_model(other, str(tmp_path / "b"))
    out = str(tmp_path / "hf")
    export_hf(str(tmp_path / "a"), out, max_shard_size=2000)  # sharded, with an index
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")    # the user's own file
    with pytest.raises(ExportExistsError, match="already holds an export.*overwrite=True"):
        export_hf(str(tmp_path / "b"), out)
    export_hf(str(tmp_path / "b"), out, overwrite=True)      # one file: the stale index goes
    assert sorted(os.listdir(out)) == ["model.safetensors", "tokenizer.json"]
    got = tiny.make("plain", seed=3)
    load_model(got, out)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in got.state_dict().items())

    real, calls = hf._write_shard, []

    def dies_on_the_second_shard(*args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("killed")
        return real(*args)

    monkeypatch.setattr(hf, "_write_shard", dies_on_the_second_shard)
    with pytest.raises(OSError, match="killed"):
        export_hf(str(tmp_path / "a"), str(tmp_path / "hf2"), max_shard_size=2000)
    with pytest.raises(NotACheckpointError):  # shards without their index: no export
        load_model(tiny.make("plain"), str(tmp_path / "hf2"))


def test_export_peft_refuses_to_write_over_an_adapter_unless_asked(tmp_path):
    from dcp_universal import ExportExistsError, apply_lora, export_peft

    model = apply_lora(tiny.make("plain", seed=1).requires_grad_(False), rank=2, alpha=4.0,
                       targets=["q"])
    tiny.randomize_adapters(model, seed=3)
    step = CheckpointManager(str(tmp_path / "run")).save(1, model)
    out = export_peft(step, str(tmp_path / "adapter"))
    with pytest.raises(ExportExistsError, match="already holds an adapter"):
        export_peft(step, out)
    assert export_peft(step, out, overwrite=True) == out


_EXIT_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import tiny
from dcp_universal import CheckpointManager
from dcp_universal.training.items import Item

class Broken(Item):
    name = "broken"
    def save(self, ctx):
        def write(path, group):
            raise OSError("the disk went away")
        return write

items = [Broken()] if {fail!r} else []
mgr = CheckpointManager({root!r}, items=items)
mgr.save(1, tiny.make("plain", seed=0), blocking=False)
# no wait(), no close(): the process just ends
"""


@pytest.mark.parametrize("fail", [False, True])
def test_an_async_save_in_flight_at_exit_finishes_or_says_so(tmp_path, fail):
    import subprocess
    import sys

    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    root = str(tmp_path / "run")
    script = _EXIT_SCRIPT.format(tests=tests, fail=fail, root=root)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    steps = CheckpointManager(root).steps()
    if fail:
        assert steps == []
        assert "asynchronous save of step 1" in done.stderr and "not committed" in done.stderr
        assert "the disk went away" in done.stderr
    else:
        assert steps == [1] and "failed" not in done.stderr, done.stderr


def test_a_full_disk_says_so_and_commits_nothing(tmp_path, monkeypatch):
    import contextlib
    import errno

    from dcp_universal import CheckpointError
    from dcp_universal.storage.local import LocalStorage

    model, opt = _trained("plain")
    mgr = CheckpointManager(str(tmp_path / "run"))
    mgr.save(1, model, opt)

    class FullDisk:
        """The writer's file system once the disk is full: writes fail with ENOSPC."""

        def __init__(self, inner) -> None:
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        @contextlib.contextmanager
        def create_stream(self, path, mode):
            with self._inner.create_stream(path, mode) as stream:
                class Stream:
                    def write(self, data):
                        raise OSError(errno.ENOSPC, "No space left on device")

                    def __getattr__(self, name):
                        return getattr(stream, name)

                yield Stream() if "w" in mode else stream

    real = LocalStorage.dcp_writer

    def dcp_writer(self, path, **options):
        writer = real(self, path, **options)
        writer.fs._inner = FullDisk(writer.fs._inner)  # the disk, below the checksums
        return writer

    monkeypatch.setattr(LocalStorage, "dcp_writer", dcp_writer)
    with pytest.raises(CheckpointIOError, match="the disk is full.*No space left on device"):
        mgr.save(2, model, opt)
    monkeypatch.undo()
    assert mgr.steps() == [1]
    mgr.load(tiny.make("plain", seed=4))  # the last good step is intact

    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        CheckpointManager(str(tmp_path / "afile")).save(1, model, opt)


# ---- one writer per root ---------------------------------------------------------------

def _lease_of_another_job(root, *, host=None, pid=None, age=0.0, ttl=120.0):
    """The lease file another job would have written."""
    import socket
    import time

    from dcp_universal.training import lease

    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, lease.LEASE_FILE), "w") as f:
        json.dump({"owner": "another-job", "host": host or socket.gethostname(),
                   "pid": pid if pid is not None else os.getppid(),
                   "started": lease._started(pid if pid is not None else os.getppid()),
                   "renewed_unix": time.time() - age, "ttl_s": ttl}, f)


def test_a_second_job_writing_the_same_root_is_refused(tmp_path):
    import subprocess
    import sys

    from dcp_universal import RootBusyError
    from dcp_universal.training import lease

    model, opt = _trained("plain")
    root = str(tmp_path / "run")
    mgr = CheckpointManager(root)
    mgr.save(1, model, opt)
    _lease_of_another_job(root)  # a live job (our parent process) took it over meanwhile
    with pytest.raises(RootBusyError, match="being written by another job.*pid"):
        mgr.save(2, model, opt)
    with pytest.raises(RootBusyError):
        CheckpointManager(root, keep_last=1).prune()
    assert mgr.steps() == [1]
    mgr.load(tiny.make("plain", seed=2))  # readers need no lease

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    _lease_of_another_job(root, pid=int(dead))  # its process is gone: taken over at once
    mgr.save(2, model, opt)
    mgr.close()
    # another host's lease, whatever its clock says: taken over once it stayed unchanged
    # for the ttl as watched from here (tests/unit/test_fencing.py: a live one is not)
    _lease_of_another_job(root, host="elsewhere", age=-10.0)
    watcher = CheckpointManager(root, lease_ttl=0.5)
    watcher.save(3, model, opt)
    watcher.close()
    assert mgr.steps() == [1, 2, 3]


def test_the_lease_is_renewed_while_the_job_lives_and_released_by_close(tmp_path):
    import time

    from dcp_universal import RootBusyError
    from dcp_universal.training.lease import Lease

    model, opt = _trained("plain")
    for root in (str(tmp_path / "run"), "memory://lease-test/run"):  # disk and object store
        mgr = CheckpointManager(root, lease_ttl=1.0)
        mgr.save(1, model, opt)
        other = Lease(mgr._store, mgr.root, ttl=1.0)
        other.owner = "another-job"
        time.sleep(2.5)  # longer than the ttl: renewed meanwhile (every ttl / 4)
        with pytest.raises(RootBusyError):
            other.acquire()
        mgr.close()
        other.acquire()  # released: the next job takes it at once
        other.release()
        assert not mgr._store.exists(other.path)
    mgr._store.remove_tree("memory://lease-test")


def _race_for_the_lease(root, options, go, out):
    """One job: once every job is ready, at the time in the file ``go``, try to take
    ``root``'s lease; write the outcome to ``out``."""
    import time

    from dcp_universal import RootBusyError
    from dcp_universal.storage import storage_for
    from dcp_universal.training.lease import Lease

    lease = Lease(storage_for(root, options), root, ttl=120.0)
    lease.store.exists(root)  # connected
    open(out + ".ready", "w").close()
    while not os.path.exists(go):
        time.sleep(0.005)
    time.sleep(max(0.0, float(open(go).read()) - time.time()))
    try:
        lease.acquire()
        outcome = "won"
    except RootBusyError:
        outcome = "refused"
    with open(out, "w") as f:
        f.write(outcome)
    time.sleep(1.0)  # hold it while the others look
    os._exit(0)  # no release at exit: the parent reads the file


# Two of the four (holder, store) pairs: each store's create-only write and each way to
# the lease (a free root; an abandoned lease's takeover marker) is raced once. Each
# case spawns four interpreters (torch's import: most of its ~13 s).
@pytest.mark.parametrize("where,holder", [("local", "dead"), ("s3", "none")])
def test_of_jobs_racing_for_one_root_exactly_one_gets_the_lease(tmp_path, request, where, holder):
    import multiprocessing
    import subprocess
    import sys
    import time

    from dcp_universal.storage import storage_for
    from dcp_universal.training import lease

    if where == "s3":
        base, options = request.getfixturevalue("s3")
        root = f"{base}/race-{holder}-{os.getpid()}-{time.time_ns()}"
    else:
        root, options = str(tmp_path / "run"), None
    if holder == "dead":  # a crashed job's lease, on this host: every racer may take it over
        dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                  capture_output=True, text=True).stdout)
        store = storage_for(root, options)
        store.makedirs(root)
        store.write_atomic(f"{root}/{lease.LEASE_FILE}", json.dumps(
            {"owner": "crashed", "acquired": "x", "host": __import__("socket").gethostname(),
             "pid": dead, "renewed_unix": time.time(), "ttl_s": 120.0}).encode())
    ctx = multiprocessing.get_context("spawn")
    go = str(tmp_path / "go")
    outs = [str(tmp_path / f"out-{i}") for i in range(4)]
    procs = [ctx.Process(target=_race_for_the_lease, args=(root, options, go, o))
             for o in outs]
    for p in procs:
        p.start()
    deadline = time.time() + 120
    while not all(os.path.exists(o + ".ready") for o in outs) and time.time() < deadline:
        time.sleep(0.05)
    with open(go + ".tmp", "w") as f:
        f.write(str(time.time() + 0.3))
    os.replace(go + ".tmp", go)
    for p in procs:
        p.join(60)
    outcomes = sorted(open(o).read() for o in outs)
    assert outcomes == ["refused"] * 3 + ["won"], outcomes
    held = json.loads(storage_for(root, options).read_bytes(f"{root}/{lease.LEASE_FILE}"))
    assert held["owner"] != "crashed"


def test_a_store_that_answers_no_request_gives_a_checkpoint_error_saying_what_to_check():
    pytest.importorskip("s3fs")
    from dcp_universal import CheckpointIOError, load_model

    dead = {"endpoint_url": "http://127.0.0.1:9", "key": "testing", "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    model = tiny.make("plain", seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointIOError, match="s3://ckpt/run/step-00000001.*failed: "
                       "EndpointConnectionError.*check that the store is reachable"):
        load_model(model, "s3://ckpt/run/step-00000001", storage_options=dead)
    with pytest.raises(CheckpointIOError, match="listing s3://ckpt/run failed"):
        CheckpointManager("s3://ckpt/run", storage_options=dead).load(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
