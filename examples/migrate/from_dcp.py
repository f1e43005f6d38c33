"""Resume a run saved with plain DCP, ``dcp.save({"model": get_model_state_dict(model),
"optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=SRC)``: the first
start reads the model and the optimizer state by parameter name, commits them as this
root's first step, then trains on as examples/train.py does.

    python examples/migrate/from_dcp.py SRC checkpoints/run [STEP]

Plain DCP records no step number: pass the one you saved at (default 0). The saved
param groups' hyperparameters are not carried (the optimizer's own stand).
"""
import sys

import torch

from dcp_universal import CheckpointManager

src, root = sys.argv[1], sys.argv[2]
saved_step = int(sys.argv[3]) if len(sys.argv) > 3 else 0
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
w_true = torch.randn(32, 1)  # the function to learn

with CheckpointManager(root, keep_last=3) as mgr:
    first = mgr.latest_step() is None
    report = mgr.load(model, optimizer, init_from=src)  # src is read on the first start only
    start = report.step if report.step is not None else saved_step
    print(report.summary())
    if first:  # the migrated state, committed: a restart resumes from this root
        mgr.save(start, model, optimizer)
    for step in range(start + 1, start + 21):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(64, 32, generator=g)
        loss = (model(x) - x @ w_true).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0:
            mgr.save(step, model, optimizer)
    print(f"step {mgr.latest_step()}: loss {loss.item():.4f}")
