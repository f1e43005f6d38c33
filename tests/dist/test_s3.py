"""S3 through fsspec, against moto's server on 127.0.0.1: save, list, load, reshard and
prune exactly as on local disk."""

from __future__ import annotations

import torch

import harness
import tiny
from dcp_universal import CheckpointManager, load_model
from s3server import fresh_prefix
from train_loop import Data, build, moments, train


def _train_and_save(rank, world_size, root, options, variant):
    torch.manual_seed(rank)
    model, opt, sched = build(variant, "fsdp", world_size)
    tiny.randomize_adapters(model, seed=rank)
    mgr = CheckpointManager(root, keep_last=2, storage_options=options)
    data, counters = Data(rank), {"step": 0}
    for step in (1, 2, 3):
        train(model, opt, sched, data, counters, step)
        mgr.save(step, model, opt, extra={"train": counters}, merged=step == 3)
    with torch.no_grad():
        y = model(tiny.fixed_input())
    return mgr.steps(), y, moments(model, opt)


def _resume(rank, world_size, root, options, variant):
    model, opt, _ = build(variant, "fsdp", world_size, seed=5)
    counters = {}
    mgr = CheckpointManager(root, storage_options=options)
    report = mgr.load(model, opt, extra={"train": counters}, skip_per_rank=["rng"])
    with torch.no_grad():
        y = model(tiny.fixed_input())
    return mgr.latest_step(), y, moments(model, opt), counters, report


def test_s3_round_trip_reshards_prunes_and_serves_model_only_loads(s3):
    url, options = s3
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    for variant in ("plain", "lora4"):
        root = fresh_prefix(url)
        steps, y_saved, m_saved = harness.run(_train_and_save, 2, root, options, variant)[0]
        assert steps == [2, 3]  # keep_last=2 pruned step 1 on S3
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, refresh=True))
        if variant == "lora4":
            assert len([n for n in names if n.startswith("base-")]) == 1
        assert [n for n in names if n.startswith("step-")] == ["step-00000002", "step-00000003"]

        latest, y, m, counters, report = harness.run(_resume, 3, root, options, variant)[0]
        assert latest == 3 and counters == {"step": 3}
        torch.testing.assert_close(y, y_saved, atol=1e-5, rtol=0)
        assert set(report.optimizer_restored) == set(m_saved)
        for name in m_saved:
            for k in m_saved[name]:
                assert torch.equal(m[name][k], m_saved[name][k]), (name, k)

        # an inference node: one process, no process group, model only. Removing every
        # optimizer/ object first proves the load never needs them.
        step_dir = f"{root}/step-00000003"
        fs.rm(f"{step_dir}/optimizer", recursive=True)
        for target in ("plain", "lora2"):
            model = tiny.make(target, seed=11)
            load_model(model, step_dir, storage_options=options)
            with torch.no_grad():
                torch.testing.assert_close(model(tiny.fixed_input()), y_saved, atol=1e-5, rtol=0)
