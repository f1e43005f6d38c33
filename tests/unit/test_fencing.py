"""Fenced writers (issue 29): a job that lost the root's lease commits and removes
nothing, abandonment is judged by the observer's own monotonic clock, and every refusal
names the real holder. Each case failed before the fence."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import tiny
from dcp_universal import CheckpointManager, RootBusyError, load_model
from dcp_universal.storage import LocalStorage
from dcp_universal.training import lease as lease_mod
from dcp_universal.training.lease import Lease
from s3server import fresh_prefix

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TTL = 1.0

# Job A, on "node-a": saves step 1, then step 2, and stops itself (SIGSTOP) at the fence
# check named by `target` (after it passed, or before it when `before`), as a long GC
# pause or a stalled NFS would. Job B takes the root over meanwhile.
_JOB_A = textwrap.dedent("""
    import os, signal, socket, sys
    sys.path.insert(0, {tests!r})
    socket.gethostname = lambda: "node-a"
    import tiny
    from dcp_universal import CheckpointManager, RootBusyError
    from dcp_universal.training.lease import Lease

    check, paused = Lease.check, []

    def pause(lease):
        # no renewal in flight when the process stops (a PUT the store finishes after
        # the stop would read as a live holder to B, which is right, but not this case)
        lease._stop.set()
        if lease._thread is not None:
            lease._thread.join()
        paused.append(1); os.kill(os.getpid(), signal.SIGSTOP)

    def pausing(self, what):
        hit = {target!r} in what and not paused
        if hit and {before!r}:
            pause(self)
        check(self, what)
        if hit and not {before!r}:
            pause(self)

    mgr = CheckpointManager({root!r}, lease_ttl={ttl!r}, keep_last={keep_last!r},
                            storage_options={options!r})
    model = tiny.make("plain", seed=1)
    mgr.save(1, model)
    Lease.check = pausing
    try:
        mgr.save(2, model)
        print("A: saved step 2", flush=True)
    except RootBusyError as e:
        print("A: refused:", e, flush=True)
    mgr.close()
