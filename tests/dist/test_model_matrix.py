"""The configuration matrix: save from {1 process, DDP x2, FSDP2 x4} x {plain, LoRA},
load into {1 process without a process group, DDP x2, FSDP2 x2, FSDP2 x4} x {plain, LoRA
same rank, LoRA other rank and targets}; every loaded model must compute the saved
model's outputs. Each world is spawned once and runs all of its cases."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import harness
import tiny
from dcp_universal import load_model, save_model

SAVED = ["plain", "lora4"]
TARGETS = ["plain", "lora4", "lora2"]  # plain, LoRA of the same rank, another rank and targets
SAVE_MODES = {"single": 1, "ddp": 2, "fsdp": 4}
LOAD_MODES = {"single": 1, "ddp2": 2, "fsdp2": 2, "fsdp4": 4}
ATOL = 1e-5


def _wrap(model, mode: str, world_size: int, *, ac: bool = False):
    if mode.startswith("fsdp"):
        mesh = init_device_mesh("cpu", (world_size,))
        for i, block in enumerate(model.blocks):
            if ac:
                block = model.blocks[i] = checkpoint_wrapper(block)
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if mode.startswith("ddp"):
        return DDP(model)
    return model


def _save_job(rank, world_size, mode, root):
    out = {}
    for variant in SAVED:
        model = _wrap(tiny.make(variant, seed=0), mode, world_size, ac=True)
        # FSDP2: each rank fills its own adapter shard from its own seed; DDP replicas
        # must agree, so every rank uses one seed.
        tiny.randomize_adapters(model, seed=100 + (rank if mode == "fsdp" else 0))
        with torch.no_grad():
            ref = model(tiny.fixed_input())
        expected = tiny.reference_merge(model)
        save_model(model, f"{root}/{mode}-{variant}")
        save_model(model, f"{root}/{mode}-{variant}-rank0", merge="rank0")
        out[variant] = (ref, expected)
    return out


def _load_cases(mode, world_size, root):
    out = {}
    for save_mode, saved, variant in itertools.product(SAVE_MODES, SAVED, TARGETS):
        model = _wrap(tiny.make(variant, seed=7), mode, world_size)
        report = load_model(model, f"{root}/{save_mode}-{saved}")
        with torch.no_grad():
            y = model(tiny.fixed_input())
        out[(save_mode, saved, variant)] = (y, report)
    return out


def _load_job(rank, world_size, mode, root):
    return _load_cases(mode, world_size, root)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("matrix"))
    refs = {}
    for variant in SAVED:  # the one-process save, in this process, no process group
        model = tiny.make(variant, seed=0)
        tiny.randomize_adapters(model, seed=100)
        with torch.no_grad():
            refs[("single", variant)] = (model(tiny.fixed_input()), tiny.reference_merge(model))
        save_model(model, f"{root}/single-{variant}")
        save_model(model, f"{root}/single-{variant}-rank0", merge="rank0")
    for mode in ("ddp", "fsdp"):
        result = harness.run(_save_job, SAVE_MODES[mode], mode, root)[0]
        refs.update({(mode, v): r for v, r in result.items()})
    return root, refs


@pytest.fixture(scope="module")
def loaded(saved):
    root, _ = saved

    @functools.cache
    def get(mode):
        if mode == "single":
            assert not dist.is_initialized()
            return _load_cases(mode, 1, root)
        return harness.run(_load_job, LOAD_MODES[mode], mode, root)[0]

    return get


@pytest.mark.parametrize("variant", TARGETS)
@pytest.mark.parametrize("saved_as", SAVED)
@pytest.mark.parametrize("save_mode", list(SAVE_MODES))
@pytest.mark.parametrize("load_mode", list(LOAD_MODES))
def test_loaded_model_computes_saved_function(saved, loaded, load_mode, save_mode, saved_as, variant):
    _, refs = saved
    ref, _ = refs[(save_mode, saved_as)]
    y, report = loaded(load_mode)[(save_mode, saved_as, variant)]
    torch.testing.assert_close(y, ref, atol=ATOL, rtol=0)
    if variant == "plain":
        assert not report.fresh and not report.remapped
    else:
        # adapted base weights are remapped, adapters start fresh
        assert report.fresh and all(".lora_" in k for k in report.fresh)
        assert all(v.endswith(k.rsplit(".", 1)[0].rsplit(".", 1)[-1] + ".base_layer." + k.rsplit(".", 1)[1])
                   for k, v in report.remapped.items())


@pytest.mark.parametrize("merge", ["sharded", "rank0"])
@pytest.mark.parametrize("save_mode", list(SAVE_MODES))
def test_merged_weights_on_disk_match_independent_merge(saved, save_mode, merge):
    root, refs = saved
    _, expected = refs[(save_mode, "lora4")]
    suffix = "" if merge == "sharded" else "-rank0"
    on_disk = tiny.read_dir(f"{root}/{save_mode}-lora4{suffix}")
    plain_keys = set(tiny.read_dir(f"{root}/{save_mode}-plain"))
    assert set(on_disk) == plain_keys  # canonical names only, no adapter or wrapper keys
    assert len(expected) == 2 * 3 + 1  # q, v, fc1 in two blocks, and wte
    for key, want in expected.items():
        torch.testing.assert_close(on_disk[key], want, atol=1e-6, rtol=1e-6)


def test_sharded_and_rank0_files_agree(saved):
    root, _ = saved
    for mode in SAVE_MODES:
        a = tiny.read_dir(f"{root}/{mode}-lora4")
        b = tiny.read_dir(f"{root}/{mode}-lora4-rank0")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)
