"""DoRA and expert LoRA merged while sharded, against PEFT's merge of the gathered model.

Two PEFT models with random weights (built from a config, nothing downloaded), each on
every world size of ``--ranks`` gloo ranks:

* **DoRA**: a Llama (``--hidden``, ``--intermediate``, ``--layers``, ``--vocab``) with
  PEFT DoRA (r 16, alpha 32) on every projection and ``embed_tokens``; FSDP2 (each
  decoder layer, then the root);
* **expert LoRA**: a Qwen3-MoE (``--moe-hidden``, ``--moe-intermediate``, ``--experts``,
  top 2, ``--moe-layers``) with PEFT LoRA (r 8, alpha 16) on the fused experts
  (``target_parameters``) and ``q_proj``; expert parallelism: each experts module's
  fused weights ``Shard(0)`` on a 1-D "ep" mesh over all ranks, the rest replicated.

Every ``lora_A`` / ``lora_B`` is random and non-zero, so each merge does real work. Side
by side in one run, in an order rotated round by round:

* ``save_model`` (``merge="sharded"``): each rank merges its own shards / experts;
* ``save_model(merge="rank0")``: every weight gathered to rank 0, merged there;
* PEFT's merge of the gathered model, what users do today: every rank gathers the full
  state (``full_tensor()`` of each DTensor), rank 0 loads it into an unsharded PEFT model
  of the same config (built before timing), calls ``merge_and_unload()`` on a deepcopy
  and writes the merged state dict with ``torch.save`` (fsynced); the others wait at a
  barrier;
* plain ``dcp.save`` of the unmerged sharded state: what the write alone costs.

Per operation: the median over ``--repeats`` rounds of the slowest rank's seconds, the
ratio to PEFT's merge of the gathered model, the peak anonymous memory above the level
before it (max over ranks), and, from one profiled round, the elements each rank sent
into collectives (the largest over ranks; fp32, so MB = elements x 4 / 1e6; object
collectives count their pickled bytes as elements). Once per run, untimed, the sharded
merge (and the rank-0 one), loaded into the plain model, is compared with PEFT's merged
weights: the max abs difference is printed and must be under 1e-5, so both sides did
the same work. A default run takes about 3.5 minutes on 2 shared CPU cores, ``--smoke``
about one.

    .venv/bin/python benchmarks/bench_adapters.py           # both models, 2 and 4 ranks, 3 rounds
    .venv/bin/python benchmarks/bench_adapters.py --smoke   # small sizes, 2 ranks, 1 round
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile

import peft
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import torch.nn as nn
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

_HERE = os.path.dirname(os.path.abspath(__file__))
# the checkout's package before any installed one, in spawned ranks too (they inherit it)
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
from _common import exit_rank, init_gloo, measure, torch_save_fsynced  # noqa: E402
from dcp_universal import load_model, save_model  # noqa: E402

OPS = ["save_model sharded merge", "save_model rank0 merge", "PEFT merge of the gathered model",
       "dcp.save (no merge)"]
BASELINE = OPS[2]
ATOL = 1e-5
DORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "embed_tokens"]
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TITLES = {"dora": "DoRA Llama, FSDP2", "experts": "Expert LoRA Qwen3-MoE, expert parallel"}


def _plain(kind: str, cfg: dict, seed: int) -> nn.Module:
    """The model without adapters, random weights."""
    torch.manual_seed(seed)
    if kind == "dora":
        config = transformers.LlamaConfig(
            vocab_size=cfg["vocab"], hidden_size=cfg["hidden"],
            intermediate_size=cfg["intermediate"], num_hidden_layers=cfg["layers"],
            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
            tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(config)
    config = transformers.Qwen3MoeConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["moe_hidden"],
        intermediate_size=2 * cfg["moe_hidden"],  # the dense MLP: unused, every layer is sparse
        moe_intermediate_size=cfg["moe_intermediate"], num_hidden_layers=cfg["moe_layers"],
        num_attention_heads=8, num_key_value_heads=4, head_dim=cfg["moe_hidden"] // 8,
        num_experts=cfg["experts"], num_experts_per_tok=2, max_position_embeddings=256,
        tie_word_embeddings=False)
    return transformers.Qwen3MoeForCausalLM(config)


def _peft(kind: str, cfg: dict) -> nn.Module:
    """The unsharded PEFT model: the same weights and factors on every rank."""
    if kind == "dora":
        lora = peft.LoraConfig(r=16, lora_alpha=32, use_dora=True, target_modules=DORA_TARGETS)
    else:
        lora = peft.LoraConfig(r=8, lora_alpha=16, target_parameters=EXPERT_TARGETS,
                               target_modules=["q_proj"])
    model = peft.get_peft_model(_plain(kind, cfg, seed=0), lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # PEFT starts B at 0 (a merge would add nothing); DoRA's magnitudes stay the
            # base's norms, as PEFT sets them
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def _shard(kind: str, model: nn.Module, world: int) -> nn.Module:
    base = model.get_base_model()
    if kind == "dora":
        mesh = init_device_mesh("cpu", (world,))
        for layer in base.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    for layer in base.model.layers:
        experts = layer.mlp.experts.get_base_layer()  # the fused experts, below PEFT's wrappers
        for name, p in list(experts.named_parameters(recurse=False)):
            setattr(experts, name, nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)]),
                                                requires_grad=p.requires_grad))
    return model


def _peft_merge_gathered(model: nn.Module, reference: nn.Module | None, path: str) -> None:
    """PEFT's merge of the gathered model. Collective: every rank gathers the full state;
    rank 0 loads it into ``reference``, merges a copy and writes it; all meet at a barrier."""
    full = {k: v.full_tensor() if isinstance(v, DTensor) else v
            for k, v in model.state_dict().items()}
    if dist.get_rank() == 0:
        reference.load_state_dict(full)
        merged = copy.deepcopy(reference).merge_and_unload()
        torch_save_fsynced(merged.state_dict(), path)
    dist.barrier()


def _worker(rank: int, world: int, kind: str, cfg: dict, init_file: str, result_file: str) -> None:
    init_gloo(rank, world, init_file)
    model = _shard(kind, _peft(kind, cfg), world)
    reference = _peft(kind, cfg) if rank == 0 else None  # a user's, built before the merge
    root = cfg["out"]

    def path(name: str) -> str:
        return os.path.join(root, name)

    ops = {
        OPS[0]: lambda: save_model(model, path("sharded")),
        OPS[1]: lambda: save_model(model, path("rank0"), merge="rank0"),
        OPS[2]: lambda: _peft_merge_gathered(model, reference, path("peft.pt")),
        OPS[3]: lambda: dcp.save(model.state_dict(), checkpoint_id=path("dcp")),
    }
    everyone = measure(ops, lambda r: OPS[r % len(OPS):] + OPS[:r % len(OPS)],
                       cfg["repeats"])
    if rank == 0:
        params = {"base": 0, "adapter": 0}
        for name, p in reference.named_parameters():
            params["adapter" if "lora_" in name else "base"] += p.numel()
        with open(result_file, "w") as f:
            json.dump({"ranks": everyone, "params": params}, f)
    dist.barrier()
    dist.destroy_process_group()
    exit_rank()


def _max_diff(kind: str, cfg: dict, name: str) -> tuple[float, int]:
    """(max abs difference, tensors) between the merge at ``name``, loaded into a plain
    model of other weights, and PEFT's merged state dict. One process, untimed."""
    plain = _plain(kind, cfg, seed=2)
    load_model(plain, os.path.join(cfg["out"], name))
    got, want = plain.state_dict(), torch.load(os.path.join(cfg["out"], "peft.pt"))
    if set(got) != set(want):
        raise KeyError(f"{name}: keys differ from PEFT's merged state dict: "
                       f"{sorted(set(got) ^ set(want))[:5]}")
    return max(float((got[k] - want[k]).abs().max()) for k in want), len(want)


