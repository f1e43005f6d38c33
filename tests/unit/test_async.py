"""Asynchronous saves in one process: a snapshot at call time, the same commit as a
blocking save, failures delivered once, one save in flight, reused staging buffers."""

from __future__ import annotations

import threading

import pytest
import torch

import faulty
from dcp_universal import CheckpointIOError, CheckpointManager, SaveHandle
from train_loop import Data, assert_same, snapshot, train, trained_job


@pytest.mark.parametrize("variant", ["plain", "lora4"])
def test_the_snapshot_is_taken_at_call_time(tmp_path, variant):
    model, opt, sched, counters = trained_job(variant)
    mgr = CheckpointManager(str(tmp_path / "root"))
    want = snapshot(model, opt)
    handle = mgr.save(2, model, opt, extra={"sched": sched, "train": counters}, blocking=False)
    assert isinstance(handle, SaveHandle)
    # the caller changes everything in place at once: none of it may reach the step
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        for s in opt.state.values():
            for t in s.values():
                t.add_(3.0)
    counters["step"] = 99
    assert handle.result(timeout=60) == mgr.step_path(2)
    assert handle.done() and mgr.steps() == [2]
    fresh, fopt, fsched, fcounters = trained_job(variant, seed=5, steps=1)
    mgr.load(fresh, fopt, extra={"sched": fsched, "train": fcounters})
    assert_same(fresh, fopt, want)
    assert fcounters["step"] == 2


def test_async_and_blocking_saves_write_the_same_checkpoint(tmp_path):
    model, opt, sched, _ = trained_job("lora4")
    want = snapshot(model, opt)
    blocking = CheckpointManager(str(tmp_path / "b"))
    blocking.save(2, model, opt, extra={"sched": sched})
    asynced = CheckpointManager(str(tmp_path / "a"))
    asynced.save(2, model, opt, extra={"sched": sched}, blocking=False).result()
    ma, mb = asynced.manifest(2), blocking.manifest(2)
    assert (ma.base, ma.items, ma.adapters) == (mb.base, mb.items, mb.adapters)
    assert {k: r.size for k, r in ma.files.items()} == {k: r.size for k, r in mb.files.items()}
    for mgr in (asynced, blocking):
        fresh, fopt, fsched, _ = trained_job("lora4", seed=7, steps=1)
        mgr.load(fresh, fopt, extra={"sched": fsched})
        assert_same(fresh, fopt, want)
        assert fsched.state_dict() == sched.state_dict()


def test_a_background_failure_commits_nothing_and_is_raised_once(tmp_path, monkeypatch):
    faulty.register()
    root = "faulty://" + str(tmp_path / "root")
    model, opt, _, _ = trained_job()
    mgr = CheckpointManager(root)
    mgr.save(1, model, opt)
    monkeypatch.setenv("FAULTY_PATTERN", "*step-00000002/optimizer/__*")
    handle = mgr.save(2, model, opt, blocking=False)
    with pytest.raises(CheckpointIOError, match="writing .*optimizer failed.*injected"):
        handle.result()
    assert mgr.steps() == [1]
    monkeypatch.setenv("FAULTY_PATTERN", "*step-00000003/optimizer/__*")
    mgr.save(3, model, opt, blocking=False)  # its failure is not asked for ...
    with pytest.raises(CheckpointIOError, match="injected"):
        mgr.save(4, model, opt)               # ... so the next save raises it, and does not run
    assert mgr.steps() == [1]
    monkeypatch.delenv("FAULTY_PATTERN")
    mgr.save(4, model, opt, blocking=False)   # raised once: the manager goes on
    mgr.wait()
    assert mgr.steps() == [1, 4]


def test_one_save_in_flight_retention_after_commit(tmp_path, monkeypatch):
    model, opt, sched, counters = trained_job()
    mgr = CheckpointManager(str(tmp_path / "root"), keep_last=1)
    gate = threading.Event()
    real = mgr._retain

    def slow_retain(step):  # hold the first save's background work until step 2 is called
        gate.wait(30)
        real(step)

    monkeypatch.setattr(mgr, "_retain", slow_retain)
    first = mgr.save(1, model, opt, blocking=False)
    assert not first.done()
    threading.Timer(0.3, gate.set).start()
    train(model, opt, sched, Data(0), counters, 3)
    second = mgr.save(3, model, opt, blocking=False)  # waits for step 1 first
    assert first.done() and first.result() == mgr.step_path(1)
    second.result()
    assert mgr.steps() == [3]  # retention ran after each commit, never on a step in flight


def test_staging_buffers_are_reused_from_save_to_save(tmp_path):
    model, opt, sched, counters = trained_job()
    mgr = CheckpointManager(str(tmp_path / "root"), keep_last=2)
    mgr.save(2, model, opt, blocking=False).result()
    first = {k: b.data_ptr() for k, b in mgr._snapshots._buffers.items()}
    nbytes = mgr._snapshots.nbytes
    params = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    assert nbytes >= params  # model and optimizer moments are staged
    train(model, opt, sched, Data(0), counters, 3)
    mgr.save(3, model, opt, blocking=False).result()
    assert {k: b.data_ptr() for k, b in mgr._snapshots._buffers.items()} == first
    assert mgr._snapshots.nbytes == nbytes


def test_context_manager_waits_and_close_keeps_the_manager_usable(tmp_path):
    model, opt, sched, counters = trained_job("lora4")
    with CheckpointManager(str(tmp_path / "root")) as mgr:
        handle = mgr.save(2, model, opt, blocking=False)
    assert handle.done() and mgr.steps() == [2]
    train(model, opt, sched, Data(0), counters, 3)
    mgr.save(3, model, opt, blocking=False)
    mgr.close()
    assert mgr.steps() == [2, 3]
    assert mgr.save(4, model, opt) == mgr.step_path(4)  # blocking returns the path


def test_a_failing_block_is_not_masked_by_the_save(tmp_path, monkeypatch):
    faulty.register()
    model, opt, _, _ = trained_job()
    monkeypatch.setenv("FAULTY_PATTERN", "*step-00000002/optimizer/__*")
    with pytest.raises(KeyError, match="the block's own"):
        with CheckpointManager("faulty://" + str(tmp_path / "root")) as mgr:
            mgr.save(2, model, opt, blocking=False)
            raise KeyError("the block's own")
    assert mgr.steps() == []


@pytest.mark.parametrize("merge", ["sharded", "rank0"])
def test_async_merged_model_is_the_snapshots_merge(tmp_path, merge):
    import tiny
    from dcp_universal import load_model

    model, opt, sched, counters = trained_job("lora4")
    tiny.randomize_adapters(model, seed=4)
    with torch.no_grad():
        want = model(tiny.fixed_input())
    mgr = CheckpointManager(str(tmp_path / "root"), merge=merge)
    handle = mgr.save(2, model, opt, merged=True, blocking=False)
    with torch.no_grad():  # base and adapters change at once: the merge must not see it
        for p in model.parameters():
            p.add_(0.5)
    handle.result()
    assert mgr.manifest(2).items["model"]
    plain = tiny.make("plain", seed=9)
    load_model(plain, mgr.step_path(2) + "/model")
    with torch.no_grad():
        torch.testing.assert_close(plain(tiny.fixed_input()), want, atol=1e-5, rtol=0)
