"""An inference node: one process, no process group, no optimizer. Loads the latest step
that examples/train.py wrote, whatever the number of processes that wrote it.
python examples/inference.py ckpt"""
import sys

import torch

from dcp_universal import CheckpointManager, load_model

root = sys.argv[1] if len(sys.argv) > 1 else "checkpoints/train"
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
w_true = torch.randn(32, 1)

mgr = CheckpointManager(root)
step = mgr.latest_step()
if step is None:  # nothing committed there (yet): say so rather than fail on a None
    sys.exit(f"{root} holds no committed step: train first (examples/train.py {root})")
report = load_model(model, mgr.step_path(step))
print(report.summary())
x = torch.randn(256, 32, generator=torch.Generator().manual_seed(-1 % 2**31))
with torch.no_grad():
    print(f"step {step}: held-out loss {(model(x) - x @ w_true).pow(2).mean().item():.4f}")
