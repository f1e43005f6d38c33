"""Exact resume (losses equal bit for bit) and resume into other configurations, with
optimizer state followed by canonical name. Two spawned ranks per run."""

from __future__ import annotations

import pytest
import torch

import harness
import tiny
from dcp_universal import CheckpointManager
from dcp_universal import PerRankStateError
from train_loop import Data, build, moments, train

TOTAL, SAVE_AT = 6, 3


def _run(rank, world_size, mode, variant, root, resume):
    torch.manual_seed(1000 + rank)
    model, opt, sched = build(variant, mode, world_size)
    data, counters = Data(rank), {"step": 0}
    extra = {"lr_scheduler": sched, "train": counters, "data": data}
    mgr = CheckpointManager(root)
    report = None
    if resume:
        torch.manual_seed(777)  # whatever this job's RNG is, the checkpoint's must win
        report = mgr.load(model, opt, extra=extra)

    def on_step(step):
        if step == SAVE_AT and not resume:
            mgr.save(step, model, opt, extra=extra)

    losses = train(model, opt, sched, data, counters, TOTAL, on_step)
    return losses, report


@pytest.mark.parametrize("mode,variant", [("fsdp", "plain"), ("ddp", "plain"), ("fsdp", "lora4")])
def test_resume_is_bit_identical(tmp_path, mode, variant):
    root = str(tmp_path / "ckpt")
    full_run = harness.run(_run, 2, mode, variant, root, False)
    resumed = harness.run(_run, 2, mode, variant, root, True)
    for rank in range(2):
        uninterrupted, _ = full_run[rank]
        after, report = resumed[rank]
        assert len(after) == TOTAL - SAVE_AT
        for a, b in zip(uninterrupted[SAVE_AT:], after):
            assert torch.equal(a, b), (rank, uninterrupted[SAVE_AT:], after)
        assert not report.optimizer_fresh and not report.optimizer_dropped and not report.fresh
    if variant == "lora4":
        manifest = CheckpointManager(root).manifest(SAVE_AT)
        assert manifest.items == {"adapters": True, "optimizer": True}
        assert manifest.base.startswith("base-")


# ---- across configurations ------------------------------------------------------------

SOURCES = ["plain", "lora4", "lora8"]


def _save_sources(rank, world_size, root):
    out = {}
    for variant in SOURCES:
        torch.manual_seed(5 + rank)
        model, opt, sched = build(variant, "fsdp", world_size)
        tiny.randomize_adapters(model, seed=50 + rank)
        data, counters = Data(rank), {"step": 0}
        train(model, opt, sched, data, counters, 2)
        CheckpointManager(f"{root}/{variant}").save(2, model, opt, extra={"data": data})
        with torch.no_grad():
            y = model(tiny.fixed_input())
        out[variant] = (moments(model, opt), y)
    return out


CASES = [("plain", "lora4"), ("lora4", "plain"), ("lora4", "lora8"), ("lora4", "lora4")]


def _load_targets(rank, world_size, root):
    out = {}
    for source, target in CASES:
        model, opt, _ = build(target, "fsdp", world_size, seed=9)
        data = Data(rank)
        mgr = CheckpointManager(f"{root}/{source}")
        try:
            mgr.load(model, opt, extra={"data": data})
            raise AssertionError("a world-size change must not pass silently")
        except PerRankStateError as e:
            untouched = not any(moments(model, opt).values()) and data.pos == 0
            message = str(e)
        report = mgr.load(model, opt, extra={"data": data}, skip_per_rank=["rng", "data"])
        with torch.no_grad():
            y = model(tiny.fixed_input())
        out[(source, target)] = (moments(model, opt), report, y, untouched, message)
    return out


@pytest.fixture(scope="module")
def transfers(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("xconf"))
    saved = harness.run(_save_sources, 2, root)[0]
    loaded = harness.run(_load_targets, 3, root)[0]
    return saved, loaded


@pytest.mark.parametrize("source,target", CASES)
def test_optimizer_state_follows_parameters_by_name(transfers, source, target):
    saved, loaded = transfers
    saved_moments, saved_out = saved[source]
    got, report, y, untouched, message = loaded[(source, target)]
    torch.testing.assert_close(y, saved_out, atol=1e-5, rtol=0)  # same function, 2 -> 3 ranks
    assert untouched and "skip_per_rank=['data']" in message  # the RNG is no obstacle

    for name in report.optimizer_restored:  # moments equal after a gather, bit for bit
        assert got[name].keys() == saved_moments[name].keys()
        for k in got[name]:
            assert torch.equal(got[name][k], saved_moments[name][k]), (name, k)
    restored, fresh, dropped = (set(report.optimizer_restored), set(report.optimizer_fresh),
                                set(report.optimizer_dropped))
    assert "blocks.0.ln.weight" in restored and "head.weight" in restored  # LayerNorm kept
    assert not restored & fresh and not restored & dropped
    if source == "plain":  # standard -> LoRA: the frozen bases' moments are dropped
        assert {"blocks.0.q.weight", "wte.weight"} <= dropped
        assert {"blocks.0.q.lora_A", "wte.lora_B"} <= fresh
    elif target == "plain":  # LoRA -> standard: adapters dropped, bases start fresh
        assert {"blocks.0.q.lora_A", "wte.lora_B"} <= dropped
        assert {"blocks.0.q.weight", "wte.weight"} <= fresh
    elif target == "lora8":  # another rank: adapter shapes differ
        assert {"blocks.0.q.lora_A", "blocks.1.fc1.lora_B"} <= dropped & fresh
    else:  # same adapters: everything restored
        assert not fresh and not dropped and "blocks.0.q.lora_A" in restored
