"""Rank 0 acts, every rank agrees: the commit helper's errors, and the step a reader
picks while a writer commits new ones."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

import harness
import tiny
from dcp_universal import CheckpointManager, StepAlreadyExistsError


class _Unpicklable(RuntimeError):
    def __init__(self, message, handle):
        super().__init__(message)
        self.handle = handle

    def __reduce__(self):
        raise TypeError("not picklable")


def _rank0_fails(rank, world_size, which):
    from dcp_universal import _comm

    def act():
        if which == "library":
            raise StepAlreadyExistsError("step 5 is already committed")
        raise _Unpicklable("disk on fire", handle=lambda: None)

    try:
        _comm.on_rank0(act)
    except Exception as e:
        return type(e).__name__, str(e).splitlines()[0], "\n".join(getattr(e, "__notes__", []))
    return None


@pytest.mark.parametrize("which", ["library", "unpicklable"])
def test_rank0s_exception_reaches_every_rank_with_class_message_and_traceback(which):
    results = harness.run(_rank0_fails, 2, which)
    expected = {"library": ("StepAlreadyExistsError", "step 5 is already committed"),
                "unpicklable": ("_Unpicklable", "disk on fire")}[which]
    assert [r[:2] for r in results] == [expected, expected]
    assert results[0][2] == ""  # rank 0 raises its own exception, traceback intact
    assert "raised on rank 0" in results[1][2] and "in act" in results[1][2]


def _reader(rank, world_size, root, workdir):
    mgr = CheckpointManager(root)
    if rank == 0:
        steps = mgr._tier.steps  # where a load lists the committed steps

        def chosen():  # rank 0 has listed; now let the writer commit step 2
            out = steps()
            open(os.path.join(workdir, "rank0-listed"), "w").close()
            return out

        mgr._tier.steps = chosen
    else:  # rank 1 starts its load only once step 2 is committed
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(workdir, "step2-committed")):
            assert time.monotonic() < deadline, "the writer never committed step 2"
            time.sleep(0.02)
    model = tiny.make("plain", seed=50 + rank)
    mgr.load(model)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_reader_racing_a_writer_loads_one_step_on_every_rank(tmp_path):
    root, workdir = str(tmp_path / "run"), str(tmp_path)
    writer = CheckpointManager(root)
    one, two = tiny.make("plain", seed=1), tiny.make("plain", seed=2)
    writer.save(1, one)

    def write_step_2():
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(workdir, "rank0-listed")):
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        writer.save(2, two)
        open(os.path.join(workdir, "step2-committed"), "w").close()

    thread = threading.Thread(target=write_step_2)
    thread.start()
    try:
        results = harness.run(_reader, 2, root, workdir)
    finally:
        thread.join()
    assert writer.steps() == [1, 2]  # step 2 was committed while the readers loaded
    for state in results:  # both ranks loaded step 1, the step rank 0 picked
        for k, v in one.state_dict().items():
            assert torch.equal(state[k], v), k
