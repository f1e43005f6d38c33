#!/usr/bin/env bash
# Eight processes train and are pre-empted; three resume; one process serves the model.
# bash examples/resume_8_on_3.sh [checkpoint root]
set -euo pipefail
# Runs from any directory: the examples are found beside this script, the root is
# relative to where it is started.
root=${1:-checkpoints/resume_8_on_3}
python=${PYTHON:-python}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
"$python" -m torch.distributed.run --nproc_per_node=8 "$here/train.py" "$root"
"$python" -m torch.distributed.run --nproc_per_node=3 "$here/train.py" "$root"
"$python" "$here/inference.py" "$root"
