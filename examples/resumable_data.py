"""The data position across world sizes: every sample of an epoch seen once, whatever
the number of processes before and after a pre-emption. Run it twice with different
--nproc_per_node (and --workers 0 or 2); each process appends the indices it trained on
to SEEN_DIR/rank-<r>.txt, so the union can be checked.
torchrun --nproc_per_node=4 examples/resumable_data.py CKPT SEEN_DIR 5 [WORKERS]"""
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from dcp_universal import CheckpointManager, ResumableSampler

root, seen_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
workers = int(sys.argv[4]) if len(sys.argv) > 4 else 0
if "RANK" in os.environ:
    dist.init_process_group("gloo")
rank = dist.get_rank() if dist.is_initialized() else 0
dataset = torch.arange(1000)  # sample i is the number i
sampler = ResumableSampler(len(dataset), seed=0)  # rank, world size: the process group's
loader = DataLoader(dataset, batch_size=8, sampler=sampler, num_workers=workers)
model = torch.nn.Linear(1, 1)

with CheckpointManager(root) as mgr:
    mgr.load(model, extra={"sampler": sampler})  # None on the first start
    start = mgr.latest_step() or 0
    batches = iter(loader)
    seen = []
    for step in range(start + 1, start + steps + 1):
        batch = next(batches)  # the training step would use it here
        seen += batch.tolist()
        if workers:  # the loader prefetches: tell the sampler what the loop consumed
            sampler.advance(len(batch))
    mgr.save(start + steps, model, extra={"sampler": sampler})
os.makedirs(seen_dir, exist_ok=True)
with open(os.path.join(seen_dir, f"rank-{rank}.txt"), "a") as f:
    f.write("".join(f"{i}\n" for i in seen))
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
