#!/usr/bin/env bash
# End-to-end demo: one model through five configurations, each loading the last one's
# checkpoint with dcp_universal, with no conversion step in between.
#
#   1) pre-train, FSDP2 on 4 processes                    -> runs/demo/pretrain/step-00000150
#   2) LoRA fine-tune (rank 8), FSDP2 on 2 processes, saving every 20 steps under
#      runs/demo/lora asynchronously (training stalls only for the snapshot); killed
#      right after step 40 (a simulated pre-emption, once step 40 is committed)
#   3) resume it on 3 processes (--resume auto): the data order continues where the 2
#      processes stopped; train on to step 100, saved merged -> runs/demo/lora/step-00000100
#   4) load (3) into LoRA rank 4 on a 2-D mesh (FSDP x TP, 4 processes): same EVAL_LOSS
#   5) load (3) in one process, no process group: same EVAL_LOSS, and a sample
#   6) export (3) as Hugging Face safetensors (bf16 and fp32), and start a one-process
#      evaluation from the fp32 export: same EVAL_LOSS
#
# Usage: bash launch/demo.sh (from any directory). Runs on CPU (gloo), about 2 minutes on
# 2 CPU cores once set up. Logs go to runs/demo/*.log.
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
# The fine-tune's flags, identical for the first launch and the relaunch after the kill.
LORA=(--parallel fsdp "${MODEL[@]}" --init-from "$WORK/pretrain/step-00000150"
      --lora-rank 8 --lora-alpha 16 --lora-targets q,v,fc1,wte --steps 100 --lr 3e-3 --seed 1
      --ckpt-dir "$WORK/lora" --save-every 20 --keep-last 2 --resume auto --async-save)
FINAL="$WORK/lora/step-00000100"
TOL=1e-4

stage() { printf '\n==== %s ====\n' "$*"; }
die() { echo "DEMO FAILED: $*" >&2; exit 1; }
eval_loss() { sed -n 's/^EVAL_LOSS //p' "$1" | tail -n 1; }
show_root() { echo "\$ ls -F $1"; ls -F "$1"; }
# same_loss NAME WANT GOT: exit 1 unless |WANT - GOT| <= TOL.
same_loss() {
  "$PY" - "$1" "$2" "$3" "$TOL" <<'PYEOF'
import sys
name, want, got, tol = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
ok = abs(want - got) <= tol
print(f"{name}: EVAL_LOSS {got:.6f} vs the fine-tune's {want:.6f} (|diff| {abs(want - got):.1e}, "
      f"tolerance {tol:g}): {'OK' if ok else 'MISMATCH'}")
sys.exit(0 if ok else 1)
PYEOF
}

stage "1/6 pre-train a plain GPT with FSDP2 on 4 processes, save the last step under $WORK/pretrain"
"$TORCHRUN" --standalone --nproc_per_node=4 launch/train.py --parallel fsdp "${MODEL[@]}" \
  --steps 150 --lr 2e-3 --ckpt-dir "$WORK/pretrain" 2>&1 | tee "$WORK/stage1.log"

stage "2/6 LoRA fine-tune (rank 8 on q,v,fc1,wte) with FSDP2 on 2 processes, saving every 20 steps; killed after step 40"
# Run to a log and show the trainer's lines only: torchrun's failure report that follows a
# killed job is expected here (it stays in the log).
status=0
"$TORCHRUN" --standalone --nproc_per_node=2 launch/train.py "${LORA[@]}" --kill-after 40 \
  > "$WORK/stage2.log" 2>&1 || status=$?
sed '/simulating pre-emption/q' "$WORK/stage2.log"
[ "$status" -ne 0 ] && grep -q "simulating pre-emption (step saved)" "$WORK/stage2.log" \
  || { cat "$WORK/stage2.log"; die "stage 2 should have been killed right after saving step 40"; }
echo "(torchrun exited with status $status, as a pre-empted job does; its report is in $WORK/stage2.log)"
show_root "$WORK/lora"

stage "3/6 relaunch the fine-tune on 3 processes: it resumes from step 40 to 100, the data order continuing where 2 processes stopped"
"$TORCHRUN" --standalone --nproc_per_node=3 launch/train.py "${LORA[@]}" \
  2>&1 | tee "$WORK/stage3.log"
grep -q "^resumed $WORK/lora/step-00000040 .* at step 40," "$WORK/stage3.log" \
  || die "stage 3 did not resume from step 40"
WANT=$(eval_loss "$WORK/stage3.log")
[ -n "$WANT" ] || die "stage 3 printed no EVAL_LOSS line"
# keep-last 2 leaves the two newest steps; only the last holds the merged model/. The base
# is the frozen weights, written once (and once more after the move to 3 processes, as the
# base's fingerprint includes its sharding; the old one goes with the last step using it).
show_root "$WORK/lora"
show_root "$FINAL"
if [ -d "$FINAL/model" ]; then
  echo "\$ .venv/bin/dcp-universal inspect $FINAL"
  .venv/bin/dcp-universal inspect "$FINAL"
fi

stage "4/6 load the final step into LoRA rank 4 on a 2-D mesh: FSDP x TP, (dp 2, tp 2) on 4 processes, evaluate only"
"$TORCHRUN" --standalone --nproc_per_node=4 launch/train.py --parallel fsdp --tp 2 "${MODEL[@]}" \
  --init-from "$FINAL" --lora-rank 4 --lora-targets q,v,fc1,wte --eval-only \
  2>&1 | tee "$WORK/stage4.log"
same_loss "stage 4 (FSDP x TP (2, 2), LoRA rank 4)" "$WANT" "$(eval_loss "$WORK/stage4.log")"

stage "5/6 inference: load the final step in one process with no process group, sample 200 bytes"
"$PY" launch/train.py --parallel none "${MODEL[@]}" --init-from "$FINAL" --eval-only \
  --sample 200 2>&1 | tee "$WORK/stage5.log"
same_loss "stage 5 (one process, plain model)" "$WANT" "$(eval_loss "$WORK/stage5.log")"

stage "6/6 hand-off: export the final step as Hugging Face safetensors; evaluate from the export"
.venv/bin/dcp-universal export "$FINAL" "$WORK/hf-bf16" --format hf --dtype bfloat16 --max-shard-size 200KB
.venv/bin/dcp-universal export "$FINAL" "$WORK/hf" --format hf
show_root "$WORK/hf-bf16"
"$PY" launch/train.py --parallel none "${MODEL[@]}" --init-from "$WORK/hf" --eval-only \
  2>&1 | tee "$WORK/stage6.log"
same_loss "stage 6 (one process, from the HF export)" "$WANT" "$(eval_loss "$WORK/stage6.log")"

printf '\nDEMO OK (%d s)\n' "$SECONDS"