""")


def _stopped(pid: int, deadline: float) -> None:
    while time.time() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] == "T":
                return
        time.sleep(0.05)
    raise AssertionError("job A never reached its pause")


def _weights(root, step, options=None):
    target = tiny.make("plain", seed=9)
    load_model(target, f"{root}/step-{step:08d}", storage_options=options)
    return target.state_dict()


def _same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("where,act", [("local", "commit"), ("local", "delete"),
                                       ("s3", "commit")])
def test_a_paused_writer_never_commits_or_deletes_after_another_job_took_the_root(
        tmp_path, request, where, act):
    if where == "s3":
        url, options = request.getfixturevalue("s3")
        root = fresh_prefix(url)
    else:
        root, options = str(tmp_path / "run"), None
    # on a local disk A is paused *after* its check passed: only the fence's rename
    # stops it; an object store has no rename, so there A is paused before the check
    target = "step-00000002/manifest.json" if act == "commit" else "step-00000001"
    script = _JOB_A.format(tests=TESTS, target=target, before=where == "s3", root=root,
                           ttl=TTL, keep_last=1 if act == "delete" else None, options=options)
    a = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        _stopped(a.pid, time.time() + 120)
        b = CheckpointManager(root, lease_ttl=TTL, storage_options=options)
        model_b = tiny.make("plain", seed=2)
        mine = [3, 4] if act == "delete" else [2, 3]
        for step in mine:  # takes the lease over once A's stayed unchanged for TTL
            b.save(step, model_b)
    finally:
        os.kill(a.pid, signal.SIGCONT)
    out, _ = a.communicate(timeout=120)
    assert "A: refused:" in out and "no longer holds the writer lease" in out, out
    if act == "commit":  # A's step 2 never committed over B's
        assert b.steps() == [1, 2, 3]
        assert _same(_weights(root, 2, options), model_b.state_dict())
        assert json.loads(b._store.read_bytes(f"{root}/step-00000002/manifest.json")
                          )["writer"] == b._lease.token
    else:  # A's retention removed nothing once B held the root
        assert b.steps() == [1, 2, 3, 4]
        assert _same(_weights(root, 1, options), tiny.make("plain", seed=1).state_dict())
    b.close()


class _Elsewhere(Lease):
    """A holder on another host whose wall clock is ``skew`` seconds off."""

    skew = 0.0

    def _content(self) -> bytes:
        d = json.loads(super()._content())
        d.update(host="node-a", renewed_unix=d["renewed_unix"] + self.skew)
        return json.dumps(d).encode()


def _holder(root: str, skew: float, ttl: float = 0.4) -> Lease:
    holder = _Elsewhere(LocalStorage(), root, ttl=ttl)
    holder.owner, holder.skew = "job-a", skew
    holder.acquire()
    return holder


def _contender(root: str, ttl: float = 0.4) -> Lease:
    other = Lease(LocalStorage(), root, ttl=ttl)
    other.owner = "job-b"
    return other


def test_a_live_holder_whose_clock_is_behind_is_never_taken_over(tmp_path):
    root = str(tmp_path / "run")
    holder = _holder(root, skew=-300.0)
    try:
        for _ in range(3):
            with pytest.raises(RootBusyError) as e:
                _contender(root).acquire()
            assert "node-a" in str(e.value) and "renewed while this job watched" in str(e.value)
            assert not re.search(r"-\d+ s\b", str(e.value)) and "None" not in str(e.value)
        holder.check("a commit")  # still the holder
    finally:
        holder.release()


def test_a_dead_holder_whose_clock_is_ahead_is_taken_over_once_watched_for_ttl(tmp_path):
    root = str(tmp_path / "run")
    holder = _holder(root, skew=+300.0)
    holder._stop.set()  # its job died: no renewal from now on
    holder._thread.join()
    other = _contender(root)
    start = time.monotonic()
    other.acquire()
    assert time.monotonic() - start >= other.ttl * 0.95  # watched, not judged by its clock
    with pytest.raises(RootBusyError, match="no longer holds the writer lease.*acquisition"):
        holder.check("a commit")
    assert json.loads(open(other.path).read())["owner"] == "job-b"
    assert not any(n.startswith(lease_mod.FENCE_PREFIX + holder.token)
                   for n in os.listdir(root))  # fenced off, then cleared
    other.release()
    assert os.listdir(root) == []  # no takeover marker, lease or fence left behind


def test_a_holder_that_renewed_just_after_the_last_look_is_not_taken_over(tmp_path):
    root = str(tmp_path / "run")
    holder = _holder(root, skew=0.0)
    holder._stop.set()
    holder._thread.join()
    other = _contender(root)
    seen = other._raw()  # the watcher's last look: unchanged for the ttl, it thinks
    holder._renew("renewing the writer lease")  # the holder renews right after
    assert other._take_over(json.loads(seen), seen) is False
    holder.check("a commit")  # still the holder: no marker against it is left
    assert sorted(os.listdir(root)) == sorted([lease_mod.LEASE_FILE,
                                               lease_mod.FENCE_PREFIX + holder.token])
    holder.release()
    assert os.listdir(root) == []


def test_a_manager_watching_since_its_start_takes_an_abandoned_root_without_waiting(tmp_path):
    root = str(tmp_path / "run")
    holder = _holder(root, skew=0.0, ttl=0.5)
    holder._stop.set()
    holder._thread.join()
    mgr = CheckpointManager(root, lease_ttl=0.5)  # starts watching here
    time.sleep(0.6)  # a load and some training
    start = time.monotonic()
    mgr.save(1, tiny.make("plain"))
    assert time.monotonic() - start < 0.5  # had watched long enough already
    mgr.close()


def test_the_loser_of_a_race_for_a_free_root_that_finds_the_lease_gone_tries_again(
        tmp_path, monkeypatch):
    root = str(tmp_path / "run")
    lease = _contender(root)
    real, lost = LocalStorage.create_new, []

    def racing(self, path, data):
        if path == lease.path and not lost:  # another job won, then released at once
            lost.append(1)
            return False
        return real(self, path, data)

    monkeypatch.setattr(LocalStorage, "create_new", racing)
    lease.acquire()
    assert lost and json.loads(open(lease.path).read())["owner"] == "job-b"
    lease.release()


def test_a_refusal_names_the_real_holder_or_says_it_cannot_be_read(tmp_path):
    root = str(tmp_path / "run")
    holder = _holder(root, skew=0.0)
    other = _contender(root)
    real = other._raw
    calls = []

    def free_once():  # it looked free, then the holder's create won
        calls.append(1)
        return None if len(calls) == 1 else real()

    other._raw = free_once
    with pytest.raises(RootBusyError) as e:
        other.acquire()
    msg = str(e.value)
    assert "host 'node-a'" in msg and f"pid {os.getpid()}" in msg and "None" not in msg
    holder.release()

    stop = threading.Event()

    def scribble():  # a lease that is not JSON, and keeps changing
        i = 0
        while not stop.is_set():
            i += 1
            with open(os.path.join(root, "writer.lease"), "w") as f:
                f.write(f"{{not json {i}")
            time.sleep(0.02)

    t = threading.Thread(target=scribble)
    t.start()
    try:
        with pytest.raises(RootBusyError, match="its holder cannot be read"):
            _contender(root).acquire()
    finally:
        stop.set()
        t.join()
    other = _contender(root)
    other.acquire()  # garbage that stays unchanged for ttl: abandoned
    other.release()
