"""Train, get pre-empted, resume on any number of processes: run it again, with
another --nproc_per_node (or as plain python: one process)."""
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from dcp_universal import CheckpointManager

root = sys.argv[1] if len(sys.argv) > 1 else "checkpoints/train"
if "RANK" in os.environ:  # started by torchrun: shard the model over every process
    dist.init_process_group("gloo")  # "nccl" on GPUs (then move the model to its GPU)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
if dist.is_initialized():
    fully_shard(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
w_true = torch.randn(32, 1)  # the function to learn

with CheckpointManager(root, keep_last=2) as mgr:
    report = mgr.load(model, optimizer)  # None on the first start
    start = mgr.latest_step() or 0
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if report is not None and rank0:
        print(f"resumed step {start}: {report.summary().splitlines()[0]}")
    for step in range(start + 1, start + 21):
        g = torch.Generator().manual_seed(step)  # the same batch on every process
        x = torch.randn(64, 32, generator=g)
        loss = (model(x) - x @ w_true).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0:
            mgr.save(step, model, optimizer)
    if rank0:
        print(f"step {mgr.latest_step()}: loss {loss.item():.4f}")
if dist.is_initialized():
    dist.barrier()  # every process done before any tears its connections down
    dist.destroy_process_group()
