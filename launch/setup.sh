#!/usr/bin/env bash
# Idempotent set-up: a .venv at the repo root with torch, this package and its test extras.
# torch is installed as the exact CPU release first, because a bare `torch` requirement in
# a fresh venv may resolve to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install -q torch==2.13.0
fi
# dev includes bitsandbytes (QLoRA tests): it requires torch>=2.4, so the torch above stays
.venv/bin/pip install -q -e ".[dev,peft,hf]"
