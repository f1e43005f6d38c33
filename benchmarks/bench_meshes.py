"""The merge under tensor parallelism, measured: what each rank moves and holds.

Four gloo ranks on a (dp 2, tp 2) mesh (FSDP x TP) train nothing: they hold a model of
``--blocks`` blocks of width ``--dim`` (q and v column-wise, fc1 row-wise, fc2
replicated; FSDP over dp) with the library's LoRA (rank ``--rank``) on q, v and fc1
under the same plan, and, side by side in one run, rotated round by round:

* ``save_model(merge="sharded")``: each rank merges its own block of every weight;
* ``save_model(merge="rank0")``: every weight gathered to rank 0, merged there;
* plain ``dcp.save`` of ``model.state_dict()`` (the unmerged 2-D state: no merge at all);
* ``load_model`` of the sharded merge into the same layout, and plain ``dcp.load``.

Per operation: the median over ``--repeats`` rounds of the slowest rank's seconds, the
ratio to plain DCP, the peak anonymous memory above the level before it (max over
ranks), and, from one profiled round, the elements each rank sent into collectives (the
largest over ranks; the model is fp32, so MB = elements x 4 / 1e6; object collectives
count their pickled bytes as elements).

    .venv/bin/python benchmarks/bench_meshes.py                   # dim 1024, 4 blocks, 3 rounds
    .venv/bin/python benchmarks/bench_meshes.py --dim 256 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import exit_rank, init_gloo, measure  # noqa: E402
from dcp_universal import apply_lora, load_model, save_model  # noqa: E402

OPS = ["save_model sharded merge", "save_model rank0 merge", "dcp.save (no merge)",
       "load_model", "dcp.load"]


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(torch.tanh(self.q(x)) * self.v(x))))


class Net(nn.Module):
    def __init__(self, dim: int, blocks: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(512, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(blocks))

    def forward(self, idx):
        h = self.wte(idx)
        for b in self.blocks:
            h = b(h)
        return h


def _build(cfg: dict) -> nn.Module:
    torch.manual_seed(0)
    model = apply_lora(Net(cfg["dim"], cfg["blocks"]), rank=cfg["rank"], alpha=2.0 * cfg["rank"],
                       targets=["q", "v", "fc1"])
    with torch.no_grad():  # non-zero B: the merge adds something
        for m in model.modules():
            if hasattr(m, "lora_B") and isinstance(m.lora_B, nn.Module):
                m.lora_B.weight.normal_(0, 0.01)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    plan = {}
    for i in range(cfg["blocks"]):
        for name, style, factor in (("q", ColwiseParallel, "lora_B"), ("v", ColwiseParallel, "lora_B"),
                                    ("fc1", RowwiseParallel, "lora_A")):
            plan[f"blocks.{i}.{name}.base_layer"] = style()
            plan[f"blocks.{i}.{name}.{factor}"] = style()
    parallelize_module(model, mesh["tp"], plan)
    for b in model.blocks:
        fully_shard(b, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model


def _worker(rank: int, world: int, cfg: dict, init_file: str, result_file: str) -> None:
    init_gloo(rank, world, init_file)
    model = _build(cfg)
    root = cfg["out"]

    def path(name: str) -> str:
        return os.path.join(root, name)

    ops = {
        OPS[0]: lambda: save_model(model, path("sharded")),
        OPS[1]: lambda: save_model(model, path("rank0"), merge="rank0"),
        OPS[2]: lambda: dcp.save(model.state_dict(), checkpoint_id=path("dcp")),
        OPS[3]: lambda: load_model(model, path("sharded")),
        OPS[4]: lambda: dcp.load(model.state_dict(), checkpoint_id=path("dcp")),
    }
    # saves rotated; loads after the saves they read
    everyone = measure(ops, lambda r: [*OPS[:3][r % 3:], *OPS[:3][:r % 3], *OPS[3:]],
                       cfg["repeats"])
    if rank == 0:
        with open(result_file, "w") as f:
            json.dump(everyone, f)
    dist.barrier()
    dist.destroy_process_group()
    exit_rank()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    params = args.blocks * (2 * args.dim * args.dim + 4 * args.dim * args.dim) + 512 * args.dim
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {**vars(args), "out": os.path.join(tmp, "ckpt")}
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(4, cfg, init_file, result_file), nprocs=4, join=True)
        with open(result_file) as f:
            ranks = json.load(f)
        shutil.rmtree(cfg["out"], ignore_errors=True)
    print(f"(dp 2, tp 2) on 4 gloo ranks: {params / 1e6:.1f}M fp32 parameters "
          f"({params * 4 / 1e6:.0f} MB), LoRA rank {args.rank} on q, v, fc1; "
          f"{args.repeats} rounds")
    print("| operation | seconds (median, slowest rank) | vs plain DCP | peak extra MB (max rank) "
          "| elements sent per rank (max) | MB sent per rank |")
    print("|---|---|---|---|---|---|")
    med = {op: statistics.median(max(r["seconds"][op][i] for r in ranks)
                                 for i in range(args.repeats)) for op in OPS}
    for op in OPS:
        base = med[OPS[2]] if "save" in op else med[OPS[4]]
        sent = max(r["sent"][op] for r in ranks)
        print(f"| {op} | {med[op]:.3f} | {med[op] / base:.2f}x | "
              f"{max(r['peak'][op] for r in ranks):.0f} | {sent:,} | {sent * 4 / 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
