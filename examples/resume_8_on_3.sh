#!/usr/bin/env bash
# Eight processes train and are pre-empted; three resume; one process serves the model.
# bash examples/resume_8_on_3.sh [checkpoint root]
set -euo pipefail
root=${1:-checkpoints/resume_8_on_3}
python=${PYTHON:-python}
"$python" -m torch.distributed.run --nproc_per_node=8 examples/train.py "$root"
"$python" -m torch.distributed.run --nproc_per_node=3 examples/train.py "$root"
"$python" examples/inference.py "$root"
