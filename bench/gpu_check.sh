#!/usr/bin/env bash
# One-command GPU check (no hub access needed): random-init Qwen3-1.7B-shape models, every headline
# method in bf16 with fp32 master weights: tokens/s, MFU, peak memory, and FORA's dW Q ~ 0 under bf16.
# Writes bench/results/gpu_check.json and .md. About 5 minutes on one H100/H200.
#   bash bench/gpu_check.sh                       # defaults: 2 layers, 8 x 1024 tokens per step, 20 steps
#   bash bench/gpu_check.sh --peak-tflops 989     # when the device name is not in the table
#   bash bench/gpu_check.sh --smoke               # CPU: tiny widths, a few steps
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec timeout 900 "$PYTHON" bench/gpu_check.py "$@"
