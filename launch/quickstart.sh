#!/usr/bin/env bash
# Fresh machine -> a short real pretraining run, in one command:
#   1. tools/setup_env.sh: ./.venv with the pinned CPU stack (torch 2.13.0 CPU, deepspeed 0.19.8, ...)
#   2. launch/run_demo.sh: llama-tiny on the Python standard library sources, 2 processes through the
#      deepspeed launcher on CPU, GradientStabilizer on (SHAPER=spamp for SPAMP), printing loss,
#      validation loss and shaping statistics.
# Extra arguments go to launch/pretrain.py; SHAPER, ITERS, ZERO, NPROC as in run_demo.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
exec bash launch/run_demo.sh "$@"
