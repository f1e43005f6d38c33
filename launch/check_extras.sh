#!/usr/bin/env bash
# Each extra, installed alone into a clean venv as a user would (not editable), runs the
# feature it exists for (launch/smoke_extra.py); the core install alone must name the
# extra a feature needs. CI runs it after the tests; it needs .venv (moto's S3 server).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
moto_pid=
cleanup() { [ -n "$moto_pid" ] && kill "$moto_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

port=$(.venv/bin/python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
    .venv/bin/moto_server -H 127.0.0.1 -p "$port" > "$work/moto.log" 2>&1 &
moto_pid=$!

for extra in core hf s3 peft progress bench; do
    start=$SECONDS
    python3 -m venv "$work/venv-$extra"
    pip="$work/venv-$extra/bin/pip"
    "$pip" install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
    spec=.
    [ "$extra" != core ] && spec=".[$extra]"
    "$pip" install -q "$spec" 2>&1 | grep -v "^WARNING: Location" || true
    mkdir -p "$work/run-$extra"
    (cd "$work/run-$extra" && AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
        AWS_EC2_METADATA_DISABLED=true "$work/venv-$extra/bin/python" \
        "$OLDPWD/launch/smoke_extra.py" "$extra" "$work/run-$extra" "http://127.0.0.1:$port")
    if [ "$extra" = core ]; then  # the README's loop: 2 processes, resumed on 3
        (cd "$work/run-core" && for n in 2 3; do
            "$work/venv-core/bin/torchrun" --standalone --nproc_per_node=$n \
                "$OLDPWD/examples/train.py" loop > "loop-$n.log" 2>&1 \
                || { cat "loop-$n.log"; exit 1; }
        done && grep -q "resumed step 20" loop-3.log && echo "core loop: 2 processes, resumed on 3: ok")
    fi
    echo "  ($((SECONDS - start)) s)"
done
