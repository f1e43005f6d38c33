"""One rank's storage fails during a save: every rank raises a clear error within a
bounded time (no rank hangs in a barrier), nothing is committed, and the previous step
still loads."""

from __future__ import annotations

import os
import time

import pytest
import torch

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


def _load_with_damaged_rank1_file(rank, world_size, root):
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    model, opt, sched = build("plain", "fsdp", world_size)
    mgr = CheckpointManager(root)
    train(model, opt, sched, Data(rank), {"step": 0}, 1)
    mgr.save(1, model, opt)
    target, topt, tsched = build("plain", "fsdp", world_size, seed=5)
    train(target, topt, tsched, Data(rank + 7), {"step": 0}, 1)
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    before = {k: local(v).clone() for k, v in target.state_dict().items()}
    if rank == 0:  # rank 1's data file of the model: same size, unreadable
        path = os.path.join(mgr.step_path(1), "model", "__1_0.distcp")
        data = bytearray(open(path, "rb").read())
        data[-22:] = bytes(22)
        open(path, "wb").write(data)
    dist.barrier()
    outcomes = []
    for verify in (None, False):  # checked: the checksum finds it; unchecked: the parse
        try:
            mgr.load(target, topt, verify=verify)
            outcomes.append("loaded")
        except CheckpointError as e:
            outcomes.append(f"{type(e).__name__}: {e}")
    untouched = all(torch.equal(local(v), before[k]) for k, v in target.state_dict().items())
    return outcomes, untouched


def test_a_load_failing_on_one_rank_leaves_every_rank_untouched(tmp_path):
    """Rank 1 cannot read its shard; rank 0 read and prepared all of its own, but its
    copies wait for a commit that never comes."""
    results = harness.run(_load_with_damaged_rank1_file, 2, str(tmp_path / "root"), timeout=120)
    for rank, ((checked, unchecked), untouched) in enumerate(results):
        assert checked.startswith("IntegrityError: "), (rank, checked)
        assert "__1_0.distcp fails its checksum" in checked, (rank, checked)
        assert "found by rank 1" in checked, (rank, checked)
        assert unchecked.startswith("IntegrityError: "), (rank, unchecked)
        assert "cannot be read" in unchecked and "found by rank 1" in unchecked, (rank, unchecked)
        assert untouched, rank
