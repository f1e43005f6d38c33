"""No hang longer than the user's timeout (issue "Trust"): when one rank stops inside a
save or a load (a hung file system), every other rank raises CheckpointTimeoutError
within the timeout plus a few seconds, naming the rank it waited for; nothing is
committed, and the stalled rank, once it wakes up, commits nothing either."""

from __future__ import annotations

import os
import time

import pytest
import torch

import harness
import tiny
from dcp_universal import CheckpointManager, CheckpointTimeoutError, load_model, save_model

TIMEOUT_S = 4.0
STALL_S = 9.0  # the stalled rank wakes up well after the others gave up (at ~4.1 s)
SLACK_S = 10.0  # what the issue allows beyond the timeout


def _stall_in(where: str) -> None:
    """Patch this process so that its next ``where`` sleeps STALL_S first."""
    from dcp_universal.storage.local import LocalStorage
    from dcp_universal.training import commit

    def sleeping(run):
        def slow(*args, **kwargs):
            time.sleep(STALL_S)
            return run(*args, **kwargs)
        return slow

    if where == "write":  # inside DCP, in this rank's write of its files
        make = LocalStorage.dcp_writer

        def dcp_writer(self, path, **options):
            writer = make(self, path, **options)
            writer.write_data = sleeping(writer.write_data)
            return writer

        LocalStorage.dcp_writer = dcp_writer
    elif where == "read":  # inside DCP, in this rank's read of its files
        make_reader = LocalStorage.dcp_reader

        def dcp_reader(self, *args, **kwargs):
            reader = make_reader(self, *args, **kwargs)
            reader.read_data = sleeping(reader.read_data)
            return reader

        LocalStorage.dcp_reader = dcp_reader
    elif where == "commit":  # rank 0, after every write, before it claims the commit
        commit.check_files = sleeping(commit.check_files)
    else:
        raise AssertionError(where)


def _job(rank, world_size, root, what, stalled):
    model = tiny.make("plain", seed=3)
    mgr = CheckpointManager(root, timeout=TIMEOUT_S)
    if what in ("load", "load_model"):
        mgr.save(1, model)
        save_model(model, f"{root}/plain")
    if rank == stalled:
        _stall_in({"save": "write", "async": "write", "save_model": "write", "load": "read",
                   "load_model": "read", "commit": "commit"}[what])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if what == "load":
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = harness.outcome(lambda: mgr.load(model))
    elif what == "load_model":
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = harness.outcome(lambda: load_model(model, f"{root}/plain", timeout=TIMEOUT_S))
    elif what == "async":
        start = time.monotonic()
        mgr.save(2, model, blocking=False)
        name, message, _ = harness.outcome(mgr.wait)
        out = (name, message, time.monotonic() - start)
    elif what == "save_model":
        out = harness.outcome(lambda: save_model(model, f"{root}/exported", timeout=TIMEOUT_S))
    else:
        out = harness.outcome(lambda: mgr.save(2, model))
    untouched = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    mgr.close()
    return out, untouched


CASES = [(2, "save", 1), (2, "load", 1), (4, "save", 2), (4, "load", 3), (2, "async", 1),
         (2, "commit", 0), (2, "save_model", 0), (2, "load_model", 1)]


@pytest.mark.parametrize("world,what,stalled", CASES, ids=[f"{w}ranks-{what}-stall{s}"
                                                          for w, what, s in CASES])
def test_a_stalled_rank_makes_every_other_rank_raise_within_the_timeout(
        tmp_path, world, what, stalled):
    root = str(tmp_path / "run")
    results = harness.run(_job, world, root, what, stalled)
    for rank, ((name, message, seconds), untouched) in enumerate(results):
        assert name == CheckpointTimeoutError.__name__, (rank, name, message)
        assert "restart the job" in message
        if rank != stalled:
            assert seconds < TIMEOUT_S + SLACK_S, (rank, seconds, message)
            assert f"rank(s) [{stalled}]" in message, (rank, message)
        else:  # woke up to find the others gone, and gave up at once
            assert seconds < STALL_S + TIMEOUT_S + SLACK_S, (rank, seconds, message)
        if what.startswith("load"):
            assert untouched, f"rank {rank}: a failed load changed the model"
    mgr = CheckpointManager(root)
    if what in ("load", "load_model"):
        assert mgr.steps() == [1]
    elif what == "save_model":
        assert not os.path.exists(f"{root}/exported/.metadata")
    else:
        assert mgr.steps() == []  # nothing committed, not even by the stalled rank
    if what == "commit":
        assert "Nothing was committed" in results[1][0][1]
        assert "running _commit on rank 0" in results[1][0][1]
        assert "not committed" in results[0][0][1]


def _bad_timeout(rank, world_size, root):
    out = []
    for value in (0, -1, float("nan"), True, "10"):
        try:
            CheckpointManager(root, timeout=value)
        except ValueError as e:
            out.append(str(e))
    return out


def test_timeout_must_be_a_positive_number(tmp_path):
    messages = _bad_timeout(0, 1, str(tmp_path))
    assert len(messages) == 5 and all("positive number of seconds" in m for m in messages)
