#!/usr/bin/env bash
# The demo's S3 variant: the same checkpoints on real S3 protocol, spoken to moto's
# server on 127.0.0.1 (started here, stopped at exit; nothing else is contacted).
#
#   1) LoRA run with FSDP2 on 2 processes, saving every 10 steps to s3://demo/run,
#      pre-empted after step 20
#   2) resumed on 3 processes from S3 to step 40
#   3) an inference process loads the final model from S3 (model/ only) and evaluates
#
# Usage: bash launch/demo_s3.sh (from any directory; about a minute on 2 cores).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash launch/setup.sh
PY=.venv/bin/python
TORCHRUN=.venv/bin/torchrun
export OMP_NUM_THREADS=1 AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
       AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p runs
.venv/bin/moto_server -H 127.0.0.1 -p "$PORT" >runs/moto.log 2>&1 &
MOTO=$!
trap 'kill $MOTO 2>/dev/null || true' EXIT
ENDPOINT="http://127.0.0.1:$PORT"
for _ in $(seq 50); do curl -s "$ENDPOINT" >/dev/null && break; sleep 0.2; done
"$PY" - "$ENDPOINT" <<'PYEOF'
import sys, boto3
boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1").create_bucket(Bucket="demo")
PYEOF
OPTS="{\"endpoint_url\": \"$ENDPOINT\"}"
MODEL=(--n-layer 2 --n-head 4 --n-embd 64 --block-size 64)
LORA=(--lora-rank 8 --lora-targets q,v,fc1,wte --lr 3e-3)
stage() { printf '\n==== %s ====\n' "$*"; }

stage "1/3 LoRA run, FSDP2 on 2 processes, checkpoints to s3://demo/run every 10 steps; pre-empted after step 20"
set +e
"$TORCHRUN" --standalone --nproc_per_node=2 launch/train.py --parallel fsdp "${MODEL[@]}" "${LORA[@]}" \
  --steps 40 --save-every 10 --keep-last 2 --resume auto --kill-after 20 \
  --ckpt-dir s3://demo/run --storage-options "$OPTS" 2>&1 | tail -n 5
set -e

stage "2/3 the same command on 3 processes: resumes from S3"
"$TORCHRUN" --standalone --nproc_per_node=3 launch/train.py --parallel fsdp "${MODEL[@]}" "${LORA[@]}" \
  --steps 40 --save-every 10 --keep-last 2 --resume auto \
  --ckpt-dir s3://demo/run --storage-options "$OPTS" 2>&1 | tee runs/demo_s3_stage2.log | grep -E "resumed|EVAL_LOSS"
"$PY" - "$OPTS" <<'PYEOF'
import json, sys, s3fs
fs = s3fs.S3FileSystem(**json.loads(sys.argv[1]))
print("s3://demo/run:", sorted(p.rsplit("/", 1)[-1] for p in fs.ls("demo/run")))
PYEOF

stage "3/3 inference: one process, no process group, loads s3://demo/run/step-00000040's model"
"$PY" launch/train.py --parallel none "${MODEL[@]}" --eval-only --sample 100 \
  --init-from s3://demo/run/step-00000040 --storage-options "$OPTS" 2>&1 | tee runs/demo_s3_stage3.log | tail -n 6
WANT=$(sed -n 's/^EVAL_LOSS //p' runs/demo_s3_stage2.log | tail -n 1)
GOT=$(sed -n 's/^EVAL_LOSS //p' runs/demo_s3_stage3.log | tail -n 1)
"$PY" -c "import sys; w, g = float('$WANT'), float('$GOT'); print(f'EVAL_LOSS {g} vs training {w}'); sys.exit(abs(w - g) > 1e-4)"
printf '\nS3 DEMO OK (%d s)\n' "$SECONDS"
