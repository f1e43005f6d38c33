#!/usr/bin/env bash
# End-to-end demo: one model through four configurations, each loading the last one's
# checkpoint with dcp_universal, with no conversion step in between.
#
#   1) pre-train, FSDP2 on 4 processes                        -> runs/demo/pretrain
#   2) LoRA fine-tune (rank 8), FSDP2 on 2 processes, merged  -> runs/demo/lora
#   3) load (2) into LoRA rank 4 on 3 processes: same EVAL_LOSS as (2)
#   4) load (2) in one process, no process group: same EVAL_LOSS, and a sample
#
# Usage: bash launch/demo.sh (from any directory). Runs on CPU (gloo), about 2 minutes on
# 2 cores. Logs go to runs/demo/*.log.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash launch/setup.sh
PY=.venv/bin/python
TORCHRUN=.venv/bin/torchrun
WORK=runs/demo
rm -rf "$WORK"
mkdir -p "$WORK"
# torchrun sets this anyway (with a warning); the ranks share 2 cores, so 1 thread each.
export OMP_NUM_THREADS=1

# Every stage builds the same base architecture; only wrapping and adapters change.
MODEL=(--n-layer 2 --n-head 4 --n-embd 64 --block-size 64)
TOL=1e-4

stage() { printf '\n==== %s ====\n' "$*"; }
eval_loss() { sed -n 's/^EVAL_LOSS //p' "$1" | tail -n 1; }
# same_loss NAME WANT GOT: exit 1 unless |WANT - GOT| <= TOL.
same_loss() {
  "$PY" - "$1" "$2" "$3" "$TOL" <<'EOF'
import sys
name, want, got, tol = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
ok = abs(want - got) <= tol
print(f"{name}: EVAL_LOSS {got:.6f} vs stage 2's {want:.6f} (|diff| {abs(want - got):.1e}, "
      f"tolerance {tol:g}): {'OK' if ok else 'MISMATCH'}")
sys.exit(0 if ok else 1)
EOF
}

stage "1/4 pre-train a plain GPT with FSDP2 on 4 processes, save to $WORK/pretrain"
"$TORCHRUN" --standalone --nproc_per_node=4 launch/train.py --parallel fsdp "${MODEL[@]}" \
  --steps 150 --lr 2e-3 --ckpt-dir "$WORK/pretrain" 2>&1 | tee "$WORK/stage1.log"

stage "2/4 LoRA fine-tune (rank 8 on q,v,fc1,wte) with FSDP2 on 2 processes, save merged to $WORK/lora"
"$TORCHRUN" --standalone --nproc_per_node=2 launch/train.py --parallel fsdp "${MODEL[@]}" \
  --init-from "$WORK/pretrain" --lora-rank 8 --lora-alpha 16 --lora-targets q,v,fc1,wte \
  --steps 100 --lr 3e-3 --seed 1 --ckpt-dir "$WORK/lora" 2>&1 | tee "$WORK/stage2.log"
WANT=$(eval_loss "$WORK/stage2.log")
[ -n "$WANT" ] || { echo "stage 2 printed no EVAL_LOSS line" >&2; exit 1; }

stage "3/4 load stage 2's merged model into LoRA rank 4 with FSDP2 on 3 processes, evaluate only"
"$TORCHRUN" --standalone --nproc_per_node=3 launch/train.py --parallel fsdp "${MODEL[@]}" \
  --init-from "$WORK/lora" --lora-rank 4 --lora-targets q,v,fc1,wte --eval-only \
  2>&1 | tee "$WORK/stage3.log"
same_loss "stage 3 (FSDP2 x3, LoRA rank 4)" "$WANT" "$(eval_loss "$WORK/stage3.log")"

stage "4/4 inference: load stage 2's model in one process with no process group, sample 200 bytes"
"$PY" launch/train.py --parallel none "${MODEL[@]}" --init-from "$WORK/lora" --eval-only \
  --sample 200 2>&1 | tee "$WORK/stage4.log"
same_loss "stage 4 (one process, plain model)" "$WANT" "$(eval_loss "$WORK/stage4.log")"

printf '\nDEMO OK (%d s)\n' "$SECONDS"
