"""Resume a torchtitan run here: the first start reads torchtitan's ``step-N`` directory
(the model, its optimizer state by parameter name, its LR scheduler's state, the step
number), commits it as this root's first step, then trains on as examples/train.py does.

    python examples/migrate/from_torchtitan.py outputs/checkpoint/step-1000 checkpoints/run

torchtitan's data loader and loss history are not carried: the report's notes name
them. Build the model, optimizer and scheduler as the torchtitan run did (same
parameter names, same param groups).
"""
import sys

import torch

from dcp_universal import CheckpointManager

src, root = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + 0.01 * s))
w_true = torch.randn(32, 1)  # the function to learn
extra = {"lr_scheduler": scheduler}

with CheckpointManager(root, keep_last=3) as mgr:
    first = mgr.latest_step() is None
    report = mgr.load(model, optimizer, init_from=src, extra=extra)  # src: first start only
    start = report.step or 0  # the step torchtitan recorded, or this root's latest
    print(report.summary())
    if first:  # the migrated state, committed: a restart resumes from this root
        mgr.save(start, model, optimizer, extra=extra)
    for step in range(start + 1, start + 21):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(64, 32, generator=g)
        loss = (model(x) - x @ w_true).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        if step % 10 == 0:
            mgr.save(step, model, optimizer, extra=extra)
    print(f"step {mgr.latest_step()}: loss {loss.item():.4f}")
