"""One rank's storage fails during a save: every rank raises a clear error within a
bounded time (no rank hangs in a barrier), nothing is committed, and the previous step
still loads."""

from __future__ import annotations

import os
import time

import pytest

import faulty
import harness
from dcp_universal import CheckpointManager
from dcp_universal.errors import CheckpointError
from train_loop import Data, build, train


def _save_with_fault(rank, world_size, root, fault):
    faulty.register()
    model, opt, sched = build("lora4", "fsdp", world_size)
    mgr = CheckpointManager(root)
    train(model, opt, sched, Data(rank), {"step": 0}, 1)
    mgr.save(1, model, opt)
    os.environ.update(fault)  # from now on rank 1's writes of step 2 fail
    train(model, opt, sched, Data(rank), {"step": 1}, 2)
    start = time.monotonic()
    try:
        mgr.save(2, model, opt)
        outcome = "saved"
    except CheckpointError as e:
        outcome = f"{type(e).__name__}: {e}"
    return outcome, time.monotonic() - start, mgr.steps()


@pytest.mark.parametrize("fault", [
    {"FAULTY_PATTERN": "*step-00000002/optimizer/__1_*", "FAULTY_RANK": "1"},
    {"FAULTY_PATTERN": "*step-00000002/adapters/__1_*", "FAULTY_RANK": "1", "FAULTY_DELAY": "3"},
], ids=["write-error", "write-timeout"])
def test_one_rank_storage_failure_fails_every_rank_and_commits_nothing(tmp_path, fault):
    root = "faulty://" + str(tmp_path / "root")
    results = harness.run(_save_with_fault, 2, root, fault, timeout=120)
    for rank, (outcome, seconds, steps) in enumerate(results):
        assert outcome.startswith("CheckpointIOError: writing"), (rank, outcome)
        assert "rank(s) [1]" in outcome and "injected" in outcome
        assert seconds < 30, (rank, seconds)  # bounded: the failing write's time, not a hang
        assert steps == [1]
    faulty.register()
    mgr = CheckpointManager(root)
    assert mgr.latest_step() == 1
    model, opt, _ = build("lora4", "none", 1, seed=3)
    report = mgr.load(model, opt, skip_per_rank=["rng"])
    assert report.optimizer_restored and not report.optimizer_fresh
    mgr.verify(1)
