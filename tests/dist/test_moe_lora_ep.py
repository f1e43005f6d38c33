"""LoRA on mixture-of-experts parameters under expert parallelism: each rank holds whole
experts (the fused 3-D weights as DTensors ``Shard(0)`` on an expert mesh, as torchtitan
shards them) and merges the experts it holds. A run resumes exactly across EP degrees
(EP 2 -> EP 4 -> FSDP2 x3 -> one process), the expert weights and their LoRA factors,
moments included; its merged saves equal PEFT's ``merge_and_unload``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import harness
from hf_models import fsdp_layers, logits, max_diff
from moe_models import BUILDERS, with_expert_lora
from dcp_universal import CheckpointManager, load_model, save_model

ATOL = 1e-5


def _experts(model):
    """The fused experts modules (below PEFT's wrappers)."""
    return [layer.mlp.experts.get_base_layer() for layer in model.get_base_model().model.layers]


def _expert_parallel(model, world):
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    for experts in _experts(model):
        for name, p in list(experts.named_parameters(recurse=False)):
            setattr(experts, name, nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)]),
                                                requires_grad=p.requires_grad))
    return model



def _build(arch, seed, world, layout):
    model = with_expert_lora(BUILDERS[arch](seed=seed), seed=seed)
    model = (_expert_parallel if layout == "ep" else fsdp_layers)(model, world)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, opt


def _full(model, opt):
    names = {id(p): n for n, p in model.named_parameters()}
    whole = lambda t: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()  # noqa: E731
    params = {n: whole(p) for n, p in model.named_parameters()}
    moments = {names[id(p)]: whole(s["exp_avg"]) for p, s in opt.state.items()}
    return params, moments


def _first(rank, world, arch, root):
    model, opt = _build(arch, 1, world, "ep")
    g = torch.Generator().manual_seed(5)
    for p in [p for p in model.parameters() if p.requires_grad]:  # one step, same on every rank
        p.grad = torch.randn(p.shape, generator=g) * 0.1
    opt.step()
    with CheckpointManager(f"{root}/ck") as mgr:
        mgr.save(1, model, opt)
    save_model(model, f"{root}/merged-ep")  # each rank merges the experts it holds
    return _full(model, opt)


def _again(rank, world, arch, root, layout, step):
    model, opt = _build(arch, 7, world, layout)
    with CheckpointManager(f"{root}/ck") as mgr:
        report = mgr.load(model, opt)
        mgr.save(step + 1, model, opt)
    return report.notes, _full(model, opt)


@pytest.mark.parametrize("arch", ["gpt_oss"])  # transposed experts with biases; the unit tests cover the rest
def test_expert_lora_resumes_exactly_across_ep_degrees(tmp_path, arch):
    root = str(tmp_path)
    saved = harness.run(_first, 2, arch, root)[0]
    for world, layout, step in ((4, "ep", 1), (3, "fsdp", 2)):
        notes, now = harness.run(_again, world, arch, root, layout, step)[0]
        assert any("exactly" in n for n in notes), (layout, notes)
        for part, want in zip(now, saved):
            assert set(part) == set(want)
            for k in want:
                assert torch.equal(part[k], want[k]), (layout, world, k)
    # one process: the same adapters exactly, and a plain model merged
    src = with_expert_lora(BUILDERS[arch](seed=1), seed=1)
    with torch.no_grad():
        for n, p in src.named_parameters():
            p.copy_(saved[0][n])
    expected = logits(copy.deepcopy(src).merge_and_unload())
    target = with_expert_lora(BUILDERS[arch](seed=3), seed=3)
    CheckpointManager(f"{root}/ck").load(target)
    assert torch.equal(logits(target), logits(src))
    for path in (f"{root}/merged-ep", f"{root}/ck/step-00000003"):
        plain = BUILDERS[arch](seed=4)
        load_model(plain, path)
        assert max_diff(logits(plain), expected) < ATOL, path