def _run(kind: str, world: int, args: argparse.Namespace) -> bool:
    """One model on ``world`` ranks: its table. False when the merge check fails."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {**vars(args), "out": os.path.join(tmp, "ckpt")}
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(world, kind, cfg, init_file, result_file), nprocs=world, join=True)
        with open(result_file) as f:
            result = json.load(f)
        (diff, n), (diff0, _) = _max_diff(kind, cfg, "sharded"), _max_diff(kind, cfg, "rank0")
    ranks, params = result["ranks"], result["params"]
    print(f"\n{TITLES[kind]}, {world} gloo ranks: {params['base'] / 1e6:.1f}M fp32 parameters "
          f"({params['base'] * 4 / 1e6:.0f} MB) + {params['adapter'] / 1e6:.2f}M adapter; "
          f"{args.repeats} rounds")
    ok = max(diff, diff0) < ATOL
    print(f"check (untimed): sharded merge vs PEFT merge_and_unload, max abs diff {diff:.1e} "
          f"over {n} tensors (rank0 merge: {diff0:.1e}): {'ok' if ok else 'FAILED'} (< {ATOL:g})\n")
    print("| operation | seconds (median, slowest rank) | vs PEFT merge (gathered) "
          "| peak extra MB (max rank) | elements sent per rank (max) | MB sent per rank |")
    print("|---|---|---|---|---|---|")
    med = {op: statistics.median(max(r["seconds"][op][i] for r in ranks)
                                 for i in range(args.repeats)) for op in OPS}
    for op in OPS:
        sent = max(r["sent"][op] for r in ranks)
        print(f"| {op} | {med[op]:.3f} | {med[op] / med[BASELINE]:.2f}x | "
              f"{max(r['peak'][op] for r in ranks):.0f} | {sent:,} | {sent * 4 / 1e6:.1f} |")
    sys.stdout.flush()
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(TITLES), default=["dora", "experts"])
    p.add_argument("--ranks", type=int, nargs="+", default=None,
                   help="world sizes (default 2 4; 2 with --smoke)")
    p.add_argument("--hidden", type=int, default=512, help="Llama width")
    p.add_argument("--intermediate", type=int, default=1376, help="Llama MLP width")
    p.add_argument("--layers", type=int, default=4, help="Llama decoder layers")
    p.add_argument("--vocab", type=int, default=8000, help="both models' vocabulary")
    p.add_argument("--moe-hidden", type=int, default=256, help="Qwen3-MoE width")
    p.add_argument("--moe-intermediate", type=int, default=512, help="one expert's MLP width")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--moe-layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true",
                   help="a quick check: small models (vocab 1000, 2 layers), 1 round, 2 ranks")
    args = p.parse_args()
    if args.ranks is None:
        args.ranks = [2] if args.smoke else [2, 4]
    if args.smoke:
        args.hidden, args.intermediate, args.layers, args.vocab = 128, 344, 2, 1000
        args.moe_hidden, args.moe_intermediate, args.experts, args.moe_layers = 64, 128, 4, 2
        args.repeats = 1
    ok = True
    for kind in args.models:
        for world in args.ranks:
            ok = _run(kind, world, args) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
