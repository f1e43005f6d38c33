"""2-D meshes: FSDP x TP and HSDP, with the library's own LoRA under tensor parallelism
(its factors named by the plan) and PEFT LoRA under TP. Saves merge each rank's block,
loads reshard into every other layout (FSDP2 x4 and x3, (dp 1, tp 4), HSDP (2, 2), one
process), and a 2-D job resumes exactly. Dimensions divide by the TP degrees (a local
TP output cannot be uneven)."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import harness
import tiny
from dcp_universal import CheckpointManager, load_model, save_model

DIM, HIDDEN = 16, 24
ATOL = 1e-5


def _model(variant: str, seed: int):
    model = tiny.make(variant, seed=seed, dim=DIM, hidden=HIDDEN)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # non-zero adapters, so that merges are real
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def tp_plan(model) -> dict:
    """Colwise q and v, rowwise fc1; with the library's LoRA: the base layers, lora_B
    under a colwise base and lora_A under a rowwise one (the other factor replicated)."""
    plan = {}
    for i, block in enumerate(model.blocks):
        lora = hasattr(block.q, "base_layer")
        for name, style in (("q", ColwiseParallel), ("v", ColwiseParallel), ("fc1", RowwiseParallel)):
            if not lora or not hasattr(getattr(block, name), "base_layer"):
                plan[f"blocks.{i}.{name}"] = style()
                continue
            plan[f"blocks.{i}.{name}.base_layer"] = style()
            plan[f"blocks.{i}.{name}.{'lora_B' if style is ColwiseParallel else 'lora_A'}"] = style()
    return plan


def layout(model, kind: str, world: int):
    """``fsdp`` (1-D), ``2d`` (dp x tp=2), ``tp`` (tp=world), ``hsdp`` (replicate 2 x
    shard world/2), ``none``."""
    if kind == "none":
        return model
    if kind in ("2d", "tp"):
        tp = 2 if kind == "2d" else world
        mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], tp_plan(model))
        if kind == "tp":
            return model
        shard_mesh = mesh["dp"]
    elif kind == "hsdp":
        shard_mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    else:
        shard_mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=shard_mesh)
    fully_shard(model, mesh=shard_mesh)
    return model


def _full(model) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.state_dict().items()}


def _out(model) -> torch.Tensor:
    with torch.no_grad():
        y = model(tiny.fixed_input())
    return (y.full_tensor() if isinstance(y, DTensor) else y).detach()


def _batch(i: int) -> torch.Tensor:
    return torch.randint(0, tiny.VOCAB, (4, 7), generator=torch.Generator().manual_seed(i))


def _train(model, opt, steps: range) -> None:
    for i in steps:
        model(_batch(i)).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()


def _save_2d(rank, world, root):
    model = layout(_model("lora4", seed=1), "2d", world)
    save_model(model, f"{root}/merged")
    save_model(model, f"{root}/merged-rank0", merge="rank0")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with CheckpointManager(f"{root}/run") as mgr:
        _train(model, opt, range(2))
        mgr.save(2, model, opt)
        _train(model, opt, range(2, 4))
    return _out(model), _full(model)


def _load_into(rank, world, root, kind, variant):
    model = layout(_model(variant, seed=7), kind, world)
    with CheckpointManager(f"{root}/run") as mgr:
        report = mgr.load(model)
    step2 = _out(model)
    target = layout(_model("plain", seed=8), kind, world)
    load_model(target, f"{root}/merged")
    return step2, _out(target), [n for n in report.notes if "exactly" in n]


def _resume_2d(rank, world, root):
    model = layout(_model("lora4", seed=9), "2d", world)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with CheckpointManager(f"{root}/run") as mgr:
        mgr.load(model, opt)
    _train(model, opt, range(2, 4))
    return _out(model), _full(model)


def test_fsdp_x_tp_with_own_lora_saves_merges_loads_anywhere_and_resumes_exactly(tmp_path):
    root = str(tmp_path)
    reference = _model("lora4", seed=1)  # one process, the same weights
    ref_out = _out(reference)
    saved_out, saved_state = harness.run(_save_2d, 4, root)[0]

    for name in ("merged", "merged-rank0"):  # each rank merged its own block
        plain = _model("plain", seed=3)
        load_model(plain, f"{root}/{name}")
        assert (_out(plain) - ref_out).abs().max() < ATOL, name

    # the step at 2, into every other layout: the same adapters restore exactly
    ref2 = _model("lora4", seed=7)
    CheckpointManager(f"{root}/run").load(ref2)
    step2_out = _out(ref2)
    for kind, world in (("fsdp", 4), ("tp", 4), ("hsdp", 4), ("fsdp", 3), ("2d", 4)):
        got, merged, exact = harness.run(_load_into, world, root, kind, "lora4")[0]
        assert (got - step2_out).abs().max() < ATOL, (kind, world)
        assert (merged - ref_out).abs().max() < ATOL, (kind, world)
        assert exact, (kind, world)
    got, _, exact = harness.run(_load_into, 3, root, "fsdp", "lora2")[0]  # another LoRA
    assert (got - step2_out).abs().max() < ATOL and not exact

    resumed_out, resumed_state = harness.run(_resume_2d, 4, root)[0]
    assert torch.equal(resumed_out, saved_out)  # the 2-D job resumed bit for bit
    for k, v in saved_state.items():
        assert torch.equal(resumed_state[k], v), k


def _eight(rank, world, root):
    model = layout(_model("lora4", seed=1), "2d", world)  # dp 4 x tp 2
    with CheckpointManager(f"{root}/eight") as mgr:
        mgr.save(1, model)
    return _out(model)


def test_eight_ranks_on_a_2d_mesh_load_into_one_process(tmp_path):
    out = harness.run(_eight, 8, str(tmp_path))[0]
    ref = _model("lora4", seed=1)
    assert (out - _out(ref)).abs().max() < ATOL
    plain = _model("plain", seed=2)
    load_model(plain, str(tmp_path / "eight" / "step-00000001"))
    assert (_out(plain) - _out(ref)).abs().max() < ATOL


def _peft_tp(model, world: int):
    """PEFT LoRA on q, v, o of a tiny Llama, FSDP x TP (dp x tp=2): colwise q, k, v, gate,
    up; rowwise o, down; lora_B colwise under a colwise base, lora_A rowwise under a
    rowwise one."""
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    root = "base_model.model.model.layers"
    plan = {}
    for i in range(len(model.base_model.model.model.layers)):
        for name, style in (("self_attn.q_proj", ColwiseParallel), ("self_attn.k_proj", ColwiseParallel),
                            ("self_attn.v_proj", ColwiseParallel), ("self_attn.o_proj", RowwiseParallel),
                            ("mlp.gate_proj", ColwiseParallel), ("mlp.up_proj", ColwiseParallel),
                            ("mlp.down_proj", RowwiseParallel)):
            fqn = f"{root}.{i}.{name}"
            if name.split(".")[1] in ("q_proj", "v_proj", "o_proj"):
                factor = "lora_B" if style is ColwiseParallel else "lora_A"
                plan[f"{fqn}.base_layer"] = style()
                plan[f"{fqn}.{factor}.default"] = style()
            else:
                plan[fqn] = style()
    parallelize_module(model, mesh["tp"], plan)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model


def _peft_job(rank, world, root):
    from hf_models import llama, logits, with_lora

    model = _peft_tp(with_lora(llama(tied=False, seed=1), target_modules=["q_proj", "v_proj", "o_proj"]),
                     world)
    save_model(model, f"{root}/peft-merged")
    with CheckpointManager(f"{root}/peft") as mgr:
        mgr.save(1, model)
    target = layout_llama(with_lora(llama(tied=False, seed=4), seed=9,
                                    target_modules=["q_proj", "v_proj", "o_proj"]), world)
    with CheckpointManager(f"{root}/peft") as mgr:
        mgr.load(target)
    return logits(model), logits(target)


def layout_llama(model, world: int):
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def test_peft_lora_under_tp_saves_merges_and_restores_on_fsdp(tmp_path):
    from hf_models import llama, logits, with_lora

    ref = logits(with_lora(llama(tied=False, seed=1), target_modules=["q_proj", "v_proj", "o_proj"]))
    tp_out, fsdp_out = harness.run(_peft_job, 4, str(tmp_path))[0]
    assert (tp_out - ref).abs().max() < ATOL
    assert (fsdp_out - ref).abs().max() < ATOL  # restored exactly into FSDP2 x4
    plain = llama(tied=False, seed=6)
    load_model(plain, str(tmp_path / "peft-merged"))
    assert (logits(plain) - ref).abs().max() < ATOL
