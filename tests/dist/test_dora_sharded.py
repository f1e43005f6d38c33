"""DoRA merged while sharded: under FSDP2 a Linear's per-row norms are local and an
Embedding's per-column norms are reduced across ranks (61 rows on 2 and 3 ranks: uneven
shards); under a ``RowwiseParallel`` base (TP) a Linear's per-row norm is reduced. Each
merge is compared with PEFT's own ``merge_and_unload`` of the unsharded model, and a
DoRA run resumes exactly on another number of ranks."""

from __future__ import annotations

import copy

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import harness
from hf_models import fsdp_layers, llama, logits, max_diff, with_lora
from dcp_universal import CheckpointManager, load_model, save_model

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj", "embed_tokens"]


def _dora(seed=1):
    return with_lora(llama(tied=False), seed=seed, target_modules=TARGETS, use_dora=True)



def _full(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()}


def _save_fsdp(rank, world, root):
    model = fsdp_layers(_dora(), world)
    save_model(model, f"{root}/sharded")
    save_model(model, f"{root}/rank0", merge="rank0")
    with CheckpointManager(f"{root}/ck") as mgr:
        mgr.save(1, model, merged=True)
    full = _full(model)  # collective: every rank gathers
    return full if rank == 0 else None


def _resume_fsdp(rank, world, root):
    model = fsdp_layers(_dora(seed=7), world)  # other factors and magnitudes: all overwritten
    with CheckpointManager(f"{root}/ck") as mgr:
        report = mgr.load(model)
    plain = fsdp_layers(llama(tied=False, seed=5), world)
    load_model(plain, f"{root}/ck/step-00000001/model")  # the merged model/ of the step
    composed = fsdp_layers(llama(tied=False, seed=6), world)
    with CheckpointManager(f"{root}/composed") as mgr:
        mgr.load(composed)  # base + adapters merged while loading: norms reduced
    return report.notes, _full(model), logits(plain), logits(composed)


def test_dora_under_fsdp2_merges_like_peft_and_resumes_on_three_ranks(tmp_path):
    root = str(tmp_path)
    src = _dora()
    expected = logits(copy.deepcopy(src).merge_and_unload())
    saved = harness.run(_save_fsdp, 2, root)[0]
    for mode in ("sharded", "rank0"):
        plain = llama(tied=False, seed=3)
        load_model(plain, f"{root}/{mode}")
        assert max_diff(logits(plain), expected) < ATOL, mode
    # a step without model/: loads compose base and adapters, norms over 3 uneven shards
    with CheckpointManager(f"{root}/composed") as mgr:
        mgr.save(1, src)
    out = harness.run(_resume_fsdp, 3, root)
    notes, params, plain_out, composed_out = out[0]
    assert any("exactly" in n for n in notes), notes
    for n, p in params.items():
        assert torch.equal(p, saved[n]), n
    assert max_diff(plain_out, expected) < ATOL
    assert max_diff(composed_out, expected) < ATOL


def _tp(rank, world, root):
    """TP x FSDP (dp 2 x tp 2): o_proj and down_proj RowwiseParallel, so their per-row
    norms sum over the tp ranks' column blocks."""
    model = _dora()
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    plan = {}
    for i in range(len(model.base_model.model.model.layers)):
        at = f"base_model.model.model.layers.{i}"
        for name, style in (("self_attn.q_proj", ColwiseParallel), ("self_attn.v_proj", ColwiseParallel),
                            ("self_attn.o_proj", RowwiseParallel), ("mlp.down_proj", RowwiseParallel)):
            plan[f"{at}.{name}.base_layer"] = style()
            factor = "lora_B" if style is ColwiseParallel else "lora_A"
            plan[f"{at}.{name}.{factor}.default"] = style()
    parallelize_module(model, mesh["tp"], plan)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    save_model(model, f"{root}/tp")
    save_model(model, f"{root}/tp-rank0", merge="rank0")


def test_dora_under_rowwise_parallel_reduces_row_norms(tmp_path):
    expected = logits(copy.deepcopy(_dora()).merge_and_unload())
    harness.run(_tp, 4, str(tmp_path))
    for mode in ("tp", "tp-rank0"):
        plain = llama(tied=False, seed=3)
        load_model(plain, str(tmp_path / mode))
        assert max_diff(logits(plain), expected) < ATOL, mode
