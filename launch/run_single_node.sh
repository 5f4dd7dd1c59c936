#!/usr/bin/env bash
# Single node: NPROC processes (GPUs, or CPU ranks) through the deepspeed launcher.
#
#   NPROC=2 bash launch/run_single_node.sh --deepspeed_config configs/deepspeed/zero1_bf16_spamp.json \
#       --train-iters 200
#
# Every argument goes to launch/pretrain.py. Without a visible GPU the run uses DeepSpeed's CPU
# accelerator (gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${DS_ACCELERATOR:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    export DS_ACCELERATOR=cpu
fi
exec deepspeed --num_gpus "$NPROC" --master_port "$MASTER_PORT" launch/pretrain.py "$@"
