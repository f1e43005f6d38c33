"""Asynchronous saves under a process group: training goes on while the background
thread writes on its own gloo group; the snapshot, the commit, a failure on one rank;
an 8-rank LoRA run resumed on 3 ranks with another LoRA rank and in one process."""

from __future__ import annotations

import os

import torch
from torch.distributed.tensor import DTensor

import faulty
import harness
import tiny
from dcp_universal import CheckpointIOError, CheckpointManager, load_model
from train_loop import Data, build, moments, train


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _snapshot(model, opt):
    return ({k: _local(v).clone() for k, v in model.state_dict().items()},
            {k: {n: _local(t).clone() for n, t in v.items()} for k, v in moments(model, opt).items()})


def _equal(model, opt, want) -> bool:
    params, states = want
    now = moments(model, opt)
    return (all(torch.equal(_local(v), params[k]) for k, v in model.state_dict().items())
            and all(torch.equal(_local(now[k][n]), states[k][n]) for k in states for n in states[k]))


def _train_while_saving(rank, world_size, root):
    model, opt, sched = build("lora4", "fsdp", world_size)
    counters = {"step": 0}
    extra = {"sched": sched, "train": counters}
    with CheckpointManager(root, keep_last=2) as mgr:
        train(model, opt, sched, Data(rank), counters, 2)
        first = mgr.save(2, model, opt, extra=extra, blocking=False)
        # the loop goes on at once: forward/backward/step (collectives on the default
        # group) while the background thread writes and commits on its own group
        train(model, opt, sched, Data(rank), counters, 4)
        at_4 = _snapshot(model, opt)
        second = mgr.save(4, model, opt, extra=extra, blocking=False)
        losses = train(model, opt, sched, Data(rank), counters, 6)
        paths = (first.result(), second.result())
        mgr.save(6, model, opt, extra=extra, blocking=False)
    steps = mgr.steps()
    fresh, fopt, fsched = build("lora4", "fsdp", world_size, seed=9)
    fcounters = {"step": 0}
    mgr.load(fresh, fopt, step=4, extra={"sched": fsched, "train": fcounters})
    snapshot_ok = _equal(fresh, fopt, at_4) and fcounters["step"] == 4
    resumed = train(fresh, fopt, fsched, Data(rank), fcounters, 6)  # steps 5 and 6 again
    return steps, paths, snapshot_ok, [float(x) for x in losses], [float(x) for x in resumed]


def test_two_ranks_train_on_while_the_background_saves(tmp_path):
    root = str(tmp_path / "root")
    results = harness.run(_train_while_saving, 2, root, timeout=180)
    for rank, (steps, paths, snapshot_ok, losses, resumed) in enumerate(results):
        assert steps == [4, 6], (rank, steps)  # keep_last=2, applied after each commit
        assert paths == (os.path.join(root, "step-00000002"), os.path.join(root, "step-00000004"))
        assert snapshot_ok, rank
        assert losses == resumed, rank  # resume from the async step is exact


def _fail_on_rank1(rank, world_size, root):
    faulty.register()
    model, opt, sched = build("plain", "fsdp", world_size)
    mgr = CheckpointManager(root)
    train(model, opt, sched, Data(rank), {"step": 0}, 1)
    mgr.save(1, model, opt)
    os.environ.update({"FAULTY_PATTERN": "*step-00000002/optimizer/__1_*", "FAULTY_RANK": "1"})
    handle = mgr.save(2, model, opt, blocking=False)
    try:
        handle.result(timeout=120)
        outcome = "saved"
    except CheckpointIOError as e:
        outcome = f"{type(e).__name__}: {e}"
    del os.environ["FAULTY_PATTERN"]
    mgr.save(3, model, opt, blocking=False).result()  # the manager goes on
    mgr.close()
    return outcome, mgr.steps()


def test_a_background_failure_on_one_rank_reaches_every_rank(tmp_path):
    results = harness.run(_fail_on_rank1, 2, "faulty://" + str(tmp_path / "root"), timeout=180)
    for rank, (outcome, steps) in enumerate(results):
        assert outcome.startswith("CheckpointIOError: writing"), (rank, outcome)
        assert "rank(s) [1]" in outcome and "injected" in outcome, (rank, outcome)
        assert steps == [1, 3], (rank, steps)


def _eight_ranks_save(rank, world_size, root):
    model, opt, sched = build("lora4", "fsdp", world_size)
    tiny.randomize_adapters(model, seed=3)
    counters = {"step": 0}
    with CheckpointManager(root) as mgr:
        train(model, opt, sched, Data(rank), counters, 2)
        mgr.save(2, model, opt, extra={"sched": sched}, blocking=False)
        logits = model(tiny.fixed_input()).detach()  # the model as saved at step 2
        train(model, opt, sched, Data(rank), counters, 3)  # changes it while writing
    return logits


def _three_ranks_other_lora_rank(rank, world_size, root):
    model, opt, sched = build("lora2", "fsdp", world_size, seed=4)
    report = CheckpointManager(root).load(model, opt, extra={"sched": sched}, skip_per_rank=["rng"])
    return model(tiny.fixed_input()).detach(), sorted(report.fresh)[:3]


def test_eight_rank_async_lora_run_resumes_on_three_ranks_and_in_one_process(tmp_path):
    root = str(tmp_path / "root")
    saved = harness.run(_eight_ranks_save, 8, root, timeout=300)[0]
    for rank, (logits, fresh) in enumerate(harness.run(_three_ranks_other_lora_rank, 3, root)):
        assert torch.allclose(logits, saved, atol=1e-5), rank
        assert fresh  # another LoRA rank: new adapters, zero update
    plain = tiny.make("plain", seed=6)  # one process, no process group, model alone
    load_model(plain, os.path.join(root, "step-00000002"))
    assert torch.allclose(plain(tiny.fixed_input()), saved, atol=1e-5)
